"""KV-cached decoding and greedy self-speculative decoding with the MTP heads.

Random models almost never accept a draft, so the exactness tests also run on a tiny model
trained once per session (``trained`` in conftest.py, about 2 s) on a stream of short phrases
whose successor is one of three phrases at random: inside a phrase every depth agrees with the
main model, at a phrase boundary the heads break the tie differently, so full, partial and zero
acceptance all occur.
"""

import json

import pytest
import torch
from tests.helpers.models import assert_state_is_fresh, decoding_model, naive_greedy

import multitoken.cli
from multitoken import InputError, lookahead
from multitoken.decoding.generate import fit_prompt, generate, teacher_forced_accuracy
from multitoken.decoding.state import DecodeState, decode_layer_kwargs
from multitoken.models import LayerKVCache


# ---------------------------------------------------------------- cached == uncached
@pytest.mark.parametrize("attention", ["document", "causal"])
def test_cached_forward_in_chunks_equals_full_forward(attention):
    """Through the Decoder interface: the main layers and every MTP depth, fed in chunks with
    their caches, give the hidden states of one uncached forward."""
    model = decoding_model(3, attention=attention)
    decoder = model.decoder
    batch, seqlen, chunks = 2, 17, [5, 1, 3, 1, 7]
    ids = torch.randint(0, 24, (batch, seqlen), generator=torch.Generator().manual_seed(0))

    def decode_kwargs(start, length):
        return decode_layer_kwargs(decoder, batch, start, length, ids.device)

    with torch.no_grad():
        full = model(ids)  # D + 1 tensors (2, 17, H)
        main = [decoder.new_kv_cache(batch, seqlen) for _ in range(decoder.num_layers)]
        got, start = [], 0
        for size in chunks:
            part = ids[:, start : start + size]
            got.append(decoder.hidden(part, decode_kwargs(start, size), caches=main))
            start += size
        assert [cache.length for cache in main] == [seqlen] * decoder.num_layers
        torch.testing.assert_close(torch.cat(got, 1), full[0], rtol=1e-5, atol=1e-5)
        # Depth k, fed the previous depth's states and the tokens k ahead, matches at every
        # position whose lookahead stays inside the row.
        ahead = lookahead(ids, None, [1, 2, 3], fill=model.pad_id)  # (3, 2, 17)
        for k in range(1, 4):
            depth = model.mtp.depths[k - 1]
            cache, got, start = decoder.new_kv_cache(batch, seqlen), [], 0
            for size in chunks:
                part = slice(start, start + size)
                embedded = decoder.embed(ahead[k - 1][:, part])
                kwargs = decode_kwargs(cache.length, size)
                got.append(depth(full[k - 1][:, part], embedded, **kwargs, cache=cache))
                start += size
            valid = seqlen - k
            torch.testing.assert_close(
                torch.cat(got, 1)[:, :valid], full[k][:, :valid], rtol=1e-5, atol=1e-5
            )


