"""The ``multitoken`` command: ``train``, ``plot``, ``generate``, ``export``, ``bench``.

Bad input (an unknown config key, a value of the wrong type, a missing data path, an empty
corpus, a sequence length CP cannot split) prints one ``error:`` line and exits with code 2,
before any rank is started: every :class:`~multitoken.errors.UserError`, also one raised in a
rank. A rank that crashes ends the launch with its error shown and exit code 1; any other
exception is a bug and keeps its traceback. A run stopped by SIGTERM, SIGINT or SIGUSR1 writes
a checkpoint and exits with ``128 + signal``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from multitoken.decoding.generate import generate
from multitoken.decoding.record import generation_record
from multitoken.errors import CheckpointError, ConfigError, InputError, UserError
from multitoken.train.checkpoint import (
    check_resume_possible,
    checkpoint_folders,
    load_for_inference,
)
from multitoken.train.config_io import config_help, explicit_keys, load_config
from multitoken.train.data import prepare_data
from multitoken.train.launch import USAGE_ERROR, RankFailed, launch
from multitoken.train.lifecycle import die_with_parent, exit_code
from multitoken.train.plot import plot_runs
from multitoken.train.preflight import (
    available_memory,
    check_memory,
    check_paths,
    fit_to_devices,
)
from multitoken.train.run_dir import RunLock, check_resume_config, check_run_dir, is_run_folder
from multitoken.train.trainer import train

__all__ = ["main"]


def _train_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train",
        help="train a GPT with Multi-Token Prediction",
        description=(
            "Train the reference GPT with MTP on packed documents, with context and data "
            "parallelism over local ranks (or under torchrun). Settings come from the "
            "defaults, then CONFIG (TOML), then section.key=value overrides."
        ),
        epilog="configuration keys (section.key=default: meaning):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("items", nargs="*", metavar="CONFIG.toml | key=value")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="local ranks to launch (default: parallel.dp * parallel.cp); ignored under torchrun",
    )
    parser.add_argument("--data", default=None, help="shorthand for data.path=PATH")
    return parser


def _report_stop(cfg, signum: int) -> int:
    """Say where a run stopped by a signal can continue from; the conventional exit code."""
    folders = checkpoint_folders(cfg.run_dir)
    where = f"newest checkpoint {folders[0][1]}" if folders else "no checkpoint yet"
    print(
        f"stopped by {signal.Signals(signum).name}: {where}; the same command with "
        "train.resume=auto continues the run",
        file=sys.stderr,
    )
    return exit_code(signum)


def _preflight(cfg, ranks_here: int) -> None:
    """Checks before anything is started or written (the configuration checked itself)."""
    check_paths(cfg)
    if cfg.model.hf:  # the folder's gate: code, files, paths, config, weights' headers
        from multitoken.train.hf import check_hf_folder  # optional extra: only when used

        check_hf_folder(cfg)
    if not torch.cuda.is_available():  # a GPU rank checks its own device before it allocates
        check_memory(cfg, available_memory(None, ranks_here))


def cmd_train(args) -> int:
    files = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if len(files) > 1:
        raise ConfigError(f"at most one config file, got {files}")
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    cfg = load_config(files[0] if files else None, overrides)
    explicit = explicit_keys(files[0] if files else None, overrides)
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:  # started by torchrun
        if "TORCHELASTIC_RUN_ID" in os.environ:
            die_with_parent()
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cfg = fit_to_devices(cfg, ranks_here, explicit=explicit, launcher=False)
        _preflight(cfg, ranks_here)
        last = train(cfg)
        return _report_stop(cfg, last["stopped_by"]) if "stopped_by" in last else 0
    # The default run may take the layout the GPUs here allow (--nproc is a layout choice).
    explicit |= set() if args.nproc is None else {"parallel.cp"}
    cfg = fit_to_devices(cfg, cfg.parallel.world, explicit=explicit)  # or one error line
    world = cfg.parallel.world
    nproc = world if args.nproc is None else args.nproc
    if nproc != world:
        raise ConfigError(
            f"--nproc {nproc} but parallel.pp * parallel.dp * parallel.cp * parallel.tp = "
            f"{world}: set them so that their product is {nproc}"
        )
    _preflight(cfg, world)
    with RunLock(cfg.run_dir):  # held by this launcher for the whole run
        check_run_dir(cfg.run_dir, cfg.train.resume, cfg.run.overwrite)  # before any work
        if cfg.train.resume:
            check_resume_config(cfg.run_dir, cfg)  # the checkpoint fits this model
            check_resume_possible(cfg.run_dir, cfg.train.resume)  # ... and there is one
        data = prepare_data(cfg, verbose=True)  # errors surface here, once; ranks hit the cache
        if not cfg.model.hf:  # the tokenizer's vocabulary fits the model (and tp): or one line
            cfg.model_config(data.tokenizer.vocab_size)
        try:
            last = train(cfg, data) if world == 1 else launch(cfg, nproc)
        except RankFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if "stopped_by" in last:
        return _report_stop(cfg, last["stopped_by"])
    print(
        f"run written to {cfg.run_dir}/ (metrics.jsonl, checkpoints/); plot it with "
        f"`multitoken plot {cfg.run_dir}`"
    )
    if last and "val" in last:
        val = last["val"]
        print(
            f"final: train loss_main {last['loss_main']:.4f} loss_mtp {last['loss_mtp']} | "
            f"val loss_main {val['loss_main']:.4f} loss_mtp {val['loss_mtp']}"
        )
    return 0


def cmd_plot(args) -> int:
    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0


def cmd_generate(args) -> int:
    """``multitoken generate``: load a run, generate, print the text (or one JSON line).

    On the CPU it decodes with one intra-op thread unless ``OMP_NUM_THREADS`` is set. The JSON
    line holds ``text`` (the continuation), ``tokens`` (how many), ``token_ids``,
    ``forwards``, ``tokens_per_forward``, ``acceptance`` (per depth, conditional on the
    shallower depths; empty without ``--speculative``), ``teacher_forced_accuracy`` (per
    depth), ``tokens_per_s`` and ``prompt_tokens``.

    Returns:
        The exit status, 0.

    Raises:
        InputError: ``--speculative`` with a model trained without MTP heads, and the other
            errors of :func:`~multitoken.decoding.generate.generate`.
    """
    run_dir, prompt, speculative = args.run, args.prompt, args.speculative
    model, tokenizer = load_for_inference(run_dir)
    model = model.to(generate_device(args.device)).eval()
    if model.head_weight.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Decoding one row is a chain of small matrix-vector products: extra intra-op threads
        # mostly synchronise, and stall outright while another process holds a core (measured
        # here: 2 threads decode the default model ~20x slower than 1 on a busy 2-core machine).
        torch.set_num_threads(1)
    if speculative and model.num_depths == 0:
        raise InputError(
            f"run '{run_dir}' was trained without MTP heads (mtp.num_depths = 0), which "
            "speculative decoding drafts with: drop --speculative, or train a run with an MTP "
            "depth >= 1"
        )
    result, text = _decode(model, tokenizer, args)
    stats = result.stats
    if args.json:
        print(json.dumps(generation_record(model, result, text)))
        return 0
    print(prompt + text)
    summary = (
        f"{stats.new_tokens} tokens in {stats.forwards} forwards "
        f"({stats.tokens_per_forward:.2f} tokens/forward), {stats.tokens_per_s:.1f} tokens/s"
    )
    if speculative:
        rates = ", ".join("n/a" if a is None else f"{a:.0%}" for a in stats.acceptance)
        summary += f"; acceptance per draft step: {rates}"
    print(summary, file=sys.stderr)
    return 0


def generate_device(name: str | None) -> torch.device:
    """``generate --device``: "cuda" or "cpu"; None = CUDA when it is available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but CUDA is not available here: use --device cpu")
    return torch.device(name)


