"""What does each MTP depth add to a training step, measured against the FLOP count?

The reference decoder (``multitoken.models.GPT``, preset ``small``: dim H = 256, 4 layers, 8
query / 4 key-value heads, SwiGLU width F = 704, vocab V = 4096, tied head) runs forward +
backward on B x T = 2 x 1024 = 2048 tokens packed with a few documents per row (document
attention), at MTP depth D = 0, 1, 2, 3. Reported: t(D) / t(0) next to the ratio the matmul
FLOPs predict.

FLOP model (per token, forward, multiply-add = 2 FLOPs; KV = 4 heads x 32 = 128):

    layer   = 2 (H*H + 2*H*KV + H*H + 3*H*F)      q, k, v, o projections, SwiGLU
            + 4 * T * H                             scores and weighted values
    head    = 2 * H * V                             output head (shared by every depth)
    eh_proj = 2 * (2H) * H                          an MTP depth's projection

The attention term counts all T keys of the row: PyTorch's CPU SDPA kernel applies the
document mask to dense blocks and computes every score, so these FLOPs are executed. A
training step costs 3x the forward for the layers and projections (the backward computes the
gradients of both operands), and 4x for the head (forward, recomputation of the logits in the
chunked loss's backward, two gradient matmuls). With L main layers:

    main    = 3 * L * layer + 4 * head
    depth   = 3 * (layer + eh_proj) + 4 * head
    predicted t(D) / t(0) = (main + D * depth) / main

Not counted: norms, rotary embedding, SwiGLU's activation, softmax and other elementwise
work, the embedding lookup and the mask. Target: measured t(D) / t(0) within 25% of the
predicted ratio.

Timing: 1 thread; all four models are built first, then every repeat runs one step of each
(rotating order); the ratio is the median of per-repeat ratios. Run: ``python bench/step.py``
(a few minutes) or ``--quick`` for a smoke run.

``--compiled`` (also on in the full run) adds a second table on unpacked rows (one document
per row, what every implementation supports): tokens/s of the eager and the compiled step
(``train.compile``: every layer and MTP depth through ``torch.compile``) at D = 0, 1, 2, and of
the same weights as a transformers ``LlamaForCausalLM`` doing its own forward + backward with
labels (D = 0), the peer a user would otherwise pick. Targets: compiled >= 1.3x eager at D = 2;
eager D = 0 within 10% of transformers or faster.
"""

from __future__ import annotations

import torch

