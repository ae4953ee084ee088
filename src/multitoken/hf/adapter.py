"""The decoder interface for a Hugging Face causal LM (docs/design.md#decoder-interface).

:class:`HFDecoder` wraps a transformers ``*ForCausalLM`` and implements
:class:`~multitoken.decoder.Decoder`: the embedding, the output head and the rotary embedding
are the model's own and shared; MTP depth layers are built from the model's own decoder-layer
class with a copy of its config (so QK-norm, biases, sliding windows and the norm kind come
along), and the depth norms are the model's norm class. A
:class:`~multitoken.layout.SequenceLayout` becomes the per-document ``position_ids`` and the
document mask (:mod:`multitoken.hf.attention`), so packed batches are exact.

Example (a local folder written by ``save_pretrained``; D = 2 heads on top)::

    >>> decoder = HFDecoder.from_pretrained("path/to/llama")
    >>> model = MTPModel(decoder, MTPConfig(num_depths=2), pad_id=0)
    >>> init_mtp_weights(model)
    >>> out = model.loss(ids, next_token_labels(ids, layout), layout)
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from multitoken.errors import ConfigError, InputError, check_in_range
from multitoken.hf.attention import ATTENTION_NAME, IMPLEMENTATIONS, HFAttentionMask, register
from multitoken.hf.folder import SUPPORTED_MODEL_TYPES, check_model_folder
from multitoken.hf.linear_attention import restart_at_documents
from multitoken.layout import SequenceLayout
from multitoken.models.kv_cache import LayerKVCache

__all__ = [
    "HFDecoder",
    "HFLayerCache",
    "SUPPORTED_MODEL_TYPES",
    "init_mtp_weights",
    "init_depth_weights",
    "read_config",
]


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a local HF model folder, after the whole folder passed
    :func:`~multitoken.hf.folder.check_model_folder` (refusing anything else with the fix)."""
    return check_model_folder(path).config


