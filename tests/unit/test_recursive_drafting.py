"""Recursive drafting beyond the depths: ``generate(..., draft_steps=N)`` with N > D reuses the
depths in turn (step s runs depth ((s - 1) mod D) + 1 on step s - 1's hidden state and token)."""

import importlib
import json

import pytest
import torch
from tests.helpers.models import (
    assert_state_is_fresh,
    decoding_model,
    exact_two_token_law,
    naive_greedy,
    tiny_model,
)

import multitoken.cli
from multitoken import InputError, SequenceLayout
from multitoken.decoding.generate import generate
from multitoken.decoding.state import DecodeState

# The module, not the function that multitoken.decoding re-exports under the same name.
generate_module = importlib.import_module("multitoken.decoding.generate")


def naive_drafts(model, seq, steps, depths, rule=None):
    """``steps`` greedy drafts after ``seq`` with no cache: h^0 over positions 0..L-2 by a full
    forward, then step s runs depth ``rule(s)`` (default ((s - 1) mod depths) + 1) over every
    position j, reading h^{s-1}_j and token ``t_{j+s}`` (drafts included)."""
    rule = rule or (lambda s: (s - 1) % depths + 1)
    decoder, n = model.decoder, len(seq) - 1
    layout = SequenceLayout.from_cu_seqlens(torch.tensor([0, n]), shape=(1, n))
    kwargs = decoder.layer_kwargs(layout)
    ext = list(seq)
    with torch.no_grad():
        h = decoder.hidden(torch.tensor([seq[:-1]]), kwargs)  # (1, L - 1, H)
        for s in range(1, steps + 1):
            ids = torch.tensor([ext[s : s + n]])  # position j reads t_{j+s}
            h = model.mtp.depths[rule(s) - 1](h, decoder.embed(ids), **kwargs)
            ext.append(int((h[0, -1] @ model.head_weight.t()).argmax()))
    return ext[len(seq) :]


def record_steps(monkeypatch):
    """Per speculative step: (the committed sequence it started from, its drafts)."""
    drafts, commits = [], []
    accept, commit = generate_module.accept_drafts, DecodeState.commit

    def accepting(logits, step_drafts, *args):
        drafts.append(list(step_drafts))
        return accept(logits, step_drafts, *args)

    def committing(self, tokens, exact_upto):
        commits.append(list(tokens))
        commit(self, tokens, exact_upto)

    monkeypatch.setattr(generate_module, "accept_drafts", accepting)
    monkeypatch.setattr(DecodeState, "commit", committing)
    return drafts, commits


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_recursive_drafting_is_greedy_decoding(trained, steps):
    """D = 2 (a random model, and the trained one drafting with its first 2 depths): T = 0 is
    plain greedy token for token for every N in 1..2D, with N counters."""
    model, stream = trained
    random = decoding_model(2)
    for m, prompt in [(random, [3, 1, 4, 1, 5]), (model, stream[40:47].tolist())]:
        out = generate(m, prompt, 30, speculative=True, draft_depths=2, draft_steps=steps)
        assert out.tokens == naive_greedy(m, prompt, 30)
        stats = out.stats
        assert len(stats.reached) == len(stats.accepted) == stats.draft_steps == steps
        assert stats.draft_depths == 2 and len(stats.accepted_histogram) == steps + 1
        assert stats.forwards + sum(stats.accepted) == 30
    if steps > 2:  # the trained depths agree often enough that reused depths get accepted
        assert stats.accepted[2] > 0


def test_drafts_follow_the_step_rule(trained, monkeypatch):
    """Every step's drafts equal the uncached reference that runs depth ((s - 1) mod D) + 1 at
    step s; a different rule (the last depth repeated) drafts something else."""
    model, stream = trained
    drafts, commits = record_steps(monkeypatch)
    prompt = stream[100:107].tolist()
    generate(model, prompt, 30, speculative=True, draft_depths=2, draft_steps=4)
    assert len(drafts) == len(commits) and drafts
    differs = 0
    for step_drafts, seq in zip(drafts, [prompt, *commits[:-1]]):
        assert step_drafts == naive_drafts(model, seq, len(step_drafts), 2)
        last_repeated = naive_drafts(model, seq, len(step_drafts), 2, rule=lambda s: min(s, 2))
        differs += step_drafts != last_repeated
    assert differs > 0 and max(map(len, drafts)) == 4


