"""Speculative sampling (temperature > 0) keeps the main model's output distribution."""

import pytest
import torch
from tests.helpers.models import exact_two_token_law, tiny_model

from multitoken.decoding.generate import accept_drafts, generate


def test_acceptance_rule_reproduces_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    target_logits = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 1.5, 0.5], [0.0, 0.0, 0.0]])
    p = torch.softmax(target_logits, -1)
    # Drafts that disagree with the target on purpose (mass on the wrong tokens).
    q1 = torch.tensor([0.1, 0.3, 0.6])
    q2 = torch.tensor([0.7, 0.1, 0.2])
    trials = 20000
    d1 = torch.multinomial(q1, trials, replacement=True, generator=gen).tolist()
    d2 = torch.multinomial(q2, trials, replacement=True, generator=gen).tolist()
    first = torch.zeros(3)
    second = torch.zeros(3)
    for a, b in zip(d1, d2):
        n, token = accept_drafts(target_logits, [a, b], [q1, q2], 1.0, gen)
        emitted = [a, b][:n] + [token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    # Within 5 standard errors of the target law; the drafts' own law is far outside.
    tolerance = 5 * (0.25 / trials) ** 0.5
    assert (first / trials - p[0]).abs().max() < tolerance
    assert (second / second.sum() - p[1]).abs().max() < 5 * (0.25 / second.sum()) ** 0.5
    assert (q1 - p[0]).abs().max() > 10 * tolerance


def test_acceptance_rule_accepts_when_draft_equals_target():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.3, 1.0, -0.2], [0.0, 0.1, 0.2]])
    q = torch.softmax(logits[0], -1)
    for draft in range(3):
        assert accept_drafts(logits, [draft], [q], 1.0, gen)[0] == 1


@pytest.mark.parametrize("draft_depths", [1, 2])
def test_speculative_sampling_matches_plain_sampling_law(draft_depths):
    small = dict(dim=16, n_layers=1, n_heads=2, max_seq_len=16, init_std=1.0)
    model = tiny_model(2, vocab_size=4, **small).eval()
    prompt, temperature = [1, 3, 0, 2], 1.3
    exact = exact_two_token_law(model, prompt, temperature)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(4, 4)
    trials, accepted, rejected = 1500, 0, 0
    for _ in range(trials):
        # Three new tokens so that the first step drafts draft_depths tokens; the first two
        # follow the two-token law whichever way they were produced.
        out = generate(model, prompt, 3, True, draft_depths, temperature, generator=gen)
        counts[out.tokens[0], out.tokens[1]] += 1
        accepted += sum(out.stats.accepted)
        rejected += sum(out.stats.reached) - sum(out.stats.accepted)
    total_variation = 0.5 * (counts / trials - exact).abs().sum()
    # 1500 samples from the right law land about 0.02-0.04 away; accepting every draft
    # (the wrong rule) lands about 0.48 away.
    assert total_variation < 0.08
    # Drafts were both accepted and rejected, so both branches of the rule shaped the sample.
    assert accepted > 100 and rejected > 100


def test_plain_sampling_is_seeded():
    model = tiny_model(0, vocab_size=16, dim=16, n_layers=1, n_heads=2, max_seq_len=32).eval()

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, [1, 2], 10, temperature=1.0, generator=gen).tokens

    assert run(0) == run(0) != run(1)
