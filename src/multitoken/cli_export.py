"""``multitoken export``: a trained run as a Hugging Face model folder (docs/hf.md,
docs/serving.md)."""

from __future__ import annotations

from pathlib import Path

from multitoken.errors import CheckpointError
from multitoken.train.checkpoint import load_for_inference
from multitoken.train.run_dir import is_run_folder

__all__ = ["add_export_command", "cmd_export"]


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


def add_export_command(sub):
    """The ``export`` subcommand on the CLI's subparsers."""
    export = sub.add_parser("export", help="write a run as a Hugging Face model folder")
    export.add_argument("out", help="new folder for config.json, model.safetensors, tokenizer")
    export.add_argument("--run", default="runs/default", help="run folder")
    export.add_argument(
        "--format",
        default=None,
        choices=["mimo", "deepseek", "qwen3_next", "mimo_mtp", "eagle"],
        help="MTP weight format (default: a DeepSeek-V3, GLM-4.5, Qwen3-Next or Qwen3.5 model's "
        "own layout, deepseek or qwen3_next; mimo for the others, a dense MTP block like the "
        "GPT's); "
        "mimo_mtp: a MiMoForCausalLM folder vLLM and SGLang serve as MTP; eagle: the model and "
        "EAGLE-1 drafts for vLLM and SGLang (docs/serving.md)",
    )
    export.set_defaults(func=cmd_export)
    return export
