"""Two torchrun "nodes" on localhost (a c10d rendezvous) train exactly as one process does.

Each node is its own ``torchrun --nnodes 2 --nproc-per-node 1`` process, as on two machines
of a cluster; the two ranks form a CP = 2 group across the nodes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.helpers.cli import assert_same_records, tiny_args, train_records


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_nodes_match_one_process(run_root, reference):
    # The data is prepared once (as a login node would: the session's one-process reference
    # run did it in run_root/cache); both nodes then read the cache.
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    nodes = []
    for node_rank in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "multinode-test",
            "-m", "multitoken", *tiny_args(run_root, "run.name=nodes", "parallel.cp=2"),
        ]  # fmt: skip
        nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in nodes:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
    assert_same_records(train_records(run_root / "nodes"), train_records(reference))
