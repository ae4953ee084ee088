"""``multitoken train model.hf=PATH``: the HF folder's tokenizer and model in the trainer.

The trainer asks for three things, each answered here from the folder: the tokenizer that
tokenises the corpus (:func:`hf_tokenizer`, called before any rank starts or anything is
written, so a bad folder is one ``error:`` line), the model (:func:`build_hf_model`, with
context and data parallelism applied from outside as for the reference GPT), and, for inference,
both (:func:`hf_model_and_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from multitoken.data.tokenizer import documents_with_eos
from multitoken.errors import ConfigError, DataError
from multitoken.hf.adapter import read_config
from multitoken.hf.folder import check_model_folder
from multitoken.hf.formats import CONFIG_KEYS, detect_format
from multitoken.hf.gguf import model_folder
from multitoken.hf.meta import materialize_hf_mtp_model, meta_hf_mtp_model
from multitoken.hf.parallelize import check_hf_layout
from multitoken.hf.pipeline import PIPELINE_MODEL_TYPES
from multitoken.hf.weights import checkpoint_keys, load_hf_mtp_model
from multitoken.mtp_model import MTPModel
from multitoken.parallel.pipeline import check_pipeline

__all__ = [
    "HFTokenizer",
    "hf_folder",
    "check_hf_folder",
    "hf_tokenizer",
    "build_hf_model",
    "materialize_hf_model",
    "hf_model_and_tokenizer",
]


class HFTokenizer:
    """A folder's fast (``tokenizer.json``) tokenizer with the interface multitoken's data
    pipeline and decoding use (``encode``, ``encode_batch``, ``decode``, ``pad_id``, ``eos_id``,
    ``vocab_size``, ``save``, ``backend``).

    Args:
        path: the HF model folder.
        model_vocab_size: rows of the model's embedding; the tokenizer must fit in them.
    """

    def __init__(self, path: str | Path, model_vocab_size: int):
        check_model_folder(path)  # no auto_map (custom code), regular files only, ...
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            # Never a prompt, never the folder's code, whatever is answered.
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError) as err:
            raise DataError(f"{path} has no tokenizer transformers can load ({err})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DataError(
                f"{path} has a slow tokenizer only: save a fast one (tokenizer.json) with it"
            )
        if tokenizer.eos_token_id is None:
            raise DataError(f"the tokenizer of {path} has no eos token to end documents with")
        if len(tokenizer) > model_vocab_size:
            raise ConfigError(
                f"the tokenizer of {path} has {len(tokenizer)} tokens but the model's vocabulary "
                f"(vocab_size in config.json) has {model_vocab_size}: use the tokenizer the "
                "model was trained with"
            )
        # As multitoken's own tokenizer: text is text, so data cannot forge a document end.
        backend.encode_special_tokens = True
        self.hf, self.backend = tokenizer, backend
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str], dtype) -> tuple:
        """As :meth:`multitoken.data.Tokenizer.encode_documents` (what the token store calls)."""
        return documents_with_eos(self.encode_batch(texts), self.eos_id, dtype)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.backend.to_str())

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos={self.eos_id})"


def hf_folder(cfg) -> Path:
    """``model.hf`` as a model folder: the folder itself, or a GGUF file's dequantised copy
    under ``data.cache_dir`` (built on first use: :func:`~multitoken.hf.gguf.gguf_folder`)."""
    return model_folder(cfg.model.hf, cfg.data.cache_dir)


def check_hf_folder(cfg) -> dict:
    """Everything about ``model.hf`` that can be refused without loading the weights (the
    folder's gate, :func:`~multitoken.hf.folder.check_model_folder`, first); its config."""
    path = hf_folder(cfg)
    config = read_config(path)
    check_hf_layout(cfg.parallel.tp, cp=cfg.parallel.cp, model_type=config["model_type"])
    if cfg.parallel.pp > 1:
        _check_hf_pipeline(cfg, config)
    if cfg.data.seq_len > config.get("max_position_embeddings", cfg.data.seq_len):
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings="
            f"{config['max_position_embeddings']}: lower data.seq_len"
        )
    extra = set(checkpoint_keys(path))
    prefix_free = {k for k in extra if not k.startswith(("model.embed_tokens.", "model.norm."))}
    main = config["num_hidden_layers"]
    own = {
        k
        for k in prefix_free
        if k.startswith("lm_head.") or (k.startswith("model.layers.") and _layer_index(k) < main)
    }
    fmt = detect_format(prefix_free - own, config)
    if fmt is not None and cfg.mtp.num_depths:
        stored = 1 if fmt == "qwen3_next" else int(config[CONFIG_KEYS[fmt]])
        if stored != cfg.mtp.num_depths:
            raise ConfigError(
                f"{path} holds {stored} MTP depth(s) ({fmt} format) but mtp.num_depths="
                f"{cfg.mtp.num_depths}: set mtp.num_depths={stored}"
            )
    return config


