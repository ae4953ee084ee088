"""The training loop of ``multitoken train``: one function run by every rank.

Per step, on every rank: the same global batch from the deterministic loader, this rank's
:class:`~multitoken.batch.StepBatch` (:func:`~multitoken.train.step.prepare_step`: its rows,
its CP shard with the MTP halo, the global valid-target counts), the loss
(:func:`~multitoken.mtp_model.step_loss` with the step's lambda), backward, gradients summed over
all ranks (FSDP2's reduce-scatters, layer by layer), clip, AdamW. Metrics are summed over
ranks and divided once (sum/sum).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from multitoken.errors import CheckpointError, TrainingError, UserError, set_validation
from multitoken.mtp_model import MTPModel, step_loss
from multitoken.parallel import MetricSums, clip_grad_norm, grad_norm, local_device
from multitoken.train import probes
from multitoken.train.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from multitoken.train.config import TrainConfig
from multitoken.train.data import PreparedData, prepare_data
from multitoken.train.lifecycle import StopSignals
from multitoken.train.metrics import MetricsWriter
from multitoken.train.preflight import available_memory, check_memory
from multitoken.train.progress import Progress
from multitoken.train.run_dir import RunLock, check_resume_config, check_run_dir, write_run_files
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


def _on_rank0(ranks: Ranks, device: torch.device, decide: Callable[[], int]) -> int:
    """Run ``decide`` on rank 0 only and hand every rank its result.

    A :class:`UserError` on rank 0 is raised on every rank (the others with a pointer to rank
    0's message) instead of leaving them waiting in the next collective.
    """
    value, error = 0, None
    if ranks.is_main:
        try:
            value = decide()
        except UserError as err:
            error = err
    if ranks.world_group is not None:
        sent = torch.tensor([value, error is not None], dtype=torch.int64, device=device)
        dist.broadcast(sent, group=ranks.world_group, group_src=0)
        value, failed = (int(x) for x in sent.tolist())
        if failed and error is None:
            raise CheckpointError("rank 0 refused to start this run (its error says why)")
    if error is not None:
        raise error
    return value


class _Trainer:
    """The state of one run on one rank, and the named parts of its loop."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: PreparedData,
        ranks: Ranks,
        device: torch.device,
        signals: StopSignals | None = None,
    ):
        self.cfg, self.data, self.ranks, self.device = cfg, data, ranks, device
        self.signals = signals or StopSignals()
        tokenizer = data.tokenizer
        self.model: MTPModel = build_model(
            cfg, tokenizer.vocab_size, tokenizer.pad_id, ranks, device
        )
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.val_start = data.val_loader.state_dict()
        self.step, self.tokens_seen, self.resumed = 0, 0, False
        self.skipped, self.skipped_in_a_row = 0, 0
        self.autocast = device.type == "cuda" and cfg.train.bf16
        self.batch_tokens = cfg.data.batch_size * cfg.data.seq_len

    def restore(self, checkpoint: Path) -> None:
        """Continue from a verified checkpoint (see :func:`resume_checkpoint`)."""
        group = self.ranks.world_group
        extra = load_checkpoint(checkpoint, self.model, self.optimizer, group)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.data.train_loader.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["rng"])
        self.step, self.tokens_seen, self.resumed = extra["step"], extra["tokens"], True
        self.skipped = extra.get("skipped", 0)
        if self.ranks.is_main:
            print(f"resuming {self.cfg.run_dir} from step {self.step} ({checkpoint.name})")
            t = self.cfg.train
            end = min(t.steps, t.stop_after or t.steps)
            if self.step >= end:
                key = (
                    "train.stop_after" if t.stop_after and t.stop_after < t.steps else "train.steps"
                )
                print(f"nothing to train: step {self.step} reaches {key}={end}; raise it to go on")

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

    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm, clipped to ``train.grad_clip`` when that is set."""
        # Gradients may live on several meshes (TP, FSDP2 + TP): torch's clip needs one.
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.train.grad_clip
        return clip_grad_norm(params, clip) if clip > 0 else grad_norm(params)

    def train_step(self, step: int, weight: float):
        """One update, or none when the loss or gradient norm is non-finite on any rank.

        Returns:
            ``(losses, lr, stop)``: ``stop`` is a stop signal received by any rank.
        """
        losses = self.forward(next(self.data.train_loader), weight)
        loss = losses.loss * float("nan") if probes.hit(f"nan{step}") else losses.loss
        loss.backward()  # FSDP2 sums the gradients over the ranks (reduce-scatter)
        norm = self._grad_norm()
        # One small all-reduce per step, so that every rank skips the same updates and stops
        # after the same step (a signal may reach the ranks at different moments).
        flags = torch.stack(
            [
                (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm.detach())).float(),
                torch.tensor(float(self.signals.received is not None), device=norm.device),
            ]
        ).to(self.device)
        if self.ranks.world_group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.ranks.world_group)
        nonfinite, stop = (bool(x) for x in flags.tolist())
        if nonfinite:
            self._skip(step)
        else:
            self.optimizer.step()
            self.skipped_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return losses, lr, stop

    def _skip(self, step: int) -> None:
        """A non-finite update is never applied; too many in a row stop the run."""
        self.skipped += 1
        self.skipped_in_a_row += 1
        limit = self.cfg.train.max_skipped_steps
        if self.ranks.is_main:
            print(f"warning: step {step}: non-finite loss or gradient norm, update skipped")
        if self.skipped_in_a_row > limit:
            first = step - self.skipped_in_a_row + 1
            raise TrainingError(
                f"non-finite loss or gradient norm at step {first}"
                + (f" through {step}" if step > first else "")
                + f" ({self.skipped_in_a_row} in a row, more than train.max_skipped_steps="
                f"{limit}); the updates were skipped and no checkpoint holds them: lower "
                "train.lr, raise train.warmup_steps or set train.grad_clip"
            )

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
            "skipped": self.skipped,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.data.train_loader.state_dict(),
            "rng": torch.get_rng_state(),
        }
        save_checkpoint(
            self.cfg.run_dir,
            step,
            self.model,
            self.optimizer,
            extra,
            self.ranks.world_group,
            keep=self.cfg.train.keep_checkpoints,
        )

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
            probes.hit(f"step{step}")
            weight = cfg.mtp.weight_at(step, t.steps)
            losses, lr, stop = self.train_step(step, weight)
            meter.add(losses)
            self.tokens_seen += self.batch_tokens
            clock.tokens += self.batch_tokens
            if step % t.log_every == 0 or step == end or stop:
                mean_losses, accs, _ = meter.reduce(self.ranks.token_group)
                rate = clock.rate()
                last = _record(
                    step, mean_losses, accs, weight, tokens=self.tokens_seen, lr=lr,
                    tokens_per_s=rate, skipped=self.skipped,
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
                if (t.save_every and step % t.save_every == 0) or step == end or stop:
                    self.save(step)
            progress.advance(step)
            if stop:
                last["stopped_by"] = self.signals.received or 0
                break
        progress.close()
        if writer:
            writer.close()
        return last


def train(cfg: TrainConfig, data: PreparedData | None = None) -> dict[str, Any]:
    """Run (or resume) a training run on this rank; returns the last train and val records.

    Rank 0 owns the run folder for the run's life (:class:`RunLock`, unless the launcher that
    started it holds it), checks what the folder holds and picks the checkpoint to resume
    before anything is written; the run's files are written only after the data is prepared.
    SIGTERM, SIGINT and SIGUSR1 stop the run after the current step with a checkpoint; the
    returned record then has ``stopped_by`` (the signal number).

    Args:
        cfg: the resolved configuration.
        data: already prepared data (single process); None = prepare it here.
    """
    device = local_device()
    if device.type == "cuda":  # the launcher checked host memory; a GPU is checked here
        check_memory(cfg, available_memory(device))
    ranks = setup_ranks(cfg, device)
    run_dir, mode = cfg.run_dir, cfg.train.resume
    lock: RunLock | None = None
    checkpoints = run_dir / "checkpoints"

    def decide_start() -> int:  # rank 0: the step to resume from, -1 = a fresh start
        nonlocal lock
        if not RunLock.held_here(run_dir):
            lock = RunLock(run_dir).acquire()
        check_run_dir(run_dir, mode, cfg.run.overwrite)
        if mode:
            check_resume_config(run_dir, cfg)
        path = resume_checkpoint(run_dir, mode)
        return -1 if path is None else int(path.name.removeprefix("step_"))

    try:
        with StopSignals() as signals:
            start = _on_rank0(ranks, device, decide_start)
            if data is None:
                data = prepare_data(cfg, verbose=False, group=ranks.world_group)
            resuming = start >= 0
            if not cfg.model.hf:  # the vocabulary fits the model and tp, before any write
                cfg.model_config(data.tokenizer.vocab_size)
            _on_rank0(ranks, device, lambda: write_run_files(cfg, data.tokenizer, resuming) or 0)
            set_validation(cfg.train.check_inputs)
            trainer = _Trainer(cfg, data, ranks, device, signals)
            if resuming:
                trainer.restore(checkpoints / f"step_{start:06d}")
            if signals.received is None:
                return trainer.run()
            return {"stopped_by": signals.received}  # stopped before the first step
    finally:
        if lock is not None:
            lock.release()
