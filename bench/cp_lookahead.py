"""What preparing the MTP inputs costs under context parallelism, three ways, on gloo ranks.

Every way starts from the same local shard (rank r's stripes r and 2cp-1-r of every document)
and ends with the same ``mtp_input_ids [D, B, T_local]`` and ``depth_labels [D+1, B, T_local]``
(checked equal on every rank):

* ``halo``: the halos are read from the global batch the loader already holds
  (docs/design.md#context-parallelism, filled at sharding time); no message.
* ``exchange``: the fallback; the halos of every document, depth and tensor travel in one
  ``all_to_all_single`` routed from the layout.
* ``roll``: the approach the library replaces; each tensor is rolled by one position per depth,
  one document at a time, each roll a point-to-point exchange of the stripe boundary values
  with the neighbouring stripes' owners.

Messages and bytes are what one rank hands to ``torch.distributed`` per step (mean over
ranks), counted by wrapping the calls. Time is wall-clock per step (communication is waiting,
which CPU time would hide), the slowest rank of each repeat, median over repeats.

    python bench/cp_lookahead.py            # 2 and 4 ranks, D in {1, 2, 4}, 1/8/64 docs per row
    python bench/cp_lookahead.py --quick
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    base_parser,
    emit_json,
    environment,
    print_table,
    random_packed_layout,
    setup_threads,
)
from multitoken import next_token_labels  # noqa: E402
from multitoken.parallel import ParallelDims, exchange_halo, shard_batch  # noqa: E402
from multitoken.parallel.halo import halo_from_global, halo_sources  # noqa: E402
from multitoken.testing.comms import count_comms  # noqa: E402

PAD, IGNORE, VOCAB = 0, -100, 32000
WAYS = ("halo", "exchange", "roll")


def make_batch(rows: int, seqlen: int, docs: int, seed: int):
    """Rows of ``docs`` documents of random lengths (at least 1 token) each."""
    gen = torch.Generator().manual_seed(seed)
    layout = random_packed_layout(rows, seqlen, docs, gen)
    ids = torch.randint(1, VOCAB, (rows, seqlen), generator=gen)
    return ids, next_token_labels(ids, layout), layout


def by_halo(bare, ids, labels):
    sources = halo_sources(bare.plan, bare.cp_rank, bare.num_depths)
    return bare.with_halo(
        halo_from_global(ids, sources, PAD), halo_from_global(labels, sources, IGNORE)
    )


def by_exchange(bare, group):
    return exchange_halo(bare, group=group)


def _roll_once(cur: torch.Tensor, plan, cp_rank: int, fill: int, group) -> torch.Tensor:
    """``cur`` shifted left by one inside every stripe; the value entering each stripe's end
    is the first value of the next stripe, fetched from its owner, one document at a time."""
    cp = plan.cp_size
    s = plan.stripe_len.tolist()
    base = (plan.row * plan.local_len + plan.local_start).tolist()
    ranks = dist.get_process_group_ranks(group)
    rolled = torch.cat([cur[1:], cur[:1]])

    def owner(stripe: int) -> int:
        return stripe if stripe < cp else 2 * cp - 1 - stripe

    def first(p: int, stripe: int) -> int:  # flat local index of a stripe's first token
        return base[p] + (0 if stripe < cp else s[p])

    for p in range(plan.num_pieces):
        mine = (cp_rank, 2 * cp - 1 - cp_rank)
        pending, incoming = [], {}
        for stripe in mine:
            if stripe > 0 and owner(stripe - 1) != cp_rank:  # my first value ends stripe - 1
                at = first(p, stripe)
                pending.append(
                    dist.isend(cur[at : at + 1], ranks[owner(stripe - 1)], group, stripe)
                )
            nxt = stripe + 1
            if nxt < 2 * cp and owner(nxt) != cp_rank:
                buf = cur.new_empty(1)
                pending.append(dist.irecv(buf, ranks[owner(nxt)], group, nxt))
                incoming[stripe] = buf
        for work in pending:
            work.wait()
        for stripe in mine:
            end = first(p, stripe) + s[p] - 1
            nxt = stripe + 1
            if nxt == 2 * cp:
                rolled[end] = fill
            elif stripe in incoming:
                rolled[end] = incoming[stripe][0]
            else:  # the next stripe is mine too
                rolled[end] = cur[first(p, nxt)]
    return rolled


def by_roll(bare, group):
    """The baseline: D rolls of each tensor, one exchange per tensor, depth and document."""
    real = bare.layout.doc_ids >= 0
    out = {}
    for name, x, fill in (("ids", bare.input_ids, PAD), ("labels", bare.labels, IGNORE)):
        cur, steps = x.reshape(-1), [torch.where(real, x, fill)]
        for _ in range(bare.num_depths):
            cur = _roll_once(cur, bare.plan, bare.cp_rank, fill, group)
            steps.append(torch.where(real, cur.view_as(x), fill))
        out[name] = torch.stack(steps)
    return out["ids"][1:], out["labels"]


def run_rank(rank: int, world: int, store_path: str, args, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(args.threads)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    groups = ParallelDims(dp=1, cp=world).build("cpu")
    cp_group = groups.cp_group
    rows = []
    for docs in args.docs:
        ids, labels, layout = make_batch(args.rows, args.seqlen, docs, args.seed)
        for depth in args.depths:
            bare = shard_batch(ids, labels, layout, world, rank, depth, PAD, IGNORE, halo=False)
            ways = {
                "halo": partial(by_halo, bare, ids, labels),
                "exchange": partial(by_exchange, bare, cp_group),
                "roll": partial(by_roll, bare, cp_group),
            }
            ref = by_halo(bare, ids, labels)
            for got in (by_exchange(bare, cp_group), by_roll(bare, cp_group)):
                got_ids, got_labels = (
                    (got.mtp_input_ids, got.depth_labels) if hasattr(got, "plan") else got
                )
                assert torch.equal(got_ids, ref.mtp_input_ids), (docs, depth)
                assert torch.equal(got_labels, ref.depth_labels), (docs, depth)
            row = dict(world=world, docs=docs, depth=depth)
            for name, fn in ways.items():
                with count_comms() as log:
                    fn()
                # A message is a collective call or a point-to-point send (not the receive).
                messages = sum(1 for r in log.records if r.name not in ("recv", "irecv"))
                sent = torch.tensor([float(messages), float(log.nbytes())])
                dist.all_reduce(sent, group=cp_group)
                times = []
                for _ in range(args.repeats):
                    dist.barrier(group=cp_group)
                    start = time.perf_counter()
                    fn()
                    took = torch.tensor([time.perf_counter() - start])
                    dist.all_reduce(took, op=dist.ReduceOp.MAX, group=cp_group)
                    times.append(float(took))
                row[name] = dict(
                    messages=float(sent[0]) / world,
                    bytes=float(sent[1]) / world,
                    ms=1e3 * statistics.median(times),
                )
            rows.append(row)
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--docs", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.quick:
        args.seqlen, args.repeats = 512, 3
    # Wall clock whatever --clock says: waiting for peers is the cost being measured.
    setup_threads(args.threads, "wall")
    args.clock = "wall"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    all_rows = []
    for world in args.worlds:
        results = ctx.SimpleQueue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(
                run_rank,
                args=(world, os.path.join(tmp, "store"), args, results),
                nprocs=world,
                start_method="spawn",
            )
        all_rows += results.get()
    table = []
    for r in all_rows:
        cells = [r["world"], r["docs"], r["depth"]]
        for way in WAYS:
            w = r[way]
            cells += [f"{w['messages']:.0f}", f"{w['bytes'] / 1024:.1f}", f"{w['ms']:.2f}"]
        table.append(cells)
    columns = ["ranks", "docs/row", "D"]
    for way in WAYS:
        columns += [f"{way} msgs", f"{way} KiB", f"{way} ms"]
    print_table(
        f"MTP inputs under CP, per rank and step ({args.rows} rows x {args.seqlen} tokens, gloo)",
        columns,
        table,
    )
    emit_json(dict(bench="cp_lookahead", args=vars(args), env=environment(), rows=all_rows))


if __name__ == "__main__":
    main()
