"""The training loop of ``multitoken train``: one function run by every rank.

Per step, on every rank: this DP rank's rows of the global batch from the deterministic loader
(only those rows are read), this rank's
:class:`~multitoken.batch.StepBatch` (:func:`~multitoken.train.batching.rank_batch`: its rows,
its CP shard with the MTP halos, the global valid-target counts), the loss
(:func:`~multitoken.mtp_model.step_loss` with the step's lambda and the layout's
cross-entropy), backward, gradients summed over all ranks (FSDP2's reduce-scatters, layer by
layer), clip, the non-finite guard, AdamW. Metrics are summed over ranks and divided once
(sum/sum).

The parts, each with one job: the layout (:mod:`.ranks`), the model (:mod:`.model`), the
optimiser and schedule (:mod:`.optim`), the batch (:mod:`.batching`), the checkpointer
(:mod:`.checkpointer`), the guard (:mod:`.guard`), the records (:mod:`.metrics`,
:mod:`.progress`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from multitoken.errors import set_validation
from multitoken.mtp_model import step_loss
from multitoken.parallel import MetricSums, ParallelDims, clip_grad_norm, grad_norm, local_device
from multitoken.train import probes
from multitoken.train.batching import BatchFeed, rank_batch
from multitoken.train.checkpoint import resume_checkpoint
from multitoken.train.checkpointer import Checkpointer, RunState
from multitoken.train.config import TrainConfig
from multitoken.train.data import PreparedData, prepare_data
from multitoken.train.features import BuildStopped, attach_backbone, offline_data
from multitoken.train.guard import NonFiniteGuard
from multitoken.train.lifecycle import StopSignals
from multitoken.train.metrics import MetricsWriter, Stopwatch, acceptance_keys, record
from multitoken.train.model import build_model, build_pipeline, mixed_precision
from multitoken.train.optim import build_optimizer, build_scheduler
from multitoken.train.preflight import available_memory, check_memory
from multitoken.train.progress import Progress
from multitoken.train.ranks import on_rank0, setup_dims
from multitoken.train.run_dir import RunLock, check_resume_config, check_run_dir, write_run_files

__all__ = ["train"]


class Trainer:
    """One run on one rank: its parts, and the named pieces of its loop."""

    def __init__(self, cfg: TrainConfig, data: PreparedData, dims: ParallelDims, device, stop=None):
        self.cfg, self.data, self.dims, self.device = cfg, data, dims, device
        tokenizer = data.tokenizer
        self.model, self.cross_entropy = build_model(
            cfg, tokenizer.vocab_size, tokenizer.pad_id, dims, device
        )
        self.pipeline = build_pipeline(cfg, self.model, self.cross_entropy, dims, device)
        # Offline features (built here when missing; ``stop`` interrupts the build), or unchanged.
        self.data = data = offline_data(cfg, data, self.model, dims, device, stop)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.feed = BatchFeed(data.train_loader, self.prepare)  # one batch ahead
        self.checkpointer = Checkpointer(
            cfg.run_dir, self.model, self.optimizer, self.scheduler, self.feed,
            dims.world_group, cfg.train.keep_checkpoints,
        )  # fmt: skip
        self.guard = NonFiniteGuard(
            cfg.train.max_skipped_steps, dims.world_group, device, dims.is_main
        )
        self.state = RunState()
        self.val_start = data.val_loader.state_dict()
        self.autocast = mixed_precision(cfg, device) is not None  # bf16 autocast on CUDA
        self.batch_tokens = cfg.data.batch_size * cfg.data.seq_len

    @property
    def end(self) -> int:
        """The last step this invocation trains (``train.stop_after`` stops early)."""
        t = self.cfg.train
        return min(t.steps, t.stop_after or t.steps)

    def restore(self, checkpoint: Path) -> None:
        self.checkpointer.restore(checkpoint, self.state)
        self.guard.skipped = self.state.skipped
        if self.dims.is_main:
            print(f"resuming {self.cfg.run_dir} from step {self.state.step} ({checkpoint.name})")
            t = self.cfg.train
            if self.state.step >= self.end:
                key = (
                    "train.stop_after" if t.stop_after and t.stop_after < t.steps else "train.steps"
                )
                print(
                    f"nothing to train: step {self.state.step} reaches {key}={self.end}; "
                    "raise it to go on"
                )

    def save(self) -> None:
        self.state.skipped = self.guard.skipped
        self.checkpointer.save(self.state)

    def prepare(self, rows: dict[str, torch.Tensor]):
        """This rank's batch, cut on the host and copied to the device."""
        cfg = self.cfg
        batch = rank_batch(
            rows, self.dims, cfg.mtp.num_depths, self.model.pad_id, self.device,
            cfg.parallel.halo_fill,
        )  # fmt: skip
        return attach_backbone(batch, rows, self.device)  # offline features, if any

    def forward(self, batch, mtp_weight: float, acceptance: bool = False, train: bool = False):
        """The losses of a prepared batch (or of a loader's rows); ``acceptance``: with each
        depth's agreement and acceptance against the backbone (where the layout allows).
        Under pipeline parallelism ``train`` runs the backward too (the schedule's)."""
        batch = self.prepare(batch) if isinstance(batch, dict) else batch
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            if self.pipeline is not None:
                return self.pipeline.step(batch, mtp_weight, train=train, acceptance=acceptance)
            return step_loss(
                self.model, batch, mtp_weight, cross_entropy=self.cross_entropy,
                acceptance=acceptance,
            )  # fmt: skip

    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm, clipped to ``train.grad_clip`` when that is set."""
        # Gradients may live on several meshes (TP, FSDP2 + TP): torch's clip needs one.
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip, device = self.cfg.train.grad_clip, self.device  # the norm of no gradient too
        if self.pipeline is not None:  # summed over the stages, the embedding once
            return self.pipeline.grad_norm(clip)
        return clip_grad_norm(params, clip, device) if clip > 0 else grad_norm(params, device)

    def train_step(self, step: int, mtp_weight: float, stop_requested: bool):
        """One update, or none when the loss or gradient norm is non-finite on any rank.

        A logging step also measures the depths' acceptance (no gradient, same on every rank).

        Returns:
            ``(losses, lr, stop)``: ``stop`` is a stop signal received by any rank.
        """
        logs = step % self.cfg.train.log_every == 0 or step == self.end
        losses = self.forward(self.feed.next(), mtp_weight, acceptance=logs, train=True)
        loss = losses.loss * float("nan") if probes.hit(f"nan{step}") else losses.loss
        if self.pipeline is None:  # a pipeline's schedule ran its backward already
            loss.backward()  # FSDP2 sums the gradients over the ranks (reduce-scatter)
        norm = self._grad_norm()
        if step < self.end:  # the host cuts the next batch while the device runs this one
            self.feed.prefetch()
        # The step's one host sync: whether every rank applies the update, whether to stop.
        nonfinite, stop = self.guard.check(loss, norm, stop_requested)
        if nonfinite:
            self.guard.skip(step)
        else:
            self.optimizer.step()
            self.guard.applied()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return losses, lr, stop

    def evaluate(self, step: int, mtp_weight: float) -> dict[str, Any]:
        """Losses on the same held-out batches at every evaluation."""
        cfg, loader = self.cfg, self.data.val_loader
        meter = MetricSums(cfg.mtp.num_depths, self.device)
        loader.load_state_dict(self.val_start)
        self.model.eval()
        with torch.no_grad():
            for _ in range(cfg.train.eval_batches):
                batch = next(loader)
                meter.add(self.forward(batch, cfg.mtp.weight_at(0, cfg.train.steps), True))
        self.model.train()
        out = meter.reduce_all(self.dims.token_group)
        return record(
            step, out.losses, out.accuracies, mtp_weight, split="val", tokens=self.state.tokens,
            **acceptance_keys(out),
        )  # fmt: skip

    def run(self, signals: StopSignals) -> dict[str, Any]:
        t, is_main, end = self.cfg.train, self.dims.is_main, self.end
        resumed = self.state.step if self.state.step else None
        writer = (
            MetricsWriter(self.cfg.run_dir, resumed, self.cfg.run.tensorboard) if is_main else None
        )
        progress = Progress(is_main, self.state.step, end)
        meter, clock, last = MetricSums(self.cfg.mtp.num_depths, self.device), Stopwatch(), {}
        self.model.train()
        for step in range(self.state.step + 1, end + 1):
            probes.hit(f"step{step}")
            mtp_weight = self.cfg.mtp.weight_at(step, t.steps)
            losses, lr, stop = self.train_step(step, mtp_weight, signals.received is not None)
            meter.add(losses)
            self.state.step, self.state.tokens = step, self.state.tokens + self.batch_tokens
            clock.tokens += self.batch_tokens
            if step % t.log_every == 0 or step == end or stop:
                out = meter.reduce_all(self.dims.token_group)
                last = record(
                    step, out.losses, out.accuracies, mtp_weight, tokens=self.state.tokens, lr=lr,
                    tokens_per_s=clock.rate(), skipped=self.guard.skipped, **acceptance_keys(out),
                )  # fmt: skip
                if writer:
                    writer.write(last)
                progress.train(last)
            with clock.paused():
                if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                    last["val"] = self.evaluate(step, mtp_weight)
                    if writer:
                        writer.write(last["val"])
                    progress.val(last["val"])
                if (t.save_every and step % t.save_every == 0) or step == end or stop:
                    self.save()
            progress.advance(step)
            if stop:
                last["stopped_by"] = signals.received or 0
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
        data: data this process already prepared, after checking the run folder and the
            model's vocabulary (``multitoken train`` in one process); None = do both here.
    """
    device = local_device()
    if device.type == "cuda":  # the launcher checked host memory; a GPU is checked here
        check_memory(cfg, available_memory(device), device.type)
    dims = setup_dims(cfg, device)
    lock: RunLock | None = None
    checked_here = data is not None

    def decide_start() -> int:  # rank 0: the step to resume from, -1 = a fresh start
        nonlocal lock
        if not RunLock.held_here(cfg.run_dir):
            lock = RunLock(cfg.run_dir).acquire()
        if not checked_here:
            check_run_dir(cfg.run_dir, cfg.train.resume, cfg.run.overwrite)
            if cfg.train.resume:
                check_resume_config(cfg.run_dir, cfg)
        path = resume_checkpoint(cfg.run_dir, cfg.train.resume)
        return -1 if path is None else int(path.name.removeprefix("step_"))

    try:
        with StopSignals() as signals:
            start = on_rank0(dims, device, decide_start)
            if data is None:
                data = prepare_data(
                    cfg, verbose=False, group=dims.world_group, dp_rank=dims.dp_rank,
                    dp_size=dims.dp,
                )  # fmt: skip
                if not cfg.model.hf:  # the vocabulary fits the model and tp, before any write
                    cfg.model_config(data.tokenizer.vocab_size)
            write = lambda: write_run_files(cfg, data.tokenizer, start >= 0) or 0  # noqa: E731
            on_rank0(dims, device, write)
            set_validation(cfg.train.check_inputs)
            try:
                trainer = Trainer(cfg, data, dims, device, stop=lambda: signals.received)
            except BuildStopped as stopped:  # finished feature parts are kept
                return {"stopped_by": stopped.signum}
            if start >= 0:
                trainer.restore(cfg.run_dir / "checkpoints" / f"step_{start:06d}")
            if signals.received is not None:
                return {"stopped_by": signals.received}  # stopped before the first step
            return trainer.run(signals)
    finally:
        if lock is not None:
            lock.release()
