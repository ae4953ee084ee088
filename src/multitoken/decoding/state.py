"""The decoding state of one sequence: KV caches of the main layers and of every MTP depth.

A :class:`DecodeState` holds everything that decoding one sequence keeps: the committed
tokens, the main model's caches, and, for self-speculative decoding, one cache per MTP depth
plus the hidden states ``h^0 .. h^{D-1}`` that feed the next depth. The bookkeeping is the
MTP recurrence read position by position: depth k at position j needs ``h^{k-1}_j`` and the
token ``t_{j+k}``, so with ``L`` committed tokens the main model can be cached up to position
``L - 2`` (the last token is its next input) and depth k up to position ``L - 1 - k``.

**Recursive drafting** (``draft_steps`` N > ``draft_depths`` D'): draft step s runs depth
``((s - 1) mod D') + 1`` on the hidden state and the token of step s - 1, so the recurrence
simply continues past D'. The state keeps **one cache per draft step**, not per depth module:
step s at position j reads ``h^{s-1}_j`` and ``t_{j+s}``, exactly as a depth s would, so a
reused module's cache at step s holds only entries computed from its step's inputs, and the
rollback rule of :meth:`DecodeState.commit` (position j of step s read tokens up to ``j + s``)
keeps every cache exact. All steps use the rotary position j (attention depends only on
relative positions within one cache). The price is N one-layer caches instead of D'.

It drives the model only through the :class:`~multitoken.decoder.Decoder` interface
(``new_kv_cache``, ``layer_kwargs``, ``hidden``, ``embed``) and the MTP depths of an
:class:`~multitoken.mtp_model.MTPModel`, so any decoder that implements it decodes the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from multitoken.errors import InputError
from multitoken.layout import SequenceLayout
from multitoken.mtp_model import MTPModel

__all__ = ["DecodeState", "decode_layer_kwargs"]


def decode_layer_kwargs(decoder, batch: int, start: int, length: int, device) -> dict[str, Any]:
    """Layer keyword arguments for ``length`` new tokens after ``start`` cached ones.

    One document per row: the queries take positions ``start .. start + length - 1`` and
    attend causally over the cached keys and themselves, so the mask is the document rule
    with the cached keys' layout.
    """
    end = start + length
    if end > decoder.max_seq_len:
        raise InputError(
            f"decoding reaches position {end - 1} but max_seq_len is {decoder.max_seq_len}: "
            "shorten the prompt or max_new_tokens"
        )
    key_pos = torch.arange(end, device=device).expand(batch, end)
    query_pos = key_pos[:, start:]
    q_layout = SequenceLayout(torch.zeros_like(query_pos), query_pos, query_pos)
    kv_layout = SequenceLayout(torch.zeros_like(key_pos), key_pos, key_pos)
    return decoder.layer_kwargs(q_layout, kv_layout, decoding=True)


class DecodeState:
    """The caches and hidden states of one sequence being decoded (batch of one row).

    Invariants between steps, with ``L = len(tokens)``:

    * ``main[i].length == L - 1``: every committed token but the last went through the main
      model, and ``hidden[0][:, j]`` is ``h^0_j`` for ``j < L - 1``.
    * ``mtp[k-1].length <= L - 1 - k``: depth k at position j reads ``t_{j+k}``, and the last
      token ``t_{L-1}`` was at best a draft when the depths last ran. ``hidden[k][:, j]``
      (``k >= 1``) is ``h^k_j`` for every ``j`` depth k has cached. Depths catch up lazily,
      when they draft; everything past the kept lengths is zero.

    Args:
        model: the :class:`~multitoken.mtp_model.MTPModel`.
        capacity: the longest sequence (prompt plus new tokens) this state will hold.
        draft_depths: how many MTP depths draft (0 for plain decoding).
        draft_steps: how many draft steps keep caches (None = ``draft_depths``); step s runs
            depth ``((s - 1) mod draft_depths) + 1``.
        zero_first: zero the depths' token embedding at position 0 (the engines' rule).
    """

    def __init__(
        self,
        model: MTPModel,
        capacity: int,
        draft_depths: int = 0,
        draft_steps: int | None = None,
        zero_first: bool = False,
    ):
        if not 0 <= draft_depths <= model.num_depths:
            raise InputError(f"{draft_depths} MTP depths asked, the model has {model.num_depths}")
        steps = draft_depths if draft_steps is None else draft_steps
        if steps < 0 or (steps > 0) != (draft_depths > 0):
            raise InputError(f"{steps} draft steps asked with {draft_depths} draft depths")
        decoder = model.decoder
        head = model.head_weight
        self.model, self.decoder = model, decoder
        self.draft_depths = draft_depths
        self.zero_first = zero_first
        self.tokens: list[int] = []
        self.main = [decoder.new_kv_cache(1, capacity) for _ in range(decoder.num_layers)]
        # One cache per draft step (mtp[s - 1]); step s runs depth_of(s).
        self.mtp = [decoder.new_kv_cache(1, capacity) for _ in range(steps)]
        # hidden[s][:, j] = h^s_j, the hidden input of draft step s + 1 at position j.
        self.hidden = torch.zeros(
            steps, 1, capacity, decoder.hidden_size, device=head.device, dtype=head.dtype
        )
        self._hidden_end = [0] * steps  # one past the last position written, per step

    def depth_of(self, step: int) -> int:
        """The MTP depth that draft step ``step`` (1-based) runs: ``((step - 1) mod D') + 1``."""
        return (step - 1) % self.draft_depths + 1

    @property
    def device(self) -> torch.device:
        return self.model.head_weight.device

    def _ids(self, ids: list[int]) -> Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)

    def forward_main(self, ids: list[int]) -> Tensor:
        """Run the main model on ``ids`` after the cached prefix; return ``h^0 [T, H]``."""
        start = self.main[0].length
        h0 = self._run_main(self._ids(ids), start)  # (1, T, H)
        if len(self.mtp):
            self.hidden[0, :, start : start + len(ids)] = h0
            self._hidden_end[0] = max(self._hidden_end[0], start + len(ids))
        return h0[0]

    def forward_depth(self, k: int, tokens: list[int], end: int) -> Tensor:
        """Bring draft step ``k`` (MTP depth :meth:`depth_of` ``(k)``) up to position
        ``end - 1``; return ``h^k [T, H]``.

        Args:
            k: the draft step, 1..N (the depth itself when N <= D).
            tokens: the sequence the depth reads, committed tokens followed by the drafts of the
                shallower depths (position j reads ``tokens[j + k]``).
            end: one past the last position to compute; ``h^{k-1}`` must be known there.

        Returns:
            ``h^k`` at the newly computed positions ``[cache.length, end)``.
        """
        cache = self.mtp[k - 1]
        start = cache.length
        if end <= start:
            raise InputError(f"MTP draft step {k} already holds positions up to {start - 1}")
        hidden = self.hidden[k - 1, :, start:end]  # (1, T, H)
        ids = self._ids(tokens[start + k : end + k])
        out = self._run_depth(k, hidden, ids, start)  # (1, T, H)
        if k < len(self.mtp):
            self.hidden[k, :, start:end] = out
            self._hidden_end[k] = max(self._hidden_end[k], end)
        return out[0]

    # The two forwards, through the Decoder interface (StaticDecodeState compiles them).
    def _run_main(self, ids: Tensor, start: int) -> Tensor:
        kwargs = decode_layer_kwargs(self.decoder, 1, start, ids.shape[1], self.device)
        return self.decoder.hidden(ids, kwargs, caches=self.main)

    def _run_depth(self, k: int, hidden: Tensor, ids: Tensor, start: int) -> Tensor:
        kwargs = decode_layer_kwargs(self.decoder, 1, start, ids.shape[1], self.device)
        module = self.model.mtp.depths[self.depth_of(k) - 1]
        embedded = self.decoder.embed(ids)  # (1, T, H)
        if self.zero_first and start == 0:
            embedded[:, 0] = 0  # position 0: the engines' MTP drafts read no token there
        return module(hidden, embedded, **kwargs, cache=self.mtp[k - 1])

    def commit(self, tokens: list[int], exact_upto: int) -> None:
        """Make ``tokens`` the committed sequence and roll back what no longer holds.

        Args:
            tokens: the committed sequence after this step (length ``L``).
            exact_upto: number of leading tokens of the sequence each cache was last computed
                from that equal ``tokens`` (the accepted prefix; the first rejected draft and
                everything after it differ or may differ).
        """
        self.tokens = list(tokens)
        length = len(tokens)
        for cache in self.main:
            cache.truncate(min(cache.length, length - 1, exact_upto))
        for k, cache in enumerate(self.mtp, start=1):
            # Position j of depth k read tokens up to j + k.
            cache.truncate(max(0, min(cache.length, length - 1 - k, exact_upto - k)))
        # Hidden states past what each cache keeps came from the same dropped inputs.
        kept = [self.main[0].length] + [cache.length for cache in self.mtp[:-1]]
        for k in range(len(self.mtp)):
            self.hidden[k, :, kept[k] : self._hidden_end[k]] = 0
            self._hidden_end[k] = min(self._hidden_end[k], kept[k])