def test_layer_cache_update_truncate_and_capacity():
    cache = LayerKVCache(1, 2, 4, capacity=6)
    k = torch.randn(1, 2, 4, 4)
    k_all, _ = cache.update(k, k)
    assert cache.length == 4 and torch.equal(k_all, k)
    cache.truncate(1)
    assert cache.length == 1 and bool((cache.k[:, :, 1:] == 0).all())
    with pytest.raises(InputError, match="capacity"):
        cache.update(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(3)


@pytest.mark.parametrize("depth", [0, 2])
def test_plain_cached_greedy_equals_uncached(depth):
    model = decoding_model(depth, vocab=50, init_std=0.5)
    prompt = [3, 9, 4, 1, 7]
    assert generate(model, prompt, 20).tokens == naive_greedy(model, prompt, 20)


# ---------------------------------------------------------------- speculative == greedy
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_speculative_equals_greedy_random_models(depth):
    for seed in range(3):
        model = decoding_model(depth, seed=seed, vocab=8, init_std=0.3)
        prompt = torch.randint(0, 8, (6,), generator=torch.Generator().manual_seed(seed))
        plain = generate(model, prompt, 30)
        spec = generate(model, prompt, 30, speculative=True)
        assert spec.tokens == plain.tokens
        assert plain.stats.forwards == 30 and spec.stats.new_tokens == 30


def test_speculative_equals_greedy_on_a_model_that_accepts(trained):
    model, stream = trained
    histogram = [0] * 4
    for draft_depths in (1, 2, 3):
        for start in range(0, 800, 100):
            prompt = stream[start : start + 7].tolist()
            plain = generate(model, prompt, 40)
            spec = generate(model, prompt, 40, speculative=True, draft_depths=draft_depths)
            assert spec.tokens == plain.tokens
            assert sum(spec.stats.accepted_histogram) == spec.stats.forwards
            assert spec.stats.forwards + sum(spec.stats.accepted) == 40
            if draft_depths == 3:
                histogram = [a + b for a, b in zip(histogram, spec.stats.accepted_histogram)]
    assert plain.tokens == naive_greedy(model, prompt, 40)
    # Every path ran: steps that rejected the first draft, stopped midway, accepted all.
    assert histogram[0] > 0 and histogram[1] + histogram[2] > 0 and histogram[3] > 0
    assert 0 < spec.stats.acceptance[0] <= 1


def test_acceptance_counts_are_conditional(trained):
    model, stream = trained
    spec = generate(model, stream[:7].tolist(), 60, speculative=True)
    stats = spec.stats
    hist = stats.accepted_histogram
    # Depth k is judged only when depths 1..k-1 were accepted, and accepted when >= k were.
    for k in range(3):
        assert stats.accepted[k] == sum(hist[k + 1 :])
        assert stats.accepted[k] <= stats.reached[k] <= stats.forwards
        if k:
            # Judged only after the shallower depth was accepted (fewer at the very end, where
            # a step drafts only as many tokens as are still wanted).
            assert stats.accepted[k - 1] - 2 <= stats.reached[k] <= stats.accepted[k - 1]
    assert stats.tokens_per_forward == pytest.approx(60 / stats.forwards)


def test_drafts_are_the_teacher_forced_predictions(trained, monkeypatch):
    """With its cache, depth k drafts what the full forward predicts from the true tokens,
    whenever the drafts it read (those of the shallower depths) turned out right."""
    model, stream = trained
    calls = []
    forward_depth = DecodeState.forward_depth

    def recording(self, depth, tokens, end):
        hidden = forward_depth(self, depth, tokens, end)
        draft = int((hidden[-1] @ model.head_weight.t()).argmax())
        calls.append((depth, end, list(tokens[: end + depth]), draft))
        return hidden

    monkeypatch.setattr(DecodeState, "forward_depth", recording)
    checked = 0
    for start in (0, 200, 400):
        calls.clear()
        out = generate(model, stream[start : start + 7].tolist(), 40, speculative=True)
        seq = out.prompt_ids + out.tokens
        with torch.no_grad():
            hidden = model(torch.tensor([seq]))
        for depth, end, read, draft in calls:
            if read == seq[: end + depth]:
                teacher = int((hidden[depth][0, end - 1] @ model.head_weight.t()).argmax())
                assert draft == teacher
                checked += 1
    assert checked > 50 and {call[0] for call in calls} == {1, 2, 3}


def test_rejected_drafts_leave_no_trace_in_the_caches(trained, monkeypatch):
    """After every step of a speculative run (checked at each commit), the caches and hidden
    states hold exactly what the committed tokens alone would give."""
    model, stream = trained
    commit = DecodeState.commit
    checked = []

    def checking(self, tokens, exact_upto):
        commit(self, tokens, exact_upto)
        assert_state_is_fresh(model, self)
        checked.append(self.tokens)

    monkeypatch.setattr(DecodeState, "commit", checking)
    prompt = stream[3:10].tolist()
    full = generate(model, prompt, 45, speculative=True)
    assert full.state.tokens == prompt + full.tokens and len(checked) == full.stats.forwards
    assert sum(full.stats.reached) > sum(full.stats.accepted)  # some drafts were rejected
    # Stopping at an end-of-document token cuts a step short, past accepted drafts too.
    for eos in set(full.tokens[5:25]):
        out = generate(model, prompt, 45, speculative=True, eos_id=eos)
        assert out.tokens == full.tokens[: full.tokens.index(eos) + 1]
        assert checked[-1] == prompt + out.tokens


# ---------------------------------------------------------------- edges
@pytest.mark.parametrize("speculative", [False, True])
def test_edge_prompts_and_lengths(trained, speculative):
    model, stream = trained
    for depth in (1, 3):
        kwargs = dict(speculative=speculative, draft_depths=depth if speculative else None)
        # max_new_tokens = 0 and 1.
        out = generate(model, stream[:5].tolist(), 0, **kwargs)
        assert out.tokens == [] and out.stats.forwards == 0
        out = generate(model, stream[:5].tolist(), 1, **kwargs)
        assert out.tokens == naive_greedy(model, stream[:5].tolist(), 1)
        # One-token prompt: no h^0 to draft from in the first step.
        out = generate(model, stream[:1].tolist(), 12, **kwargs)
        assert out.tokens == naive_greedy(model, stream[:1].tolist(), 12)
        # Empty prompt: starts from start_id.
        out = generate(model, [], 12, start_id=5, **kwargs)
        assert out.prompt_ids == [5] and out.tokens == naive_greedy(model, [5], 12)
        # Longer than the context (96): keeps the last 96 - 20 tokens.
        long_prompt = stream[:150].tolist()
        out = generate(model, long_prompt, 20, **kwargs)
        assert out.prompt_ids == long_prompt[-76:]
        assert out.tokens == naive_greedy(model, long_prompt[-76:], 20)


def test_stops_after_eos_identically(trained):
    model, stream = trained
    prompt = stream[:7].tolist()
    full = generate(model, prompt, 40).tokens
    eos = full[12]
    want = full[: full.index(eos) + 1]
    for speculative in (False, True):
        assert generate(model, prompt, 40, speculative, eos_id=eos).tokens == want


def test_fit_prompt_rules():
    assert fit_prompt([5, 6, 7, 8], 6, 8, start_id=1) == [7, 8]
    assert fit_prompt([], 3, 8, start_id=1) == [1]
    assert fit_prompt([5, 6], 7, 8, start_id=1) == [6]
    with pytest.raises(InputError, match="max_seq_len=8"):
        fit_prompt([5], 8, 8, start_id=1)


def test_errors_are_clear():
    plain = decoding_model(0)
    with pytest.raises(InputError, match="MTP heads"):
        generate(plain, [1, 2, 3], 4, speculative=True)
    model = decoding_model(2)
    with pytest.raises(InputError, match="draft_depths must be in 1..2"):
        generate(model, [1, 2, 3], 4, speculative=True, draft_depths=3)
    with pytest.warns(DeprecationWarning, match=r"generate\(draft_depth=...\) is deprecated"):
        stats = generate(model, [1, 2, 3], 2, speculative=True, draft_depth=1).stats
    with pytest.warns(DeprecationWarning, match="GenerationStats.draft_depth is deprecated"):
        assert stats.draft_depth == stats.draft_depths == 1
    with pytest.raises(InputError, match="outside the vocabulary"):
        generate(model, [1, 99], 4)
    with pytest.raises(InputError, match="temperature"):
        generate(model, [1, 2], 4, temperature=-1.0)
    with pytest.raises(InputError, match="max_seq_len is 96"):
        DecodeState(model, 100).forward_main(list(range(97)))


def test_teacher_forced_accuracy_counts(trained):
    model, stream = trained
    ids = stream[:40].tolist()
    result = teacher_forced_accuracy(model, ids, start=10)
    # Depth k has a generated target ids[j + k + 1] for j in [10 - k - 1, 40 - k - 1).
    assert [total for _, total in result] == [30, 30, 30]
    # The stream's phrases are learned: every depth is right far more often than chance.
    assert all(hits / total > 0.5 for hits, total in result)


# ---------------------------------------------------------------- the command
class CharTokenizer:
    eos_id = 1

    def encode(self, text):
        return [2 + (ord(c) % 20) for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture
def fake_runs(monkeypatch, trained):
    """``multitoken generate --run mtp`` loads the trained D = 3 model, ``--run plain`` a D = 0
    one; both with a character tokenizer."""
    models = {"mtp": trained[0], "plain": decoding_model(0)}
    monkeypatch.setattr(
        multitoken.cli, "load_for_inference", lambda run_dir: (models[run_dir], CharTokenizer())
    )
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the command pins 1 thread on the CPU


def test_generate_command_json(fake_runs, capsys):
    argv = ["generate", "--run", "mtp", "--prompt", "def parse(", "--max-new-tokens", "16"]
    assert multitoken.cli.main([*argv, "--speculative", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert record["tokens"] == len(record["token_ids"]) <= 16
    assert record["tokens_per_forward"] == pytest.approx(
        record["tokens"] / record["forwards"], 1e-3
    )
    assert len(record["acceptance"]) == 3 and len(record["teacher_forced_accuracy"]) == 3
    assert isinstance(record["text"], str) and record["tokens_per_s"] > 0
    plain = ["generate", "--run", "plain", "--prompt", "x = 1", "--max-new-tokens", "4"]
    assert multitoken.cli.main(plain) == 0
    assert capsys.readouterr().out.startswith("x = 1")


def test_generate_command_refuses_speculative_without_heads(fake_runs, capsys):
    argv = ["generate", "--run", "plain", "--prompt", "x = 1", "--max-new-tokens", "4"]
    assert multitoken.cli.main([*argv, "--speculative"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and "without MTP heads" in captured.err
