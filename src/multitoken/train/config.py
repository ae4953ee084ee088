"""Training configuration: dataclasses merged from defaults, a TOML file, then ``key=value``.

Every field is documented in its section's docstring (``Attributes:``); those lines are the
CLI's help (``multitoken train --help``). Unknown keys and values of the wrong type are errors
that name the key and the fix, raised before any process is started.

Example::

    cfg = load_config("configs/default.toml", ["model.dim=128", "train.steps=50", "parallel.cp=2"])
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["TrainConfig", "ConfigError", "load_config", "config_help", "to_toml", "gpt_config"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclass
class ModelSection:
    """The reference GPT (vocab_size comes from the tokenizer).

    Attributes:
        dim: hidden size.
        n_layers: transformer layers of the main model.
        n_heads: query heads.
        n_kv_heads: key/value heads (grouped-query attention); 0 = n_heads.
        ffn_dim: SwiGLU hidden size; 0 = 8/3 * dim rounded to 64.
        max_seq_len: longest position the rotary table covers.
        tie_embeddings: share the embedding with the output head.
        attention: "document" (causal within documents) or "causal" (across the row).
        backend: "auto" (FlexAttention on CUDA, SDPA on CPU), "sdpa" or "flex".
        rope_theta: rotary base.
        init_std: weight initialisation standard deviation.
        recompute: recompute the main model's layers in the backward (less memory).
    """

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 0
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    attention: str = "document"
    backend: str = "auto"
    rope_theta: float = 10000.0
    init_std: float = 0.02
    recompute: bool = False


@dataclass
class MTPSection:
    """Multi-Token Prediction.

    Attributes:
        depth: extra future tokens predicted (D); 0 = plain next-token training.
        loss_weight: lambda in L_main + lambda/D * sum_k L_k.
        loss_weight_final: lambda after the switch (DeepSeek-V3: 0.3 then 0.1); <0 = no switch.
        loss_weight_switch: fraction of train.steps after which loss_weight_final applies.
        hidden_first: concatenate [hidden; embedding] (MiMo order) instead of DeepSeek's.
        recompute: recompute the MTP layers in the backward (less memory, same result).
    """

    depth: int = 2
    loss_weight: float = 0.3
    loss_weight_final: float = -1.0
    loss_weight_switch: float = 0.7
    hidden_first: bool = False
    recompute: bool = False


@dataclass
class DataSection:
    """Corpus, tokenizer, packing.

    Attributes:
        path: a folder of text files or a .jsonl file with a "text" field; "" = the Python
            standard library's source (each file a document).
        max_files: use at most this many files of the corpus; 0 = all.
        vocab_size: byte-level BPE vocabulary size (trained on the corpus, cached).
        seq_len: tokens per packed row (global, before context-parallel sharding).
        batch_size: rows per global batch (split over data-parallel ranks).
        val_fraction: share of documents held out for validation.
        align: pad every document piece to a multiple of this inside its row; 0 = 2 * cp.
        cache_dir: where the tokenizer and token arrays are cached.
        format: "auto", "text" (folder), "jsonl" (.jsonl/.gz/.zst), "parquet", "hf_disk"
            (datasets save_to_disk folder) or "hf" (local files through load_dataset).
        text_field: the JSONL field / Parquet or dataset column holding the document text.
        glob: which files of a data folder to read (fnmatch on the relative path, * crosses /).
        on_bad_record: "error" (stop, naming file and line) or "skip" (count and report).
        tokenizer: a tokenizer.json or Hugging Face model folder to use; "" = train a BPE.
        tokenizer_sample_mb: MB of training text the BPE is trained on (the first ones).
        workers: tokenisation processes; 0 = 1 below 100 MB of input, else min(cores, 16).
        pack_window: documents packed together (best-fit); 0 = the whole epoch at once.
        verify: check a cached token store by "full" checksum or by file "size" only.
    """

    path: str = ""
    max_files: int = 0
    vocab_size: int = 4096
    seq_len: int = 512
    batch_size: int = 8
    val_fraction: float = 0.02
    align: int = 0
    cache_dir: str = ".cache/multitoken"
    format: str = "auto"
    text_field: str = "text"
    glob: str = "*"
    on_bad_record: str = "error"
    tokenizer: str = ""
    tokenizer_sample_mb: int = 256
    workers: int = 0
    pack_window: int = 8192
    verify: str = "full"


@dataclass
class TrainSection:
    """Optimisation loop.

    Attributes:
        steps: optimiser steps of the whole run (the schedule's length).
        stop_after: stop after this step (0 = train.steps); resume later with train.resume.
        lr: peak learning rate (AdamW).
        min_lr: final learning rate of the cosine decay.
        warmup_steps: linear warmup steps.
        weight_decay: AdamW weight decay (matrices only).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: clip the global gradient norm to this; 0 = off.
        log_every: log train metrics every this many steps.
        eval_every: validate every this many steps (and at the end); 0 = only at the end.
        eval_batches: validation batches per evaluation.
        save_every: checkpoint every this many steps (and at the end); 0 = only at the end.
        resume: continue from the newest complete checkpoint of this run.
        seed: seed of the weights and the data order.
        bf16: bf16 autocast on CUDA (ignored on CPU).
    """

    steps: int = 200
    stop_after: int = 0
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    resume: bool = False
    seed: int = 0
    bf16: bool = True


@dataclass
class ParallelSection:
    """Parallelism over local or torchrun-launched ranks (world = dp * cp).

    Attributes:
        dp: data-parallel ranks.
        cp: context-parallel ranks (each row is sharded over them).
        lookahead: "halo" (MTP lookahead filled when sharding, no messages) or "exchange"
            (one collective per step from local shards).
    """

    dp: int = 1
    cp: int = 2
    lookahead: str = "halo"


@dataclass
class RunSection:
    """Where the run writes.

    Attributes:
        name: run name; everything goes to <dir>/<name>/.
        dir: parent folder of runs.
        tensorboard: also write TensorBoard events (needs the tensorboard package).
        overwrite: start over in a folder that already holds a run (its checkpoints and
            metrics are removed); without it, that is an error unless train.resume=true.
    """

    name: str = "default"
    dir: str = "runs"
    tensorboard: bool = False
    overwrite: bool = False


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    mtp: MTPSection = field(default_factory=MTPSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


def _field_type(section_cls: type, name: str) -> type:
    hints = typing.get_type_hints(section_cls)
    return hints[name]


def _coerce(key: str, raw: Any, kind: type, from_cli: bool) -> Any:
    """Convert a TOML value (typed) or a command-line string (parsed) to the field's type."""
    from_cli = from_cli and isinstance(raw, str) and kind is not str
    if kind is bool:
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
        return raw
    name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{key} must be {name}, got {raw!r}")


def _set(cfg: TrainConfig, key: str, raw: Any, from_cli: bool = False) -> None:
    section_name, _, name = key.partition(".")
    sections = _sections()
    if section_name not in sections or not name:
        raise ConfigError(
            f"unknown config key {key!r}: keys are <section>.<field> with section one of "
            f"{', '.join(sections)} (see `multitoken train --help`)"
        )
    section = getattr(cfg, section_name)
    names = [f.name for f in dataclasses.fields(section)]
    if name not in names:
        close = [n for n in names if n.startswith(name[:3])]
        hint = f"; did you mean {section_name}.{close[0]}?" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint} (see `multitoken train --help`)")
    setattr(section, name, _coerce(key, raw, _field_type(type(section), name), from_cli))


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data and no process: raise :class:`ConfigError` on the first."""
    checks = [
        (cfg.parallel.dp >= 1 and cfg.parallel.cp >= 1, "parallel.dp and parallel.cp must be >= 1"),
        (
            cfg.parallel.lookahead in ("halo", "exchange"),
            'parallel.lookahead must be "halo" or "exchange"',
        ),
        (cfg.mtp.depth >= 0, "mtp.depth must be >= 0"),
        (cfg.mtp.loss_weight >= 0, "mtp.loss_weight must be >= 0"),
        (cfg.model.dim >= 2, "model.dim must be >= 2"),
        (cfg.model.n_layers >= 1, "model.n_layers must be >= 1"),
        (cfg.model.n_heads >= 1, "model.n_heads must be >= 1"),
        (cfg.model.n_kv_heads >= 0, "model.n_kv_heads must be >= 0 (0 = model.n_heads)"),
        (cfg.model.ffn_dim >= 0, "model.ffn_dim must be >= 0 (0 = 8/3 * model.dim)"),
        (cfg.model.rope_theta > 0, "model.rope_theta must be > 0"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.min_lr >= 0, "train.min_lr must be >= 0"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (cfg.train.stop_after >= 0, "train.stop_after must be >= 0 (0 = train.steps)"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.eval_batches >= 1, "train.eval_batches must be >= 1"),
        (
            0 <= cfg.train.beta1 < 1 and 0 <= cfg.train.beta2 < 1,
            "train.beta1 and train.beta2 must be in [0, 1)",
        ),
        (cfg.train.grad_clip >= 0, "train.grad_clip must be >= 0 (0 = off)"),
        (cfg.data.max_files >= 0, "data.max_files must be >= 0 (0 = all)"),
        (cfg.train.steps >= 1, "train.steps must be >= 1"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.vocab_size >= 260, "data.vocab_size must be >= 260 (256 bytes + special tokens)"),
        (0 < cfg.data.val_fraction < 1, "data.val_fraction must be in (0, 1)"),
        (
            cfg.model.attention in ("document", "causal"),
            'model.attention must be "document" or "causal"',
        ),
        (
            cfg.model.backend in ("auto", "sdpa", "flex"),
            'model.backend must be "auto", "sdpa" or "flex"',
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.data.batch_size % cfg.parallel.dp:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} rows cannot be split over parallel.dp="
            f"{cfg.parallel.dp} ranks: make batch_size a multiple of dp"
        )
    align = alignment(cfg)
    if align % (2 * cfg.parallel.cp):
        raise ConfigError(
            f"data.align={align} must be a multiple of 2 * parallel.cp = {2 * cfg.parallel.cp}"
        )
    if cfg.data.seq_len % align or cfg.data.seq_len < align:
        suggestion = max(align, cfg.data.seq_len // align * align)
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is not compatible with parallel.cp="
            f"{cfg.parallel.cp}: it must be a positive multiple of {align} (2 * cp chunks per "
            f"document, see data.align), e.g. data.seq_len={suggestion}"
        )
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}: "
            "raise model.max_seq_len"
        )
    if cfg.model.dim % cfg.model.n_heads or (cfg.model.dim // cfg.model.n_heads) % 2:
        raise ConfigError(
            f"model.dim={cfg.model.dim} must split into model.n_heads={cfg.model.n_heads} heads "
            "of an even size"
        )
    kv = cfg.model.n_kv_heads or cfg.model.n_heads
    if cfg.model.n_heads % kv:
        raise ConfigError(f"model.n_heads={cfg.model.n_heads} is not a multiple of n_kv_heads={kv}")


def alignment(cfg: TrainConfig) -> int:
    """Multiple every packed document piece is padded to (so CP shards need no more padding)."""
    return cfg.data.align or 2 * cfg.parallel.cp


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            values = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path!r} is not valid TOML: {err}") from None
    cfg = TrainConfig()
    for section, entries in values.items():
        if not isinstance(entries, dict):
            raise ConfigError(f"unknown config key {section!r}: put keys under [section] tables")
        for key, value in entries.items():
            _set(cfg, f"{section}.{key}", value)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set(cfg, key.strip(), value.strip(), from_cli=True)
    validate(cfg)
    return cfg


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


def gpt_config(cfg: TrainConfig, vocab_size: int, pad_id: int = 0):
    """The :class:`~multitoken.models.GPTConfig` a training configuration describes."""
    from multitoken.models import GPTConfig
    from multitoken.mtp import MTPConfig

    m = cfg.model
    return GPTConfig(
        vocab_size=vocab_size,
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads or None,
        ffn_dim=m.ffn_dim or None,
        max_seq_len=m.max_seq_len,
        tie_embeddings=m.tie_embeddings,
        attention=m.attention,
        backend=m.backend,
        rope_theta=m.rope_theta,
        init_std=m.init_std,
        recompute=m.recompute,
        pad_id=pad_id,
        mtp=MTPConfig(
            depth=cfg.mtp.depth,
            loss_weight=cfg.mtp.loss_weight,
            hidden_first=cfg.mtp.hidden_first,
            recompute=cfg.mtp.recompute,
        ),
    )
