"""transformers itself as a client of multitoken's exports: ``generate(..., use_mtp=True)``.

transformers 5.25 drafts with a checkpoint's MTP layers (``MTPCandidateGenerator`` in
generation/candidate_generator.py, ``MtpModel`` / ``MtpLayer`` in modeling_layers.py). It finds
them by the keys of the model class's ``_keys_to_ignore_on_load_unexpected``, which name the
released layer index: ``model.layers.61`` for DeepSeek-V3 (modeling_deepseek_v3.py), 92 and 46
for GLM-4.5 and GLM-4.5-Air (modeling_glm4_moe.py). So the models here have the released layer
counts, at tiny widths. Its drafting rule, read there: MTP layer i (of n, each draft step the
next one, n drafts per verification) takes ``concat(enorm(embed(t_{j+1})), hnorm(h_j))`` with
``h`` the main model's ``hidden_states[-1]`` (the final-normed state: ``capture_outputs`` ties it
to ``last_hidden_state``) or the previous MTP layer's output, runs the block, then ``post_norm``
(the checkpoint's ``shared_head.norm``), and projects with the main model's head; the input
embedding at position 0 is not zeroed. That is multitoken's depth formula and its drafting in
:func:`multitoken.decoding.generate.generate` (depth k drafts the k-th token), so no engine
option is needed for this client: the rotary positions of the MTP layers differ by one (it
numbers them by the embedded token), which relative attention does not see.

Heads are fine-tuned here by multitoken (heads only, ``targets=base``), exported in the
released layout, loaded by transformers, checked to be our tensors, and decoded: the tokens
are the greedy ones, and every verification drafts and accepts what ours does.
"""

import importlib

import pytest
import torch
import transformers
from tests.helpers.batches import packed_batch
from tests.helpers.released import save_released
from transformers import AutoModelForCausalLM
from transformers.generation.candidate_generator import MTPCandidateGenerator
from transformers.modeling_layers import MtpModel

from multitoken import MTPConfig
from multitoken.batch import StepBatch
from multitoken.hf.weights import load_hf_mtp_model, read_tensors, save_pretrained
from multitoken.mtp_model import step_loss

# The module (the package re-exports its function under the same name).
decoding = importlib.import_module("multitoken.decoding.generate")
# (model type, the released main layer count transformers' loader keys on, config overrides).
# Small weights keep the residual stream near the token embedding, so these random models
# decode varied text (at the default scale their 46-61 layers collapse onto one repeated
# token, which every draft trivially matches); GLM's random q/k/v biases collapse it too.
SHAPES = [
    ("deepseek_v3", 61, {"initializer_range": 0.002}),
    ("glm4_moe", 46, {"initializer_range": 0.002, "attention_bias": False}),
]
PROMPT = [5, 9, 14, 3, 22, 40]
NEW = 20


