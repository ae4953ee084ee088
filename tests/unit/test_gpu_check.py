"""bench/gpu_check.py (``make gpu-check``) imports, parses and runs its comparisons on CPU.

The script's real work needs an NVIDIA GPU; here its argument handling, the no-GPU path and
the comparison logic of the cheap checks run in ``--cpu-smoke`` mode (the CPU in place of the
GPU, fp32), and a deliberately spoiled reference must make a check FAIL.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
# In-process and cheap on CPU; compiled_decode (training a model), nccl_parallel and fsdp2
# (spawned ranks, each importing torch) take longer and are left to `--cpu-smoke` by hand.
CHEAP = ["train_bf16", "flex_attention", "preflight_memory", "throughput"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def run(gpu_check, tmp_path, *argv) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    code = gpu_check.main([*argv, "--json", str(out)])
    return code, json.loads(out.read_text())


def test_help_and_list(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.parse_args(["--help"])
    assert exit_.value.code == 0
    assert "--cpu-smoke" in capsys.readouterr().out
    assert gpu_check.main(["--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names == gpu_check.NAMES and len(names) == 8
    assert gpu_check.parse_args(["--only", "fsdp2,throughput"]).selected == ["fsdp2", "throughput"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "nope"])


def test_without_a_gpu_every_check_is_skipped(gpu_check, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, record = run(gpu_check, tmp_path)
    assert code == 0
    assert capsys.readouterr().out.startswith("no CUDA device")
    assert [c["check"] for c in record["checks"]] == gpu_check.NAMES
    assert {c["status"] for c in record["checks"]} == {"SKIP"}


def test_cpu_smoke_passes_and_a_spoiled_reference_fails(gpu_check, tmp_path, capsys):
    code, record = run(gpu_check, tmp_path, "--cpu-smoke", "--only", ",".join(CHEAP))
    table = capsys.readouterr().out
    assert code == 0, table
    assert record["mode"] == "cpu-smoke" and record["failed"] == 0
    assert {c["check"] for c in record["checks"]} == set(CHEAP)
    assert {c["status"] for c in record["checks"]} == {"PASS"}, table
    assert "max abs/rel error" in table and table.rstrip().splitlines()[-1].startswith("{")

    only = "train_bf16,flex_attention"  # equalities (preflight checks a bound)
    code, record = run(gpu_check, tmp_path, "--cpu-smoke", "--perturb-reference", "--only", only)
    assert code == 1
    status = {c["check"]: c["status"] for c in record["checks"]}
    assert status == dict.fromkeys(only.split(","), "FAIL"), record["checks"]


def test_a_crashing_check_fails_alone(gpu_check, tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    checks = [(n, boom if n == "train_bf16" else f, t) for n, f, t in gpu_check.CHECKS]
    monkeypatch.setattr(gpu_check, "CHECKS", checks)
    code, record = run(gpu_check, tmp_path, "--cpu-smoke", "--only", "train_bf16,flex_attention")
    assert code == 1
    rows = {c["check"]: c for c in record["checks"]}
    assert rows["train_bf16"]["status"] == "FAIL"
    assert "illegal memory access" in rows["train_bf16"]["reason"]
    assert rows["flex_attention"]["status"] == "PASS"