def test_drafts_follow_the_step_rule_with_one_depth(monkeypatch):
    """FastMTP's case: one depth applied recursively (draft_depths=1), random weights."""
    model = decoding_model(2, seed=3)
    drafts, commits = record_steps(monkeypatch)
    prompt = [5, 9, 2, 7]
    out = generate(model, prompt, 20, speculative=True, draft_depths=1, draft_steps=3)
    assert out.tokens == naive_greedy(model, prompt, 20)
    for step_drafts, seq in zip(drafts, [prompt, *commits[:-1]]):
        assert step_drafts == naive_drafts(model, seq, len(step_drafts), 1)


def test_caches_stay_exact_after_rollback(trained, monkeypatch):
    model, stream = trained
    commit, checked = DecodeState.commit, []

    def checking(self, tokens, exact_upto):
        commit(self, tokens, exact_upto)
        assert_state_is_fresh(model, self, 2)
        checked.append(len(tokens))

    monkeypatch.setattr(DecodeState, "commit", checking)
    out = generate(
        model, stream[3:10].tolist(), 40, speculative=True, draft_depths=2, draft_steps=4
    )
    assert len(checked) == out.stats.forwards
    assert sum(out.stats.reached) > sum(out.stats.accepted)  # some drafts were rolled back


def test_compiled_recursive_drafting_equals_eager(trained):
    model, stream = trained
    prompt = stream[50:57].tolist()
    kwargs = dict(speculative=True, draft_depths=2, draft_steps=3)
    eager = generate(model, prompt, 20, **kwargs)
    fast = generate(model, prompt, 20, **kwargs, compile=True)
    assert fast.tokens == eager.tokens == naive_greedy(model, prompt, 20)
    assert fast.stats.accepted == eager.stats.accepted and sum(fast.stats.accepted[2:]) > 0


def test_recursive_sampling_keeps_the_target_law():
    """T > 0, D = 2, N = 4: the first two tokens follow the main model's exact two-token law
    (four-token vocabulary), with drafts of the reused depths both accepted and rejected."""
    small = dict(dim=16, n_layers=1, n_heads=2, max_seq_len=16, init_std=1.0)
    model = tiny_model(2, vocab_size=4, **small).eval()
    prompt, temperature = [1, 3, 0, 2], 1.3
    exact = exact_two_token_law(model, prompt, temperature)
    gen = torch.Generator().manual_seed(2)
    counts, trials = torch.zeros(4, 4), 1500
    reached, accepted = [0] * 4, [0] * 4
    for _ in range(trials):
        # Five new tokens: the first step drafts four (steps 3 and 4 reuse depths 1 and 2).
        out = generate(model, prompt, 5, True, 2, temperature, generator=gen, draft_steps=4)
        counts[out.tokens[0], out.tokens[1]] += 1
        reached = [a + b for a, b in zip(reached, out.stats.reached)]
        accepted = [a + b for a, b in zip(accepted, out.stats.accepted)]
    # As in test_generate_sampling: the right law lands about 0.02-0.04 away.
    assert 0.5 * (counts / trials - exact).abs().sum() < 0.08
    reused_accepted = accepted[2] + accepted[3]
    assert reused_accepted > 20 and reached[2] + reached[3] - reused_accepted > 20


def test_draft_steps_are_checked_and_ignored_without_speculation():
    model = decoding_model(2)
    with pytest.raises(InputError, match="draft_steps must be an integer >= 1"):
        generate(model, [1, 2], 4, speculative=True, draft_steps=0)
    plain = generate(model, [1, 2], 4, draft_steps=5)
    assert plain.stats.draft_steps == 0 and plain.tokens == naive_greedy(model, [1, 2], 4)
    default = generate(model, [1, 2], 6, speculative=True, draft_depths=1)
    assert default.stats.draft_steps == 1  # N defaults to the draft depths


class ByteTokenizer:
    eos_id = 1

    def encode(self, text):
        return [2 + (ord(c) % 20) for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_generate_command_draft_steps(trained, monkeypatch, capsys):
    parsed = multitoken.cli.build_parser().parse_args(["generate", "--draft-steps", "5"])
    assert parsed.draft_steps == 5
    assert multitoken.cli.build_parser().parse_args(["generate"]).draft_steps is None
    monkeypatch.setattr(
        multitoken.cli, "load_for_inference", lambda run: (trained[0], ByteTokenizer())
    )
    threads = torch.get_num_threads()
    argv = ["generate", "--run", "mtp", "--prompt", "def f(", "--max-new-tokens", "12"]
    try:
        code = multitoken.cli.main(
            [*argv, "--speculative", "--draft-depth", "2", "--draft-steps", "4", "--json"]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert len(record["acceptance"]) == 4 and record["tokens"] <= 12
