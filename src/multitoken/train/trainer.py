"""The training loop of ``multitoken train``: one function run by every rank.

Per step, on every rank: the same global batch from the deterministic loader, this rank's
data-parallel rows, this rank's context-parallel shard (with the MTP halo, or the one-collective
exchange), the valid-target counts summed over all ranks (one all_reduce), forward, backward,
gradients summed over all ranks (one flattened all_reduce), clip, AdamW. Metrics are summed
over ranks and divided once (sum/sum).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from multitoken.layout import SequenceLayout
from multitoken.lookahead import mtp_inputs
from multitoken.models import GPT
from multitoken.parallel.reduce import MetricSums, global_normalizer
from multitoken.train.checkpoint import (
    check_resume_config,
    check_run_dir,
    clear_run_dir,
    fault_point,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from multitoken.train.config import TrainConfig, gpt_config, to_toml
from multitoken.train.data import PreparedData, prepare_data
from multitoken.train.metrics import MetricsWriter

__all__ = ["train", "lr_lambda", "mtp_weight"]


def lr_lambda(cfg: TrainConfig):
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr`` over ``train.steps``."""
    t = cfg.train

    def factor(step: int) -> float:  # step = optimiser steps taken so far
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        floor = t.min_lr / t.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def mtp_weight(cfg: TrainConfig, step: int) -> float:
    """The MTP loss weight at a step (DeepSeek-V3 switched from 0.3 to 0.1 late in training)."""
    m = cfg.mtp
    if m.loss_weight_final >= 0 and step > m.loss_weight_switch * cfg.train.steps:
        return m.loss_weight_final
    return m.loss_weight


@dataclass
class _Ranks:
    """This process's place in the (dp, cp) mesh; ``groups`` is None in a single process."""

    groups: Any
    rank: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int

    @property
    def world_group(self):
        return None if self.groups is None else self.groups.dp_cp_group


def _setup_ranks(cfg: TrainConfig, device: torch.device) -> _Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and cfg.parallel.dp * cfg.parallel.cp == 1:
        return _Ranks(None, 0, 0, 1, 0, 1)
    from multitoken.train.config import ConfigError

    if world != cfg.parallel.dp * cfg.parallel.cp:  # before any collective: no rank hangs
        raise ConfigError(
            f"{world} ranks were started but parallel.dp * parallel.cp = "
            f"{cfg.parallel.dp * cfg.parallel.cp}: launch dp * cp ranks"
        )
    from multitoken.parallel.mesh import ParallelGroups, init_distributed

    init_distributed()
    groups = ParallelGroups.build(cfg.parallel.dp, cfg.parallel.cp, device.type)
    return _Ranks(
        groups,
        torch.distributed.get_rank(),
        groups.dp_rank,
        groups.dp_size,
        groups.cp_rank,
        groups.cp_size,
    )


def _optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


