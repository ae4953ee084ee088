"""What one training step costs per parallel layout: collectives, bytes, memory and time.

Every layout runs the library's own training path on gloo ranks spawned by this script:
``setup_dims`` (the ``(dp, cp, tp)`` groups), ``build_model`` (tensor parallelism, then the
CP hooks, then FSDP2 over dp x cp, as ``multitoken train`` builds it), ``build_optimizer``
(AdamW), then per step ``prepare_step`` (this rank's rows and CP shard, the normaliser's
all_reduce), ``step_loss``, backward, ``clip_grad_norm``, the optimiser step. Layouts: the
(tp, cp) grid {(1,1), (2,1), (1,2), (2,2), (4,1), (1,4)} (TP with sequence parallelism, and tp 2
without it), then FSDP2 dp = 2 and dp 2 x tp 2.
Under CP the model is sharded with FSDP2 over the CP ranks too (they hold different tokens).

Per rank and step, after one warm-up step:

* collectives: calls and bytes this rank hands to ``torch.distributed`` by kind
  (``all_gather``, ``reduce_scatter``, ``all_reduce``, ``all_to_all``), counted by
  ``count_comms`` over one whole step (DTensor's and FSDP2's functional collectives included),
  mean over ranks; and what the rank *sends* under the ring algorithms (an all-gather hands
  in its shard but forwards n - 1 shards, a reduce-scatter sends (n - 1) / n of its input, an
  all-reduce twice that): the bytes to compare layouts by;
* memory: ``state`` = the bytes of this rank's local parameters, gradients and AdamW state
  (exact, from the tensors: DTensor and FSDP2 shards count their local part); ``step peak`` =
  the peak of tensor allocations during one step above its start (``torch.profiler`` memory
  events: activations, gathered parameters, temporaries); ``RSS`` = ``ru_maxrss`` of the rank
  process, and its rise from before the model was built (the model is built whole on every
  rank, then sharded, so this includes one whole copy); the largest rank of each;
* time: wall-clock seconds of the slowest rank per step, median over the timed steps, and the
  CPU seconds of all ranks together per step (what the layout costs in compute: on a machine
  with fewer cores than ranks, wall time is the CPU time shared out over the cores).

The step-1 loss (summed over the ranks with other tokens) is the same for every layout: the
layouts train the same model on the same batch.

    python bench/parallel.py            # dim 512, 8 layers, vocab 32k, D = 1 (43M parameters)
    python bench/parallel.py --quick    # a tiny model, ~1 min
    python bench/parallel.py --pipeline --quick   # the pipeline schedules (bench/_pipeline.py)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    PeakMemory,
    base_parser,
    emit_json,
    environment,
    print_table,
    random_doc_lengths,
    setup_threads,
)
from multitoken import MTPConfig, SequenceLayout, next_token_labels, step_loss  # noqa: E402
from multitoken.data import dp_slice  # noqa: E402
from multitoken.models import GPTConfig  # noqa: E402
from multitoken.parallel import clip_grad_norm  # noqa: E402
from multitoken.testing.comms import count_comms  # noqa: E402
from multitoken.train.batching import rank_batch  # noqa: E402
from multitoken.train.config import DataSection, ParallelSection, TrainConfig  # noqa: E402
from multitoken.train.model import build_model  # noqa: E402
from multitoken.train.optim import build_optimizer  # noqa: E402
from multitoken.train.ranks import setup_dims  # noqa: E402

PAD = 0
# (dp, cp, tp, sequence parallelism), in the order of the table.
LAYOUTS = [
    (1, 1, 1, True),
    (1, 1, 2, True),
    (1, 1, 2, False),
    (1, 2, 1, True),
    (1, 2, 2, True),
    (1, 1, 4, True),
    (1, 4, 1, True),
    (2, 1, 1, True),
    (2, 1, 2, True),
]
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
MIB = 2**20


def layout_name(dp: int, cp: int, tp: int, sp: bool = True) -> str:
    name = f"dp{dp} tp{tp}" if dp > 1 else f"tp{tp} cp{cp}"
    return name if sp or tp == 1 else f"{name} no-SP"


def make_config(args, dp: int, cp: int, tp: int, sp: bool = True) -> TrainConfig:
    model = GPTConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        max_seq_len=args.seqlen,
    )
    return TrainConfig(
        model=model,
        mtp=MTPConfig(num_depths=args.depth),
        data=DataSection(vocab_size=args.vocab, seq_len=args.seqlen, batch_size=args.rows),
        parallel=ParallelSection(dp=dp, cp=cp, tp=tp, sequence_parallel=sp),
    )


def global_batch(args) -> dict[str, torch.Tensor]:
    """What the loader yields: ``rows`` packed rows of ``docs`` random documents each, every
    length a multiple of 8 (``data.align``: the packer pads pieces to it)."""
    gen = torch.Generator().manual_seed(args.seed)
    align = 8
    lengths = [
        [align * n for n in random_doc_lengths(args.seqlen // align, args.docs, gen)]
        for _ in range(args.rows)
    ]
    layout = SequenceLayout.from_lengths(lengths)
    ids = torch.randint(1, args.vocab, (args.rows, args.seqlen), generator=gen)
    flat = torch.tensor([n for row in lengths for n in row])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), flat.cumsum(0)])
    return dict(input_ids=ids, labels=next_token_labels(ids, layout), cu_seqlens=cu_seqlens)


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def kind_of(name: str) -> str:
    return next((kind for kind in KINDS if name.startswith(kind)), name)


def ring_bytes(kind: str, nbytes: int, ranks: int) -> float:
    """What one rank sends for a collective under the ring algorithms (NCCL's for large
    messages): an all-gather forwards the ``n - 1`` other shards, a reduce-scatter ``(n - 1) /
    n`` of its input, an all-reduce (a reduce-scatter then an all-gather) twice that."""
    factor = {
        "all_gather": ranks - 1,
        "reduce_scatter": (ranks - 1) / ranks,
        "all_reduce": 2 * (ranks - 1) / ranks,
        "all_to_all": (ranks - 1) / ranks,
    }
    return nbytes * factor.get(kind, 1)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_rank(rank: int, world: int, store_path: str, out_dir: str, layout, args) -> None:
    dp, cp, tp, sp = layout
    os.environ.update(
        GLOO_SOCKET_IFNAME="lo", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(args.threads)
    if world > 1:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    cfg = make_config(args, dp, cp, tp, sp)
    device = torch.device("cpu")
    ranks = setup_dims(cfg, device)  # joins the initialised group, builds the mesh's groups
    batch = global_batch(args)
    rss_before = max_rss_bytes()

    model, cross_entropy = build_model(cfg, args.vocab, PAD, ranks, device)
    optimizer = build_optimizer(model, cfg)
    state: dict[str, int] = {}

    def measure_state() -> None:
        opt_state = [t for s in optimizer.state.values() for t in s.values()]
        state["params"] = local_bytes(model.parameters())
        state["grads"] = local_bytes(p.grad for p in model.parameters())
        state["optimizer"] = local_bytes(opt_state)

    def train_step(after_update=None):
        """The trainer's step (``Trainer.train_step``) on a fixed global batch."""
        rows = dp_slice(batch, ranks.dp_rank, ranks.dp)  # what this rank's loader yields
        step_batch = rank_batch(
            rows, ranks, cfg.mtp.num_depths, PAD, device, cfg.parallel.halo_fill
        )
        losses = step_loss(model, step_batch, cfg.mtp.loss_weight, cross_entropy=cross_entropy)
        losses.loss.backward()
        clip_grad_norm(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        if after_update is not None:
            after_update()
        optimizer.zero_grad(set_to_none=True)
        return losses

    def barrier() -> None:
        if ranks.world_group is not None:
            dist.barrier(group=ranks.world_group)

    first_loss = train_step().loss.item()  # warm-up: FSDP2's lazy init, optimiser state
    with count_comms() as log:
        train_step()
    comms: dict[str, list[float]] = {}
    for record in log.records:
        kind = kind_of(record.name)
        count_bytes = comms.setdefault(kind, [0, 0, 0.0])
        count_bytes[0] += 1
        count_bytes[1] += record.nbytes
        count_bytes[2] += ring_bytes(kind, record.nbytes, dist.get_world_size(record.group))
    barrier()
    memory = PeakMemory()
    with memory.measure():
        train_step(measure_state)
    wall, cpu = [], []
    for _ in range(args.steps):
        barrier()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        train_step()
        took = torch.tensor([time.perf_counter() - start_wall])
        cpu.append(time.process_time() - start_cpu)
        if ranks.world_group is not None:
            dist.all_reduce(took, op=dist.ReduceOp.MAX, group=ranks.world_group)
        wall.append(float(took))
    result = dict(
        rank=rank,
        coords=(ranks.dp_rank, ranks.cp_rank, ranks.tp_rank),
        first_loss=first_loss,
        comms=comms,
        state=state,
        step_peak=memory.peak_bytes,
        rss=max_rss_bytes(),
        rss_rise=max_rss_bytes() - rss_before,
        parameters=sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters()
        ),
        wall=wall,
        cpu=cpu,
    )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run_layout(layout, args) -> list[dict]:
    world = layout[0] * layout[1] * layout[2]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            run_rank,
            args=(world, os.path.join(tmp, "store"), tmp, layout, args),
            nprocs=world,
            start_method="forkserver",
        )
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def summarize(layout, per_rank: list[dict]) -> dict:
    dp, cp, tp, sp = layout
    world = len(per_rank)
    comms = {}
    for kind in sorted({k for r in per_rank for k in r["comms"]}):
        calls = [r["comms"].get(kind, [0, 0, 0.0]) for r in per_rank]
        comms[kind] = dict(
            calls=sum(c[0] for c in calls) / world,
            bytes=sum(c[1] for c in calls) / world,
            ring_bytes=sum(c[2] for c in calls) / world,
        )
    steps = len(per_rank[0]["wall"])
    return dict(
        layout=dict(dp=dp, cp=cp, tp=tp, sequence_parallel=sp),
        name=layout_name(dp, cp, tp, sp),
        world=world,
        # The loss of the ranks with other tokens adds up to the global one (TP peers repeat it).
        loss=sum(r["first_loss"] for r in per_rank if r["coords"][2] == 0),
        comms=comms,
        parameters_per_rank=max(r["parameters"] for r in per_rank),
        state_bytes=max(sum(r["state"].values()) for r in per_rank),
        state_detail=per_rank[0]["state"],
        step_peak_bytes=max(r["step_peak"] for r in per_rank),
        rss_bytes=max(r["rss"] for r in per_rank),
        rss_rise_bytes=max(r["rss_rise"] for r in per_rank),
        wall_s=statistics.median(per_rank[0]["wall"]),  # already the slowest rank's
        cpu_s_all_ranks=statistics.median(sum(r["cpu"][i] for r in per_rank) for i in range(steps)),
    )


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--depth", type=int, default=1, help="MTP depth D")
    parser.add_argument("--rows", type=int, default=2, help="rows of the global batch")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--docs", type=int, default=4, help="documents per row")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    parser.add_argument("--pipeline", action="store_true", help="the pp schedules' rows instead")
    parser.add_argument("--pp", type=int, default=2, help="pipeline ranks (--pipeline)")
    parser.add_argument("--microbatches", type=int, default=0, help="per step; 0 = 2 pp")
    args = parser.parse_args()
    if args.pipeline:
        setup_threads(args.threads, "wall")
        args.clock = "wall"
        multiprocessing.set_forkserver_preload(["torch", "multitoken.train.step", "_common"])
        import _pipeline

        _pipeline.main(args, global_batch)
        return
    if args.quick:
        args.dim, args.layers, args.vocab, args.seqlen, args.steps = 64, 2, 4096, 128, 2
    # Wall clock for the steps whatever --clock says (waiting for peers is part of the cost);
    # CPU time is reported next to it.
    setup_threads(args.threads, "wall")
    args.clock = "wall"
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    # Ranks fork from a server that imported these once (seconds saved per rank and layout).
    multiprocessing.set_forkserver_preload(["torch", "multitoken.train.step", "_common"])
    rows = []
    for layout in LAYOUTS:
        start = time.perf_counter()
        rows.append(summarize(layout, run_layout(layout, args)))
        print(f"{rows[-1]['name']}: {time.perf_counter() - start:.0f} s", file=sys.stderr)

    model = asdict(make_config(args, 1, 1, 1).model)
    kinds = [k for k in KINDS if any(k in r["comms"] for r in rows)]
    kinds += sorted({k for r in rows for k in r["comms"]} - set(kinds))
    comm_table = []
    for r in rows:
        cells = [r["name"], r["world"]]
        for kind in kinds:
            c = r["comms"].get(kind, dict(calls=0, bytes=0))
            cells += [f"{c['calls']:.0f}", f"{c['bytes'] / MIB:.2f}"]
        cells.append(f"{sum(c['bytes'] for c in r['comms'].values()) / MIB:.2f}")
        cells.append(f"{sum(c['ring_bytes'] for c in r['comms'].values()) / MIB:.2f}")
        comm_table.append(cells)
    columns = ["layout", "ranks"]
    for kind in kinds:
        columns += [f"{kind} n", f"{kind} MiB"]
    print_table(
        f"Collectives per rank and training step (mean over ranks; dim {args.dim}, "
        f"{args.layers} layers, vocab {args.vocab}, D={args.depth}, "
        f"{args.rows} x {args.seqlen} tokens)",
        [*columns, "total MiB", "sent MiB (ring)"],
        comm_table,
    )
    print_table(
        "Memory per rank (largest rank) and time per step (noisy: shared CPU, gloo)",
        [
            "layout",
            "ranks",
            "params/rank",
            "state MiB",
            "step peak MiB",
            "RSS MiB",
            "RSS rise MiB",
            "wall s",
            "CPU s (all ranks)",
            "step-1 loss",
        ],
        [
            [
                r["name"],
                r["world"],
                f"{r['parameters_per_rank'] / 1e6:.1f}M",
                f"{r['state_bytes'] / MIB:.0f}",
                f"{r['step_peak_bytes'] / MIB:.0f}",
                f"{r['rss_bytes'] / MIB:.0f}",
                f"{r['rss_rise_bytes'] / MIB:.0f}",
                f"{r['wall_s']:.2f}",
                f"{r['cpu_s_all_ranks']:.2f}",
                f"{r['loss']:.6f}",
            ]
            for r in rows
        ],
    )
    emit_json(dict(bench="parallel", args=vars(args), model=model, env=environment(), rows=rows))


if __name__ == "__main__":
    main()
