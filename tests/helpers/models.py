"""The one tiny GPT + MTP model factory of the tests, and a tiny model trained to draft well."""

from __future__ import annotations

import torch

from multitoken import MTPConfig, MTPModel, next_token_labels
from multitoken.decoding.state import DecodeState
from multitoken.models import GPTConfig

# A tiny GPT: two layers, grouped-query attention (4 query, 2 key/value heads).
TINY_GPT = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
# Smaller still (one layer of width 16), where only the saved state matters: checkpoints.
SMALL_GPT = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32)


def tiny_model(depth: int = 1, *, seed: int = 0, pad_id: int = 0, mtp: dict | None = None,
               **gpt) -> MTPModel:  # fmt: skip
    """The tiny GPT (``TINY_GPT``, with ``gpt`` overriding any ``GPTConfig`` field) with
    ``depth`` MTP depths (``mtp``: other ``MTPConfig`` fields), every weight seeded by
    ``seed``: the same call gives the same weights in any process."""
    torch.manual_seed(seed)
    config = GPTConfig(**{**TINY_GPT, **gpt})
    return MTPModel.from_config(config, MTPConfig(num_depths=depth, **(mtp or {})), pad_id=pad_id)


def phrase_stream(seed: int = 0, vocab: int = 24, phrases: int = 8, length: int = 20000):
    """Short phrases, each followed by one of three phrases at random: inside a phrase every
    depth can agree with the main model, at a boundary the heads break the tie differently."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 6, (phrases,), generator=gen)
    words = [torch.randint(2, vocab, (int(n),), generator=gen).tolist() for n in lengths]
    successors = torch.randint(0, phrases, (phrases, 3), generator=gen)
    stream, current = [], 0
    while len(stream) < length:
        stream += words[current]
        current = int(successors[current, int(torch.randint(0, 3, (1,), generator=gen))])
    return torch.tensor(stream)


def decoding_model(depth: int, seed: int = 0, vocab: int = 24, **gpt) -> MTPModel:
    """The decoding tests' random model (eval mode): vocabulary 24, 96 positions."""
    gpt = {"vocab_size": vocab, "max_seq_len": 96, **gpt}
    return tiny_model(depth, seed=seed, mtp=dict(loss_weight=1.0), **gpt).eval()


def train_phrase_model(steps: int = 100) -> tuple[MTPModel, torch.Tensor]:
    """(a D = 3 model trained on ``phrase_stream`` whose heads often agree with it, the stream):
    full, partial and zero acceptance all occur when it drafts. About 2 s."""
    stream = phrase_stream()
    model = decoding_model(3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 32, (8,), generator=gen)
        ids = stream[starts[:, None] + torch.arange(32)]  # (8, 32)
        loss = model.loss(ids, next_token_labels(ids)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), stream


def naive_greedy(model: MTPModel, prompt, n: int) -> list[int]:
    """Greedy decoding with a full uncached forward per token: the decoding reference."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model.logits(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def assert_state_is_fresh(model, state, draft_depths: int | None = None) -> None:
    """``state`` (a :class:`DecodeState`, one cache per draft step) equals a fresh state fed
    only its committed tokens, as far as each of its caches reaches: whole buffers, so nothing
    past a kept length survives either. ``draft_depths``: the depth modules the draft steps
    cycle through (None: one per step)."""
    tokens, steps = state.tokens, len(state.mtp)
    assert state.main[0].length == len(tokens) - 1
    ref = DecodeState(model, state.main[0].capacity, draft_depths or steps, steps)
    ref.tokens = list(tokens)
    with torch.no_grad():
        ref.forward_main(tokens[: state.main[0].length])
        for k in range(1, steps + 1):
            assert state.mtp[k - 1].length <= len(tokens) - 1 - k
            if state.mtp[k - 1].length:
                ref.forward_depth(k, tokens, end=state.mtp[k - 1].length)
    for got, want in zip(state.main + state.mtp, ref.main + ref.mtp):
        assert got.length == want.length
        torch.testing.assert_close(got.k, want.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.v, want.v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.hidden, ref.hidden, rtol=1e-5, atol=1e-5)


def exact_two_token_law(model, prompt, temperature):
    """P(x1, x2 | prompt) of plain sampling, ``[V, V]``."""
    vocab = model.decoder.vocab_size
    with torch.no_grad():
        first = torch.softmax(model.logits(torch.tensor([prompt]))[0, -1] / temperature, -1)
        seqs = torch.tensor([[*prompt, x] for x in range(vocab)])
        second = torch.softmax(model.logits(seqs)[:, -1] / temperature, -1)  # (V, V)
    return first[:, None] * second
