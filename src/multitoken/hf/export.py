"""A trained multitoken model as a Hugging Face folder that transformers loads.

The reference GPT is a Llama (pre-norm RMSNorm, RoPE with the half-split rotation, SwiGLU,
grouped-query attention, optional tied embeddings), so it is written as a
``LlamaForCausalLM``: the same rotation convention as transformers' ``rotate_half`` (no
permutation of q/k rows), ``rope_theta`` and ``rms_norm_eps`` carried over. Its MTP depths are
written in a released format (default ``mimo``: MiMo's MTP block is a dense Llama-family
decoder layer like the reference's, where DeepSeek/GLM blocks are MLA/MoE and Qwen3-Next's are
zero-centred; the concatenation order is converted exactly). A model on an HF decoder is
written with its own class.

Example::

    >>> model, tokenizer = load_for_inference("runs/default")
    >>> export_model(model, tokenizer, "exported")          # config.json, model.safetensors, ...
    >>> AutoModelForCausalLM.from_pretrained("exported")     # logits equal multitoken's
"""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from multitoken.errors import CheckpointError
from multitoken.hf.adapter import HFDecoder
from multitoken.hf.engine_blocks import implied_config
from multitoken.hf.formats import FORMATS, to_format
from multitoken.hf.serve_formats import SERVE_FORMATS
from multitoken.hf.weights import mtp_tensors, save_pretrained, save_with_mtp
from multitoken.models.gpt import GPT
from multitoken.mtp_model import MTPModel

__all__ = [
    "export_model",
    "check_target",
    "staging",
    "llama_config",
    "llama_model",
    "llama_state_dict",
    "DEFAULT_FORMAT",
    "OWN_FORMAT",
    "default_format",
    "SERVE_FORMATS",
    "reference_depths",
    "tokenizer_folder",
    "reference_mtp",
    "write_hf_model",
]

DEFAULT_FORMAT = "mimo"
# The released architectures export by default in their own layout (the one their releases,
# transformers and the serving engines read); every other model in DEFAULT_FORMAT.
OWN_FORMAT = {
    "deepseek_v3": "deepseek",
    "glm4_moe": "deepseek",
    "qwen3_next": "qwen3_next",
    "qwen3_5_text": "qwen3_next",
    "qwen3_5_moe_text": "qwen3_next",
}
# Reference layer parameter -> transformers Llama decoder-layer parameter.
_BLOCK = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def _block_key(key: str) -> str:
    """``attention.wq.weight`` -> ``self_attn.q_proj.weight``."""
    stem, leaf = key.rsplit(".", 1)
    if stem not in _BLOCK:
        raise CheckpointError(f"no Llama name for the reference parameter {key!r}")
    return f"{_BLOCK[stem]}.{leaf}"


def llama_config(gpt: GPT, eos_id: int, pad_id: int) -> LlamaConfig:
    """The ``LlamaConfig`` of a reference GPT (with the tokenizer's special ids)."""
    cfg = gpt.config
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def llama_state_dict(gpt: GPT) -> dict[str, Tensor]:
    """The reference GPT's weights under transformers Llama names."""
    out = {}
    for key, value in gpt.state_dict().items():
        if key == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["model.norm.weight"] = value
        elif key == "output.weight":
            out["lm_head.weight"] = value
        elif key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            out[f"model.layers.{index}.{_block_key(rest)}"] = value
        else:
            raise CheckpointError(f"no Llama name for the reference parameter {key!r}")
    if gpt.config.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def llama_model(gpt: GPT, eos_id: int, pad_id: int) -> LlamaForCausalLM:
    """The reference GPT as a transformers ``LlamaForCausalLM`` with the same weights (the
    main model: MTP depths are exported separately, in a released format)."""
    hf_model = LlamaForCausalLM(llama_config(gpt, eos_id, pad_id))
    hf_model.load_state_dict(llama_state_dict(gpt), strict=True)
    return hf_model


_OWNER = ".export-owner"


def check_target(out: str | Path) -> Path:
    """Refuse an export target that is not new: an existing file, a link, a folder with files.

    Raises:
        CheckpointError: naming ``out`` and the fix.
    """
    out = Path(out)
    if out.is_symlink():
        raise CheckpointError(f"{out} is a link: export into a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty: export into a new folder")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise CheckpointError(f"{out} cannot be created: {parent} is not a writable folder")
    return out