class _Step:
    """Turns a global batch into this rank's model inputs and runs forward + backward."""

    def __init__(self, cfg: TrainConfig, model: GPT, ranks: _Ranks, device: torch.device):
        self.cfg, self.model, self.ranks, self.device = cfg, model, ranks, device
        self.depth = cfg.mtp.depth
        self.autocast = device.type == "cuda" and cfg.train.bf16

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        """This rank's keyword arguments for the model, and the global valid-target counts."""
        from multitoken.data import dp_slice

        r, depth, pad_id = self.ranks, self.depth, self.model.config.pad_id
        local = dp_slice(batch, r.dp_rank, r.dp_size) if r.dp_size > 1 else batch
        ids, labels = local["input_ids"].to(self.device), local["labels"].to(self.device)
        layout = SequenceLayout.from_cu_seqlens(local["cu_seqlens"].to(self.device), ids.shape)
        if r.cp_size == 1:
            mtp_ids, depth_labels = mtp_inputs(ids, labels, layout, depth, pad_id)
            inputs = dict(input_ids=ids, labels=labels, layout=layout)
            inputs.update(mtp_input_ids=mtp_ids, depth_labels=depth_labels)
            return inputs, global_normalizer(depth_labels, r.world_group)
        from multitoken.parallel.context import exchange_halo, shard_batch

        exchange = self.cfg.parallel.lookahead == "exchange"
        shard = shard_batch(
            ids, labels, layout, r.cp_size, r.cp_rank, depth, pad_id, halo=not exchange
        )
        # The step's first collective: the global valid-target counts per depth, which also
        # checks that every CP peer cut the same plan (so a mismatch fails on every rank).
        counts = global_normalizer(shard, r.world_group)
        if exchange:
            shard = exchange_halo(shard, r.groups.cp_group)  # one all_to_all for all depths
        return shard.model_inputs(), counts

    def forward(self, batch: dict[str, torch.Tensor], weight: float):
        inputs, normalizer = self.inputs(batch)
        self.model.config.mtp.loss_weight = weight
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(**inputs, loss_normalizer=normalizer)
        return out, normalizer


def _record(step, losses, accs, weight, extra) -> dict[str, Any]:
    depth = len(losses) - 1
    total = losses[0] + (weight / depth * sum(losses[1:]) if depth else 0.0)
    record = {
        "step": step,
        "loss": total,
        "loss_main": losses[0],
        "loss_mtp": losses[1:],
        "acc_main": accs[0],
        "acc_mtp": accs[1:],
    }
    record.update(extra)
    return record


def _evaluate(step_fn: _Step, loader, start, cfg: TrainConfig, group) -> tuple[list, list]:
    step_fn.model.eval()
    meter = MetricSums(cfg.mtp.depth, step_fn.device)
    loader.load_state_dict(start)  # the same held-out batches at every evaluation
    with torch.no_grad():
        for _ in range(cfg.train.eval_batches):
            out, normalizer = step_fn.forward(next(loader), mtp_weight(cfg, 0))
            meter.add(out, normalizer)
    step_fn.model.train()
    losses, accs, _ = meter.reduce(group)
    return losses, accs


