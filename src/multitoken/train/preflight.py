"""Checks that need the machine, run before any rank starts: memory and paths.

A configuration can be valid and still not fit: ``model.dim=65536`` or
``model.max_seq_len=1e9`` used to fail deep inside an allocation (a traceback, or minutes of
swapping first). :func:`memory_estimate` is a lower bound of what one rank allocates (model and
optimiser state as if fully sharded over the ranks of one replica, the rotary table, one layer's
attention scores, the activations kept for the backward), so a refusal is never a false alarm; a
run that passes may still need more.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from multitoken.errors import ConfigError
from multitoken.models.attention import resolve_backend
from multitoken.train.config import TrainConfig

__all__ = [
    "memory_estimate",
    "attention_bytes",
    "available_memory",
    "check_memory",
    "check_paths",
    "fit_to_devices",
    "LAYOUT_KEYS",
]

# The settings that decide how many ranks a run starts: a run that sets none of them is the
# default layout, which may be fitted to the GPUs present.
LAYOUT_KEYS = ("parallel.dp", "parallel.dp_replicate", "parallel.cp", "parallel.tp")

_FP32 = 4
_GIB = 1 << 30


def attention_bytes(cfg: TrainConfig, backend: str, device_type: str) -> int:
    """What one layer's attention allocates beyond q, k, v and its output, per rank: the fp32
    ``[B, H, T / cp, T]`` scores of SDPA's math kernel on the CPU; FlexAttention's fp32
    log-sum-exp ``[B, H, T / cp]`` (the scores stay in the kernel, the block mask is a table
    per 128 x 128 block); on CUDA, SDPA's boolean ``[B, 1, T / cp, T]`` mask (its
    memory-efficient kernel keeps no scores)."""
    model = cfg.model
    rows = cfg.data.batch_size // cfg.parallel.dp
    queries = cfg.data.seq_len // cfg.parallel.cp
    if backend == "flex":
        return rows * model.n_heads * queries * _FP32
    if device_type != "cuda":
        return rows * model.n_heads * queries * cfg.data.seq_len * _FP32
    return rows * queries * cfg.data.seq_len  # one byte per (query, key)


def _shape(cfg: TrainConfig):
    """The model's sizes: the reference GPT's settings, or the ``model.hf`` folder's
    ``config.json`` (checked by the folder's gate first)."""
    if cfg.model.hf:
        from multitoken.hf.folder import check_model_folder  # optional extra: only when used
        from multitoken.hf.gguf import model_folder  # a GGUF file: its (cached) folder

        return check_model_folder(model_folder(cfg.model.hf, cfg.data.cache_dir)).shape
    model = cfg.model
    return SimpleNamespace(
        vocab=model.vocab_size or cfg.data.vocab_size,
        dim=model.dim,
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        kv_heads=model.kv_heads,
        head_dim=model.head_dim,
        ffn=model.ffn_hidden,
        tied=model.tie_embeddings,
    )


def memory_estimate(
    cfg: TrainConfig, device_type: str = "cpu", backend: str | None = None
) -> dict[str, int]:
    """A lower bound of one rank's memory, in bytes, by what it is for (the reference GPT, or
    the Hugging Face model of ``model.hf``), on ``device_type`` with the attention ``backend``
    the model runs there (None = the one it would choose,
    :func:`~multitoken.models.attention.resolve_backend`)."""
    shape, world = _shape(cfg), cfg.parallel.world
    if backend is None:
        backend = resolve_backend(cfg.model.backend, device_type, shape.head_dim)
    dim, head_dim, ffn = shape.dim, shape.head_dim, shape.ffn
    layer = (
        dim * shape.n_heads * head_dim * 2  # q, o
        + 2 * dim * shape.kv_heads * head_dim  # k, v
        + 3 * dim * ffn  # SwiGLU
        + 2 * dim  # norms
    )
    mtp_params = cfg.mtp.num_depths * (layer + 2 * dim * dim + 3 * dim)  # + eh_proj, norms
    base = shape.vocab * dim * (1 if shape.tied else 2) + shape.n_layers * layer
    rows = cfg.data.batch_size // cfg.parallel.dp
    queries = cfg.data.seq_len // cfg.parallel.cp
    layers = shape.n_layers + cfg.mtp.num_depths
    tp = cfg.parallel.tp
    # weights, gradients and AdamW's two moments in fp32, at best sharded over every rank of
    # one replica (HSDP keeps parallel.dp_replicate copies); a frozen backbone has weights only
    trained = mtp_params + (0 if cfg.mtp.freeze_base else base)
    state = (4 * trained + (base + mtp_params - trained)) * _FP32 * cfg.parallel.dp_replicate
    if cfg.model.hf:  # every rank loads the whole folder in fp32 before sharding
        return {
            "model and optimiser state": max(state // world, (base + mtp_params) * _FP32),
            "activations": rows * queries * (4 * dim + 2 * ffn) * _FP32 * layers,
        }
    return {
        "model and optimiser state": state // world,
        "rotary table": cfg.model.max_seq_len * head_dim * _FP32,
        # TP splits the heads and the feed-forward (and, with sequence parallelism, the rest):
        # dividing all of it by tp keeps this a lower bound
        "attention scores of one layer": attention_bytes(cfg, backend, device_type) // tp,
        "activations": rows * queries * (4 * dim + 2 * ffn) * _FP32 * layers // tp,
    }


def available_memory(device: torch.device | None = None, ranks_here: int = 1) -> int | None:
    """Bytes one rank may use: free memory of its GPU, or this machine's available memory
    shared by ``ranks_here`` ranks; None when unknown."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, ranks_here)
    except OSError:
        pass
    return None


def check_memory(cfg: TrainConfig, available: int | None, device_type: str = "cpu") -> None:
    """Refuse a configuration whose lower-bound memory exceeds ``available`` bytes on
    ``device_type``.

    Raises:
        ConfigError: naming the estimate, its largest part and the settings that drive it.
    """
    if available is None:
        return
    parts = memory_estimate(cfg, device_type)
    need = sum(parts.values())
    if need <= available:
        return
    largest = max(parts, key=parts.get)
    hint = {
        "model and optimiser state": (
            "the model's size (config.json of model.hf), or mtp.freeze_base=true"
            if cfg.model.hf
            else "model.dim, model.n_layers, model.ffn_dim or the vocabulary"
        ),
        "rotary table": "model.max_seq_len",
        "attention scores of one layer": "data.seq_len, data.batch_size or model.n_heads",
        "activations": "data.seq_len or data.batch_size",
    }[largest]
    raise ConfigError(
        f"this configuration needs at least {need / _GIB:.1f} GiB per rank ({largest}: "
        f"{parts[largest] / _GIB:.1f} GiB) but {available / _GIB:.1f} GiB are available: "
        f"lower {hint}"
    )


def check_paths(cfg: TrainConfig) -> None:
    """Paths the run will create must be creatable folders (not a file, a device, a link
    to one).

    Raises:
        ConfigError: ``data.cache_dir`` or ``run.dir`` names something that is not a folder,
            or ``run.dir`` cannot be written.
    """
    for key, value in (("data.cache_dir", cfg.data.cache_dir), ("run.dir", cfg.run.dir)):
        path = Path(value)
        for parent in (path, *path.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{key}={value!r}: {parent} exists and is not a folder")
                if key == "run.dir" and not os.access(parent, os.W_OK | os.X_OK):
                    raise ConfigError(f"{key}={value!r}: {parent} is not writable")
                break


def fit_to_devices(
    cfg: TrainConfig, ranks_here: int, *, explicit: set[str], launcher: bool = True
) -> TrainConfig:
    """The run's config, checked against the CUDA devices of this machine before any rank
    starts: NCCL needs one GPU per local rank (rank i uses ``cuda:i``).

    Without CUDA nothing changes (gloo ranks on the CPU, any number). With fewer GPUs than
    ``ranks_here`` local ranks, a run that set none of :data:`LAYOUT_KEYS` (the default run)
    takes the largest ``parallel.cp`` the devices and the config allow (the losses do not
    depend on the layout), with one line saying so; any other run is refused.

    Args:
        cfg: the resolved config.
        ranks_here: local ranks the run would start on this machine.
        explicit: the ``section.key`` names the user set (:func:`~.config_io.explicit_keys`).
        launcher: multitoken launches the ranks (False under torchrun: the ranks exist).

    Raises:
        ConfigError: more local ranks than GPUs, in a layout the user chose.
    """
    if not torch.cuda.is_available():
        return cfg
    devices = torch.cuda.device_count()
    if ranks_here <= devices:
        return cfg
    if launcher and not explicit & set(LAYOUT_KEYS):
        for cp in range(min(cfg.parallel.cp, devices), 0, -1):
            try:
                fitted = replace(cfg, parallel=replace(cfg.parallel, cp=cp))
            except ConfigError:
                continue
            print(
                f"multitoken: {devices} CUDA device(s) here: training with parallel.cp={cp} "
                f"instead of the default {cfg.parallel.cp} (the same losses; set parallel.cp "
                "to choose)",
                file=sys.stderr,
            )
            return fitted
    raise ConfigError(
        f"{ranks_here} local ranks (parallel.dp * parallel.cp * parallel.tp per node) but "
        f"{devices} CUDA device(s) here, and each rank needs a GPU of its own: lower "
        f"parallel.dp, parallel.cp or parallel.tp to at most {devices} ranks per node, or train "
        "on the CPU with CUDA_VISIBLE_DEVICES="
    )
