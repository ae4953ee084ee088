"""Decoding at the overhead floor: static-shape, compiled decode steps (gpt-fast's recipe).

A decoding step of a small model is almost all per-operation overhead (Python, dispatch,
small kernels, building masks and layouts), so the step is rewritten with static shapes and
compiled with ``torch.compile``:

* the KV caches are the same preallocated ``[1, Hkv, capacity, d]`` buffers; new keys and
  values are written with ``index_copy_`` at a position *tensor*, and attention always reads
  the whole buffer with a ``[T, capacity]`` mask ``key_pos <= query_pos`` (nothing past the
  newest position is ever read, so stale entries of a rolled-back draft are invisible);
* the rotary tables and the mask are indexed by that position tensor, so a step's graph does
  not depend on how long the sequence is: one graph per number of new tokens T (1 for plain
  decoding, up to D + 1 to verify drafts), reused for the whole generation;
* longer spans (the prompt's prefill, an MTP depth catching up on it) run the same function
  eagerly: they happen once per generation.

:class:`StaticDecodeState` is a :class:`~multitoken.decoding.state.DecodeState` that runs its
forwards this way; the bookkeeping (which positions each cache holds, rollback) is inherited,
so the tokens are those of eager decoding. It needs the reference decoder
(:class:`~multitoken.models.GPT`: its layers, norm and rotary tables).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.decoding.state import DecodeState
from multitoken.errors import InputError
from multitoken.models.gpt import GPT
from multitoken.mtp_model import MTPModel

__all__ = ["StaticDecodeState", "max_static_tokens"]


class _StaticCache:
    """What a layer's attention writes its new keys and values through: the whole buffers."""

    def __init__(self, k: Tensor, v: Tensor, input_pos: Tensor):
        self.k, self.v, self.input_pos = k, v, input_pos

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, self.input_pos, k)  # (1, Hkv, capacity, d)
        self.v.index_copy_(2, self.input_pos, v)
        return self.k, self.v


class _StaticMask:
    """Causal mask of T new tokens over the whole cache (one document per row)."""

    def __init__(self, allowed: Tensor):
        self.allowed = allowed  # (1, 1, T, capacity) bool

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        gqa = k.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed, enable_gqa=gqa)


def _layer_kwargs(decoder: GPT, input_pos: Tensor, capacity: int) -> dict[str, Any]:
    key_pos = torch.arange(capacity, device=input_pos.device)
    allowed = (key_pos[None, :] <= input_pos[:, None])[None, None]  # (1, 1, T, capacity)
    rope = decoder.rope_cos[input_pos][None, None], decoder.rope_sin[input_pos][None, None]
    return {"rope": rope, "mask": _StaticMask(allowed)}


def _main_step(
    decoder: GPT, ids: Tensor, input_pos: Tensor, keys: list[Tensor], values: list[Tensor]
) -> Tensor:
    """``h^0 [1, T, H]`` of ``ids [1, T]`` at positions ``input_pos [T]``."""
    kwargs = _layer_kwargs(decoder, input_pos, keys[0].shape[2])
    caches = [_StaticCache(k, v, input_pos) for k, v in zip(keys, values)]
    return decoder.hidden(ids, kwargs, caches=caches)


def _depth_step(
    decoder: GPT,
    module: nn.Module,
    hidden: Tensor,
    ids: Tensor,
    input_pos: Tensor,
    k: Tensor,
    v: Tensor,
    zero_first: bool = False,
) -> Tensor:
    """``h^k [1, T, H]`` of MTP depth ``module`` at positions ``input_pos`` (``zero_first``: no
    token embedding at position 0, the engines' rule)."""
    kwargs = _layer_kwargs(decoder, input_pos, k.shape[2])
    embedded = decoder.embed(ids)  # (1, T, H)
    if zero_first:
        embedded = embedded * (input_pos != 0).to(embedded.dtype)[None, :, None]
    return module(hidden, embedded, **kwargs, cache=_StaticCache(k, v, input_pos))


def compile_mode(device_type: str) -> str | None:
    """``torch.compile``'s mode for the decode steps: "reduce-overhead" on CUDA (the steps are
    replayed as CUDA graphs: one launch per step instead of one per kernel, which is what a
    one-token step costs on a GPU), the default elsewhere."""
    return "reduce-overhead" if device_type == "cuda" else None


