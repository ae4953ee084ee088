"""The pipeline rows of ``bench/parallel.py`` (``--pipeline``): what each schedule costs.

Every schedule runs the trainer's pipeline path on ``pp`` gloo ranks: ``setup_dims``,
``build_model``, ``build_pipeline`` (the stages, PyTorch's schedule), ``build_optimizer``, then
per step ``rank_batch``, ``Pipeline.step`` (every microbatch's forward and backward),
``Pipeline.grad_norm`` (clipped), AdamW. A one-process row (no pipeline) is the baseline.

Per rank and step, after one warm-up step (the schedule's shape inference):

* **bubble, measured**: the time the rank spends blocked waiting for its point-to-point
  messages (every wait of the schedules goes through ``schedules._wait_batch_p2p``, timed
  here), over the wall time of ``Pipeline.step`` (every microbatch's forward and backward,
  the losses' broadcast, the embedding copies' sum; ``step s``, the slowest rank's), the
  median of the timed steps; the table gives the mean over the ranks and each rank's. It
  includes the transfer time and any wait for a descheduled peer on a shared machine.
* **bubble, theory**: ``(p - 1) / (m + p - 1)`` for GPipe and 1F1B, ``(p - 1) / (v m + p -
  1)`` for the looped schedules with ``v`` stages per rank (equal stages, backward a fixed
  multiple of forward); none given for the zero-bubble ones (it depends on the ratio of the
  input- and weight-gradient passes; 0 in their ideal). The stages are not equal: the last
  one holds the head, the MTP depths and the embedding copy, so GPipe and 1F1B also get the
  bubble their formula gives with each rank's measured compute (:func:`stage_bubbles`).
* **activation memory**: the peak of tensor allocations during ``Pipeline.step`` above its
  start, the gradient buffers already allocated (``torch.profiler`` memory events): the
  activations the schedule keeps in flight plus temporaries.
* **bytes sent**: the schedule's ``isend`` bytes per rank and step (``count_comms``), and the
  step's collectives (the losses' broadcast, the embedding copies' gradient sum).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.pipelining import schedules

from _common import PeakMemory, emit_json, environment, print_table
from multitoken import MTPConfig, step_loss
from multitoken.data import dp_slice
from multitoken.models import GPTConfig
from multitoken.parallel.pipeline import stages_per_rank
from multitoken.testing.comms import count_comms
from multitoken.train.batching import rank_batch
from multitoken.train.config import DataSection, ParallelSection, TrainConfig
from multitoken.train.model import build_model, build_pipeline
from multitoken.train.optim import build_optimizer
from multitoken.train.ranks import setup_dims

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble",
             "ZBVZeroBubble", "DualPipeV")  # fmt: skip
MIB = 2**20
PAD = 0
_IDLE = [0.0]  # seconds this rank spent blocked in the schedule's p2p waits


def _timed_wait(work) -> None:
    start = time.perf_counter()
    for w in work:
        w.wait()
    _IDLE[0] += time.perf_counter() - start


def theory(schedule: str, pp: int, microbatches: int) -> float | None:
    """The schedule's bubble fraction with equal stages (module docstring); None: no formula."""
    if schedule in ("GPipe", "1F1B"):
        return (pp - 1) / (microbatches + pp - 1)
    if schedule in ("Interleaved1F1B", "LoopedBFS"):
        v = stages_per_rank(schedule)
        return (pp - 1) / (v * microbatches + pp - 1)
    return None


def make_config(args, schedule: str | None) -> TrainConfig:
    model = GPTConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                      n_heads=args.heads, n_kv_heads=args.kv_heads,
                      max_seq_len=args.seqlen)  # fmt: skip
    pp = 1 if schedule is None else args.pp
    parallel = ParallelSection(cp=1, pp=pp, pp_schedule=schedule or "1F1B",
                               pp_microbatches=args.microbatches if pp > 1 else 0)  # fmt: skip
    data = DataSection(vocab_size=args.vocab, seq_len=args.seqlen, batch_size=args.rows)
    return TrainConfig(model=model, mtp=MTPConfig(num_depths=args.depth), data=data,
                       parallel=parallel)  # fmt: skip