def train(cfg: TrainConfig, data: PreparedData | None = None) -> dict[str, Any]:
    """Run (or resume) a training run on this rank; returns the last train and val records.

    Args:
        cfg: the resolved configuration.
        data: already prepared data (single process); None = prepare it here.
    """
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    ranks = _setup_ranks(cfg, device)
    group, is_main = ranks.world_group, ranks.rank == 0
    run_dir = cfg.run_dir
    if cfg.train.resume:  # every rank, before config.toml is rewritten
        check_resume_config(run_dir, cfg)
    if data is None:
        data = prepare_data(cfg, verbose=False, group=group)
    if is_main:
        check_run_dir(run_dir, cfg.train.resume, cfg.run.overwrite)
        if cfg.run.overwrite and not cfg.train.resume:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
        data.tokenizer.save(run_dir / "tokenizer.json")

    torch.manual_seed(cfg.train.seed)
    model = GPT(gpt_config(cfg, data.tokenizer.vocab_size, data.tokenizer.pad_id)).to(device)
    if ranks.cp_size > 1:
        from multitoken.parallel.apply import parallelize

        parallelize(model, ranks.groups)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    loader, val_loader = data.train_loader, data.val_loader
    val_start = val_loader.state_dict()

    start, tokens_seen = 0, 0
    world = ranks.dp_size * ranks.cp_size
    checkpoint = resume_checkpoint(run_dir, world) if cfg.train.resume else None
    if checkpoint is not None:
        extra = load_checkpoint(checkpoint, model, optimizer, group)
        scheduler.load_state_dict(extra["scheduler"])
        loader.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["rng"])
        start, tokens_seen = extra["step"], extra["tokens"]
        if is_main:
            print(f"resuming {run_dir} from step {start} ({checkpoint.name})", flush=True)
    elif cfg.train.resume and is_main:
        print(f"train.resume=true but {run_dir} has no complete checkpoint: starting at step 0")
    writer = (
        MetricsWriter(run_dir, start if checkpoint else None, cfg.run.tensorboard)
        if is_main
        else None
    )
    step_fn = _Step(cfg, model, ranks, device)
    meter = MetricSums(cfg.mtp.depth, device)
    end = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    log = _Progress(is_main, start, end, cfg)
    last: dict[str, Any] = {}
    window_start, window_tokens = time.perf_counter(), 0
    batch_tokens = cfg.data.batch_size * cfg.data.seq_len
    model.train()
    for step in range(start + 1, end + 1):
        fault_point(f"step{step}")
        weight = mtp_weight(cfg, step)
        out, normalizer = step_fn.forward(next(loader), weight)
        out.loss.backward()
        if group is not None:
            from multitoken.parallel.context import sync_gradients

            sync_gradients(model, group)
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        meter.add(out, normalizer)
        tokens_seen += batch_tokens
        window_tokens += batch_tokens
        if step % cfg.train.log_every == 0 or step == end:
            losses, accs, _ = meter.reduce(group)
            elapsed = time.perf_counter() - window_start
            last = _record(
                step,
                losses,
                accs,
                weight,
                {"tokens": tokens_seen, "lr": lr, "tokens_per_s": window_tokens / elapsed},
            )
            window_start, window_tokens = time.perf_counter(), 0
            if writer:
                writer.write(last)
            log.train(last)
        paused = time.perf_counter()  # evaluation and saving do not count as training time
        eval_due = cfg.train.eval_every and step % cfg.train.eval_every == 0
        if eval_due or step == cfg.train.steps:
            losses, accs = _evaluate(step_fn, val_loader, val_start, cfg, group)
            val = _record(step, losses, accs, weight, {"split": "val", "tokens": tokens_seen})
            if writer:
                writer.write(val)
            log.val(val)
            last["val"] = val
        save_due = cfg.train.save_every and step % cfg.train.save_every == 0
        if save_due or step == end:
            extra = {
                "step": step,
                "tokens": tokens_seen,
                "scheduler": scheduler.state_dict(),
                "loader": loader.state_dict(),
                "rng": torch.get_rng_state(),
            }
            save_checkpoint(run_dir, step, model, optimizer, extra, group)
        window_start += time.perf_counter() - paused
        log.advance(step)
    log.close()
    if writer:
        writer.close()
    return last


class _Progress:
    """A live rich progress bar on a terminal, plain log lines otherwise (CI, files)."""

    def __init__(self, enabled: bool, start: int, end: int, cfg: TrainConfig):
        self.enabled, self.bar = enabled, None
        if not enabled:
            return
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.description}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("", total=end, completed=start)
            self.bar.start()

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def train(self, r: dict[str, Any]) -> None:
        if not self.enabled:
            return
        mtp = " ".join(f"{x:.3f}" for x in r["loss_mtp"])
        text = (
            f"step {r['step']:>5}  loss {r['loss']:.4f}  main {r['loss_main']:.4f}  "
            f"mtp [{mtp}]  acc {r['acc_main']:.3f}  lr {r['lr']:.2e}  "
            f"{r['tokens_per_s']:,.0f} tok/s"
        )
        if self.bar is not None:
            self.bar.update(self.task, description=text.split("  ", 1)[1])
        self._print(text)

    def val(self, r: dict[str, Any]) -> None:
        if self.enabled:
            mtp = " ".join(f"{x:.3f}" for x in r["loss_mtp"])
            acc = " ".join(f"{x:.3f}" for x in r["acc_mtp"])
            self._print(
                f"[val] step {r['step']}  loss_main {r['loss_main']:.4f}  loss_mtp [{mtp}]  "
                f"acc_main {r['acc_main']:.3f}  acc_mtp [{acc}]"
            )

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