def fine_tune_heads(folder):
    """Heads-only, self-distilled: a few AdamW steps on packed random documents."""
    model = load_hf_mtp_model(folder, MTPConfig(num_depths=1, freeze_base=True, targets="base"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    for step in range(6):
        ids, labels, layout = packed_batch([[12, 12], [24]], seed=step, vocab=97, low=2)
        step_loss(model, StepBatch.build(ids, labels, layout, 1), 1.0).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def transformers_drafts(hf, monkeypatch):
    """transformers' greedy MTP generation, and each verification's (prefix length, drafts,
    accepted), with the MtpModel it built."""
    records, built = [], []
    get_candidates = MTPCandidateGenerator.get_candidates
    update = MTPCandidateGenerator.update_candidate_strategy
    from_pretrained = MtpModel.from_pretrained.__func__

    def spy_candidates(self, input_ids, *args, **kwargs):
        ids, logits = get_candidates(self, input_ids, *args, **kwargs)
        records.append([input_ids.shape[1], ids[0, input_ids.shape[1] :].tolist()])
        return ids, logits

    def spy_update(self, input_ids, scores, num_matches):
        records[-1].append(int(num_matches))
        return update(self, input_ids, scores, num_matches)

    def spy_from_pretrained(cls, main_model, *args, **kwargs):
        built.append(from_pretrained(cls, main_model, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(MTPCandidateGenerator, "get_candidates", spy_candidates)
    monkeypatch.setattr(MTPCandidateGenerator, "update_candidate_strategy", spy_update)
    monkeypatch.setattr(MtpModel, "from_pretrained", classmethod(spy_from_pretrained))
    ids = torch.tensor([PROMPT])
    out = hf.generate(ids, max_new_tokens=NEW, do_sample=False, use_mtp=True, pad_token_id=0)
    steps = {n: (drafts, accepted) for n, drafts, accepted in records if drafts}
    return out[0, len(PROMPT) :].tolist(), steps, built[0]


def multitoken_drafts(model, prompt, new, monkeypatch):
    """multitoken's speculative generation, and each verification's (prefix length, drafts,
    accepted)."""
    steps, step, accept = {}, decoding._speculative_step, decoding.accept_drafts

    def spy_step(model_, state, *args):
        steps[len(state.tokens)] = None
        return step(model_, state, *args)

    def spy_accept(logits, drafts, *args):
        accepted, token = accept(logits, drafts, *args)
        key = max(steps)
        steps[key] = (list(drafts), accepted)
        return accepted, token

    monkeypatch.setattr(decoding, "_speculative_step", spy_step)
    monkeypatch.setattr(decoding, "accept_drafts", spy_accept)
    tokens = decoding.generate(model, prompt, new, speculative=True).tokens
    return tokens, {n: s for n, s in steps.items() if s and s[0]}


@pytest.mark.parametrize(
    "model_type,num_layers,overrides", SHAPES, ids=["deepseek_v3", "glm4_5_air"]
)
def test_transformers_drafts_with_our_fine_tuned_heads(
    tmp_path, monkeypatch, model_type, num_layers, overrides
):
    folder = tmp_path / "released"
    released = save_released(model_type, folder, num_layers=num_layers, **overrides)
    model = fine_tune_heads(released)
    save_pretrained(model, tmp_path / "out", "deepseek")

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert transformers.__version__.startswith("5.")
    hf.generation_config.eos_token_id = None  # a fixed length, as multitoken's generate here
    tokens, theirs, mtp = transformers_drafts(hf, monkeypatch)

    # It loaded our fine-tuned weights, tensor for tensor (not a random init, not the release).
    ours = model.mtp.depths[0]
    layer = mtp.layers[0]
    for name in ("enorm", "hnorm", "eh_proj"):
        assert torch.equal(getattr(layer, name).weight, getattr(ours, name).weight), name
    assert torch.equal(layer.post_norm.weight, ours.final_norm.weight)
    block = layer.mtp_block.state_dict()
    assert set(block) == set(ours.layer.state_dict())
    for key, value in ours.layer.state_dict().items():
        assert torch.equal(block[key], value), key
    release = read_tensors(released, {f"model.layers.{num_layers}.eh_proj.weight"})
    assert not torch.equal(release.popitem()[1], ours.eh_proj.weight)  # trained

    # The greedy tokens, by transformers without MTP and by multitoken.
    plain = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert tokens == plain[0, len(PROMPT) :].tolist()
    assert decoding.generate(model, PROMPT, NEW).tokens == tokens

    # The same drafts, accepted the same way. transformers' first forward makes one token
    # without drafting: multitoken starts from the prompt plus that token.
    ours_tokens, mine = multitoken_drafts(model, PROMPT + tokens[:1], NEW - 1, monkeypatch)
    assert ours_tokens == tokens[1:]
    common = sorted(set(mine) & set(theirs))
    assert len(common) >= len(theirs) - 1 and len(common) >= 5, (mine, theirs)
    for n in common:
        assert mine[n] == theirs[n], (n, mine[n], theirs[n])
    accepted = [theirs[n][1] for n in common]
    assert 0 < sum(accepted) < len(accepted), theirs  # drafts accepted and drafts rejected
