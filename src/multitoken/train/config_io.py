"""Reading and writing a :class:`~multitoken.train.config.TrainConfig`.

Values come from the defaults, then a TOML file, then ``section.key=value`` overrides; each
section is built once from the merged values, so its own checks run on the final values and
an error names the full key (``model.n_heads must be >= 1, got 0``). Unknown keys and values
of the wrong type are errors that name the key and the fix.

Example::

    cfg = load_config("configs/tiny.toml", ["model.dim=128", "train.steps=50", "parallel.cp=2"])
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

from multitoken.errors import ConfigError
from multitoken.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "load_config",
    "load_saved_config",
    "config_from_dict",
    "config_help",
    "to_toml",
    "fixed_keys",
    "explicit_keys",
]


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


def _coerce(key: str, raw: Any, kind: type, from_cli: bool) -> Any:
    """Convert a TOML value (typed) or a command-line string (parsed) to the field's type."""
    from_cli = from_cli and isinstance(raw, str) and kind is not str
    if kind == bool | str:  # a switch with a named third value (train.resume = "auto")
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        if isinstance(raw, str):
            return _coerce(key, raw, str, from_cli)
    elif kind is bool:
        if isinstance(raw, bool):
            return raw
        if from_cli and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if from_cli and raw.lower() in ("false", "0", "no", "off"):
            return False
    elif kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_cli and re.fullmatch(r"[+-]?\d+", raw.strip()):
            return int(raw)
    elif kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if from_cli:
            try:
                return float(raw)
            except ValueError:
                pass
    elif kind is str and isinstance(raw, str):
        if any(ord(c) < 32 for c in raw):
            raise ConfigError(f"{key} must not contain control characters (newlines, tabs)")
        return raw
    name = "true or false" if kind is bool else getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{key} must be {name}, got {raw!r}")


# Keys renamed in 0.3, with the old values' new spelling: the old key works for one version,
# with one line on stderr naming the new one.
RENAMED: dict[str, tuple[str, dict[Any, Any]]] = {
    "parallel.lookahead": ("parallel.halo_fill", {"halo": "sharding"}),
    "mtp.depth": ("mtp.num_depths", {}),
}


def _set(values: dict[str, dict[str, Any]], key: str, raw: Any, from_cli: bool) -> None:
    if key in RENAMED:
        new_key, new_values = RENAMED[key]
        print(
            f"warning: {key} is deprecated and will be removed in the next version: use "
            f"{new_key}" + (f" ({', '.join(f'{a!r} is {b!r}' for a, b in new_values.items())})"
                            if new_values else ""),
            file=sys.stderr,
        )  # fmt: skip
        key, raw = new_key, new_values.get(raw, raw)
    section_name, _, name = key.partition(".")
    sections = _sections()
    if section_name not in sections or not name:
        raise ConfigError(
            f"unknown config key {key!r}: keys are <section>.<field> with section one of "
            f"{', '.join(sections)} (see `multitoken train --help`)"
        )
    hints = typing.get_type_hints(sections[section_name])
    names = [f.name for f in dataclasses.fields(sections[section_name])]
    if name not in names:
        close = [n for n in names if n.startswith(name[:3])]
        hint = f"; did you mean {section_name}.{close[0]}?" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint} (see `multitoken train --help`)")
    values[section_name][name] = _coerce(key, raw, hints[name], from_cli)


def _build(values: dict[str, dict[str, Any]]) -> TrainConfig:
    built = {}
    for name, cls in _sections().items():
        try:
            built[name] = cls(**values.get(name, {}))
        except ConfigError as err:
            raise err.under(name) from None
    return TrainConfig(**built)


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """A config from nested ``{section: {field: value}}`` (TOML's shape) and overrides."""
    merged: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    for section, entries in values.items():
        if not isinstance(entries, dict):
            raise ConfigError(f"unknown config key {section!r}: put keys under [section] tables")
        for key, value in entries.items():
            _set(merged, f"{section}.{key}", value, from_cli=False)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set(merged, key.strip(), value.strip(), from_cli=True)
    return _build(merged)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    return config_from_dict(values, overrides)


def explicit_keys(path: str | Path | None, overrides: list[str] | None = None) -> set[str]:
    """The ``section.key`` names a TOML file at ``path`` and ``overrides`` set (old names as
    their new ones): what the user chose, as opposed to a default."""
    keys = {item.partition("=")[0].strip() for item in overrides or [] if "=" in item}
    if path and Path(path).is_file():
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            values = {}  # load_config has already refused it
        for section, entries in values.items():
            if isinstance(entries, dict):
                keys.update(f"{section}.{key}" for key in entries)
    return {RENAMED[key][0] if key in RENAMED else key for key in keys}


# A saved run is read for what it fixes (model, MTP, data, tokenizer), never for its layout.
ONE_PROCESS = [
    "parallel.dp=1",
    "parallel.dp_replicate=1",
    "parallel.cp=1",
    "parallel.tp=1",
    "parallel.pp=1",
]


def load_saved_config(path: str | Path) -> TrainConfig:
    """A run's own ``config.toml``, with its parallel layout reset to one process: a run
    resumes and decodes at any layout, so the checks of the layout it was saved at (CP's
    alignment, sequence parallelism's lengths, a TP split written before a new check) must not
    make it unreadable."""
    return load_config(path, ONE_PROCESS)


def _field_docs(section_cls: type) -> dict[str, str]:
    """Field help from the ``Attributes:`` block of a section's docstring."""
    docs: dict[str, str] = {}
    current = None
    for line in (section_cls.__doc__ or "").splitlines()[1:]:
        match = re.match(r"\s{8}(\w+): (.*)", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.startswith(" " * 12):
            docs[current] += " " + line.strip()
    return docs


def config_help() -> str:
    """Every key with its default and documentation, for ``--help``."""
    lines = []
    defaults = TrainConfig()
    for name, cls in _sections().items():
        lines.append(f"[{name}] {(cls.__doc__ or '').splitlines()[0]}")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, name), f.name)
            lines.append(f"  {name}.{f.name}={value!r}: {docs.get(f.name, '')}")
    return "\n".join(lines)


def to_toml(cfg: TrainConfig) -> str:
    """The resolved configuration as TOML (written next to every run)."""
    out = []
    for section, entries in cfg.to_dict().items():
        out.append(f"[{section}]")
        for key, value in entries.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            out.append(f"{key} = {text}")
        out.append("")
    return "\n".join(out)


def fixed_keys(cfg: TrainConfig) -> list[str]:
    """``section.field`` keys a run's weights and tokenizer depend on (fixed on resume)."""
    keys = []
    for section in dataclasses.fields(cfg):
        for item in dataclasses.fields(getattr(cfg, section.name)):
            if item.metadata.get("fixed_on_resume"):
                keys.append(f"{section.name}.{item.name}")
    return keys
