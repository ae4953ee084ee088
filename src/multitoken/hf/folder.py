"""The one gate every user-supplied Hugging Face model folder passes before anything reads it.

:func:`check_model_folder` is called by every load of a model folder (``model.hf=`` in the
training preflight, the tokenizer, the model, the MTP weights, ``generate --run`` on an HF run)
and refuses, with one :class:`~multitoken.errors.ConfigError` naming the file and the fix:

- code: an ``auto_map`` in ``config.json`` or ``tokenizer_config.json`` (transformers would
  offer to run the folder's Python files); every transformers call also passes
  ``trust_remote_code=False``, so nothing can prompt;
- anything but regular files (or links to them) in the folder: a FIFO, a device or a socket
  would hang a reader; a broken link;
- paths that leave the folder: a shard index (``*.safetensors.index.json``) naming anything
  but a plain file name in the folder;
- a ``config.json`` with missing, mistyped or absurd fields (bounds below), or one
  transformers cannot build;
- safetensors that are not whole: a bad header, a truncated file, tensors whose offsets do not
  tile the data, a dtype other than a float one, a backbone tensor missing or of a shape the
  config does not give.

Everything here reads JSON and the safetensors headers only (no tensor data, no allocation
of the model), so a refused folder costs milliseconds and leaves nothing written.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multitoken.errors import ConfigError
from multitoken.hf.backbone import check_backbone
from multitoken.hf.multimodal import text_config, text_names

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ModelFolder",
    "ModelShape",
    "check_model_folder",
    "load_json",
    "regular_file",
]

# Architectures whose decoder layers the adapter drives exactly (tests/unit/test_hf_adapter.py).
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "deepseek_v3",
    "glm4_moe",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5_text",
    "qwen3_5_moe_text",
)
_JSON_LIMIT = 64 << 20  # no config or index we read is near this
_HEADER_LIMIT = 100_000_000  # the safetensors library's own limit
_FLOAT_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# config.json fields: (required, lowest, highest); every one an integer.
_INT_FIELDS = {
    "vocab_size": (True, 1, 1 << 24),
    "hidden_size": (True, 1, 1 << 17),
    "intermediate_size": (True, 1, 1 << 20),
    "num_hidden_layers": (True, 1, 1024),
    "num_attention_heads": (True, 1, 1024),
    "num_key_value_heads": (False, 1, 1024),
    "head_dim": (False, 1, 4096),
    "max_position_embeddings": (False, 1, 1 << 24),
    "sliding_window": (False, 1, 1 << 24),
    "num_nextn_predict_layers": (False, 0, 64),
    "mtp_num_hidden_layers": (False, 0, 64),
}
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family model, as the memory estimate needs them."""

    vocab: int
    dim: int
    n_layers: int
    n_heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool

    @property
    def layer_params(self) -> int:
        attention = 2 * self.dim * self.n_heads * self.head_dim
        attention += 2 * self.dim * self.kv_heads * self.head_dim
        return attention + 3 * self.dim * self.ffn + 2 * self.dim

    @property
    def params(self) -> int:
        """Parameters of the model (biases and QK-norms left out: a lower bound)."""
        embed = self.vocab * self.dim * (1 if self.tied else 2)
        return embed + self.n_layers * self.layer_params + self.dim


@dataclass(frozen=True)
class ModelFolder:
    """A checked model folder: its ``config.json``, shape and safetensors files."""

    path: Path
    config: dict[str, Any]
    shape: ModelShape
    weight_files: tuple[Path, ...]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape), no data read
    # Stored names that differ from the model's (a multimodal folder's text model): stored ->
    # the model's name, or None for what is never read (its vision tower).
    renamed: dict[str, str | None] = field(default_factory=dict)

    def model_name(self, stored: str) -> str | None:
        """The model's name for a tensor stored as ``stored`` (None: not read)."""
        return self.renamed.get(stored, stored)


