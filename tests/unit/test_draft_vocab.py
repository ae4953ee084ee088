"""A reduced draft vocabulary and padded verification (``generate(draft_vocab=, verify_tokens=)``):
drafts come from the subset only, greedy decoding stays plain greedy, sampling keeps the main
model's law, and the padded rows leave the caches as a rejected draft would."""

import importlib

import pytest
import torch
from tests.helpers.models import (
    assert_state_is_fresh,
    decoding_model,
    exact_two_token_law,
    naive_greedy,
    tiny_model,
)

from multitoken import InputError
from multitoken.decoding.draft_vocab import DraftVocab, most_frequent
from multitoken.decoding.generate import generate
from multitoken.decoding.state import DecodeState

generate_module = importlib.import_module("multitoken.decoding.generate")


def record_drafts(monkeypatch) -> list[list[int]]:
    drafts, accept = [], generate_module.accept_drafts

    def accepting(logits, step_drafts, *args):
        drafts.append(list(step_drafts))
        return accept(logits, step_drafts, *args)

    monkeypatch.setattr(generate_module, "accept_drafts", accepting)
    return drafts


def test_most_frequent_takes_the_largest_counts_ties_to_the_smaller_id():
    counts = torch.tensor([5, 0, 9, 5, 1, 9])
    assert most_frequent(counts, 3).tolist() == [0, 2, 5]
    assert most_frequent(counts, 4).tolist() == [0, 2, 3, 5]
    with pytest.raises(InputError, match=r"size must be in 1..6"):
        most_frequent(counts, 0)


@pytest.mark.parametrize("ids, match", [([], "empty"), ([0, 24], r"\[0, 24\)"), ([3, 3], "twice")])
def test_bad_draft_vocabularies_are_refused(ids, match):
    model = decoding_model(2)
    with pytest.raises(InputError, match=match):
        generate(model, [1, 2], 4, speculative=True, draft_vocab=ids)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_verify_tokens_are_refused(bad):
    with pytest.raises(InputError, match="verify_tokens must be an integer >= 0"):
        generate(decoding_model(1), [1, 2], 4, speculative=True, verify_tokens=bad)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("verify_tokens", [0, 4, 8])
def test_greedy_output_is_plain_greedy(trained, monkeypatch, steps, verify_tokens):
    """T = 0 with drafts from the 12 most frequent tokens of the training stream: every draft
    lies in the subset, and the output is plain greedy decoding token for token."""
    model, stream = trained
    vocab = most_frequent(torch.bincount(stream, minlength=model.decoder.vocab_size), 12)
    drafts = record_drafts(monkeypatch)
    prompt = stream[40:47].tolist()
    out = generate(
        model, prompt, 30, speculative=True, draft_steps=steps, draft_vocab=vocab,
        verify_tokens=verify_tokens,
    )  # fmt: skip
    assert out.tokens == naive_greedy(model, prompt, 30)
    assert set(sum(drafts, [])) <= set(vocab.tolist()) and sum(out.stats.accepted) > 0


def test_the_whole_vocabulary_drafts_what_no_vocabulary_drafts(trained):
    model, stream = trained
    prompt = stream[60:67].tolist()
    everything = torch.arange(model.decoder.vocab_size).flip(0)  # any order
    full = generate(model, prompt, 30, speculative=True, draft_vocab=everything)
    plain = generate(model, prompt, 30, speculative=True)
    assert full.tokens == plain.tokens and full.stats.accepted == plain.stats.accepted


def test_a_vocabulary_without_the_right_tokens_drafts_nothing_accepted(trained):
    """A subset of tokens the model never predicts: every draft is rejected, output unchanged."""
    model, stream = trained
    prompt = stream[10:17].tolist()
    target = set(naive_greedy(model, prompt, 30))
    never = [i for i in range(model.decoder.vocab_size) if i not in target]
    out = generate(model, prompt, 30, speculative=True, draft_vocab=never)
    assert out.tokens == naive_greedy(model, prompt, 30) and sum(out.stats.accepted) == 0


def test_padded_verification_runs_the_padded_shape_and_rolls_back(trained, monkeypatch):
    model, stream = trained
    lengths, forward, commit = [], DecodeState.forward_main, DecodeState.commit

    def recording(self, tokens):
        lengths.append((id(self), len(tokens)))
        return forward(self, tokens)

    def checking(self, tokens, exact_upto):
        commit(self, tokens, exact_upto)
        assert_state_is_fresh(model, self)

    monkeypatch.setattr(DecodeState, "forward_main", recording)
    monkeypatch.setattr(DecodeState, "commit", checking)
    out = generate(model, stream[3:10].tolist(), 25, speculative=True, verify_tokens=5)
    assert out.tokens == naive_greedy(model, stream[3:10].tolist(), 25)
    # The prompt's forward, then one verification per step: 5 rows while there are drafts
    # (the fresh reference states the check builds run forwards of their own).
    steps = [n for state, n in lengths if state == lengths[0][0]][1:]
    assert steps[0] == 5 and set(steps) <= {1, 5} and len(steps) == out.stats.forwards
    assert steps.count(5) >= out.stats.forwards - 1


def test_sampling_with_a_draft_vocabulary_keeps_the_target_law():
    """T > 0, drafts over 2 of the 4 tokens: the first two tokens follow the main model's exact
    two-token law, with drafts both accepted and rejected."""
    small = dict(dim=16, n_layers=1, n_heads=2, max_seq_len=16, init_std=1.0)
    model = tiny_model(2, vocab_size=4, **small).eval()
    prompt, temperature = [1, 3, 0, 2], 1.3
    exact = exact_two_token_law(model, prompt, temperature)
    gen = torch.Generator().manual_seed(4)
    counts, trials, accepted, reached = torch.zeros(4, 4), 1500, 0, 0
    for _ in range(trials):
        out = generate(
            model, prompt, 3, True, 2, temperature, generator=gen, draft_vocab=[0, 2],
            verify_tokens=4,
        )  # fmt: skip
        counts[out.tokens[0], out.tokens[1]] += 1
        accepted += sum(out.stats.accepted)
        reached += sum(out.stats.reached)
    # As in test_generate_sampling: the right law lands about 0.02-0.04 away.
    assert 0.5 * (counts / trials - exact).abs().sum() < 0.08
    assert accepted > 50 and reached - accepted > 50


def test_draft_vocab_keeps_contiguous_rows_of_the_head():
    weight = torch.randn(10, 3)
    vocab = DraftVocab([7, 2, 5], weight)
    assert vocab.ids.tolist() == [2, 5, 7] and vocab.weight.is_contiguous()
    torch.testing.assert_close(vocab.weight, weight[[2, 5, 7]])
    probs = vocab.full_probs(torch.tensor([0.5, 0.25, 0.25]))
    assert probs.tolist() == [0, 0, 0.5, 0, 0, 0.25, 0, 0.25, 0, 0]
