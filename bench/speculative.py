"""What do the MTP heads buy at decoding time? Self-speculative vs plain greedy decoding.

For a trained run (``--run runs/default``) and prompts from the held-out split of its corpus
(the documents the run never trained on, chosen exactly as the trainer chose them), every
prompt is decoded greedily four ways: plain (one main-model forward per token) and
speculative with each draft depth 1..D. Reported:

* **identical output**: every speculative decoding equals plain greedy token for token
  (asserted; the benchmark fails otherwise);
* **tokens per forward**: new tokens / main-model forwards (plain is 1.0);
* **acceptance per depth**: P(depth k's draft accepted | drafts 1..k-1 accepted), the rate that
  sets the speed, and the unconditional teacher-forced accuracy of each depth on the same text
  (its prediction from the true tokens, against the main model's greedy choice). The two differ
  by where they are counted: the conditional rate only at the positions where steps start,
  which crowd into the hard stretches (easy ones are crossed in jumps of D + 1 tokens), the
  teacher-forced accuracy at every position. Where both count the same position they agree:
  a draft is exactly the teacher-forced prediction when the drafts it read were right
  (``tests/unit/test_generate.py``);
* **step costs**: one main-model forward of 1 and of D + 1 tokens, one MTP depth drafting one
  token (each with its head and argmax), which explain the speed-up;
* **speed-up**: plain / speculative seconds per prompt, median over prompts (the calls of one
  prompt run back to back in rotating order, so a slow spell of the shared machine hits all of
  them alike), and the aggregate tokens/s of each. The clock is this process's CPU time by
  default (``--clock wall`` for wall-clock time; see ``bench/_common.py``).

Setup: ``--prompts 64`` prompts of ``--prompt-tokens 64`` tokens, each a window at a seeded
random offset of a held-out document (documents taken in turn), ``--max-new-tokens 64``, stop
at end of document, fp32 on the CPU, 1 thread by default.

Without a trained run, ``--synthetic`` trains a tiny model inline (about 20 s) on a stream of
random phrases whose successor is one of three at random, and takes prompts from a held-out
stretch of the stream: a check of the benchmark's logic, not a result.

Run: ``python bench/speculative.py --run runs/default`` (a few minutes on 2 cores),
``--quick`` for 8 prompts of 32 new tokens.
"""

from __future__ import annotations

import random
import time

import torch

from _common import (
    base_parser,
    clock,
    console,
    emit_json,
    environment,
    median,
    median_ms,
    print_table,
    setup_threads,
)
from multitoken import MTPConfig, MTPModel, next_token_labels
from multitoken.data import split_documents
from multitoken.decoding.generate import GenerationStats, generate, teacher_forced_accuracy
from multitoken.decoding.state import DecodeState
from multitoken.models import GPT, GPTConfig
from multitoken.train.checkpoint import load_for_inference
from multitoken.train.config_io import load_config
from multitoken.train.data import data_source


def heldout_prompts(run: str, count: int, length: int, room: int, seed: int):
    """The run's model and tokenizer, and ``count`` prompts from its held-out documents."""
    model, tokenizer = load_for_inference(run)
    cfg = load_config(f"{run}/config.toml")
    # The trainer's split (the token store's rule): same source, same file cap, same seed.
    docs = list(data_source(cfg))
    _, heldout = split_documents(docs, cfg.data.val_fraction, cfg.train.seed)
    encoded = [
        ids for ids in tokenizer.encode_batch([d.text for d in heldout]) if len(ids) > length
    ]
    if not encoded:
        raise SystemExit(f"no held-out document of {run} is longer than {length} tokens")
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        ids = encoded[i % len(encoded)]
        # Leave room for the continuation inside the document when there is some.
        start = rng.randrange(0, max(1, len(ids) - length - room))
        prompts.append(ids[start : start + length])
    return model, tokenizer.eos_id, prompts, f"{run} ({len(heldout)} held-out documents)"