from _common import (
    base_parser,
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
from multitoken import MTPConfig, MTPModel, next_token_labels
from multitoken.models import GPTConfig

TARGET_TOLERANCE = 0.25


def flops_per_token(cfg: GPTConfig, seqlen: int) -> dict[str, float]:
    """Forward matmul FLOPs per token of one main layer, the head and an MTP projection."""
    dim, ffn = cfg.dim, cfg.ffn_hidden
    kv = cfg.kv_heads * cfg.head_dim
    projections = 2 * (dim * dim + 2 * dim * kv + dim * dim + 3 * dim * ffn)
    attention = 4 * seqlen * dim
    return {
        "layer": projections + attention,
        "layer_projections": projections,
        "layer_attention": attention,
        "head": 2 * dim * cfg.vocab_size,
        "eh_proj": 2 * (2 * dim) * dim,
    }


def predicted_ratio(cfg: GPTConfig, seqlen: int, depth: int) -> float:
    f = flops_per_token(cfg, seqlen)
    main = 3 * cfg.n_layers * f["layer"] + 4 * f["head"]
    per_depth = 3 * (f["layer"] + f["eh_proj"]) + 4 * f["head"]
    return (main + depth * per_depth) / main


def packed_batch(batch: int, seqlen: int, docs_per_row: int, vocab: int, gen: torch.Generator):
    layout = random_packed_layout(batch, seqlen, docs_per_row, gen)
    ids = torch.randint(1, vocab, (batch, seqlen), generator=gen)
    return ids, next_token_labels(ids, layout), layout


def compiled_and_peer(cfg: GPTConfig, batch: int, seqlen: int, repeats: int, seed: int) -> dict:
    """Tokens/s of eager vs compiled steps at D = 0, 1, 2 and of transformers' Llama (D = 0),
    all on the same unpacked rows and the same main-model weights."""
    from multitoken.hf.export import llama_model
    from multitoken.models.parallelize import compile_gpt

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (batch, seqlen), generator=gen)
    labels = next_token_labels(ids)
    steps = {}
    for depth in (0, 1, 2):
        for compiled in (False, True):
            torch.manual_seed(seed)
            model = MTPModel.from_config(cfg, MTPConfig(num_depths=depth))
            if compiled:
                compile_gpt(model)

            def step(model=model) -> None:
                model.zero_grad(set_to_none=True)
                model.loss(ids, labels).loss.backward()

            steps[f"D={depth} {'compiled' if compiled else 'eager'}"] = step

    torch.manual_seed(seed)
    reference = MTPModel.from_config(cfg, MTPConfig(num_depths=0))
    hf = llama_model(reference.decoder, eos_id=1, pad_id=0)
    hf.config._attn_implementation = "sdpa"
    # transformers shifts the labels itself: give it the inputs, it predicts ids[1:].
    hf_labels = ids.clone()

    def hf_step() -> None:
        hf.zero_grad(set_to_none=True)
        hf(input_ids=ids, labels=hf_labels).loss.backward()

    steps["D=0 transformers"] = hf_step
    for fn in steps.values():  # compile (and warm) outside the timing
        fn()
    samples = time_interleaved(steps, repeats=repeats, warmup=1)
    tokens = batch * seqlen
    rows = {name: tokens / median(times) for name, times in samples.items()}
    ratios = {
        "compiled_over_eager": {
            d: median(paired_ratios(samples, f"D={d} eager", f"D={d} compiled")) for d in (0, 1, 2)
        },
        "eager_d0_over_transformers": median(
            paired_ratios(samples, "D=0 transformers", "D=0 eager")
        ),
    }
    return {"tokens_per_s": rows, "ratios": ratios}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per depth")
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument(
        "--compiled", action="store_true", help="also eager vs compiled vs transformers"
    )
    args = parser.parse_args()
    setup_threads(args.threads, args.clock)
    gen = torch.Generator().manual_seed(args.seed)

    if args.quick:
        batch, seqlen, docs = 1, 256, 3
        overrides = dict(dim=64, n_heads=4, n_kv_heads=2)
        repeats = args.repeats or 3
    else:
        batch, seqlen, docs, overrides = 2, 1024, 4, {}
        repeats = args.repeats or 7
    depths = list(range(args.max_depth + 1))

    # One decoder config for every D: the models differ only in their MTP depths.
    cfg = GPTConfig.preset("small", vocab_size=4096, max_seq_len=seqlen, **overrides)
    models = {}
    for depth in depths:
        torch.manual_seed(args.seed)
        models[depth] = MTPModel.from_config(cfg, MTPConfig(num_depths=depth))
    ids, labels, layout = packed_batch(batch, seqlen, docs, 4096, gen)

    def train_step(depth: int) -> None:
        model = models[depth]
        model.zero_grad(set_to_none=True)
        model.loss(ids, labels, layout).loss.backward()

    samples = time_interleaved(
        {f"D={d}": (lambda d=d: train_step(d)) for d in depths}, repeats=repeats, warmup=1
    )
    flops = flops_per_token(cfg, seqlen)
    results = []
    for depth in depths:
        ratios = paired_ratios(samples, f"D={depth}", "D=0")
        measured = median(ratios)
        predicted = predicted_ratio(cfg, seqlen, depth)
        results.append(
            {
                "depth": depth,
                "step_s": median(samples[f"D={depth}"]),
                "ratio": measured,
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "predicted_ratio": predicted,
                "relative_error": measured / predicted - 1,
                "extra_measured_over_predicted": (
                    (measured - 1) / (predicted - 1) if depth else None
                ),
                "params": sum(p.numel() for p in models[depth].parameters()),
            }
        )

    print_table(
        f"GPT 'small' (H={cfg.dim}, L={cfg.n_layers}, V={cfg.vocab_size}), B x T = "
        f"{batch} x {seqlen}, {docs} docs/row, forward+backward, {args.threads} thread(s), "
        f"median of {repeats}",
        ["D", "params", "step CPU s", "t(D)/t(0)", "(min-max)", "FLOP-predicted", "meas/pred"],
        [
            (
                r["depth"],
                f"{r['params'] / 1e6:.2f}M",
                f"{r['step_s']:.3f}",
                f"{r['ratio']:.3f}",
                f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}",
                f"{r['predicted_ratio']:.3f}",
                f"{1 + r['relative_error']:.3f}",
            )
            for r in results
        ],
    )
    main_flops = 3 * cfg.n_layers * flops["layer"] + 4 * flops["head"]
    depth_flops = 3 * (flops["layer"] + flops["eh_proj"]) + 4 * flops["head"]
    console.print(
        f"training FLOPs per token: main {main_flops / 1e6:.2f}M "
        f"(layer {flops['layer'] / 1e6:.3f}M fwd of which attention "
        f"{flops['layer_attention'] / 1e6:.3f}M, head {flops['head'] / 1e6:.3f}M fwd); "
        f"per depth {depth_flops / 1e6:.2f}M (eh_proj {flops['eh_proj'] / 1e6:.3f}M fwd)"
    )
    met = all(abs(r["relative_error"]) <= TARGET_TOLERANCE for r in results)
    worst = max(abs(r["relative_error"]) for r in results)
    console.print(
        f"target: t(D)/t(0) within {TARGET_TOLERANCE:.0%} of the FLOP prediction: "
        f"{'met' if met else 'MISSED'} (worst {worst:.1%})"
    )
    peer = None
    if args.compiled or not args.quick:
        peer = compiled_and_peer(cfg, batch, seqlen, repeats, args.seed)
        speed = peer["ratios"]["compiled_over_eager"]
        print_table(
            f"Unpacked rows, B x T = {batch} x {seqlen}: tokens/s (median of {repeats}; "
            "ratios paired per repeat)",
            ["step", "tokens/s"],
            [(name, f"{rate:,.0f}") for name, rate in peer["tokens_per_s"].items()],
        )
        hf_ratio = peer["ratios"]["eager_d0_over_transformers"]
        console.print(
            "compiled / eager: "
            + ", ".join(f"D={d} {r:.2f}x" for d, r in speed.items())
            + f" (target >= 1.3x at D=2: {'met' if speed[2] >= 1.3 else 'MISSED'}); "
            f"eager D=0 / transformers: {hf_ratio:.2f}x "
            f"(target >= 0.9: {'met' if hf_ratio >= 0.9 else 'MISSED'})"
        )
    emit_json(
        {
            "bench": "step",
            "compiled_and_peer": peer,
            "quick": args.quick,
            "env": environment(),
            "repeats": repeats,
            "shape": {"batch": batch, "seqlen": seqlen, "docs_per_row": docs},
            "model": {
                "dim": cfg.dim,
                "n_layers": cfg.n_layers,
                "n_heads": cfg.n_heads,
                "n_kv_heads": cfg.kv_heads,
                "ffn_dim": cfg.ffn_hidden,
                "vocab": cfg.vocab_size,
            },
            "flops_per_token_forward": flops,
            "training_flops_per_token": {"main": main_flops, "per_depth": depth_flops},
            "target": {"tolerance": TARGET_TOLERANCE, "met": met, "worst": worst},
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