class HFLayerCache(LayerKVCache):
    """A :class:`LayerKVCache` that a transformers attention module can append to.

    transformers calls ``cache.update(k, v, layer_idx, ...)`` on a cache of all layers; here each
    layer gets its own cache, so the layer index is not needed. ``value_dim`` sizes the second
    tensor when it differs from the first: DeepSeek's MLA caches its compressed latents, the
    normed ``kv_lora_rank`` part and the rotated ``qk_rope_head_dim`` part, one head each.
    """

    def __init__(self, *args, value_dim: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if value_dim is not None:
            shape = (*self.v.shape[:-1], value_dim)
            self.v = torch.zeros(shape, device=self.v.device, dtype=self.v.dtype)

    def update(self, k: Tensor, v: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return super().update(k, v)


class HFDecoder(nn.Module):
    """A transformers decoder-only causal LM as a :class:`~multitoken.decoder.Decoder`.

    Args:
        model: a loaded ``*ForCausalLM`` of a type in :data:`SUPPORTED_MODEL_TYPES`.
        implementation: the attention implementation the document mask is handed to
            (``"sdpa"``, ``"eager"`` or ``"flex_attention"``).
        attention: ``"document"`` (causal inside each document) or ``"causal"`` (across rows).

    Attributes:
        model: the wrapped transformers model (its state dict is the HF checkpoint's).
    """

    def __init__(
        self, model: PreTrainedModel, implementation: str = "sdpa", attention: str = "document"
    ):
        super().__init__()
        config = model.config
        _check_model(model)
        if implementation not in IMPLEMENTATIONS:
            raise ConfigError(
                f"attention implementation {implementation!r} cannot take a document mask: "
                f"use one of {IMPLEMENTATIONS}"
            )
        register()
        # Only this copy's layers dispatch to the multitoken mask; the config object is shared
        # by every layer of the model, so one assignment switches them all.
        config._attn_implementation = ATTENTION_NAME
        self.model = model
        declare_kv_hooks(model)
        restart_at_documents(model)  # Qwen3-Next's linear attention: exact when packed
        self.implementation, self.attention = implementation, attention
        self.hidden_size, self.vocab_size = config.hidden_size, config.vocab_size
        self.max_seq_len = config.max_position_embeddings
        self.num_layers = config.num_hidden_layers

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        implementation: str = "sdpa",
        attention: str = "document",
        dtype: torch.dtype = torch.float32,
    ) -> HFDecoder:
        """Load a local HF model folder (no hub access), refusing unsupported ones first."""
        # Safetensors only: a folder someone hands over must not reach torch.load's unpickler
        # (pytorch_model.bin); no remote code either (transformers' default).
        model = _quietly(
            path,
            lambda: AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=dtype,
                local_files_only=True,
                attn_implementation="sdpa",
                use_safetensors=True,
                trust_remote_code=False,
            ),
        )
        return cls(model.eval(), implementation, attention)

    @classmethod
    def on_meta(
        cls,
        path: str | Path,
        implementation: str = "sdpa",
        attention: str = "document",
        dtype: torch.dtype = torch.float32,
    ) -> HFDecoder:
        """The folder's model built on the meta device from its config alone: no storage, no
        weight read (:mod:`multitoken.hf.meta` materialises it after sharding)."""
        config = _quietly(
            path,
            lambda: AutoConfig.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            ),
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False
            )
        return cls(model.eval(), implementation, attention)

    # ------------------------------------------------------------------ parts of the model
    @property
    def base(self) -> nn.Module:
        """The model without its head (``model.model``: embeddings, layers, norm, rotary)."""
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    # ------------------------------------------------------------------ Decoder interface
    @property
    def head_weight(self) -> Tensor:
        """``[V, H]`` the output head (the embedding when the model ties them)."""
        return self.model.get_output_embeddings().weight

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.base.embed_tokens(input_ids)  # (B, T, H)

    def layer_kwargs(
        self,
        layout: SequenceLayout,
        kv_layout: SequenceLayout | None = None,
        *,
        decoding: bool = False,
    ) -> dict[str, Any]:
        """``attention_mask`` (:class:`HFAttentionMask`), ``position_ids`` (restarting in every
        document; never rolled) and ``position_embeddings`` (the model's rotary cos, sin)."""
        check_in_range(
            "a document position",
            layout.positions,
            self.max_seq_len,
            "raise max_position_embeddings in the model's config.json or split long documents",
        )
        implementation = "sdpa" if decoding else self.implementation
        mask = HFAttentionMask(layout, kv_layout, self.attention, implementation)
        positions = layout.positions
        embed = self.base.embed_tokens  # None on a middle pipeline stage (hf/pipeline.py)
        reference = next(self.layers.parameters()) if embed is None else embed.weight
        cos, sin = self.base.rotary_emb(reference, position_ids=positions)  # (B, T, d) each
        return {
            "attention_mask": mask,
            "position_ids": positions,
            "position_embeddings": (cos, sin),
        }

    def hidden(
        self,
        input_ids: Tensor,
        layer_kwargs: dict[str, Any],
        caches: list[HFLayerCache] | None = None,
    ) -> Tensor:
        if caches is not None and len(caches) != len(self.layers):
            raise InputError(f"{len(caches)} caches for {len(self.layers)} layers")
        x = self.embed(input_ids)  # (B, T, H)
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            x = _output(layer(x, **layer_kwargs, cache=cache))
        return self.base.norm(x)

    def make_mtp_layer(self, k: int) -> nn.Module:
        """A fresh decoder layer of the model's class, numbered after the main layers.

        The config copy counts the MTP layers as full-attention layers after the main ones
        (DeepSeek numbers depth k's layer ``L + k - 1``); a model whose every layer slides
        (Mistral's ``sliding_window``) gives its MTP layers the same window.
        """
        config = copy.deepcopy(self.model.config)
        index = self.num_layers + k - 1
        config.num_hidden_layers = index + 1
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types[: self.num_layers])
            config.layer_types += ["full_attention"] * (index + 1 - self.num_layers)
        layer = type(self.layers[0])(config, index)
        declare_kv_hooks(layer)
        # As from_pretrained does: the model's fp32-strict tensors (DeepSeek's and GLM's
        # router weight and routing bias) stay fp32 whatever the model's dtype.
        keep = getattr(self.model, "_keep_in_fp32_modules_strict", None) or ()
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            if not any(pattern in name for pattern in keep):
                tensor.data = tensor.data.to(self.head_weight.dtype)
        return layer

    def make_norm(self) -> nn.Module:
        norm = self.base.norm
        with torch.no_grad():
            # A fresh norm: the constructor's weight (ones, or zeros for zero-centred norms).
            fresh = type(norm)(self.hidden_size, eps=_norm_eps(norm))
            if any(t.is_meta for t in norm.parameters()):
                # A decoder built on the meta device (hf/meta.py), perhaps sharded since: no
                # storage to copy, so the fresh norm itself (built where the caller builds).
                return fresh.to(self.head_weight.dtype)
            norm = copy.deepcopy(norm)
            norm.load_state_dict(fresh.state_dict())
        return norm

    def new_kv_cache(self, batch: int, capacity: int) -> HFLayerCache:
        # (a hybrid model's first layer may be linear attention: its cache is refused when used)
        attn = next(layer.self_attn for layer in self.layers if hasattr(layer, "self_attn"))
        weight = self.head_weight
        if hasattr(attn, "kv_lora_rank"):  # MLA: the latents, not the expanded keys and values
            dims = {"n_kv_heads": 1, "head_dim": attn.kv_lora_rank}
            dims["value_dim"] = attn.qk_rope_head_dim
        else:
            dims = {"n_kv_heads": self.model.config.num_key_value_heads}
            dims["head_dim"] = attn.head_dim
        return HFLayerCache(
            batch, capacity=capacity, device=weight.device, dtype=weight.dtype, **dims
        )