def _owner_gone(partial: Path) -> bool:
    """Whether the export that made ``partial`` is known to have ended (killed: its pid is
    gone on this host); unknown owners are taken to be alive."""
    try:
        fields = (partial / _OWNER).read_text().split()
        pid, host = int(fields[1]), fields[3]
    except (OSError, ValueError, IndexError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _claim(partial: Path, out: Path) -> None:
    """Create ``partial`` (the lock: ``mkdir`` succeeds for one export only), clearing one a
    killed export left behind."""
    for _ in range(2):
        try:
            partial.mkdir()
        except FileExistsError:
            if not _owner_gone(partial):
                raise CheckpointError(
                    f"another export into {out} is under way ({partial} exists): wait for it to "
                    "finish, or remove that folder if no export is running"
                ) from None
            shutil.rmtree(partial, ignore_errors=True)  # what a killed export left
            continue
        (partial / _OWNER).write_text(f"pid {os.getpid()} host {socket.gethostname()}\n")
        return
    raise CheckpointError(f"cannot claim {partial} for the export into {out}: try again")


@contextmanager
def staging(out: Path):
    """A temporary folder beside ``out``, renamed to ``out`` when the block completes (removed
    if it fails), and held by one export at a time."""
    partial = out.parent / f".{out.name}.export-partial"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _claim(partial, out)
    except OSError as err:
        raise CheckpointError(f"cannot write beside {out}: {err.strerror or err}") from None
    try:
        check_target(out)  # again, now that this export holds the lock
        yield partial
        (partial / _OWNER).unlink()
        try:
            os.rename(partial, out)  # atomic; fails if anything wrote into out meanwhile
        except OSError as err:
            raise CheckpointError(
                f"{out} was written by something else during the export ({err.strerror}): "
                "export into a new folder"
            ) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def reference_depths(model: MTPModel) -> list[dict[str, Tensor]]:
    """The canonical depth dicts of a model on the reference GPT (Llama block names)."""
    depths = []
    for module in model.mtp.depths if model.mtp is not None else []:
        canonical = {}
        for key, value in module.state_dict().items():
            if key.startswith("layer."):
                key = "layer." + _block_key(key.removeprefix("layer."))
            canonical[key] = value
        depths.append(canonical)
    return depths


def reference_mtp(model: MTPModel, fmt: str) -> tuple[dict[str, Tensor], dict[str, int]]:
    """The MTP depths of a model on the reference GPT, in ``fmt`` (Llama block names)."""
    if model.mtp is None:
        return {}, {}
    decoder = model.decoder
    return to_format(
        reference_depths(model),
        fmt,
        num_layers=decoder.num_layers,
        hidden_first=model.config.hidden_first,
        embed=decoder.tok_embeddings.weight,
        head=decoder.head_weight,
    )


def write_hf_model(hf_model, folder: Path, tensors: dict[str, Tensor], entries: dict) -> None:
    """``hf_model.save_pretrained(folder)`` (no progress bar, sdpa attention in its config) and
    the MTP ``tensors`` and config ``entries`` added."""
    saved = hf_model.config._attn_implementation
    hf_model.config._attn_implementation = "sdpa"  # what a reader of the folder should get
    hf_logging.disable_progress_bar()  # the CLI prints one line for the export
    try:
        hf_model.save_pretrained(folder)
    finally:
        hf_model.config._attn_implementation = saved
        hf_logging.enable_progress_bar()
    if tensors:
        save_with_mtp(folder, tensors, entries)


def tokenizer_folder(tokenizer) -> PreTrainedTokenizerFast:
    """The run's tokenizer as transformers saves it (its pad and end-of-document tokens)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend,
        pad_token=tokenizer.backend.id_to_token(tokenizer.pad_id),
        eos_token=tokenizer.backend.id_to_token(tokenizer.eos_id),
        clean_up_tokenization_spaces=False,
    )


def default_format(model: MTPModel) -> str:
    """The MTP weight format ``model`` exports in when none is asked for: a released MTP
    architecture's own (:data:`OWN_FORMAT`), else :data:`DEFAULT_FORMAT`."""
    decoder = model.decoder
    model_type = decoder.model.config.model_type if isinstance(decoder, HFDecoder) else None
    return OWN_FORMAT.get(model_type, DEFAULT_FORMAT)


def export_model(model: MTPModel, tokenizer, out: str | Path, fmt: str | None = None) -> Path:
    """Write ``model`` and its tokenizer as an HF folder; MTP weights in ``fmt``.

    Everything is built and checked before the first file is written, and the files are
    written into a temporary folder beside ``out`` that is renamed to ``out`` when complete: a
    refused, failed or killed export leaves no ``out``, and of two exports into one folder
    only one can succeed (the other is refused at once).

    Args:
        model: a trained :class:`MTPModel` (reference GPT or HF decoder).
        tokenizer: the run's tokenizer (a ``tokenizers`` backend under ``.backend``).
        out: a new (or empty) folder.
        fmt: the MTP weight format, one of :data:`~multitoken.hf.formats.FORMATS` (the
            serving exports are :func:`multitoken.hf.serve_export.export_for_engine`); None:
            :func:`default_format`.
    """
    out = Path(out)
    fmt = default_format(model) if fmt is None else fmt
    if fmt not in FORMATS:
        raise CheckpointError(
            f"unknown MTP weight format {fmt!r}: choose one of {FORMATS} (the serving exports "
            f"{SERVE_FORMATS} are multitoken.hf.serve_export.export_for_engine)"
        )
    check_target(out)
    hf_tokenizer = tokenizer_folder(tokenizer)
    decoder = model.decoder
    if not isinstance(decoder, HFDecoder | GPT):
        raise CheckpointError(f"cannot export a {type(decoder).__name__} decoder")
    if isinstance(decoder, HFDecoder):
        implied_config(decoder.model.config.to_dict())  # a contradicting config fails here
        if model.mtp is not None:
            mtp_tensors(model, fmt)  # a format that cannot hold the depths fails before writing
        with staging(out) as partial:
            save_pretrained(model, partial, fmt)
            hf_tokenizer.save_pretrained(partial)
        return out
    hf_model = llama_model(decoder, tokenizer.eos_id, tokenizer.pad_id)
    tensors, entries = reference_mtp(model, fmt)
    with staging(out) as partial:
        write_hf_model(hf_model, partial, tensors, entries)
        hf_tokenizer.save_pretrained(partial)
    return out
