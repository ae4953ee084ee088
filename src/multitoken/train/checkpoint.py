"""Checkpoints: ``torch.distributed.checkpoint`` for the model and optimiser, one small file per
rank for the rest (step, schedule, data position, RNG), written atomically.

Layout of a run::

    runs/<name>/checkpoints/step_000100/   .metadata, *.distcp, extra_rank<r>.pt
    runs/<name>/checkpoints/latest         "step_000100"

A save goes to ``step_N.partial`` and is renamed to ``step_N`` only after every rank has
finished writing, so an interrupted save (a killed rank, a full disk) never leaves a directory
that :func:`latest_checkpoint` would pick up.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from multitoken.data import Tokenizer
from multitoken.errors import CheckpointError, ConfigError
from multitoken.model import MTPModel
from multitoken.train.config import TrainConfig, fixed_keys
from multitoken.train.config_io import load_config

__all__ = [
    "check_run_dir",
    "clear_run_dir",
    "fault_point",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "resume_checkpoint",
    "check_resume_config",
    "load_for_inference",
]

_STEP_DIR = re.compile(r"step_(\d+)$")
# Frozen parameters (a pretrained backbone under mtp.freeze_base) are not part of a run's state:
# they come from model.hf, and the checkpoint holds only what training changes.
_TRAINABLE = StateDictOptions(ignore_frozen_params=True)
_TRAINABLE_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)


def _run_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Model and optimiser state without frozen parameters, tied aliases included (a frozen
    tied head appears under its own name too, which ``ignore_frozen_params`` misses)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_TRAINABLE)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_state.items() if k not in frozen}, optim_state


@contextmanager
def _quiet_single_process():
    """DCP warns when it runs without a process group; here a single process is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def _barrier(group) -> None:
    if group is not None:
        dist.barrier(group=group)


def fault_point(point: str) -> None:
    """Test hook: ``MULTITOKEN_FAULT=<point>:<rank>`` SIGKILLs that rank at that point."""
    spec = os.environ.get("MULTITOKEN_FAULT", "")
    if (
        spec
        and spec.rsplit(":", 1)[0] == point
        and spec.rsplit(":", 1)[1] == str(dist.get_rank() if dist.is_initialized() else 0)
    ):
        os.kill(os.getpid(), 9)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    group=None,
) -> Path:
    """Save model, optimiser and this rank's ``extra`` state as ``step_<step>``; collective.

    Args:
        run_dir: the run's folder.
        step: the last completed optimiser step.
        model, optimizer: replicated on every rank of ``group``.
        extra: small per-rank state (scheduler, data position, RNG), saved with ``torch.save``.
        group: the process group of all ranks that train this model (None: single process).
    """
    root = Path(run_dir) / "checkpoints"
    final, partial = root / f"step_{step:06d}", root / f"step_{step:06d}.partial"
    rank = _rank(group)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(group)
    model_state, optim_state = _run_state(model, optimizer)
    with _quiet_single_process() if group is None else nullcontext():
        dcp.save(
            {"model": model_state, "optim": optim_state},
            checkpoint_id=str(partial),
            process_group=group,
        )
    torch.save(extra, partial / f"extra_rank{rank}.pt")
    fault_point(f"save{step}")
    _barrier(group)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)  # atomic: the checkpoint appears whole or not at all
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
    _barrier(group)
    return final


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run over an earlier one.

    A fresh run in a folder with checkpoints would leave the earlier run's newer checkpoints in
    place, and a later resume would silently continue the wrong run.
    """
    run_dir = Path(run_dir)
    earlier = (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file()
    if earlier and not resume and not overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run: continue it with train.resume=true, start over "
            "with run.overwrite=true (removes its checkpoints and metrics), or pick another "
            "run.name"
        )


def clear_run_dir(run_dir: Path) -> None:
    """Remove an earlier run's checkpoints and metrics (``run.overwrite=true``)."""
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
    (Path(run_dir) / "metrics.jsonl").unlink(missing_ok=True)


