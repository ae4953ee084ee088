"""The errors multitoken raises for bad input, and the checks that raise them.

Every error a user can cause (a configuration, a batch, a corpus, a checkpoint) is a
:class:`UserError`: its message names the problem and the fix, and the command-line tool prints
it as one ``error:`` line with exit code 2. Anything else is a bug and keeps its traceback.
They subclass ``ValueError`` so that code catching ``ValueError`` keeps working.

The checks that read tensor *values* (token ids in range, positions below the rotary table)
cost a device-to-host sync on CUDA. They run by default; a production loop whose batches come
from a trusted pipeline turns them off with :func:`set_validation` or, for a block,
``with validation(False): ...``. Shape and dtype checks are free and always run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = [
    "FIXED",
    "UserError",
    "ConfigError",
    "LayoutError",
    "InputError",
    "DataError",
    "CheckpointError",
    "TrainingError",
    "INT_DTYPES",
    "require",
    "check_int_tensor",
    "check_in_range",
    "set_validation",
    "validation",
    "validation_enabled",
    "warn_renamed",
    "renamed_kwarg",
]

INT_DTYPES = (torch.int32, torch.int64)


class UserError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""


class ConfigError(UserError):
    """A setting that cannot work.

    Args:
        message: what is wrong and how to fix it.
        key: the setting's name (``"n_heads"``); a loader that knows the section re-raises
            with the full key (``"model.n_heads"``) via :meth:`under`.
    """

    def __init__(self, message: str, key: str | None = None):
        self.key, self.message = key, message
        super().__init__(f"{key} {message}" if key else message)

    def under(self, section: str) -> ConfigError:
        """The same error with the key prefixed by its section."""
        if self.key is None:
            return self
        return ConfigError(self.message, f"{section}.{self.key}")


class LayoutError(UserError):
    """Document boundaries that are malformed, or a tensor that does not fit its layout."""


class InputError(UserError):
    """A tensor given to a model, a loss or a decoder with the wrong shape, dtype or values."""


class DataError(UserError):
    """A corpus, tokenizer or data path that cannot be used."""


class CheckpointError(UserError):
    """A run folder or checkpoint that cannot be resumed or loaded as asked."""


class TrainingError(UserError):
    """A run that cannot go on with its settings (its loss or gradients stay non-finite)."""


# Field metadata of the config dataclasses: the fields that shape the weights (a run cannot be
# resumed with other values; ``multitoken.train.config_io.fixed_keys`` reads it).
FIXED = {"fixed_on_resume": True}


def require(checks: list[tuple[bool, str, str]], config: object) -> None:
    """Raise a :class:`ConfigError` for the first ``(ok, field, message)`` that fails, naming
    the field and its value (the one check loop of every config dataclass)."""
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{message}, got {getattr(config, key)!r}", key)


_VALIDATE = True


def set_validation(enabled: bool) -> None:
    """Turn the value checks (and their host syncs) on or off for this process."""
    global _VALIDATE
    _VALIDATE = bool(enabled)


def validation_enabled() -> bool:
    """Whether value checks run (see :func:`set_validation`)."""
    return _VALIDATE


@contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Value checks on or off inside a block, restored after it."""
    saved = _VALIDATE
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(saved)


def check_int_tensor(
    name: str,
    x: object,
    ndim: int | None = None,
    error: type[UserError] = InputError,
) -> Tensor:
    """Raise ``error`` unless ``x`` is an int32/int64 tensor with ``ndim`` dimensions."""
    if not isinstance(x, Tensor):
        raise error(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        want = {1: "[N]", 2: "[B, T]", 3: "[D, B, T]"}.get(ndim, f"{ndim}-D")
        raise error(f"{name} must be a {want} tensor, got shape {tuple(x.shape)}")
    if x.dtype not in INT_DTYPES:
        raise error(f"{name} must be int32 or int64, got {x.dtype}: cast it with .long()")
    return x


def check_in_range(
    name: str,
    x: Tensor,
    high: int,
    fix: str,
    *,
    ignore: int | None = None,
    error: type[UserError] = InputError,
) -> None:
    """Raise ``error`` unless every value of ``x`` (but ``ignore``) lies in ``[0, high)``.

    A value check: skipped when validation is off (it syncs the host with the device).
    """
    if not _VALIDATE or x.numel() == 0:
        return
    bad = (x < 0) | (x >= high)
    if ignore is not None:
        bad &= x != ignore
    if bool(bad.any()):
        value = int(x[bad].reshape(-1)[0])
        raise error(f"{name} {value} is outside [0, {high}): {fix}")


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """A :class:`DeprecationWarning` for a name kept one version after its rename.

    ``stacklevel`` 3 points at the caller of the function that calls this one.
    """
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=stacklevel)


def renamed_kwarg(old: str, new: str) -> Callable[[Callable], Callable]:
    """Decorator: the keyword argument ``old`` still works as ``new``, with a warning."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if old in kwargs:
                warn_renamed(f"{fn.__qualname__}({old}=...)", f"{new}=")
                if new in kwargs:
                    raise TypeError(f"{fn.__qualname__} got {new} and its deprecated alias {old}")
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap
