"""The serving engines' draft rules in multitoken's decoding and training (docs/serving.md).

* ``generate(draft_rule=...)``: greedy output unchanged (T = 0), the engine's depth count, and
  the position-0 zeroing, checked against a naive recomputation of the depth at position 0.
* ``mtp.zero_first_embedding``: the depth loss equals one computed by hand with the embedding
  zeroed at each document's first position (documents one by one).
* ``mtp.block = "eagle"``: the depth computes EAGLE-1's draft, written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers.models import decoding_model, naive_greedy, tiny_model

from multitoken import MTPConfig, next_token_labels
from multitoken.decoding import generate
from multitoken.decoding.rules import DraftRule
from multitoken.decoding.state import DecodeState
from multitoken.errors import ConfigError, InputError
from multitoken.layout import SequenceLayout
from multitoken.lookahead import lookahead

PROMPT = [3, 7, 1, 9, 4, 4, 2]


@pytest.mark.parametrize(
    "rule,steps",
    [
        (DraftRule("vllm:deepseek_v3", zero_first_position=True), 4),
        (DraftRule("sglang:deepseek_v3", depths=1), 3),
        (DraftRule("vllm:mimo", depths=1, zero_first_position=True), 2),
    ],
)
def test_engine_rule_decoding_is_greedy_decoding(rule, steps):
    model = decoding_model(2, seed=3)
    out = generate(model, PROMPT, 20, speculative=True, draft_steps=steps, draft_rule=rule)
    assert out.tokens == naive_greedy(model, PROMPT, 20)
    assert out.stats.draft_depths == (rule.depths or 2)
    assert sum(out.stats.reached) > 0  # it drafted


def test_engine_rule_caps_the_depths_and_refuses_more():
    model = decoding_model(3, seed=1)
    rule = DraftRule("sglang:glm4_moe", depths=1)
    out = generate(model, PROMPT, 8, speculative=True, draft_steps=3, draft_rule=rule)
    assert out.stats.draft_depths == 1 and out.stats.draft_steps == 3
    with pytest.raises(InputError, match="drafts with 1 MTP depth"):
        generate(model, PROMPT, 8, speculative=True, draft_depths=2, draft_rule=rule)
    with pytest.raises(InputError, match="depths must be >= 1"):
        DraftRule("bad", depths=0)


def _depth_one_at_start(model, ids, zero: bool) -> torch.Tensor:
    """h^1 over the whole prompt, recomputed in one batched forward (no cache)."""
    x = torch.tensor([ids])
    layout = SequenceLayout.from_lengths([[len(ids)]])
    kwargs = model.decoder.layer_kwargs(layout)
    h0 = model.decoder.hidden(x, kwargs)
    nxt = lookahead(x, layout, [1], fill=model.pad_id)[0]
    emb = model.decoder.embed(nxt)
    if zero:
        emb[:, 0] = 0
    return model.mtp.depths[0](h0, emb, **kwargs)[0]


@pytest.mark.parametrize("zero", [False, True])
def test_decode_state_zeroes_position_zero_only_under_the_rule(zero):
    model = decoding_model(1, seed=2)
    ids = PROMPT
    with torch.inference_mode():
        state = DecodeState(model, 32, draft_depths=1, zero_first=zero)
        state.forward_main(ids[:-1])
        got = state.forward_depth(1, ids, end=len(ids) - 1)
        want = _depth_one_at_start(model, ids, zero)[: len(ids) - 1]
        other = _depth_one_at_start(model, ids, not zero)[: len(ids) - 1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, other, atol=1e-4)  # the rule changes what the depth computes


def test_zero_first_embedding_training_matches_documents_one_by_one():
    mtp = dict(zero_first_embedding=True)
    model = tiny_model(2, seed=4, mtp=mtp)
    plain = tiny_model(2, seed=4)
    torch.manual_seed(0)
    ids = torch.randint(1, 64, (1, 12))
    layout = SequenceLayout.from_lengths([[5, 7]])
    packed = model(ids, layout)
    for start, length in ((0, 5), (5, 7)):
        doc = ids[:, start : start + length]
        one = SequenceLayout.from_lengths([[length]])
        kwargs = plain.decoder.layer_kwargs(one)
        h = plain.decoder.hidden(doc, kwargs)
        shifted = lookahead(doc, one, [1, 2], fill=plain.pad_id)
        for k in (1, 2):
            emb = plain.decoder.embed(shifted[k - 1])
            emb[:, 0] = 0  # the document's first position reads no token
            h = plain.mtp.depths[k - 1](h, emb, **kwargs)
            torch.testing.assert_close(
                packed[k][:, start : start + length], h, rtol=1e-5, atol=1e-5
            )
    assert not torch.allclose(packed[1], plain(ids, layout)[1], atol=1e-4)
    model.loss(ids, next_token_labels(ids, layout), layout).loss.backward()


def test_zero_first_embedding_with_tensor_parallelism_is_refused():
    with pytest.raises(ConfigError, match="parallel.tp=1"):
        MTPConfig(zero_first_embedding=True).check_layout(tp=2, cp=1)


def _eagle_by_hand(depth, hidden, emb, kwargs) -> torch.Tensor:
    """EAGLE-1 (vLLM llama_eagle.py): fc([emb; hidden]), the layer with no input norm, no final
    norm: x + attn(x), then + ffn(norm(.)), written from the reference block's parts."""
    layer = depth.layer
    x = torch.cat([emb, hidden], dim=-1) @ depth.eh_proj.weight.t()
    x = x + layer.attention(x, kwargs["rope"], kwargs["mask"], None)
    return x + layer.feed_forward(layer.ffn_norm(x))


def test_eagle_block_is_eagle_one():
    model = tiny_model(1, seed=5, mtp=dict(block="eagle"))
    depth = model.mtp.depths[0]
    names = set(depth.state_dict())
    assert "enorm.weight" not in names and "final_norm.weight" not in names
    assert not any("attention_norm" in n for n in names) and "eh_proj.weight" in names
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (1, 10))
    layout = SequenceLayout.from_lengths([[10]])
    out = model(ids, layout)
    kwargs = model.decoder.layer_kwargs(layout)
    emb = model.decoder.embed(lookahead(ids, layout, [1], fill=0)[0])
    want = _eagle_by_hand(depth, out[0], emb, kwargs)
    torch.testing.assert_close(out[1], want, rtol=1e-5, atol=1e-5)


def test_unknown_block_is_refused():
    with pytest.raises(ConfigError, match="block"):
        MTPConfig(block="medusa")
