"""Training configuration: one dataclass per section, the model's own nested as they are.

``TrainConfig.model`` *is* the reference decoder's :class:`~multitoken.models.GPTConfig` and
``TrainConfig.mtp`` *is* :class:`~multitoken.mtp.MTPConfig` (lingua nests its model args the
same way): defaults and checks live once, on the dataclass that uses them. Every section
checks itself when it is built (``__post_init__``); checks across sections live in
:meth:`TrainConfig.validate`. Field docstrings (``Attributes:``) are the CLI's help. Loading
from TOML and ``key=value`` overrides is :mod:`multitoken.train.config_io`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from multitoken.errors import FIXED, ConfigError, require
from multitoken.models.gpt import GPTConfig
from multitoken.models.parallelize import check_tp_split, check_vocab_split
from multitoken.mtp import MTPConfig
from multitoken.parallel.pipeline import check_pipeline
from multitoken.train.feature_config import FeaturesSection
from multitoken.train.parallel_section import HALO_FILLS, ParallelSection

__all__ = [
    "TrainConfig",
    "DataSection",
    "TrainSection",
    "ParallelSection",
    "RunSection",
    "ConfigError",
    "alignment",
    "HALO_FILLS",
]


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


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
        align: pad every document piece to a multiple of this inside its row (2 * parallel.cp
            must divide it); 0 = 8, which serves cp 1, 2 and 4 with the same batches.
        cache_dir: where the tokenizer and token arrays are cached.
        format: "auto", "text" (folder), "jsonl" (.jsonl/.gz/.zst), "parquet", "hf_disk"
            (datasets save_to_disk folder) or "hf" (local files through load_dataset).
        text_field: the JSONL field / Parquet or dataset column holding the document text.
        glob: which files of a data folder to read (fnmatch on the relative path, * crosses /).
        on_bad_record: "error" (stop, naming file and line) or "skip" (count and report).
        max_doc_mb: skip (count and report) a document over this many MB; 0 = no limit.
        max_expanded_mb: stop (one error naming the file) when one compressed input file
            (.gz, .zst) expands to more than this many MB; 0 = no limit.
        tokenizer: a tokenizer.json or Hugging Face model folder to use; "" = train a BPE.
        tokenizer_sample_mb: MB of training text the BPE is trained on (the first ones).
        workers: tokenisation processes; 0 = 1 below 100 MB of input, else min(cores, 16).
        pack_window: documents packed together (best-fit); 0 = the whole epoch at once.
        verify: check a cached token store by "full" checksum or by file "size" only.
    """

    path: str = field(default="", metadata=FIXED)
    max_files: int = field(default=0, metadata=FIXED)
    vocab_size: int = field(default=4096, metadata=FIXED)
    seq_len: int = field(default=512, metadata=FIXED)
    batch_size: int = field(default=8, metadata=FIXED)
    val_fraction: float = field(default=0.02, metadata=FIXED)
    align: int = field(default=0, metadata=FIXED)
    cache_dir: str = ".cache/multitoken"
    format: str = "auto"
    text_field: str = "text"
    glob: str = "*"
    on_bad_record: str = "error"
    max_doc_mb: int = 64
    max_expanded_mb: int = 100_000
    tokenizer: str = ""
    tokenizer_sample_mb: int = 256
    workers: int = 0
    pack_window: int = 8192
    verify: str = "full"

    def __post_init__(self) -> None:
        require(
            [
                (self.max_files >= 0, "max_files", "must be >= 0 (0 = all)"),
                (self.seq_len >= 1, "seq_len", "must be >= 1"),
                (self.batch_size >= 1, "batch_size", "must be >= 1"),
                (0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)"),
                (self.align >= 0, "align", "must be >= 0 (0 = 8)"),
                (self.max_doc_mb >= 0, "max_doc_mb", "must be >= 0 (0 = no limit)"),
                (self.max_expanded_mb >= 0, "max_expanded_mb", "must be >= 0 (0 = no limit)"),
                (self.tokenizer_sample_mb >= 1, "tokenizer_sample_mb", "must be >= 1"),
                (self.workers >= 0, "workers", "must be >= 0 (0 = automatic)"),
                (self.verify in ("size", "full"), "verify", 'must be "size" or "full"'),
            ],
            self,
        )


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
        keep_checkpoints: keep this many newest checkpoints, delete older ones; 0 = keep all.
        resume: continue from the newest intact checkpoint of this run: true (one must
            exist), false (start fresh) or "auto" (resume if one exists, else start fresh: the
            same command line for a first start and a requeue).
        max_skipped_steps: consecutive steps whose update is skipped for a non-finite loss or
            gradient norm before the run stops with an error.
        seed: seed of the weights and the data order.
        bf16: bf16 autocast on CUDA (ignored on CPU).
        check_inputs: check every batch's values (token ids, positions); off saves a few
            host syncs per step on GPU.
        compile: compile every transformer layer and MTP depth with torch.compile (the
            first steps pay the compilation; falls back to eager, with a message, where
            torch.compile cannot run).
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
    keep_checkpoints: int = 3
    resume: bool | str = False
    max_skipped_steps: int = 5
    seed: int = 0
    bf16: bool = True
    check_inputs: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        require(
            [
                (self.steps >= 1, "steps", "must be >= 1"),
                (self.stop_after >= 0, "stop_after", "must be >= 0 (0 = train.steps)"),
                (_finite(self.lr) and self.lr > 0, "lr", "must be a finite number > 0"),
                (_finite(self.min_lr) and self.min_lr >= 0, "min_lr", "must be >= 0"),
                (self.min_lr <= self.lr, "min_lr", f"must be <= train.lr={self.lr}"),
                (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
                (
                    _finite(self.weight_decay) and self.weight_decay >= 0,
                    "weight_decay",
                    "must be >= 0",
                ),
                (0 <= self.beta1 < 1, "beta1", "must be in [0, 1)"),
                (0 <= self.beta2 < 1, "beta2", "must be in [0, 1)"),
                (_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "must be >= 0"),
                (self.log_every >= 1, "log_every", "must be >= 1"),
                (self.eval_every >= 0, "eval_every", "must be >= 0 (0 = only at the end)"),
                (self.eval_batches >= 1, "eval_batches", "must be >= 1"),
                (self.save_every >= 0, "save_every", "must be >= 0 (0 = only at the end)"),
                (self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 = all)"),
                (self.resume in (True, False, "auto"), "resume", 'must be true, false or "auto"'),
                (self.max_skipped_steps >= 0, "max_skipped_steps", "must be >= 0"),
                (0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)"),
            ],
            self,
        )


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

    def __post_init__(self) -> None:
        # A run writes only inside <dir>/<name>: the name is one plain path component.
        name = self.name
        require(
            [
                (name not in ("", ".", ".."), "name", "must be a plain folder name"),
                (
                    "/" not in name and "\\" not in name and all(ord(c) >= 32 for c in name),
                    "name",
                    "must be a plain folder name (no /, \\ or control characters; put runs "
                    "elsewhere with run.dir)",
                ),
                (len(name.encode()) <= 200, "name", "must be at most 200 bytes"),
                (self.dir != "", "dir", 'must be a folder (run.dir="." for this one)'),
            ],
            self,
        )


@dataclass
class TrainConfig:
    """Everything ``multitoken train`` needs; see ``multitoken train --help``."""

    model: GPTConfig = field(default_factory=GPTConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=RunSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The decoder's config for a tokenizer of ``vocab_size`` tokens: ``model.vocab_size``
        rows (0 = the tokenizer's; more pads the embedding and head with rows that are never a
        target, e.g. to a multiple of ``parallel.tp``), checked before anything is written.

        Raises:
            ConfigError: fewer rows than tokens, or rows that ``parallel.tp`` does not divide.
        """
        rows = self.model.vocab_size or vocab_size
        if rows < vocab_size:
            raise ConfigError(
                f"is {rows} but the tokenizer has {vocab_size} tokens: set model.vocab_size=0 "
                "(the tokenizer's), a larger one, or another data.vocab_size",
                "model.vocab_size",
            )
        self._check_rows_split(rows, "model.vocab_size")  # padding rows, never a target
        return GPTConfig(**{**asdict(self.model), "vocab_size": rows})

    def _check_rows_split(self, rows: int, key: str) -> None:
        """TP splits the embedding and the head by rows: ``rows`` must divide by tp."""
        if not self.model.hf:
            check_vocab_split(rows, self.parallel.tp, key)

    def validate(self) -> None:
        """Checks across sections (each section checked itself when it was built)."""
        self._check_batch_layout()
        self._check_model_layout()

    def _check_batch_layout(self) -> None:
        """The batch fits the layout: rows split over dp, pieces over 2 * cp."""
        data, parallel = self.data, self.parallel
        if data.batch_size % parallel.dp:
            raise ConfigError(
                f"data.batch_size={data.batch_size} rows cannot be split over parallel.dp="
                f"{parallel.dp} ranks: make batch_size a multiple of dp"
            )
        align = alignment(self)
        if align % (2 * parallel.cp):
            raise ConfigError(
                f"parallel.cp={parallel.cp} cuts every document piece into 2 * cp = "
                f"{2 * parallel.cp} stripes, which data.align={align} does not divide: set "
                f"data.align={max(align, 2 * parallel.cp) // (2 * parallel.cp) * 2 * parallel.cp}"
                " (and the same value in every run you compare: it decides the batches)"
            )
        if data.seq_len % align or data.seq_len < align:
            suggestion = max(align, data.seq_len // align * align)
            raise ConfigError(
                f"data.seq_len={data.seq_len} is not compatible with parallel.cp={parallel.cp}: "
                f"it must be a positive multiple of {align} (2 * cp stripes per document, see "
                f"data.align), e.g. data.seq_len={suggestion}"
            )
        if data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}: raise model.max_seq_len"
            )
        if self.run.overwrite and self.train.resume:
            raise ConfigError(
                f"run.overwrite=true removes the run that train.resume={self.train.resume!r} "
                "would continue: set one of them"
            )

    def _check_pipeline_scope(self) -> None:
        """What ``parallel.pp > 1`` runs besides the reference GPT: heads-only Hugging Face
        models, one rank per stage (docs/parallelism.md#pipeline-parallelism)."""
        parallel, hf = self.parallel, self.model.hf
        if self.features.offline:
            raise ConfigError(
                "features.mode=offline with parallel.pp > 1: the pipeline stages run the "
                "backbone themselves; use features.mode=online (or parallel.pp=1)"
            )
        if self.mtp.loss != "ce" and parallel.cp > 1:
            raise ConfigError(
                f"mtp.loss={self.mtp.loss} with parallel.pp > 1 and parallel.cp > 1: a "
                "microbatch's teacher rows i + k from the CP peers are not exchanged per "
                "microbatch yet; use mtp.loss=ce, parallel.cp=1 or parallel.pp=1"
            )
        if hf and not self.mtp.freeze_base:
            raise ConfigError(
                "parallel.pp > 1 with model.hf trains the MTP heads only: set "
                "mtp.freeze_base=true (or parallel.pp=1)"
            )
        if hf and parallel.world != parallel.pp:
            raise ConfigError(
                f"parallel.pp={parallel.pp} with model.hf runs one rank per stage: set "
                f"parallel.dp=1, parallel.cp=1 and parallel.tp=1 (got dp={parallel.dp}, "
                f"cp={parallel.cp}, tp={parallel.tp})"
            )

    def _check_model_layout(self) -> None:
        """The model fits the layout: tp splits its heads, widths and vocabulary rows."""
        data, parallel, model, tp = self.data, self.parallel, self.model, self.parallel.tp
        self.mtp.check_layout(tp, parallel.cp)
        self.features.check_layout(self.mtp.freeze_base, parallel.cp, tp)
        if parallel.pp > 1:
            self._check_pipeline_scope()
        if parallel.pp > 1 and not model.hf:  # model.hf: its layer count, in check_hf_folder
            try:  # the rows split into microbatches, the layers into stages
                rows = data.batch_size // parallel.dp
                check_pipeline(parallel.pp, parallel.pp_schedule, parallel.pp_microbatches,
                               rows, model.n_layers, parallel.pp_layers)  # fmt: skip
            except ConfigError as err:
                raise err.under("parallel") from None
        check_tp_split(model.n_heads, model.kv_heads, model.ffn_hidden, tp)
        rows = model.vocab_size or (0 if data.tokenizer else data.vocab_size)  # a BPE's size
        self._check_rows_split(rows, "model.vocab_size" if model.vocab_size else "data.vocab_size")
        local = data.seq_len // parallel.cp  # positions per CP rank (cp divides seq_len)
        if tp > 1 and parallel.sequence_parallel and not model.hf and local % tp:
            raise ConfigError(
                f"parallel.sequence_parallel splits the {local} positions each CP rank holds "
                f"(data.seq_len / parallel.cp) over parallel.tp={tp} ranks, which does not "
                f"divide them: make data.seq_len a multiple of cp * tp = {parallel.cp * tp}, "
                "or set parallel.sequence_parallel=false"
            )
        if self.mtp.num_depths >= data.seq_len:
            raise ConfigError(
                f"mtp.num_depths={self.mtp.num_depths} leaves no target in rows of data.seq_len="
                f"{data.seq_len} tokens: lower mtp.num_depths or raise data.seq_len"
            )


DEFAULT_ALIGN = 8


def alignment(cfg: TrainConfig) -> int:
    """Multiple every packed document piece is padded to (so CP shards need no more padding).

    Independent of ``parallel.cp`` by default, so that every parallel layout with the same
    global batch trains on the same tokens in the same order (CP = 1 and CP = 4 alike).
    """
    return cfg.data.align or DEFAULT_ALIGN
