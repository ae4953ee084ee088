"""``multitoken generate --draft-vocab N --verify-tokens M`` on a trained run: the draft
vocabulary is the run's N most frequent training tokens, and the output is plain greedy."""

import json

import numpy as np
from tests.helpers.cli import cli

from multitoken.train.config_io import load_config
from multitoken.train.data import prepare_data
from multitoken.train.draft_vocab import run_draft_vocab


def test_draft_vocab_is_the_most_frequent_training_tokens(reference):
    ids = run_draft_vocab(reference, 40)
    # Counted independently, over the whole training split at once.
    tokens = prepare_data(load_config(reference / "config.toml"), verbose=False)
    tokens = tokens.train_loader.corpus.tokens
    counts = np.bincount(tokens, minlength=int(ids.max()) + 1)
    threshold = np.sort(counts)[::-1][39]
    assert ids.tolist() == sorted(ids.tolist()) and len(set(ids.tolist())) == 40
    assert (counts[ids.numpy()] >= threshold).all()
    assert (np.delete(counts, ids.numpy()) <= threshold).all()


def test_generate_with_a_draft_vocabulary_is_plain_greedy(reference):
    base = ["generate", "--run", str(reference), "--prompt", "def f(", "--max-new-tokens", "24"]
    code, out, err = cli(*base, "--json")
    assert code == 0, err
    plain = json.loads(out.strip().splitlines()[-1])
    fast = ["--speculative", "--draft-vocab", "64", "--verify-tokens", "4", "--json"]
    code, out, err = cli(*base, *fast)
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert record["token_ids"] == plain["token_ids"] and len(record["acceptance"]) >= 1


def test_bad_draft_vocab_is_one_error(reference):
    code, _, err = cli("generate", "--run", str(reference), "--speculative", "--draft-vocab", "-3")
    assert code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
