"""The run folder: one owner at a time, nothing written outside it, nothing foreign removed.

A run writes only inside ``<run.dir>/<run.name>/`` (``run.name`` is a plain name, checked with
the config). :class:`RunLock` makes one trainer the owner of the folder for the run's life: an
exclusive ``flock`` on ``<run>/.lock``, which the kernel releases however the owner ends (even
SIGKILL), so a lock is never stale; the file records pid, host and start time for the message
a second trainer gets. The order of a start is: lock, check what the folder holds, prepare the
data, and only then remove an earlier run (``run.overwrite``) and write ``config.toml`` and
``tokenizer.json``; a resume never rewrites the tokenizer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from multitoken.data import Tokenizer
from multitoken.errors import CheckpointError, ConfigError, UserError
from multitoken.train.config import TrainConfig
from multitoken.train.config_io import fixed_keys, load_saved_config, to_toml

__all__ = [
    "RunLock",
    "RUN_FILES",
    "is_run_folder",
    "check_run_dir",
    "clear_run_dir",
    "check_resume_config",
    "write_run_files",
]

LOCK_NAME = ".lock"
# Everything a run writes in its folder (what run.overwrite may remove).
RUN_FILES = (
    "config.toml",
    "tokenizer.json",
    "metrics.jsonl",
    "checkpoints",
    "tensorboard",
    "loss.png",
    "accuracy.png",
    "acceptance.png",
)
_HELD: dict[Path, RunLock] = {}  # locks this process holds, by resolved run folder
OWNER_ENV = "MULTITOKEN_RUN_LOCK_OWNER"  # "<pid>": the launcher that holds the lock for us


class RunLock:
    """An exclusive lock on a run folder, held from before the first write to the end.

    Args:
        run_dir: the run folder (created if missing, the only thing created before the checks).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.created_dir = False

    @staticmethod
    def held_here(run_dir: str | Path) -> bool:
        """Whether this process, or the launcher that started it, holds the run's lock."""
        if Path(run_dir).resolve() in _HELD:
            return True
        owner = os.environ.get(OWNER_ENV)
        if not owner:
            return False
        try:
            return (Path(run_dir) / LOCK_NAME).read_text().split()[1] == owner
        except (OSError, IndexError):
            return False

    def acquire(self) -> RunLock:
        """Take the lock or fail at once.

        Raises:
            CheckpointError: another trainer holds it (naming its pid and host), or the folder
                cannot be locked.
        """
        if self.run_dir.is_symlink() or (self.run_dir.exists() and not self.run_dir.is_dir()):
            raise ConfigError(f"{self.run_dir} is not a folder: pick another run.name")
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(
                    f"{self.run_dir} is in use by another `multitoken train` ({owner}): wait "
                    "for it to finish, or pick another run.name"
                ) from None
            except OSError as err:
                os.close(fd)
                raise CheckpointError(f"cannot lock {self.path}: {err}") from None
            # A releasing owner unlinks the file: a lock on an unlinked inode owns nothing.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()} since {stamp}\n".encode())
        self.fd = fd
        _HELD[self.run_dir.resolve()] = self
        return self

    def release(self) -> None:
        """Unlock; remove the lock file, and the folder if this run created it and left it empty."""
        if self.fd is None:
            return
        _HELD.pop(self.run_dir.resolve(), None)
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if self.created_dir:
            with contextlib.suppress(OSError):  # the run wrote something: keep it
                self.run_dir.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _entries(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.is_dir() else []


def is_run_folder(run_dir: str | Path) -> bool:
    """A folder holding a multitoken run: its ``config.toml`` reads as a multitoken config."""
    config = Path(run_dir) / "config.toml"
    if not config.is_file() or config.is_symlink():
        return False
    try:
        load_saved_config(str(config))
    except UserError:
        return False
    return True


def check_run_dir(run_dir: Path, resume: bool | str, overwrite: bool) -> None:
    """Refuse a folder this start must not write into.

    A fresh run in a folder with checkpoints would leave the earlier run's newer checkpoints in
    place, and a later resume would silently continue the wrong run. A folder that holds files
    of anything but a multitoken run is never written into (nor, with ``run.overwrite``,
    cleared).

    Raises:
        ConfigError: the folder holds another run (and neither resume nor overwrite is set),
            is not a multitoken run folder, or holds links where the run writes.
    """
    run_dir = Path(run_dir)
    entries = _entries(run_dir)
    if not entries:
        return
    if not is_run_folder(run_dir):
        raise ConfigError(
            f"{run_dir} is not empty and is not a multitoken run folder (no readable "
            "config.toml): nothing is written there; pick another run.name or run.dir"
        )
    links = [name for name in RUN_FILES if (run_dir / name).is_symlink()]
    if links:
        raise ConfigError(f"{run_dir / links[0]} is a link: a run writes only inside its folder")
    earlier = (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file()
    if earlier and not resume and not overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run: continue it with train.resume=true, start over "
            "with run.overwrite=true (removes its checkpoints and metrics), or pick another "
            "run.name"
        )


def clear_run_dir(run_dir: str | Path) -> None:
    """Remove what an earlier run wrote (``run.overwrite=true``), and nothing else."""
    run_dir = Path(run_dir)
    if _entries(run_dir) and not is_run_folder(run_dir):
        raise ConfigError(f"{run_dir} is not a multitoken run folder: not clearing it")
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


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
    try:
        saved = load_saved_config(str(saved_file))
    except UserError as err:
        raise CheckpointError(f"{saved_file} cannot be resumed: {err}") from None
    for key in fixed_keys(cfg):
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if old != new:
            raise ConfigError(
                f"train.resume with {key}={new!r}, but {run_dir} was trained with {key}={old!r}: "
                f"resume with {key}={old!r}, or start a new run (another run.name)"
            )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # replaces a planted link instead of writing through it


def write_run_files(cfg: TrainConfig, tokenizer: Tokenizer, resuming: bool) -> None:
    """Rank 0, after the data is prepared: write ``config.toml`` and ``tokenizer.json``.

    A resume keeps the run's tokenizer: one that differs (another ``train.seed``, split or
    corpus) is an error, never a silent swap that would make ``generate`` decode other text.
    An overwrite removes the earlier run's files only now, after everything was checked.

    Raises:
        CheckpointError: resuming with data settings that give another tokenizer.
    """
    run_dir = cfg.run_dir
    saved = run_dir / "tokenizer.json"
    if resuming and saved.is_file():
        if Tokenizer.load(saved).backend.to_str() != tokenizer.backend.to_str():
            raise CheckpointError(
                f"train.resume: these data settings give another tokenizer than {saved} "
                "(train.seed, data.val_fraction, data.max_files or the corpus changed): resume "
                "with the run's settings (see its config.toml)"
            )
    elif cfg.run.overwrite:
        clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / "config.toml", to_toml(cfg))
    if not (resuming and saved.is_file()):
        tokenizer.save(saved)
