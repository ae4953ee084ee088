"""An HF model with MTP built on the meta device, sharded, then materialised shard by shard.

:func:`~multitoken.hf.weights.load_hf_mtp_model` reads the whole fp32 model into memory, so a
run that FSDP2 shards would hold all of it on every rank before ``fully_shard`` cuts it. Here
(``build_model`` when FSDP2 shards the model) no rank ever holds more than its shard of the
backbone:

1. :func:`meta_hf_mtp_model` builds the model from the folder's config on the meta device: no
   storage, no weight read;
2. the caller makes it parallel (CP hooks, compile, FSDP2: ``fully_shard`` takes meta
   parameters);
3. :func:`materialize_hf_mtp_model` gives every parameter storage on the device
   (``to_empty``) and reads into each one the rows of its local shard only (safetensors'
   ``get_slice``, the rows DTensor's placements give this rank; a parameter the checkpoint holds
   under other names, MoE experts one tensor per expert, is read whole and cut; persistent
   buffers, a MoE router's bias, whole); the MTP depths get the values
   ``load_hf_mtp_model`` gives them (the folder's, or the same seeded initialisation, computed
   whole on the CPU: D layers, not the model), sliced the same way; the rotary buffers are
   recomputed, and tied embeddings are checked still tied.

The materialised model equals ``load_hf_mtp_model``'s, sharded: every tensor (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from multitoken.errors import CheckpointError, ConfigError
from multitoken.hf.adapter import HFDecoder, init_depth_weights
from multitoken.hf.block_names import to_checkpoint_names, to_model_names
from multitoken.hf.folder import ModelFolder, check_model_folder
from multitoken.hf.formats import detect_format
from multitoken.hf.weights import backbone_keys, load_depth_weights, read_tensors
from multitoken.mtp import MTPConfig, MultiTokenPredictor
from multitoken.mtp_model import MTPModel

__all__ = ["meta_hf_mtp_model", "materialize_hf_mtp_model", "local_rows"]

_BASE = "decoder.model."  # an MTPModel's prefix for the HF model's own keys


def meta_hf_mtp_model(
    path: str | Path,
    mtp: MTPConfig,
    *,
    pad_id: int = 0,
    implementation: str = "sdpa",
    attention: str = "document",
) -> MTPModel:
    """``load_hf_mtp_model``'s model on the meta device (its config read, no weight)."""
    decoder = HFDecoder.on_meta(path, implementation, attention)
    with torch.device("meta"):
        return MTPModel(decoder, mtp, pad_id=pad_id)


def materialize_hf_mtp_model(
    model: MTPModel, path: str | Path, *, device: torch.device | str, seed: int = 0
) -> MTPModel:
    """Give ``model`` (from :func:`meta_hf_mtp_model`, sharded or not) storage on ``device``
    and the values ``load_hf_mtp_model(path, ..., seed=seed)`` gives, reading only each
    parameter's local rows; in place, returned.

    Raises:
        CheckpointError: a parameter the folder lacks or holds in another shape, MTP keys of
            no format (as ``load_hf_mtp_model``).
    """
    folder = check_model_folder(path)
    decoder = model.decoder
    tied = decoder.head_weight is decoder.base.embed_tokens.weight
    depths = _depth_values(model, folder, seed)  # before any storage: a refusal leaves none
    model.to_empty(device=device)
    with torch.no_grad():
        loaded = _load_backbone(model, folder)
        for name, param in model.named_parameters():
            if name.startswith("mtp."):
                value = depths[name]
                _fill(param, value.shape, name, lambda start, stop, v=value: v[start:stop])
        for name, buffer in model.named_buffers():
            if name in depths:  # a depth's persistent buffer (a MoE layer's routing bias)
                buffer.copy_(depths[name])
                loaded.add(name)
        _recompute_buffers(model, loaded)
    if tied and decoder.head_weight is not decoder.base.embed_tokens.weight:
        raise CheckpointError("the embedding and the head came apart while materialised")
    return model


def local_rows(param: Tensor) -> tuple[Tensor, int]:
    """``param``'s local tensor and the global row its first row is: a DTensor's shard of
    dim 0 (FSDP2's: ``torch.chunk``'s rows, padding aside), or a plain tensor whole."""
    if not isinstance(param, DTensor):
        return param, 0
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    local = param.to_local()
    if tuple(local.shape) != tuple(shape) or any(offset[1:]):
        raise ConfigError(
            f"a parameter sharded as {param.placements} (local {tuple(local.shape)} at "
            f"{tuple(offset)}): only shards of dim 0 are materialised"
        )
    return local, offset[0]


