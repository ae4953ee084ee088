"""The training loop of ``multitoken train``: one function run by every rank.

Per step, on every rank: the same global batch from the deterministic loader, this rank's
:class:`~multitoken.batch.StepBatch` (:func:`~multitoken.train.step.prepare_step`: its rows,
its CP shard with the MTP halo, the global valid-target counts), the loss
(:func:`~multitoken.model.step_loss` with the step's lambda), backward, gradients summed over
all ranks (FSDP2's reduce-scatters, layer by layer), clip, AdamW. Metrics are summed over
ranks and divided once (sum/sum).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from multitoken.errors import set_validation
from multitoken.model import MTPModel, step_loss
from multitoken.parallel import MetricSums, clip_grad_norm, local_device
from multitoken.train.checkpoint import (
    check_resume_config,
    check_run_dir,
    clear_run_dir,
    fault_point,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from multitoken.train.config import TrainConfig
from multitoken.train.config_io import to_toml
from multitoken.train.data import PreparedData, prepare_data
from multitoken.train.metrics import MetricsWriter
from multitoken.train.progress import Progress
from multitoken.train.step import (
    Ranks,
    build_model,
    build_optimizer,
    lr_lambda,
    prepare_step,
    setup_ranks,
)

__all__ = ["train"]


class _Stopwatch:
    """Training time only: evaluation and checkpointing run inside :meth:`paused`."""

    def __init__(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def rate(self) -> float:
        """Tokens per second since the last call, and restart."""
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.start, self.tokens = time.perf_counter(), 0
        return rate


def _record(step: int, losses: list, accs: list, weight: float, **extra) -> dict[str, Any]:
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


def _open_run_dir(cfg: TrainConfig, data: PreparedData) -> None:
    """Rank 0: refuse to clobber an earlier run, then write the run's config and tokenizer."""
    run_dir = cfg.run_dir
    check_run_dir(run_dir, cfg.train.resume, cfg.run.overwrite)
    if cfg.run.overwrite and not cfg.train.resume:
        clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    data.tokenizer.save(run_dir / "tokenizer.json")


class _Trainer:
    """The state of one run on one rank, and the named parts of its loop."""

    def __init__(self, cfg: TrainConfig, data: PreparedData, ranks: Ranks, device: torch.device):
        self.cfg, self.data, self.ranks, self.device = cfg, data, ranks, device
        tokenizer = data.tokenizer
        self.model: MTPModel = build_model(
            cfg, tokenizer.vocab_size, tokenizer.pad_id, ranks, device
        )
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.val_start = data.val_loader.state_dict()
        self.step, self.tokens_seen, self.resumed = 0, 0, False
        self.autocast = device.type == "cuda" and cfg.train.bf16
        self.batch_tokens = cfg.data.batch_size * cfg.data.seq_len

    def restore(self) -> None:
        """Continue from the newest complete checkpoint (``train.resume``), if there is one."""
        run_dir = self.cfg.run_dir
        checkpoint = resume_checkpoint(run_dir, self.ranks.world)
        if checkpoint is None:
            if self.ranks.is_main:
                print(f"train.resume=true but {run_dir} has no complete checkpoint: step 0")
            return
        extra = load_checkpoint(checkpoint, self.model, self.optimizer, self.ranks.world_group)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.data.train_loader.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["rng"])
        self.step, self.tokens_seen, self.resumed = extra["step"], extra["tokens"], True
        if self.ranks.is_main:
            print(f"resuming {run_dir} from step {self.step} ({checkpoint.name})", flush=True)

    def forward(self, global_batch: dict[str, torch.Tensor], weight: float):
        cfg = self.cfg
        batch = prepare_step(
            global_batch,
            self.ranks,
            cfg.mtp.depth,
            self.model.pad_id,
            self.device,
            cfg.parallel.lookahead,
        )
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return step_loss(self.model, batch, weight)

    def train_step(self, weight: float):
        losses = self.forward(next(self.data.train_loader), weight)
        losses.loss.backward()  # FSDP2 sums the gradients over the ranks (reduce-scatter)
        if self.cfg.train.grad_clip > 0:
            # Gradients may live on several meshes (TP, FSDP2 + TP): torch's clip needs one.
            clip_grad_norm(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return losses, lr

    def evaluate(self, step: int, weight: float) -> dict[str, Any]:
        """Losses on the same held-out batches at every evaluation."""
        cfg, loader = self.cfg, self.data.val_loader
        meter = MetricSums(cfg.mtp.depth, self.device)
        loader.load_state_dict(self.val_start)
        self.model.eval()
        with torch.no_grad():
            for _ in range(cfg.train.eval_batches):
                meter.add(self.forward(next(loader), cfg.mtp.weight_at(0, cfg.train.steps)))
        self.model.train()
        losses, accs, _ = meter.reduce(self.ranks.token_group)
        return _record(step, losses, accs, weight, split="val", tokens=self.tokens_seen)

    def save(self, step: int) -> None:
        extra = {
            "step": step,
            "tokens": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.data.train_loader.state_dict(),
            "rng": torch.get_rng_state(),
        }
        group = self.ranks.world_group
        save_checkpoint(self.cfg.run_dir, step, self.model, self.optimizer, extra, group)

    def run(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        end = min(t.steps, t.stop_after or t.steps)
        is_main = self.ranks.is_main
        writer = None
        if is_main:
            start = self.step if self.resumed else None
            writer = MetricsWriter(cfg.run_dir, start, cfg.run.tensorboard)
        progress = Progress(is_main, self.step, end)
        meter = MetricSums(cfg.mtp.depth, self.device)
        clock = _Stopwatch()
        last: dict[str, Any] = {}
        self.model.train()
        for step in range(self.step + 1, end + 1):
            fault_point(f"step{step}")
            weight = cfg.mtp.weight_at(step, t.steps)
            losses, lr = self.train_step(weight)
            meter.add(losses)
            self.tokens_seen += self.batch_tokens
            clock.tokens += self.batch_tokens
            if step % t.log_every == 0 or step == end:
                mean_losses, accs, _ = meter.reduce(self.ranks.token_group)
                rate = clock.rate()
                last = _record(
                    step, mean_losses, accs, weight, tokens=self.tokens_seen, lr=lr,
                    tokens_per_s=rate,
                )  # fmt: skip
                if writer:
                    writer.write(last)
                progress.train(last)
            with clock.paused():
                if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                    val = self.evaluate(step, weight)
                    if writer:
                        writer.write(val)
                    progress.val(val)
                    last["val"] = val
                if (t.save_every and step % t.save_every == 0) or step == end:
                    self.save(step)
            progress.advance(step)
        progress.close()
        if writer:
            writer.close()
        return last


def train(cfg: TrainConfig, data: PreparedData | None = None) -> dict[str, Any]:
    """Run (or resume) a training run on this rank; returns the last train and val records.

    Args:
        cfg: the resolved configuration.
        data: already prepared data (single process); None = prepare it here.
    """
    device = local_device()
    ranks = setup_ranks(cfg, device)
    if cfg.train.resume:  # every rank, before config.toml is rewritten
        check_resume_config(cfg.run_dir, cfg)
    if data is None:
        data = prepare_data(cfg, verbose=False, group=ranks.world_group)
    if ranks.is_main:
        _open_run_dir(cfg, data)
    set_validation(cfg.train.check_inputs)
    trainer = _Trainer(cfg, data, ranks, device)
    if cfg.train.resume:
        trainer.restore()
    return trainer.run()