def _quietly(path: str | Path, load: Callable[[], Any]) -> Any:
    """``load()`` of the folder at ``path``, after its gate and transformers' ``AutoConfig``
    (an unknown model_type fails there with transformers' own message), with no progress bar
    and no "UNEXPECTED keys" report: the MTP keys it would list are loaded (or refused, listed)
    by :mod:`multitoken.hf.weights`, never dropped."""
    read_config(path)  # the folder's gate: no code, regular files, sizes, dtypes
    AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return load()
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def _output(result) -> Tensor:
    # transformers 5 decoder layers return the hidden state; tolerate a (hidden, ...) tuple.
    return result[0] if isinstance(result, tuple) else result


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return getattr(norm, name)
    raise ConfigError(f"cannot read the epsilon of {type(norm).__name__}")


def _check_model(model: nn.Module) -> None:
    """Refuse a model the adapter cannot drive exactly, naming what is missing."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{type(model).__name__} (model_type {model_type!r}) is not supported by the "
            f"multitoken HF adapter: supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    base = getattr(model, "model", None)
    missing = [
        name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, name)
    ]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        missing.append("lm_head")
    elif getattr(head, "bias", None) is not None:
        missing.append("a bias-free lm_head")
    if missing:
        raise ConfigError(
            f"{type(model).__name__} lacks what the adapter needs: {', '.join(missing)}"
        )
    if getattr(config, "output_router_logits", False):
        raise ConfigError(
            f"{type(model).__name__} has output_router_logits=true: transformers would add the "
            "router's load-balancing loss, which the multitoken step does not "
            "(docs/hf.md#moe-and-mla-models): set output_router_logits to false in config.json"
        )
    forward = inspect.signature(type(base.layers[0]).forward).parameters
    if "cache" not in forward:
        raise ConfigError(
            f"{type(base.layers[0]).__name__}.forward takes no 'cache' argument: install "
            "transformers >= 5.24 (pip install 'multitoken[hf]')"
        )


def init_mtp_weights(model: nn.Module, std: float | None = None) -> None:
    """Initialise the MTP depths of an :class:`~multitoken.mtp_model.MTPModel` on an HF decoder.

    Matrices ~ Normal(0, std) (default: the model's ``initializer_range``, as transformers
    initialises its own layers), biases 0, norms as constructed. The backbone is untouched.
    """
    if model.mtp is not None:
        init_depth_weights(model.mtp, model.decoder, std)


def init_depth_weights(predictor: nn.Module, decoder: HFDecoder, std: float | None = None) -> None:
    """:func:`init_mtp_weights` on the depths alone (a ``MultiTokenPredictor`` for
    ``decoder``), in the same order: the same generator state gives the same values."""
    if std is None:
        std = getattr(decoder.model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for module in predictor.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
                continue
            # MoE blocks keep matrices outside nn.Linear: the experts' stacked
            # gate_up_proj / down_proj (built with torch.empty) and the router's weight.
            for param in module.parameters(recurse=False):
                if param.dim() >= 2:
                    nn.init.normal_(param, std=std)


def declare_kv_hooks(module: nn.Module) -> None:
    """Give every attention module under ``module`` an empty ``kv_gather`` hook.

    transformers' attention modules of the supported architectures all end in ``o_proj`` (with
    ``q_proj`` / ``k_proj``, or DeepSeek's MLA projections) and call the registered "multitoken"
    attention function, which reads the hook; declaring it is what lets
    :func:`multitoken.parallel.apply_cp` find them (context parallelism sets it to the K/V
    all-gather over the CP group).
    """
    for sub in module.modules():
        if hasattr(sub, "o_proj") and not hasattr(sub, "kv_gather"):
            sub.kv_gather = None
