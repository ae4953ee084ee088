"""Compiled static-shape decoding (``generate(..., compile=True)``) against eager decoding."""

import pytest
import torch
from tests.helpers.models import decoding_model, naive_greedy

from multitoken import InputError
from multitoken.decoding.generate import generate
from multitoken.decoding.state import DecodeState
from multitoken.decoding.static import StaticDecodeState


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_compiled_speculative_equals_eager_and_greedy(trained, depth):
    model, stream = trained
    prompts = [stream[i : i + 7].tolist() for i in (0, 50, 333)]
    accepted = 0
    for prompt in prompts:
        eager = generate(model, prompt, 24, speculative=True, draft_depths=depth)
        fast = generate(model, prompt, 24, speculative=True, draft_depths=depth, compile=True)
        plain = generate(model, prompt, 24, compile=True)
        assert fast.tokens == eager.tokens == plain.tokens == naive_greedy(model, prompt, 24)
        assert fast.stats.accepted == eager.stats.accepted  # the same drafts, accepted alike
        accepted += sum(fast.stats.accepted)
    assert accepted > 0  # the drafts were really used


def test_compiled_rollback_leaves_no_trace(trained, monkeypatch):
    """After every step, the compiled state's caches and hidden states equal those of an eager
    state fed only the committed tokens (rejected drafts leave nothing behind)."""
    model, stream = trained
    states = []
    original = StaticDecodeState.commit

    def commit(self, tokens, exact_upto):
        original(self, tokens, exact_upto)
        caches = [(c.length, c.k.clone(), c.v.clone()) for c in self.main + self.mtp]
        states.append((caches, len(self.main), self.hidden.shape[2], list(tokens)))

    monkeypatch.setattr(StaticDecodeState, "commit", commit)
    generate(model, stream[100:107].tolist(), 20, speculative=True, compile=True)
    assert states
    for caches, n_main, capacity, tokens in states[:8]:
        ref = DecodeState(model, capacity, len(caches) - n_main)
        ref.tokens = tokens
        with torch.inference_mode():
            ref.forward_main(tokens[: caches[0][0]])
            for k, (length, _, _) in enumerate(caches[n_main:], start=1):
                if length:
                    ref.forward_depth(k, tokens, length)
        for (n, k, v), want in zip(caches, ref.main + ref.mtp):
            assert n == want.length
            torch.testing.assert_close(k[:, :, :n], want.k[:, :, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[:, :, :n], want.v[:, :, :n], rtol=1e-5, atol=1e-5)
            assert not k[:, :, n:].any() and not v[:, :, n:].any()


def test_compiled_decoding_refuses_what_it_cannot_do():
    model = decoding_model(1, max_seq_len=16)
    with pytest.raises(InputError, match="max_seq_len is 16"):
        StaticDecodeState(model, 40, 1)