def _check_hf_pipeline(cfg, config: dict) -> None:
    """The folder's model cut into ``parallel.pp`` stages (heads-only, one rank a stage: the
    rest was refused with the configuration): a dense architecture, its layers split."""
    if config["model_type"] not in PIPELINE_MODEL_TYPES:
        raise ConfigError(
            f"parallel.pp={cfg.parallel.pp} with a {config['model_type']} model: pipeline stages "
            f"are cut for the dense architectures ({', '.join(PIPELINE_MODEL_TYPES)}) only; "
            "use parallel.pp=1"
        )
    p = cfg.parallel
    try:
        check_pipeline(p.pp, p.pp_schedule, p.pp_microbatches, cfg.data.batch_size,
                       config["num_hidden_layers"], p.pp_layers,
                       "the model's num_hidden_layers")  # fmt: skip
    except ConfigError as err:
        raise err.under("parallel") from None


def _layer_index(key: str) -> int:
    """``model.layers.3.mlp...`` -> 3; a key with no layer number counts as past the model."""
    part = key.split(".")[2] if key.count(".") >= 2 else ""
    return int(part) if part.isdigit() else 1 << 30


def hf_tokenizer(cfg) -> HFTokenizer:
    """The tokenizer of ``model.hf``, after refusing a folder that cannot be trained."""
    config = check_hf_folder(cfg)
    return HFTokenizer(hf_folder(cfg), config["vocab_size"])


def build_hf_model(
    cfg, pad_id: int, device: torch.device | None = None, *, meta: bool = False
) -> MTPModel:
    """The folder's model with ``mtp.num_depths`` depths (its MTP weights when it has them), on
    ``device``. Parallelism is applied from outside, by the same code as for the reference GPT
    (:func:`multitoken.train.model.build_model`: context parallelism through the attention
    modules' ``kv_gather`` hooks, then FSDP2); tensor parallelism is refused (see
    :func:`hf_tokenizer`, which runs first). ``meta``: on the meta device, no weight read, for
    FSDP2 to shard before :func:`materialize_hf_model` (``device`` is then ignored)."""
    if meta:
        return meta_hf_mtp_model(
            hf_folder(cfg), cfg.mtp, pad_id=pad_id, attention=cfg.model.attention
        )
    model = load_hf_mtp_model(
        hf_folder(cfg), cfg.mtp, pad_id=pad_id, attention=cfg.model.attention, seed=cfg.train.seed
    )
    return model if device is None else model.to(device)


def materialize_hf_model(model: MTPModel, cfg, device: torch.device) -> MTPModel:
    """A ``build_hf_model(meta=True)`` model, sharded or not, given storage on ``device`` and
    the values the eager build gives it, each rank reading only its shard's rows."""
    return materialize_hf_mtp_model(model, hf_folder(cfg), device=device, seed=cfg.train.seed)


def hf_model_and_tokenizer(cfg) -> tuple[MTPModel, HFTokenizer]:
    """Model and tokenizer of an HF run for inference (CPU, eval mode)."""
    tokenizer = hf_tokenizer(cfg)
    with torch.device("cpu"):
        model = build_hf_model(cfg, tokenizer.pad_id)
    return model.eval(), tokenizer