def _decode(model, tokenizer, args):
    """``generate`` on the prompt after a short warm-up; returns the result and the new text."""
    prompt_ids, max_new_tokens = tokenizer.encode(args.prompt), args.max_new_tokens
    capacity = len(prompt_ids) + max_new_tokens
    if args.speculative or max_new_tokens:
        # The first calls pay one-time costs (allocations, kernel choice, compilation): keep
        # them out of tokens_per_s, which should be the steady rate.
        steps = args.draft_steps or args.draft_depth or model.num_depths
        steps = steps if args.speculative else 0
        warm = min(steps + 2, model.decoder.max_seq_len - 1)
        generate(
            model, prompt_ids[-8:], warm, args.speculative, args.draft_depth,
            start_id=tokenizer.eos_id, compile=args.compile,
            capacity=min(capacity, model.decoder.max_seq_len), draft_steps=args.draft_steps,
        )  # fmt: skip
    result = generate(
        model,
        prompt_ids,
        max_new_tokens,
        speculative=args.speculative,
        draft_depths=args.draft_depth,
        temperature=args.temperature,
        eos_id=tokenizer.eos_id,
        start_id=tokenizer.eos_id,
        generator=torch.Generator(device=model.head_weight.device).manual_seed(args.seed),
        compile=args.compile,
        draft_steps=args.draft_steps,
        draft_vocab=_draft_vocab(args),
        verify_tokens=args.verify_tokens,
    )
    full = tokenizer.decode(result.prompt_ids + result.tokens)
    head = tokenizer.decode(result.prompt_ids)
    # Decoding the whole sequence keeps multi-byte characters split across the seam intact.
    text = full[len(head) :] if full.startswith(head) else tokenizer.decode(result.tokens)
    return result, text


def _draft_vocab(args):
    """``--draft-vocab N``: the run's N most frequent training tokens (None: all of them)."""
    if not args.draft_vocab or not args.speculative:
        return None
    from multitoken.train.draft_vocab import run_draft_vocab

    return run_draft_vocab(args.run, args.draft_vocab)