def synthetic_prompts(count: int, length: int, seed: int, steps: int):
    """A tiny D = 3 model trained inline on a phrase stream, and prompts from its held-out tail."""
    gen = torch.Generator().manual_seed(seed)
    vocab, phrases = 64, 24
    lengths = torch.randint(2, 8, (phrases,), generator=gen)
    words = [torch.randint(2, vocab, (int(n),), generator=gen).tolist() for n in lengths]
    successors = torch.randint(0, phrases, (phrases, 3), generator=gen)
    stream, current = [], 0
    while len(stream) < 60_000:
        stream += words[current]
        current = int(successors[current, int(torch.randint(0, 3, (1,), generator=gen))])
    stream = torch.tensor(stream)
    train, heldout = stream[:50_000], stream[50_000:]
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=vocab, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512
    )
    model = MTPModel.from_config(config, MTPConfig(num_depths=3, loss_weight=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(train) - 64, (8,), generator=gen)
        ids = train[starts[:, None] + torch.arange(64)]  # (8, 64)
        loss = model.loss(ids, next_token_labels(ids)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    starts = torch.randint(0, len(heldout) - length, (count,), generator=gen).tolist()
    prompts = [heldout[s : s + length].tolist() for s in starts]
    return model.eval(), None, prompts, f"synthetic phrase stream ({steps} training steps)"


def mode_names(depth: int, hf: bool, compiled: bool = True) -> list[str]:
    """Eager plain and speculative (each depth, or all of them when compiled modes follow),
    compiled plain and each draft depth (reference GPT only), then transformers' greedy
    ``generate`` on the same weights (the peer)."""
    if not compiled:
        return ["plain"] + [f"draft {d}" for d in range(1, depth + 1)]
    names = ["plain", f"draft {depth}", "plain compiled"]
    names += [f"draft {d} compiled" for d in range(1, depth + 1)]
    return names + (["hf greedy", "hf greedy static"] if hf else [])


def run_prompt(model, prompt, max_new, eos_id, rotation, names, hf_model=None):
    """Every decoding mode on one prompt, in rotating order; HF results come back as the
    same Generation records (tokens, seconds) so that they sit in the same table."""
    shift = rotation % len(names)
    results = {}
    for name in names[shift:] + names[:shift]:
        start = clock()
        if name.startswith("hf"):
            result = hf_generate(hf_model, prompt, max_new, eos_id, static=name.endswith("static"))
        else:
            depth = int(name.split()[1]) if name.startswith("draft") else None
            result = generate(
                model, prompt, max_new, depth is not None, depth, eos_id=eos_id,
                compile=name.endswith("compiled"),
            )  # fmt: skip
        # The benchmarks' clock (CPU time by default: robust on a shared machine).
        result.stats.seconds = clock() - start
        result.state = None  # free the caches
        results[name] = result
    return results


def hf_model_of(model: MTPModel, eos_id: int | None):
    """The same main-model weights as a transformers LlamaForCausalLM (multitoken's export)."""
    from multitoken.hf.export import llama_model

    return llama_model(model.decoder, eos_id=1 if eos_id is None else eos_id, pad_id=0).eval()


def hf_generate(hf_model, prompt: list[int], max_new: int, eos_id, static: bool):
    """transformers' greedy ``generate`` (dynamic cache, or its static cache), as a Generation."""
    from multitoken.decoding.generate import Generation

    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=max_new, do_sample=False, eos_token_id=eos_id, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        out = hf_model.generate(ids, **kwargs)[0, len(prompt) :].tolist()
    stats = GenerationStats(new_tokens=len(out), forwards=len(out))
    return Generation(list(prompt), out, stats)


def step_costs(model: MTPModel, prompt: list[int], repeats: int = 200) -> dict[str, float]:
    """Milliseconds of the pieces of a decoding step, each the median of ``repeats`` calls."""
    depth = model.num_depths
    state = DecodeState(model, len(prompt) + depth + 2, depth)
    head = model.head_weight.t()

    def timed(fn) -> float:
        return median_ms(fn, repeats)

    def main_forward(tokens: list[int]):
        def run():
            (state.forward_main(tokens) @ head).argmax(-1).tolist()
            for cache in state.main:
                cache.truncate(len(prompt) - 1)

        return run

    def draft():
        cache = state.mtp[0]
        cache.truncate(len(prompt) - 2)
        int((state.forward_depth(1, prompt, end=len(prompt) - 1)[-1] @ head).argmax())

    with torch.inference_mode():
        state.forward_main(prompt[:-1])
        state.forward_depth(1, prompt, end=len(prompt) - 1)
        return {
            "main forward, 1 token": timed(main_forward(prompt[-1:])),
            f"main forward, {depth + 1} tokens (verify)": timed(main_forward(prompt[-depth - 1 :])),
            "one MTP depth, 1 position (draft)": timed(draft),
        }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default", help="trained run folder")
    parser.add_argument("--synthetic", action="store_true", help="train a tiny model inline")
    parser.add_argument("--synthetic-steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens = 8, 32
    setup_threads(args.threads, args.clock)
    began = time.perf_counter()
    if args.synthetic:
        model, eos_id, prompts, source = synthetic_prompts(
            args.prompts, args.prompt_tokens, args.seed, args.synthetic_steps
        )
    else:
        model, eos_id, prompts, source = heldout_prompts(
            args.run, args.prompts, args.prompt_tokens, args.max_new_tokens, args.seed
        )
    depth = model.num_depths
    if depth == 0:
        raise SystemExit(
            f"{source}: the model has no MTP heads (mtp.num_depths = 0), nothing to draft"
        )
    reference = isinstance(model.decoder, GPT)  # compiled decoding and the export need it
    hf_model = hf_model_of(model, eos_id) if reference and not args.no_hf else None
    names = mode_names(depth, hf_model is not None, compiled=reference)
    setup_s = time.perf_counter() - began

    # Warm-up, compilation included: the same cache capacity as the measured calls.
    compile_began = time.perf_counter()
    run_prompt(model, prompts[0], args.max_new_tokens, eos_id, 0, names, hf_model)
    warm_s = time.perf_counter() - compile_began
    totals: dict[str, GenerationStats] = {}
    ratios: dict[str, list[float]] = {}  # plain eager seconds / this mode's, per prompt
    hits, targets = [0] * depth, [0] * depth
    for i, prompt in enumerate(prompts):
        results = run_prompt(model, prompt, args.max_new_tokens, eos_id, i, names, hf_model)
        plain = results["plain"]
        for name in names:
            if results[name].tokens != plain.tokens:
                raise AssertionError(f"prompt {i}: {name} differs from plain greedy decoding")
            stats = results[name].stats
            totals[name] = totals[name].merge(stats) if name in totals else stats
            ratios.setdefault(name, []).append(plain.stats.seconds / stats.seconds)
        sequence = plain.prompt_ids + plain.tokens
        for k, (h, t) in enumerate(teacher_forced_accuracy(model, sequence, len(plain.prompt_ids))):
            hits[k] += h
            targets[k] += t

    def percent(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    accuracy = [h / t if t else None for h, t in zip(hits, targets)]
    rows = []
    # Per prompt: eager plain seconds / compiled plain seconds (1 when nothing is compiled).
    compiled_plain = ratios.get("plain compiled", ratios["plain"])
    for name in names:
        s = totals[name]
        # vs compiled plain: this mode's ratio over compiled plain's, prompt by prompt.
        vs_compiled = median([r / c for r, c in zip(ratios[name], compiled_plain)])
        rows.append(
            [name, s.new_tokens, s.forwards, f"{s.tokens_per_forward:.2f}",
             f"{s.tokens_per_s:.1f}", f"{median(ratios[name]):.2f}x", f"{vs_compiled:.2f}x",
             " / ".join(percent(a) for a in s.acceptance) or "-"]
        )  # fmt: skip
    print_table(
        f"Greedy decoding, {len(prompts)} prompts of {args.prompt_tokens} tokens, up to "
        f"{args.max_new_tokens} new: {source}; every mode's output identical to plain: yes",
        ["decoding", "tokens", "forwards", "tokens/forward", "tokens/s", "vs eager plain",
         "vs compiled plain", "acceptance per depth (conditional)"],
        rows,
    )  # fmt: skip
    print_table(
        "Per-depth accuracy of the MTP heads on the generated text",
        ["depth", "teacher-forced accuracy", "conditional acceptance (drafting all depths)"],
        [
            [k + 1, percent(accuracy[k]), percent(totals[f"draft {depth}"].acceptance[k])]
            for k in range(depth)
        ],
    )
    costs = step_costs(model, prompts[0])
    base = costs["main forward, 1 token"]
    print_table(
        "Cost of the pieces of a step (median ms; includes the head and the argmax)",
        ["piece", "ms", "relative to a 1-token forward"],
        [[name, f"{ms:.3f}", f"{ms / base:.2f}"] for name, ms in costs.items()],
    )
    console.print(
        f"setup {setup_s:.1f} s, warm-up (compilation) {warm_s:.1f} s, "
        f"total {time.perf_counter() - began:.1f} s"
    )
    emit_json(
        {
            "bench": "speculative",
            "source": source,
            "prompts": len(prompts),
            "prompt_tokens": args.prompt_tokens,
            "max_new_tokens": args.max_new_tokens,
            "mtp_depth": depth,
            "identical": True,
            "warmup_s": round(warm_s, 1),
            "step_costs_ms": costs,
            "teacher_forced_accuracy": accuracy,
            "modes": {
                name: {
                    "tokens": totals[name].new_tokens,
                    "forwards": totals[name].forwards,
                    "tokens_per_forward": round(totals[name].tokens_per_forward, 4),
                    "acceptance": totals[name].acceptance,
                    "tokens_per_s": round(totals[name].tokens_per_s, 2),
                    "speedup_vs_eager_plain": round(median(ratios[name]), 3),
                    "speedup_vs_compiled_plain": round(
                        median([r / c for r, c in zip(ratios[name], compiled_plain)]), 3
                    ),
                }
                for name in names
            },
            **environment(),
        }
    )


if __name__ == "__main__":
    main()
