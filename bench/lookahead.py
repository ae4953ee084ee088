"""How much faster is ``lookahead`` than a per-document Python loop?

``multitoken.lookahead.lookahead(x, layout, [1..D], fill)`` (a same-document test and a select
over the whole batch per shift, no loop over documents) against two Python loops over the
documents, written here:

* ``loop`` (the baseline of the target): for each shift k and each document slice ``[s, e)``,
  shift the slice by k (``out[s : e - k] = x[s + k : e]``) and fill its last k places.
* ``prefilled loop`` (a tighter loop, for reference): fill the whole output once, then one
  slice copy per document and shift. About twice as fast as ``loop``, because the per-slice
  Python and dispatch overhead, not the copying, is what a loop pays for.

Setup: B = 1 row of T = 8192 token ids holding 1, 4, 16, 64 or 256 documents of random
lengths (random distinct cut points, so no document is empty) summing to T; D in {1, 3}.
Every contender gets its document boundaries precomputed outside the timed region (the
layout for ``lookahead``, a Python list of ``cu_seqlens`` for the loops), so only the
shifting is timed. All three are checked to agree exactly before timing.

Timing: 1 thread by default; every sample times enough back-to-back calls to last about
50 ms; the contenders are interleaved sample by sample (rotating order); each speedup is the
median over samples of the per-sample ratio. Target: at 64 documents, ``lookahead`` is at
least 20x faster than ``loop``.

Run: ``python bench/lookahead.py`` (about a minute) or ``--quick`` for a smoke run.
"""

from __future__ import annotations

import torch

from _common import (
    base_parser,
    calibrate_number,
    console,
    emit_json,
    environment,
    median,
    paired_ratios,
    print_table,
    random_packed_layout,
    setup_threads,
    time_interleaved,
)
from multitoken import lookahead

FILL = -100
TARGET_DOCS = 64
TARGET_SPEEDUP = 20.0


def loop_lookahead(x: torch.Tensor, cu_seqlens: list[int], shifts: list[int], fill):
    """The naive reference: for each document slice, shift it by k and fill its tail."""
    out = torch.empty((len(shifts), *x.shape), dtype=x.dtype)  # (K, B, T)
    flat_x = x.reshape(-1)
    flat_out = out.view(len(shifts), -1)
    for j, k in enumerate(shifts):
        for start, stop in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            cut = max(start, stop - k)
            flat_out[j, start:cut] = flat_x[start + k : stop]
            flat_out[j, cut:stop] = fill
    return out


def prefilled_loop_lookahead(x: torch.Tensor, cu_seqlens: list[int], shifts: list[int], fill):
    """A tighter loop: fill everything once, then one slice copy per document and shift."""
    out = x.new_full((len(shifts), *x.shape), fill)  # (K, B, T)
    flat_x = x.reshape(-1)
    flat_out = out.view(len(shifts), -1)
    for j, k in enumerate(shifts):
        for start, stop in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            if stop - start > k:
                flat_out[j, start : stop - k] = flat_x[start + k : stop]
    return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="samples per contender")
    args = parser.parse_args()
    setup_threads(args.threads, args.clock)
    gen = torch.Generator().manual_seed(args.seed)

    seqlen = 1024 if args.quick else 8192
    doc_counts = [1, 4, 16, 64] if args.quick else [1, 4, 16, 64, 256]
    depths = [1, 3]
    repeats = args.repeats or (3 if args.quick else 21)

    results = []
    for depth in depths:
        shifts = list(range(1, depth + 1))
        for n_docs in doc_counts:
            layout = random_packed_layout(1, seqlen, n_docs, gen)
            cu = layout.cu_seqlens().tolist()  # the loops' document boundaries
            x = torch.randint(0, 50_000, (1, seqlen), generator=gen)

            contenders = {
                "lookahead": lambda x=x, layout=layout, s=shifts: lookahead(x, layout, s, FILL),
                "loop": lambda x=x, cu=cu, s=shifts: loop_lookahead(x, cu, s, FILL),
                "prefilled": lambda x=x, cu=cu, s=shifts: prefilled_loop_lookahead(x, cu, s, FILL),
            }
            expected = contenders["loop"]()
            for name, fn in contenders.items():
                assert torch.equal(fn(), expected), f"{name} disagrees at D={depth}, {n_docs} docs"

            # Microsecond calls: each sample runs a contender `number` times back to back.
            number = {name: calibrate_number(fn) for name, fn in contenders.items()}
            batched = {
                name: (lambda fn=fn, n=number[name]: [fn() for _ in range(n)])
                for name, fn in contenders.items()
            }
            per_sample = time_interleaved(batched, repeats=repeats)
            samples = {name: [t / number[name] for t in ts] for name, ts in per_sample.items()}
            speedups = paired_ratios(samples, "loop", "lookahead")
            vs_prefilled = paired_ratios(samples, "prefilled", "lookahead")
            results.append(
                {
                    "depth": depth,
                    "docs": n_docs,
                    "tokens": seqlen,
                    "lookahead_us": median(samples["lookahead"]) * 1e6,
                    "loop_us": median(samples["loop"]) * 1e6,
                    "prefilled_loop_us": median(samples["prefilled"]) * 1e6,
                    "speedup": median(speedups),
                    "speedup_min": min(speedups),
                    "speedup_max": max(speedups),
                    "speedup_vs_prefilled": median(vs_prefilled),
                    "equal": True,
                }
            )

    rows = [
        (
            r["depth"],
            r["docs"],
            f"{r['lookahead_us']:.1f}",
            f"{r['loop_us']:.1f}",
            f"{r['speedup']:.1f}x",
            f"{r['speedup_min']:.1f}-{r['speedup_max']:.1f}",
            f"{r['prefilled_loop_us']:.1f}",
            f"{r['speedup_vs_prefilled']:.1f}x",
            "yes" if r["equal"] else "NO",
        )
        for r in results
    ]
    print_table(
        f"lookahead vs per-document loops: B=1, T={seqlen}, shifts 1..D, "
        f"{args.threads} thread(s), median of {repeats} interleaved samples",
        [
            "D",
            "docs",
            "lookahead µs",
            "loop µs",
            "speedup",
            "(min-max)",
            "prefilled loop µs",
            "speedup",
            "equal",
        ],
        rows,
    )
    at_target = [r for r in results if r["docs"] == TARGET_DOCS]
    met = {str(r["depth"]): r["speedup"] >= TARGET_SPEEDUP for r in at_target}
    for r in at_target:
        verdict = "met" if met[str(r["depth"])] else "MISSED"
        console.print(
            f"target >= {TARGET_SPEEDUP:.0f}x over `loop` at {TARGET_DOCS} docs, D={r['depth']}: "
            f"{verdict} ({r['speedup']:.1f}x)"
        )
    emit_json(
        {
            "bench": "lookahead",
            "quick": args.quick,
            "env": environment(),
            "repeats": repeats,
            "target": {"docs": TARGET_DOCS, "speedup": TARGET_SPEEDUP, "met_by_depth": met},
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