def regular_file(path: Path, what: str) -> Path:
    """``path`` when it is a regular file (or a link to one), else one error naming it."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise ConfigError(f"{path} ({what}) cannot be read: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(
            f"{path} ({what}) is not a regular file (a FIFO, device, socket or folder "
            "would hang or mislead the reader): replace it with the file itself"
        )
    return path


def load_json(path: Path, what: str) -> Any:
    """A small JSON file, read only if it is a regular file of bounded size."""
    regular_file(path, what)
    if path.stat().st_size > _JSON_LIMIT:
        raise ConfigError(f"{path} ({what}) is over {_JSON_LIMIT >> 20} MiB: not a {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConfigError(f"{path} is not valid JSON ({str(err)[:200]})") from None


def _check_entries(folder: Path) -> None:
    """Every entry of the folder is a folder or a regular file (links followed)."""
    for entry in sorted(folder.iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:
            raise ConfigError(
                f"{entry} is a broken link or cannot be read: remove it from the model folder"
            ) from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            regular_file(entry, "a file of the model folder")


def _refuse_code(path: Path, data: Any) -> None:
    if isinstance(data, dict) and "auto_map" in data:
        raise ConfigError(
            f"{path} names custom code (auto_map {sorted(data['auto_map'])[:3]}), which "
            "multitoken never runs: remove 'auto_map' and use a built-in transformers class"
        )


def _read_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config.json`` as stored, and as the text model's (the same but for a multimodal one)."""
    if not (folder / "config.json").exists():
        raise ConfigError(
            f"{folder} is not a Hugging Face model folder (no config.json): point model.hf at a "
            "folder written by save_pretrained (config.json, *.safetensors, tokenizer files)"
        )
    config = load_json(folder / "config.json", "config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"{folder / 'config.json'} is not a JSON object")
    _refuse_code(folder / "config.json", config)
    arch = ", ".join(map(str, config.get("architectures") or ["?"]))
    stored, config = config, text_config(folder / "config.json", config)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{folder} holds a {arch} (model_type {model_type!r}), which the multitoken HF "
            f"adapter does not support: supported model types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return stored, config


def _check_fields(path: Path, config: dict[str, Any]) -> None:
    """Types and bounds of the fields that size the model."""
    for key, (required, low, high) in _INT_FIELDS.items():
        value = config.get(key)
        if value is None and not required:
            continue
        if value is None:
            raise ConfigError(f"{path} lacks {key!r}: the model's size cannot be known")
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{path}: {key}={value!r} is not an integer in [{low}, {high}]")
    for key in _BOOL_FIELDS:
        if key in config and not isinstance(config[key], bool):
            raise ConfigError(f"{path}: {key}={config[key]!r} is not true or false")
    eps = config.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        raise ConfigError(f"{path}: rms_norm_eps={eps!r} is not a number in (0, 1)")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(
            f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
            f"{kv_heads}"
        )
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise ConfigError(
            f"{path}: hidden_size={config['hidden_size']} is not a multiple of "
            f"num_attention_heads={heads} (and no head_dim is given)"
        )


def _build_config(path: Path, config: dict[str, Any]) -> None:
    """What transformers itself refuses in the config, as one line (no remote code)."""
    from transformers import CONFIG_MAPPING  # transformers' own classes, never a folder's
    from transformers.activations import ACT2FN

    act = config.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise ConfigError(f"{path}: hidden_act={act!r} is not an activation transformers knows")
    _check_rope(path, config)
    try:
        CONFIG_MAPPING[config["model_type"]](**config)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path} is not a config transformers can build ({reason})") from None


def _check_rope(path: Path, config: dict[str, Any]) -> None:
    """A rotary embedding transformers implements (an unknown kind was a KeyError mid-build)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ConfigError(f"{path}: {key} is not a JSON object")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
            raise ConfigError(f"{path}: {key} names rope_type {kind!r}, which transformers lacks")
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta > 0:
            raise ConfigError(f"{path}: rope_theta={theta!r} is not a positive number")


def _shape(config: dict[str, Any]) -> ModelShape:
    heads, dim = config["num_attention_heads"], config["hidden_size"]
    return ModelShape(
        vocab=config["vocab_size"],
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or dim // heads,
        ffn=config["intermediate_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a load reads: the shard index's (plain names in the folder only),
    else every ``*.safetensors`` here."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = load_json(index, "shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index} has no 'weight_map' of tensor names to files")
        names = set()
        for name in weight_map.values():
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ConfigError(
                    f"{index} maps tensors to {name!r}, which is not a file in {folder}: a "
                    "shard index may name only files beside it"
                )
            names.add(name)
        files = [folder / name for name in sorted(names)]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"{folder} has no *.safetensors weights: save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    return files


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors file's tensors (name -> dtype, shape), checked against the file's size."""
    regular_file(path, "safetensors weights")
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= length <= min(_HEADER_LIMIT, size - 8):
            raise ConfigError(f"{path} is not a safetensors file (its header is damaged)")
        try:
            header = json.loads(stream.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise ConfigError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return _check_tensors(path, header, size - 8 - length)


def _check_tensors(path: Path, header: dict, data_bytes: int) -> dict:
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape = info["dtype"], tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise TypeError
            if not (isinstance(begin, int) and isinstance(end, int)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: the header entry of {name!r} is damaged") from None
        if dtype not in _FLOAT_BYTES:
            raise ConfigError(
                f"{path}: tensor {name!r} is {dtype}; model weights must be one of "
                f"{', '.join(_FLOAT_BYTES)}"
            )
        if end - begin != math.prod(shape) * _FLOAT_BYTES[dtype]:
            raise ConfigError(f"{path}: tensor {name!r} has a size its shape {shape} does not give")
        tensors[name] = (dtype, shape)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            break
        position = end
    if position != data_bytes:
        raise ConfigError(
            f"{path} is truncated or damaged: its tensors cover {position} of its "
            f"{data_bytes} data bytes"
        )
    return tensors


def check_model_folder(path: str | Path) -> ModelFolder:
    """Refuse a model folder that is unsafe or unusable, before anything of it is loaded.

    Raises:
        ConfigError: naming the file and what is wrong (see the module docstring).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(
            f"{folder} is not a Hugging Face model folder (not a folder): point model.hf at a "
            "folder written by save_pretrained"
        )
    stored, config = _read_config(folder)
    _check_entries(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        if (folder / name).exists():
            _refuse_code(folder / name, load_json(folder / name, name))
    _check_fields(folder / "config.json", config)
    _build_config(folder / "config.json", config)
    shape = _shape(config)
    files = _weight_files(folder)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        tensors.update(_read_header(file))
    renamed = text_names(folder, stored, tensors)
    tensors = {renamed.get(k, k): v for k, v in tensors.items() if renamed.get(k, k) is not None}
    check_backbone(folder, shape, config, tensors)
    return ModelFolder(folder, config, shape, tuple(files), tensors, renamed)
