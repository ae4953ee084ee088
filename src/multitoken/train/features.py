"""Offline backbone features in a run: where they are, building them, reading them per step.

``features.mode=offline`` (with ``mtp.freeze_base``): the frozen decoder's outputs
(:mod:`multitoken.frozen`) are computed once per token store, backbone, dtype and
``data.seq_len`` (:func:`ensure_features`, or ``multitoken features``), then every step reads
its rows' ``h^0`` from disk and runs only the MTP depths and the head
(docs/training.md#offline-backbone-features). The features' folder is found by content: the
token store's content address, a hash of the decoder's weights and architecture
(:func:`backbone_hash`), the dtype and ``seq_len``; features of another backbone are refused.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from multitoken.batch import StepBatch
from multitoken.data.feature_build import build_features, feature_key
from multitoken.data.features import FeatureLoader, FeatureStore, open_features
from multitoken.errors import ConfigError
from multitoken.frozen import BackboneOutputs, backbone_outputs
from multitoken.layout import SequenceLayout
from multitoken.mtp_model import MTPModel
from multitoken.train.config import TrainConfig
from multitoken.train.data import PreparedData

__all__ = [
    "BuildStopped",
    "attach_backbone",
    "backbone_hash",
    "backbone_model",
    "ensure_features",
    "feature_identity",
    "offline_data",
    "prebuild_features",
    "add_features_command",
]

# Seconds between two progress lines of a feature build (a part takes minutes on a CPU).
_PROGRESS_EVERY_S = 60.0


class BuildStopped(Exception):
    """A stop signal arrived while features were being built: the finished parts are kept
    and the same command goes on from them."""

    def __init__(self, signum: int):
        super().__init__(f"feature build stopped by signal {signum}")
        self.signum = signum


# Wrappers that parallelize/compile put into parameter names: not part of the backbone.
_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def backbone_hash(model: MTPModel) -> str:
    """blake2b of the decoder's architecture and weights (names, dtypes, shapes, bytes).

    The same on every rank and in every layout: a sharded weight is gathered whole first
    (a collective over its mesh: every rank calls this together).
    """
    decoder = model.decoder
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{type(decoder).__name__}|{getattr(decoder, 'config', '')!r}".encode())
    state = decoder.state_dict()
    for name in sorted(state, key=lambda n: _plain(n)):
        tensor = state[name]
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{_plain(name)}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _plain(name: str) -> str:
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def feature_identity(cfg: TrainConfig, data: PreparedData, model: MTPModel, device) -> dict:
    """What the features of this run depend on (recorded in their index, checked on open)."""
    return {
        "store": data.store.folder.name,
        "backbone": backbone_hash(model),
        "dtype": cfg.features.dtype,
        "seq_len": cfg.data.seq_len,
        "hidden": int(model.decoder.hidden_size),
        "autocast": _autocast(cfg, device),
    }


def _autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the step runs the backbone under bf16 autocast (as the trainer does)."""
    return torch.device(device).type == "cuda" and cfg.train.bf16


def feature_folder(cfg: TrainConfig, identity: dict) -> Path:
    """``features.path``, or ``<data.cache_dir>/features-<key>``."""
    if cfg.features.path:
        return Path(cfg.features.path)
    return Path(cfg.data.cache_dir) / f"features-{feature_key(identity)}"


def backbone_model(cfg: TrainConfig, data: PreparedData, device: torch.device) -> MTPModel:
    """The run's model in this one process (its decoder as every rank builds it)."""
    torch.manual_seed(cfg.train.seed)
    if cfg.model.hf:
        from multitoken.train.hf import build_hf_model  # optional extra: only when used

        return build_hf_model(cfg, data.tokenizer.pad_id, device).eval()
    model_cfg = cfg.model_config(data.tokenizer.vocab_size)
    built = MTPModel.from_config(model_cfg, cfg.mtp, pad_id=data.tokenizer.pad_id)
    return built.to(device).eval()


