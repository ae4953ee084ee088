"""What do D extra MTP heads cost through the chunked cross-entropy, against full logits?

Per configuration (vocab V in {32k, 128k}, N = 4096 tokens, hidden H = 256, MTP depth D in
{0, 1, 3}) both contenders compute the loss of D + 1 heads that share one ``[V, H]`` weight,
each head with its own ``[N, H]`` hidden states and targets (1 in 16 is ``ignore_index``),
summed, then run the backward:

* ``chunked``: ``sum_k linear_cross_entropy(h_k, W, t_k).loss_sum`` (:mod:`multitoken.loss`:
  logits exist one chunk of at most ``chunk_elements`` at a time and are recomputed in the
  backward).
* ``full``: ``sum_k F.cross_entropy(h_k @ W.T, t_k, reduction="sum")``: every head's
  ``[N, V]`` logits (and autograd's saved ``log_softmax``) are materialised.

Reported per configuration:

* time: forward + backward seconds (median over interleaved repeats, 1 thread), and the
  ratio chunked / full, the median of per-repeat ratios. Target: <= 1.5x. The chunked version
  does four ``[N, H] x [H, V]``-sized matmuls per head (forward, recomputation, two gradient
  matmuls) against three for full logits, but it touches far less memory.
* memory: peak bytes allocated during forward + backward above what was live before (inputs
  and parameters), read from ``torch.profiler``'s allocation events (see
  ``_common.PeakMemory``: every allocation and free through PyTorch's CPU allocator, in
  order; the running sum's maximum is the peak; frees of pre-existing tensors are ignored,
  so this counts what the computation itself needs). CPU has no
  ``torch.cuda.max_memory_allocated``; ``ru_maxrss`` would also count the interpreter, MKL's
  private buffers and whatever glibc keeps cached, and it never goes down within a process.
  The profiled run is the first of each contender (it is also the one whose values and
  gradients are checked); the profiler only adds work per operator call, which is negligible
  next to these multi-second matmuls, and the remaining repeats run without it.
* growth with D: the step from D = 0 to D = 1 and the slope per further depth (D = 1 -> 3).
  Whatever the loss, a second head on the shared W makes autograd hold a second ``[V, H]``
  weight gradient while it adds the two (a constant, for any D >= 1), and each depth needs the
  gradient of its own ``[N, H]`` hidden state. Full logits add about ``N * V * 4`` bytes more
  per depth (the saved ``log_softmax``). Target: for the chunked loss the extra memory does not
  grow with D beyond those unavoidable gradients (slope <= one ``[N, H]`` gradient + 64 bytes
  per token; step <= one ``[V, H]`` gradient + the same), i.e. no logits-sized term.

Correctness: the summed loss and the gradients of every hidden state and of W agree with the
full version (``torch.testing.assert_close`` with rtol 1e-4; for gradients atol is 1e-5 times
the tensor's largest entry, since entries that cancel to nearly 0 carry absolute fp32 rounding
from summing N or V terms in another order). "loss Δrel" is |loss - ref| / |ref|, "grad Δ"
the largest max|grad - ref| / max|ref| over the D + 2 gradients.

Run: ``python bench/loss.py`` (about 15 minutes on 1 core; the 128k full-logits runs need
about 12 GiB) or ``--quick`` for a smoke run.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from _common import (
    PeakMemory,
    base_parser,
    clock,
    console,
    emit_json,
    environment,
    median,
    print_table,
    setup_threads,
)
from multitoken.loss import DEFAULT_CHUNK_ELEMENTS, linear_cross_entropy

IGNORE = -100
TARGET_TIME_RATIO = 1.5
MIB = 1 << 20


def make_inputs(tokens: int, hidden_size: int, vocab: int, depth: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hiddens = [
        torch.randn(tokens, hidden_size, generator=gen).requires_grad_() for _ in range(depth + 1)
    ]
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (depth + 1, tokens), generator=gen)
    targets[:, ::16] = IGNORE
    return hiddens, weight, targets


def chunked_loss(hiddens, weight, targets, chunk_elements):
    return sum(
        linear_cross_entropy(h, weight, t, IGNORE, chunk_elements).loss_sum
        for h, t in zip(hiddens, targets)
    )


def full_loss(hiddens, weight, targets, chunk_elements):
    return sum(
        F.cross_entropy(h @ weight.t(), t, ignore_index=IGNORE, reduction="sum")
        for h, t in zip(hiddens, targets)
    )


CONTENDERS = {"chunked": chunked_loss, "full": full_loss}


def run_once(name, hiddens, weight, targets, chunk_elements, profile: bool):
    """One forward + backward; returns seconds, peak bytes (if profiled), loss, gradients."""
    for p in (*hiddens, weight):
        p.grad = None
    gc.collect()
    memory = PeakMemory()
    if profile:
        with memory.measure():
            start = clock()
            loss = CONTENDERS[name](hiddens, weight, targets, chunk_elements)
            loss.backward()
            seconds = clock() - start
    else:
        start = clock()
        loss = CONTENDERS[name](hiddens, weight, targets, chunk_elements)
        loss.backward()
        seconds = clock() - start
    grads = [h.grad for h in hiddens] + [weight.grad]
    for p in (*hiddens, weight):
        p.grad = None
    return seconds, (memory.peak_bytes if profile else None), loss.detach(), grads


def bench_config(vocab, depth, tokens, hidden_size, repeats, chunk_elements, seed):
    hiddens, weight, targets = make_inputs(tokens, hidden_size, vocab, depth, seed)
    times = {name: [] for name in CONTENDERS}
    peaks, outputs = {}, {}
    names = list(CONTENDERS)
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            profile = rep == 0
            seconds, peak, loss, grads = run_once(
                name, hiddens, weight, targets, chunk_elements, profile
            )
            times[name].append(seconds)
            if profile:
                peaks[name] = peak
                outputs[name] = (loss, grads)
            del loss, grads
            gc.collect()
    # Values and gradients of the chunked version against full logits.
    (loss_c, grads_c), (loss_f, grads_f) = outputs["chunked"], outputs["full"]
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-4, atol=1e-4)
    grad_err = 0.0
    for got, ref in zip(grads_c, grads_f):
        # Each gradient entry is a float32 sum over N tokens (W's) or V classes (h's), added up
        # in a different order by the two versions, so entries that cancel to almost nothing
        # carry absolute, not relative, rounding: atol is scaled to the tensor's magnitude.
        scale = float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * scale)
        grad_err = max(grad_err, float((got - ref).abs().max()) / scale)
    loss_rel = abs(float(loss_c) - float(loss_f)) / abs(float(loss_f))
    ratios = [c / f for c, f in zip(times["chunked"], times["full"])]
    return {
        "vocab": vocab,
        "depth": depth,
        "heads": depth + 1,
        "tokens": tokens,
        "hidden": hidden_size,
        "chunked_s": median(times["chunked"]),
        "full_s": median(times["full"]),
        "time_ratio": median(ratios),
        "time_ratios": ratios,
        "chunked_peak_bytes": peaks["chunked"],
        "full_peak_bytes": peaks["full"],
        "memory_ratio": peaks["chunked"] / peaks["full"],
        "loss_rel_diff": loss_rel,
        "grad_max_abs_diff_over_max_abs": grad_err,
        "agree": True,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender")
    parser.add_argument("--chunk-elements", type=int, default=DEFAULT_CHUNK_ELEMENTS)
    args = parser.parse_args()
    setup_threads(args.threads, args.clock)

    if args.quick:
        tokens, hidden_size, vocabs = 1024, 64, [4096, 16384]
        repeats = {4096: args.repeats or 2, 16384: args.repeats or 2}
    else:
        tokens, hidden_size, vocabs = 4096, 256, [32768, 131072]
        repeats = {32768: args.repeats or 3, 131072: args.repeats or 2}
    depths = [0, 1, 3]

    results = []
    for vocab in vocabs:
        for depth in depths:
            result = bench_config(
                vocab, depth, tokens, hidden_size, repeats[vocab], args.chunk_elements, args.seed
            )
            results.append(result)
            console.print(
                f"  V={vocab} D={depth}: chunked {result['chunked_s']:.2f} s, "
                f"full {result['full_s']:.2f} s",
                style="dim",
            )

    hidden_grad = tokens * hidden_size * 4
    by_vocab: dict[int, dict[int, dict]] = {}
    for r in results:
        by_vocab.setdefault(r["vocab"], {})[r["depth"]] = r
    for r in results:
        base = by_vocab[r["vocab"]][0]
        for name in ("chunked", "full"):
            r[f"{name}_extra_vs_d0_bytes"] = r[f"{name}_peak_bytes"] - base[f"{name}_peak_bytes"]

    rows = [
        (
            f"{r['vocab'] // 1024}k",
            r["depth"],
            f"{r['full_s']:.2f}",
            f"{r['chunked_s']:.2f}",
            f"{r['time_ratio']:.2f}x",
            f"{r['full_peak_bytes'] / MIB:,.1f}",
            f"{r['chunked_peak_bytes'] / MIB:,.1f}",
            f"{r['memory_ratio']:.3f}",
            f"{r['full_extra_vs_d0_bytes'] / MIB:,.1f}",
            f"{r['chunked_extra_vs_d0_bytes'] / MIB:,.2f}",
            f"{r['loss_rel_diff']:.0e}",
            f"{r['grad_max_abs_diff_over_max_abs']:.0e}",
        )
        for r in results
    ]
    print_table(
        f"D+1 heads sharing W, forward+backward, chunked linear_cross_entropy vs full logits "
        f"(N={tokens}, H={hidden_size}, {args.threads} thread(s), chunk {args.chunk_elements} "
        "logits; peaks are MiB above the inputs)",
        [
            "V",
            "D",
            "full CPU s",
            "chunk CPU s",
            "time ratio",
            "full peak",
            "chunk peak",
            "mem ratio",
            "full +vs D=0",
            "chunk +vs D=0",
            "loss Δrel",
            "grad Δ",
        ],
        rows,
    )

    # How the peak grows with D: a constant step from D=0 to D=1 (a second [V, H] weight
    # gradient exists while autograd adds the heads' contributions to the shared W: the same
    # for any D >= 1), then a per-depth slope. For the chunked loss the slope must be one
    # hidden-state gradient plus a few bytes per token, whatever V: no logits-sized term.
    growth = []
    memory_met = True
    slack = 64 * tokens  # per-token statistics (lse, masks, targets) and rounding
    for vocab, by_depth in by_vocab.items():
        if not {0, 1, 3} <= set(by_depth):
            continue
        weight_grad = vocab * hidden_size * 4
        entry = {"vocab": vocab, "weight_grad_bytes": weight_grad}
        for name in ("chunked", "full"):
            peak = {d: by_depth[d][f"{name}_peak_bytes"] for d in (0, 1, 3)}
            entry[f"{name}_step_d0_d1_bytes"] = peak[1] - peak[0]
            entry[f"{name}_slope_per_depth_bytes"] = (peak[3] - peak[1]) / 2
        slope_ok = entry["chunked_slope_per_depth_bytes"] <= hidden_grad + slack
        step_ok = entry["chunked_step_d0_d1_bytes"] <= weight_grad + hidden_grad + slack
        entry["met"] = bool(slope_ok and step_ok)
        memory_met = memory_met and entry["met"]
        growth.append(entry)
    print_table(
        "Peak memory growth with D (MiB): step D=0->1 and slope per further depth (D=1->3)",
        [
            "V",
            "full step",
            "full slope",
            "chunk step",
            "chunk slope",
            "[V,H] grad",
            "[N,H] grad",
            "[N,V] logits",
        ],
        [
            (
                f"{g['vocab'] // 1024}k",
                f"{g['full_step_d0_d1_bytes'] / MIB:,.1f}",
                f"{g['full_slope_per_depth_bytes'] / MIB:,.1f}",
                f"{g['chunked_step_d0_d1_bytes'] / MIB:,.2f}",
                f"{g['chunked_slope_per_depth_bytes'] / MIB:,.2f}",
                f"{g['weight_grad_bytes'] / MIB:,.2f}",
                f"{hidden_grad / MIB:.2f}",
                f"{tokens * g['vocab'] * 4 / MIB:,.0f}",
            )
            for g in growth
        ],
    )
    time_met = all(r["time_ratio"] <= TARGET_TIME_RATIO for r in results)
    worst_ratio = max(r["time_ratio"] for r in results)
    console.print(
        f"time target <= {TARGET_TIME_RATIO}x: {'met' if time_met else 'MISSED'} "
        f"(worst {worst_ratio:.2f}x)"
    )
    console.print(
        "memory target (chunked: slope per depth = one [N,H] gradient, step D=0->1 = one "
        f"[V,H] gradient more, no logits-sized term): {'met' if memory_met else 'MISSED'}"
    )
    emit_json(
        {
            "bench": "loss",
            "quick": args.quick,
            "env": environment(),
            "repeats": {str(k): v for k, v in repeats.items()},
            "chunk_elements": args.chunk_elements,
            "hidden_grad_bytes": hidden_grad,
            "target": {
                "time_ratio": TARGET_TIME_RATIO,
                "time_met": time_met,
                "memory_independent_of_D": memory_met,
            },
            "results": results,
            "memory_growth": growth,
        }
    )


if __name__ == "__main__":
    main()
