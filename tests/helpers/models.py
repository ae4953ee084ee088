"""The one tiny GPT + MTP model factory of the tests, and a tiny model trained to draft well."""

from __future__ import annotations

import torch

from multitoken import MTPConfig, MTPModel, next_token_labels
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