def ensure_features(
    cfg: TrainConfig,
    data: PreparedData,
    model: MTPModel,
    device: torch.device,
    *,
    identity: dict | None = None,
    verbose: bool = True,
    part_tokens: int | None = None,
    stop: Callable[[], int | None] | None = None,
) -> FeatureStore:
    """The run's feature store: opened (checked by ``data.verify``), or built with ``model``
    (one process, unsharded: its decoder runs over every token of the store once). ``stop``:
    the stop signal received so far, or None; a build raises :class:`BuildStopped` at its
    next batch once there is one (finished parts are kept). A progress line every minute."""
    identity = identity or feature_identity(cfg, data, model, device)
    rows = cfg.features.batch_rows or cfg.data.batch_size
    autocast = identity["autocast"]
    progress = {"tokens": 0, "began": time.perf_counter(), "said": time.perf_counter()}

    def compute(input_ids, labels, cu_seqlens) -> BackboneOutputs:
        signum = None if stop is None else stop()
        if signum is not None:
            raise BuildStopped(signum)
        _progress(progress, int(cu_seqlens[-1]), verbose)
        ids, labels = input_ids.to(device), labels.to(device)
        layout = SequenceLayout.from_cu_seqlens(cu_seqlens.to(device), ids.shape)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return backbone_outputs(
                model, ids, layout, labels, chunk_elements=cfg.mtp.loss_chunk_elements
            )

    extra = {} if part_tokens is None else {"part_tokens": part_tokens}
    return build_features(
        data.store, feature_folder(cfg, identity), identity, compute, rows_per_batch=rows,
        verify=cfg.data.verify, verbose=verbose, **extra,
    )  # fmt: skip


def _progress(progress: dict, tokens: int, verbose: bool) -> None:
    """Count a batch of the build; say how far it got once a minute."""
    progress["tokens"] += tokens
    now = time.perf_counter()
    if verbose and now - progress["said"] >= _PROGRESS_EVERY_S:
        rate = progress["tokens"] / max(now - progress["began"], 1e-9)
        print(
            f"multitoken: features: {progress['tokens']:,} tokens so far, {rate:,.0f} tokens/s",
            file=sys.stderr,
            flush=True,
        )
        progress["said"] = now


def offline_data(
    cfg: TrainConfig, data: PreparedData, model, dims, device, stop=None
) -> PreparedData:
    """``data`` with its loaders reading the offline features too (``features.mode=offline``;
    unchanged otherwise). One process builds missing features with ``model``; ranks of a
    larger run find them built (``multitoken train`` builds them before it starts the ranks;
    under torchrun run ``multitoken features`` first)."""
    if not cfg.features.offline:
        return data
    identity = feature_identity(cfg, data, model, device)
    folder = feature_folder(cfg, identity)
    if dims.world_size == 1:
        store = ensure_features(
            cfg, data, model, device, identity=identity, verbose=dims.is_main, stop=stop
        )
    elif not folder.exists():
        raise ConfigError(
            f"features.mode=offline: no features at {folder} for this run; build them first "
            "with `multitoken features` and the same settings"
        )
    else:
        store = open_features(folder, cfg.data.verify if dims.is_main else "size", identity)
    return replace(
        data,
        train_loader=FeatureLoader(data.train_loader, store.split("train")),
        val_loader=FeatureLoader(data.val_loader, store.split("val")),
    )


def attach_backbone(batch: StepBatch, rows: dict, device: torch.device) -> StepBatch:
    """``batch`` with its rows' offline features (when the loader read some), on ``device``
    and in float32 (``h^0`` is stored in half precision; the step computes in float32)."""
    if "hidden" not in rows:
        return batch
    stored = BackboneOutputs(rows["hidden"], rows["nll"], rows["greedy"])
    return replace(batch, backbone=stored.to(device, torch.float32))


def prebuild_features(
    cfg: TrainConfig, data: PreparedData, device: torch.device, stop=None
) -> FeatureStore:
    """Build (or check) the run's features in this process, before ranks start that read
    them; the model built for it is dropped after. ``stop``: as for :func:`ensure_features`."""
    model = backbone_model(cfg, data, device)
    store = ensure_features(cfg, data, model, device, stop=stop)
    del model
    return store


def add_features_command(sub, run) -> None:
    """``multitoken features``: build a run's offline features (``run(args)`` runs it)."""
    parser = sub.add_parser(
        "features",
        help="build a heads-only run's offline backbone features (features.mode=offline)",
        description=(
            "Run the frozen backbone once over the token store of the run these settings "
            "describe and write its h^0 (and the main head's per-token NLL and argmax) beside "
            "the store; training with features.mode=offline then finds them. Resumable: an "
            "interrupted build goes on where it stopped."
        ),
    )
    parser.add_argument("items", nargs="*", metavar="CONFIG.toml | key=value")
    parser.add_argument("--data", default=None, help="shorthand for data.path=PATH")
    parser.set_defaults(func=run)