@cache
def _compiled(device_type: str = "cpu") -> tuple[Any, Any]:
    # dynamic=False: one static graph per T (and per depth module); the decoder, the layers
    # and the cache buffers are guarded by identity, so a new model or state recompiles.
    # D depths x (D + 1) step sizes exceed dynamo's default of 8 graphs per function, past
    # which it would silently run eagerly: allow enough for D <= 7.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = compile_mode(device_type)
    return (
        torch.compile(_main_step, dynamic=False, mode=mode),
        torch.compile(_depth_step, dynamic=False, mode=mode),
    )


def max_static_tokens(draft_steps: int) -> int:
    """Steps of at most this many new tokens run compiled (plain: 1, speculative: N + 1 for N
    draft steps)."""
    return draft_steps + 1


class StaticDecodeState(DecodeState):
    """A :class:`~multitoken.decoding.state.DecodeState` whose short forwards are compiled.

    Args:
        model: an :class:`~multitoken.mtp_model.MTPModel` over the reference GPT.
        capacity: the longest sequence (prompt plus new tokens); the caches hold the next power
            of two (at least 64, at most ``max_seq_len``).
        draft_depths: MTP depths that draft (0 for plain decoding).
        compile: compile the short steps (False: the same static-shape code, eagerly).
        draft_steps: draft steps, each with its own static cache (None = ``draft_depths``).
        zero_first: zero the depths' token embedding at position 0 (the engines' rule).
    """

    def __init__(
        self,
        model: MTPModel,
        capacity: int,
        draft_depths: int = 0,
        compile: bool = True,
        draft_steps: int | None = None,
        zero_first: bool = False,
    ):
        if not isinstance(model.decoder, GPT):
            raise InputError(
                f"compiled decoding needs the reference GPT decoder, got "
                f"{type(model.decoder).__name__}: decode with compile=False"
            )
        if capacity > model.decoder.max_seq_len:
            raise InputError(
                f"decoding {capacity} positions but max_seq_len is {model.decoder.max_seq_len}: "
                "shorten the prompt or max_new_tokens"
            )
        # Capacity shapes every graph: round it up to a power of two (at least 64, at most
        # max_seq_len) so that generations of similar lengths share the compiled steps.
        capacity = min(max(64, 1 << (capacity - 1).bit_length()), model.decoder.max_seq_len)
        super().__init__(model, capacity, draft_depths, draft_steps, zero_first)
        self.compile = compile
        self.max_static = max_static_tokens(len(self.mtp))
        # At most one graph per (function, cache, step size); past dynamo's recompile limit it
        # would silently run eagerly.
        limit = (len(self.mtp) + 1) * (self.max_static + 1)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        self._keys = [c.k for c in self.main]
        self._values = [c.v for c in self.main]
        self._positions = torch.arange(capacity, device=self.device)
        if compile and self.device.type == "cuda":
            # The caches are written in place by every step: fixed addresses let the CUDA
            # graphs keep them as they are instead of copying them in and out.
            depth_caches = [t for c in self.mtp for t in (c.k, c.v)]
            for buffer in [*self._keys, *self._values, *depth_caches]:
                torch._dynamo.mark_static_address(buffer)

    def _functions(self, length: int):
        if self.compile and length <= self.max_static:
            return _compiled(self.device.type)
        return _main_step, _depth_step

    def _run_main(self, ids: Tensor, start: int) -> Tensor:
        length = ids.shape[1]
        main_step, _ = self._functions(length)
        input_pos = self._positions[start : start + length]
        h0 = main_step(self.decoder, ids, input_pos, self._keys, self._values)
        for c in self.main:
            c.length = start + length
        return h0

    def _run_depth(self, k: int, hidden: Tensor, ids: Tensor, start: int) -> Tensor:
        length = ids.shape[1]
        _, depth_step = self._functions(length)
        cache_ = self.mtp[k - 1]
        input_pos = self._positions[start : start + length]
        module = self.model.mtp.depths[self.depth_of(k) - 1]
        out = depth_step(
            self.decoder, module, hidden, ids, input_pos, cache_.k, cache_.v, self.zero_first
        )
        cache_.length = start + length
        return out
