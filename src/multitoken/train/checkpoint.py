"""Checkpoints: ``torch.distributed.checkpoint`` for the model and optimiser, one small JSON file
per rank for the rest (step, schedule, data position, RNG), a manifest written last.

Layout of a run::

    runs/<name>/checkpoints/step_000100/   .metadata, *.distcp, extra_rank<r>.json, manifest.json
    runs/<name>/checkpoints/latest         "step_000100"

A save goes to ``step_N.partial``; after every rank has finished writing, the ranks hash the
files (a share each) and rank 0 writes them into ``manifest.json`` and renames the folder to
``step_N``, so an interrupted save (a killed rank, a full disk) never leaves a folder that looks
finished. Loading verifies a checkpoint against its manifest first
(:func:`~multitoken.train.manifest.verify_checkpoint`) and reads nothing through an unrestricted
unpickler (:mod:`multitoken.train.safe_load`); resume and ``generate`` skip a damaged checkpoint
with a warning naming it and take the newest intact one. ``train.keep_checkpoints`` bounds how
many are kept.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from multitoken.data import Tokenizer
from multitoken.errors import CheckpointError, UserError
from multitoken.mtp_model import MTPModel
from multitoken.train import probes
from multitoken.train.config_io import load_saved_config
from multitoken.train.manifest import (
    hash_files,
    read_manifest,
    state_file,
    verify_checkpoint,
    write_manifest,
)
from multitoken.train.safe_load import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    dump_state,
    load_state,
    read_metadata,
)

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_folders",
    "latest_checkpoint",
    "resume_checkpoint",
    "load_for_inference",
]

_STEP_DIR = re.compile(r"step_(\d+)$")
# Frozen parameters (a pretrained backbone under mtp.freeze_base) are not part of a run's state:
# they come from model.hf, and the checkpoint holds only what training changes.
# The optimiser state is saved flat, by parameter name down to its group's settings: ranks
# holding different parameters (pipeline stages) save it, any layout loads it. Older
# checkpoints keep their groups by index ("optim.param_groups.0.lr") and load as saved.
_TRAINABLE = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
_TRAINABLE_LOAD = replace(_TRAINABLE, strict=False)


def _flat_optimizer(path: Path) -> bool:
    keys = read_metadata(path).state_dict_metadata
    return not any(k.startswith("optim.param_groups.0.") for k in keys)


def _run_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, flat: bool = True):
    """Model and optimiser state without frozen parameters, tied aliases included (a frozen
    tied head appears under its own name too, which ``ignore_frozen_params`` misses)."""
    if not any(g["params"] for g in optimizer.param_groups):  # frozen pipeline stages only
        return {}, {}
    options = _TRAINABLE if flat else replace(_TRAINABLE, flatten_optimizer_state_dict=False)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_state.items() if k not in frozen}, optim_state


_PARTIAL_DIR = re.compile(r"step_(\d+)\.partial$")
_RETRIES = 5  # checkpoints rotated away while read, in a row, before giving up
_REMOVING = ".removing"  # a checkpoint being deleted (renamed first, then removed)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    group=None,
    keep: int = 0,
) -> Path:
    """Save model, optimiser and this rank's ``extra`` state as ``step_<step>``; collective.

    Args:
        run_dir: the run's folder.
        step: the last completed optimiser step.
        model, optimizer: as laid out on the ranks of ``group`` (replicated or sharded).
        extra: small per-rank state (numbers, strings, lists, dicts, tensors), saved as JSON.
        group: the process group of all ranks that train this model (None: single process).
        keep: keep this many newest checkpoints (0 = all).
    """
    root = Path(run_dir) / "checkpoints"
    final, partial = root / f"step_{step:06d}", root / f"step_{step:06d}.partial"
    rank = _rank(group)
    world = dist.get_world_size(group) if group is not None else 1
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
    dump_state(partial / state_file(rank), extra)
    probes.hit(f"save{step}")
    _barrier(group)
    shares = [hash_files(partial, rank, world)]  # every rank hashes its share of the files
    if group is not None:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(shares[0], gathered, group=group, group_dst=0)
        shares = gathered
    if rank == 0:
        files = {name: entry for share in shares for name, entry in share.items()}
        write_manifest(partial, step, world, files)  # last: a folder with one is finished
        _remove(final)
        os.replace(partial, final)  # atomic: the checkpoint appears whole or not at all
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        _prune(root, step, keep)
    _barrier(group)
    return final


def _prune(root: Path, step: int, keep: int) -> None:
    """Drop folders past ``step`` (what a resume from an older checkpoint left behind),
    unfinished saves, and all but the ``keep`` newest checkpoints."""
    for path in root.iterdir():
        stale = _PARTIAL_DIR.match(path.name) or path.name.endswith(_REMOVING)
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    folders = checkpoint_folders(root.parent)
    for number, path in folders:
        if number > step:
            _remove(path)
    kept = [f for f in folders if f[0] <= step]
    if keep:
        for _, path in kept[keep:]:
            _remove(path)


def _remove(path: Path) -> None:
    """Delete a checkpoint folder so that its name disappears at once (renamed first): a
    reader then sees the whole checkpoint or none of it, never a half-deleted "damaged" one."""
    doomed = path.with_name(path.name + _REMOVING)
    shutil.rmtree(doomed, ignore_errors=True)  # what a killed removal left
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path  # gone already, or cannot be renamed: delete it in place
    shutil.rmtree(doomed, ignore_errors=True)


def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every finished-looking checkpoint (``step_N``), newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def latest_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = _warn) -> Path | None:
    """The newest intact checkpoint of a run (``None`` if there is none).

    Damaged ones (any file missing, truncated or changed; an unfinished save) are skipped,
    each with a warning naming it and why.

    Args:
        run_dir: the run folder.
        warn: called with the message of each skipped checkpoint (None: silent).
    """
    for _, path in checkpoint_folders(run_dir):
        try:
            verify_checkpoint(path)  # its world need not be ours: checkpoints reshard
        except (CheckpointError, OSError) as err:
            if warn is not None and path.is_dir():  # gone: rotated away by a trainer
                warn(f"skipping damaged checkpoint {path}: {err}")
            continue
        return path
    return None


def resume_checkpoint(run_dir: Path, mode: bool | str) -> Path | None:
    """The checkpoint a run continues from; ``None`` = start at step 0. Any number of ranks
    resumes any checkpoint (DCP reshards the model and optimiser state on load).

    Args:
        run_dir: the run folder.
        mode: ``train.resume``: False (start fresh), True (a checkpoint must exist) or
            ``"auto"`` (resume when one exists, else start fresh: the same command line for a
            first start and a requeue).

    Raises:
        CheckpointError: ``True`` without an intact checkpoint, or checkpoints that are all
            damaged (starting over would bury them).
    """
    if not mode:
        return None
    path = latest_checkpoint(run_dir)
    if path is not None:
        return path
    damaged = checkpoint_folders(run_dir)
    if damaged:
        raise CheckpointError(
            f"every checkpoint in {Path(run_dir) / 'checkpoints'} is damaged (see the warnings "
            "above): start over with run.overwrite=true, or pick another run.name"
        )
    if mode is True:
        raise CheckpointError(
            f"train.resume=true but {run_dir} has no checkpoint: start it without "
            "train.resume, or with train.resume=auto (resume if there is a checkpoint)"
        )
    return None


def check_resume_possible(run_dir: Path, mode: bool | str) -> None:
    """The launcher's cheap check (no hashing) that ``train.resume=true`` has something to
    resume, before the data is prepared and the ranks start."""
    if mode is True and not checkpoint_folders(run_dir):
        resume_checkpoint(run_dir, mode)  # raises the no-checkpoint error


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group=None
) -> dict[str, Any]:
    """Load a verified checkpoint saved by :func:`save_checkpoint` in place; return this
    rank's extra state.

    The model and optimiser state are DTensor shards in DCP's format: they load into any
    layout (another dp, cp or tp; another number of ranks), DCP resharding them. The extra
    state (step, schedule, data position, RNG) is the same on every rank by construction; a
    rank the saving run did not have takes rank 0's.

    Raises:
        CheckpointError: this rank's state file is missing (naming it), or an entry holds more
            than plain data.
    """
    rank = _rank(group)
    saved_world = read_manifest(Path(path)).world
    extra_file = Path(path) / state_file(rank if rank < saved_world else 0)
    if not extra_file.is_file():
        raise CheckpointError(f"{extra_file} is missing: the checkpoint lacks rank {rank}'s state")
    flat = _flat_optimizer(Path(path))
    model_state, optim_state = _run_state(model, optimizer, flat)
    state = {"model": model_state, "optim": optim_state}
    _dcp_load(state, path, group)  # every rank takes part, one holding nothing to load too
    if state["model"] or state["optim"]:
        options = (
            _TRAINABLE_LOAD
            if flat
            else replace(_TRAINABLE_LOAD, flatten_optimizer_state_dict=False)
        )
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)  # fmt: skip
    return load_state(extra_file)


def _dcp_load(state: dict[str, Any], path: Path, group) -> None:
    try:
        with _quiet_single_process() if group is None else nullcontext():
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(str(path)),
                planner=SafeLoadPlanner(),
                process_group=group,
            )
    except CheckpointException as err:  # DCP wraps each rank's error
        # The checkpoint was verified against its manifest, so what DCP cannot read is content
        # that a manifest was rewritten over: refuse it by name, without DCP's tracebacks.
        failure = next(iter(err.failures.values()))[0]
        if isinstance(failure, UserError):
            raise CheckpointError(str(failure)) from None
        reason = str(failure).strip().splitlines()[0] if str(failure).strip() else ""
        raise CheckpointError(
            f"{path} cannot be read ({type(failure).__name__}: {reason[:200]})"
        ) from None


def _inference_model(run_dir: Path, cfg) -> tuple[MTPModel, Tokenizer]:
    """The run's model (untrained weights) and tokenizer."""
    if cfg.model.hf:  # a Hugging Face model: its folder and tokenizer
        from multitoken.train.hf import hf_model_and_tokenizer  # optional extra: only when used

        return hf_model_and_tokenizer(cfg)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    model = MTPModel.from_config(
        cfg.model_config(tokenizer.vocab_size), cfg.mtp, pad_id=tokenizer.pad_id
    )
    return model, tokenizer