def _fill(param: Tensor, shape, name: str, read: Callable[[int, int], Tensor]) -> None:
    """Copy rows ``read(start, stop)`` of a tensor of ``shape`` into ``param``'s shard."""
    if tuple(shape) != tuple(param.shape):
        raise CheckpointError(
            f"{name} has shape {tuple(shape)}, the model needs {tuple(param.shape)}"
        )
    local, start = local_rows(param)
    if local.numel():
        local.copy_(read(start, start + local.shape[0]))


def _load_backbone(model: MTPModel, folder: ModelFolder) -> set[str]:
    """Each backbone parameter's local rows from the file that holds it (tied ones once), and
    its persistent buffers whole; returns the buffers' names. A parameter the checkpoint holds
    under other names (MoE experts: one tensor per expert, stacked in the model) is read whole,
    one at a time, converted by transformers' mapping (:mod:`multitoken.hf.block_names`), and
    its rows taken."""
    hf_model = model.decoder.model
    params = {
        name.removeprefix(_BASE): param
        for name, param in model.named_parameters()
        if name.startswith(_BASE)
    }
    own = hf_model.state_dict()
    buffers = {
        name.removeprefix(_BASE): buffer
        for name, buffer in model.named_buffers()
        if name.startswith(_BASE) and name.removeprefix(_BASE) in own
    }
    loaded = set()
    for file in folder.weight_files:
        with safe_open(str(file), framework="pt") as handle:
            for stored in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                key = folder.model_name(stored)
                if key in params:
                    read = _Rows(handle.get_slice(stored))
                    _fill(params.pop(key), read.shape, key, read)
                elif key in buffers:
                    buffers[key].copy_(handle.get_slice(stored)[:])
                    loaded.add(_BASE + key)
    for key in sorted(params):
        sources = to_checkpoint_names(hf_model, {key: torch.empty(own[key].shape, device="meta")})
        if not set(sources) <= set(folder.tensors):
            continue  # reported below
        value = to_model_names(hf_model, read_tensors(folder.path, set(sources)), {key})[key]
        _fill(params.pop(key), value.shape, key, lambda start, stop, v=value: v[start:stop])
    if params:
        raise CheckpointError(f"{folder.path} lacks the model's tensors {sorted(params)[:10]}")
    return loaded


class _Rows:
    """Rows ``[start, stop)`` of a tensor in a safetensors file: only they leave the file."""

    def __init__(self, tensor_slice):
        self.slice, self.shape = tensor_slice, tuple(tensor_slice.get_shape())

    def __call__(self, start: int, stop: int) -> Tensor:
        return self.slice[start:stop]


def _depth_values(model: MTPModel, folder: ModelFolder, seed: int) -> dict[str, Tensor]:
    """The MTP depths' whole values, on the CPU, as ``load_hf_mtp_model`` makes them: built
    and initialised from ``seed`` exactly as there, then the folder's MTP weights if any."""
    decoder = model.decoder
    torch.manual_seed(seed)  # as the eager build, depths or none: the same generator after
    if not model.num_depths:
        strays = set(folder.tensors) - backbone_keys(decoder.model)
        detect_format(strays, folder.config)  # still refuse strays
        return {}
    with torch.device("cpu"):
        twin = MultiTokenPredictor.for_decoder(model.config, decoder)
        init_depth_weights(twin, decoder)
    dtype = decoder.head_weight.dtype
    shared = lambda: _shared(folder, decoder, dtype)  # noqa: E731
    load_depth_weights(twin, folder.path, decoder.model, decoder.num_layers, shared)
    return {f"mtp.{key}": value for key, value in twin.state_dict().items()}


def _shared(folder: ModelFolder, decoder: HFDecoder, dtype: torch.dtype) -> dict[str, Tensor]:
    """The folder's embedding and head, whole (the DeepSeek format's copies must equal them)."""
    keys = {"model.embed_tokens.weight", "lm_head.weight"}
    tensors = {key: value.to(dtype) for key, value in read_tensors(folder.path, keys).items()}
    embed = tensors["model.embed_tokens.weight"]
    tied = decoder.head_weight is decoder.base.embed_tokens.weight
    return {"embed": embed, "head": embed if tied else tensors["lm_head.weight"]}


def _recompute_buffers(model: nn.Module, loaded: set[str]) -> None:
    """The buffers ``to_empty`` left undefined (all but the ``loaded`` ones): the rotary
    tables, computed on the CPU by a fresh module of the same class and config (as the eager
    build computes them)."""
    for prefix, module in model.named_modules():
        names = [
            name
            for name, _ in module.named_buffers(recurse=False)
            if (f"{prefix}.{name}" if prefix else name) not in loaded
        ]
        if not names:
            continue
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "config"):
            raise ConfigError(
                f"{type(module).__name__} has buffers {names} that a meta-device build cannot "
                "recompute"
            )
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for name in names:
            getattr(module, name).copy_(getattr(fresh, name))