def _refuse_run_folders(out: Path) -> None:
    """An export inside a run folder is refused: rotation and ``run.overwrite`` delete files
    there (an export into a run's checkpoints/ vanished at the next rotation)."""
    for folder in (out.resolve(), *out.resolve().parents):  # links followed, ".." undone
        if is_run_folder(folder):
            raise CheckpointError(
                f"{out} is inside the run folder {folder}, where checkpoint rotation and "
                "run.overwrite delete files: export to a folder outside any run"
            )


def cmd_export(args) -> int:
    """``multitoken export``: a run as a Hugging Face folder (MTP weights in a released format)."""
    from multitoken.hf.export import check_target, default_format, export_model  # [hf] extra

    _refuse_run_folders(Path(args.out))
    check_target(args.out)  # before the (slow) load: a refusal is at once
    model, tokenizer = load_for_inference(args.run)
    fmt = args.format or default_format(model)
    if fmt in ("mimo_mtp", "eagle"):
        from multitoken.hf.serve_export import export_for_engine

        export_for_engine(model, tokenizer, args.out, fmt)
    else:
        export_model(model, tokenizer, args.out, fmt)
    depths = (
        f"{model.num_depths} MTP depth(s) in the {fmt} format" if model.num_depths else "no MTP"
    )
    print(
        f"exported {args.run} to {args.out}/ ({depths}); load it with "
        f"AutoModelForCausalLM.from_pretrained({str(args.out)!r}) or model.hf={args.out}"
    )
    return 0


def cmd_bench(args) -> int:
    bench_dir = Path(__file__).resolve().parents[2] / "bench"
    if not bench_dir.is_dir():
        raise ConfigError(
            f"no bench/ folder next to the package ({bench_dir}): run from a source checkout"
        )
    available = sorted(p.stem for p in bench_dir.glob("*.py") if not p.stem.startswith("_"))
    names = args.names or ["lookahead", "loss", "step"]
    for name in names:
        if name not in available:
            raise ConfigError(f"unknown benchmark {name!r}; available: {', '.join(available)}")
    for name in names:
        code = subprocess.call([sys.executable, str(bench_dir / f"{name}.py"), *args.extra])
        if code:
            return code
    return 0


def _generate_parser(sub) -> argparse.ArgumentParser:
    """The ``generate`` subcommand's options."""
    gen = sub.add_parser("generate", help="decode from a trained run (optionally speculative)")
    gen.add_argument("--run", default="runs/default", help="run folder")
    gen.add_argument("--prompt", default="", help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument(
        "--speculative", action="store_true", help="draft with the MTP heads, verify in one pass"
    )
    gen.add_argument("--draft-depth", type=int, default=None, help="MTP depths to draft with")
    gen.add_argument(
        "--draft-steps", type=int, default=None,
        help="drafts per verification (default: the draft depths); more reuse the depths in turn",
    )  # fmt: skip
    gen.add_argument(
        "--draft-vocab", type=int, default=0,
        help="draft among the N most frequent tokens of the run's training data (0 = all)",
    )  # fmt: skip
    gen.add_argument(
        "--verify-tokens", type=int, default=0,
        help="pad each verification forward to at least M tokens (fast CPU shapes; 0 = off)",
    )  # fmt: skip
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="compiled static-shape decode steps (the first call compiles, tens of seconds)",
    )
    gen.add_argument(
        "--device", choices=["cuda", "cpu"], default=None,
        help="where to decode (default: cuda when available; compiled steps there are CUDA graphs)",
    )  # fmt: skip
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="print one JSON line of statistics")
    return gen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multitoken",
        description="Exact Multi-Token Prediction training with packing and context parallelism.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub).set_defaults(func=cmd_train)

    plot = sub.add_parser("plot", help="per-depth loss and accuracy curves of one or more runs")
    plot.add_argument("runs", nargs="+", help="run folders (runs/<name>); several are overlaid")
    plot.add_argument("--out", default=None, help="output folder (default: the first run's)")
    plot.set_defaults(func=cmd_plot)

    _generate_parser(sub).set_defaults(func=cmd_generate)

    export = sub.add_parser("export", help="write a run as a Hugging Face model folder")
    export.add_argument("out", help="new folder for config.json, model.safetensors, tokenizer")
    export.add_argument("--run", default="runs/default", help="run folder")
    export.add_argument(
        "--format",
        default=None,
        choices=["mimo", "deepseek", "qwen3_next", "mimo_mtp", "eagle"],
        help="MTP weight format (default: a DeepSeek-V3, GLM-4.5 or Qwen3-Next model's own "
        "layout, deepseek or qwen3_next; mimo for the others, a dense MTP block like the GPT's); "
        "mimo_mtp: a MiMoForCausalLM folder vLLM and SGLang serve as MTP; eagle: the model and "
        "EAGLE-1 drafts for vLLM and SGLang (docs/serving.md)",
    )
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="run benchmarks from bench/ (default: the core ones)")
    bench.add_argument("names", nargs="*", help="benchmark names (files in bench/)")
    bench.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="passed on")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:  # anything else is a bug: it keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