def run_rank(rank: int, world: int, store_path: str, out_dir: str, schedule, args, batch) -> None:
    os.environ.update(GLOO_SOCKET_IFNAME="lo", WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                                world_size=world)  # fmt: skip
    schedules._wait_batch_p2p = _timed_wait  # looked up at every call by the schedules
    cfg, device = make_config(args, schedule), torch.device("cpu")
    ranks = setup_dims(cfg, device)
    model, cross_entropy = build_model(cfg, args.vocab, PAD, ranks, device)
    pipe = build_pipeline(cfg, model, cross_entropy, ranks, device)
    optimizer = build_optimizer(model, cfg)
    weight = cfg.mtp.loss_weight

    def forward_backward():
        step_batch = rank_batch(dp_slice(batch, 0, 1), ranks, cfg.mtp.num_depths, PAD, device)
        if pipe is not None:
            return pipe.step(step_batch, weight)
        losses = step_loss(model, step_batch, weight, cross_entropy=cross_entropy)
        losses.loss.backward()
        return losses

    def train_step(memory: PeakMemory | None = None, times: list | None = None):
        start, _IDLE[0] = time.perf_counter(), 0.0
        if memory is None:
            losses = forward_backward()
        else:
            with memory.measure():
                losses = forward_backward()
        if times is not None:  # the schedule's run: every microbatch's forward and backward
            times.append((time.perf_counter() - start, _IDLE[0]))
        if pipe is not None:
            pipe.grad_norm(cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the buffers stay: the peak is activations
        return losses

    def barrier() -> None:
        if world > 1:
            dist.barrier(group=ranks.world_group)

    first_loss = train_step().loss.item()
    with count_comms() as log:
        train_step()
    memory = PeakMemory()
    train_step(memory)
    times: list[tuple[float, float]] = []
    for _ in range(args.steps):
        barrier()
        train_step(times=times)
    wall, idle = [t[0] for t in times], [t[1] for t in times]
    sends = [r for r in log.records if r.name == "isend"]
    collectives = [r for r in log.records if r.kind == "collective"]
    result = dict(
        rank=rank, first_loss=first_loss, wall=wall, idle=idle, activation_peak=memory.peak_bytes,
        sends=len(sends), sent_bytes=sum(r.nbytes for r in sends),
        collectives=len(collectives), collective_bytes=sum(r.nbytes for r in collectives),
        parameters=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run_schedule(schedule: str | None, args, batch) -> list[dict]:
    world = 1 if schedule is None else args.pp
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(run_rank, args=(world, os.path.join(tmp, "store"), tmp, schedule,
                                           args, batch),
                           nprocs=world, start_method="forkserver")  # fmt: skip
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def summarize(schedule: str | None, args, per_rank: list[dict]) -> dict:
    fractions = [
        statistics.median(i / w for i, w in zip(r["idle"], r["wall"])) for r in per_rank
    ]  # fmt: skip
    # The slowest rank's wall time per step, median over the steps.
    wall = statistics.median(max(r["wall"][i] for r in per_rank) for i in range(args.steps))
    pipelined = schedule is not None
    predicted = None
    if pipelined and stages_per_rank(schedule) == 1:
        predicted = statistics.mean(stage_bubbles(per_rank, args.microbatches))
    return dict(
        schedule=schedule or "one process",
        pp=args.pp if pipelined else 1,
        stages_per_rank=stages_per_rank(schedule) if pipelined else 1,
        microbatches=args.microbatches if pipelined else 1,
        bubble_theory=theory(schedule, args.pp, args.microbatches) if pipelined else 0.0,
        bubble_stage_times=predicted,
        bubble_measured=statistics.mean(fractions),
        bubble_per_rank=fractions,
        wall_s=wall,
        activation_peak_bytes=[r["activation_peak"] for r in per_rank],
        sends_per_rank=[r["sends"] for r in per_rank],
        sent_bytes_per_rank=[r["sent_bytes"] for r in per_rank],
        collective_bytes_per_rank=[r["collective_bytes"] for r in per_rank],
        parameters_per_rank=[r["parameters"] for r in per_rank],
        loss=per_rank[-1]["first_loss"],
    )


def stage_bubbles(per_rank: list[dict], microbatches: int) -> list[float]:
    """Each rank's bubble that GPipe and 1F1B give with the measured stage times: rank r
    computes ``t_r`` per microbatch (its step time less its waits, over ``m``); the step takes
    ``sum(t) + (m - 1) max(t)`` (fill and drain, then the slowest stage's pace), so rank r
    idles ``1 - m t_r / step``; ``(p - 1) / (m + p - 1)`` when the stages are equal."""
    t = [
        statistics.median((w - i) / microbatches for w, i in zip(r["wall"], r["idle"]))
        for r in per_rank
    ]
    step = sum(t) + (microbatches - 1) * max(t)
    return [1 - microbatches * x / step for x in t]


def prepare(args) -> None:
    """The pipeline run's sizes: ``--quick`` a tiny model; layers that every schedule's
    ``2 pp`` stages split, rows that the microbatches divide."""
    if args.quick:
        args.dim, args.vocab, args.seqlen = 64, 4096, 128
    args.layers = -(-max(args.layers, 2 * args.pp) // (2 * args.pp)) * 2 * args.pp
    args.microbatches = args.microbatches or 2 * args.pp
    args.rows = -(-max(args.rows, args.microbatches) // args.microbatches) * args.microbatches


def main(args, global_batch) -> None:
    prepare(args)
    batch = global_batch(args)
    rows = []
    for schedule in (None, *SCHEDULES):
        start = time.perf_counter()
        rows.append(summarize(schedule, args, run_schedule(schedule, args, batch)))
        took = time.perf_counter() - start
        print(f"{rows[-1]['schedule']}: {took:.0f} s", file=sys.stderr, flush=True)

    def per_rank(values, scale=1.0, fmt="{:.2f}") -> str:
        return " / ".join(fmt.format(v / scale) for v in values)

    print_table(
        f"Pipeline schedules, pp={args.pp}, {args.microbatches} microbatches (dim {args.dim}, "
        f"{args.layers} layers, vocab {args.vocab}, D={args.depth}, {args.rows} x {args.seqlen} "
        "tokens; per rank: rank 0 / rank 1 ...)",
        [
            "schedule",
            "stages/rank",
            "bubble theory",
            "theory, stage times",
            "bubble measured",
            "per rank",
            "step s",
            "activation MiB",
            "p2p sends",
            "p2p MiB sent",
            "step-1 loss",
        ],
        [
            [
                r["schedule"],
                r["stages_per_rank"],
                "-" if r["bubble_theory"] is None else f"{r['bubble_theory']:.3f}",
                "-" if r["bubble_stage_times"] is None else f"{r['bubble_stage_times']:.3f}",
                f"{r['bubble_measured']:.3f}",
                per_rank(r["bubble_per_rank"], fmt="{:.3f}"),
                f"{r['wall_s']:.3f}",
                per_rank(r["activation_peak_bytes"], MIB, "{:.1f}"),
                per_rank(r["sends_per_rank"], fmt="{:.0f}"),
                per_rank(r["sent_bytes_per_rank"], MIB),
                f"{r['loss']:.6f}",
            ]
            for r in rows
        ],
    )
    emit_json(dict(bench="parallel_pipeline", args=vars(args), env=environment(), rows=rows))