def load_for_inference(run_dir: str | Path, step: int | None = None) -> tuple[MTPModel, Tokenizer]:
    """The trained model (eval mode, CPU) and the tokenizer of a run, in one process.

    Args:
        run_dir: ``runs/<name>``.
        step: a checkpoint step; None = the newest intact one.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        CheckpointError: not a run folder, or no intact checkpoint in it (or ``step`` is not).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(
            f"{run_dir} is not a run folder (no config.toml): train one with `multitoken train`"
        )
    try:
        cfg = load_saved_config(str(run_dir / "config.toml"))
    except UserError as err:
        raise CheckpointError(f"{run_dir} has an unreadable config.toml: {err}") from None
    if step:
        path = run_dir / "checkpoints" / f"step_{step:06d}"
        verify_checkpoint(path)
    else:
        path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"no intact checkpoint in {run_dir / 'checkpoints'}")
    model, tokenizer = _inference_model(run_dir, cfg)
    # Only what the run trained is in its checkpoint (not a frozen backbone).
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    state = {"model": {k: v for k, v in model.state_dict().items() if k in trainable}}
    for _ in range(_RETRIES):
        try:
            _dcp_load(state, path, None)
            break
        except CheckpointError:
            if step or path.is_dir():
                raise
        # A trainer rotated it away while it was read: the newest intact one now.
        path = latest_checkpoint(run_dir)
        if path is None:
            raise CheckpointError(f"no intact checkpoint in {run_dir / 'checkpoints'}")
    else:
        raise CheckpointError(f"the checkpoints of {run_dir} keep disappearing: try again")
    model.load_state_dict(state["model"], strict=not cfg.mtp.freeze_base)
    if not cfg.model.hf and model.decoder.vocab_size > tokenizer.vocab_size:
        model.decoder.drop_padding_rows(tokenizer.vocab_size)  # never a target: never sampled
    return model.eval(), tokenizer