def _complete(path: Path, world: int | None) -> bool:
    if not (path / ".metadata").is_file():
        return False
    extras = list(path.glob("extra_rank*.pt"))
    return bool(extras) if world is None else len(extras) == world


def latest_checkpoint(run_dir: Path, world: int | None = None) -> Path | None:
    """The newest complete checkpoint of a run (``None`` if there is none)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and _complete(path, world):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a run with settings its weights or tokenizer do not fit.

    Called before anything is written to the run folder (config.toml, tokenizer.json) and
    before any collective, the same on every rank.

    Raises:
        ConfigError: naming the first setting that differs from the run's ``config.toml``
            (the settings marked fixed on resume: model shape, MTP depths, corpus, tokenizer).
    """
    saved_file = Path(run_dir) / "config.toml"
    if not saved_file.is_file():
        return
    saved = load_config(str(saved_file))
    for key in fixed_keys(cfg):
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if old != new:
            raise ConfigError(
                f"train.resume with {key}={new!r}, but {run_dir} was trained with {key}={old!r}: "
                f"resume with {key}={old!r}, or start a new run (another run.name)"
            )


def resume_checkpoint(run_dir: Path, world: int) -> Path | None:
    """The checkpoint ``train.resume`` continues from: the newest complete one (None if none).

    Raises:
        ConfigError: it was written by another number of ranks than ``world`` (the same on
            every rank, before any collective), which would otherwise start over at step 0.
    """
    newest = latest_checkpoint(run_dir)
    if newest is not None and _world_of(newest) != world:
        raise ConfigError(
            f"{newest} was written by {_world_of(newest)} rank(s) but this run has {world} "
            "(parallel.dp * parallel.cp): resume with the parallel.dp and parallel.cp it was "
            "trained with"
        )
    return newest


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group=None
) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint` in place; return this rank's extra."""
    model_state, optim_state = _run_state(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet_single_process() if group is None else nullcontext():
        dcp.load(state, checkpoint_id=str(path), process_group=group)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_TRAINABLE_LOAD,
    )
    rank = _rank(group)
    extra_file = path / f"extra_rank{rank}.pt"
    if not extra_file.is_file():
        raise CheckpointError(
            f"{extra_file} is missing: this checkpoint was written by {_world_of(path)} ranks; "
            "resume with the same parallel.dp and parallel.cp"
        )
    return torch.load(extra_file, weights_only=False)


def _world_of(path: Path) -> int:
    return len(list(path.glob("extra_rank*.pt")))


def load_for_inference(run_dir: str | Path, step: int | None = None) -> tuple[MTPModel, Tokenizer]:
    """The trained model (eval mode, CPU) and the tokenizer of a run, in one process.

    Args:
        run_dir: ``runs/<name>``.
        step: a checkpoint step; None = the newest complete one.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        CheckpointError: not a run folder, or no complete checkpoint in it.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(
            f"{run_dir} is not a run folder (no config.toml): train one with `multitoken train`"
        )
    cfg = load_config(str(run_dir / "config.toml"))
    path = run_dir / "checkpoints" / f"step_{step:06d}" if step else latest_checkpoint(run_dir)
    if path is None or not (path / ".metadata").is_file():
        raise CheckpointError(f"no complete checkpoint in {run_dir / 'checkpoints'}")
    if cfg.model.hf:  # --- Hugging Face models (issue 9): merge point ---
        from multitoken.hf.train import hf_model_and_tokenizer  # optional extra: only when used

        model, tokenizer = hf_model_and_tokenizer(cfg)
    else:
        tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
        model = MTPModel.from_config(
            cfg.model_config(tokenizer.vocab_size), cfg.mtp, pad_id=tokenizer.pad_id
        )
    # Only what the run trained is in its checkpoint (not a frozen backbone).
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    state = {"model": {k: v for k, v in model.state_dict().items() if k in trainable}}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"], strict=not cfg.mtp.freeze_base)
    return model.eval(), tokenizer
