"""A heads-only Hugging Face run under pipeline parallelism equals one process: tiny dense
models (four layers, ``mtp.freeze_base``) cut into stages, GPipe and 1F1B, D in {1, 2}, tied and
untied heads, packed rows of tiny documents, two AdamW steps: loss, per-depth losses and every
MTP gradient as one process's (rtol 1e-5), the point-to-point messages of a step counted."""

import pytest
import torch
from tests.helpers.hf_pipeline import HF_LAYERS, hf_pp_model, hf_pp_reference, run_hf_pp
from tests.helpers.pipeline import PP_GPT, PP_ROWS, assert_pipeline_matches

from multitoken.hf.pipeline import PIPELINE_MODEL_TYPES
from multitoken.models.pipeline import stage_layers
from multitoken.parallel.pipeline import split_layers

SEQ_LEN, DIM = 24, PP_GPT["dim"]  # the tiny HF models are 32 wide too
# (model type, pp, schedule, D, layers per stage, tied head, zero_first_embedding)
CASES = [
    *[(t, 2, "1F1B", 2, (), False, False) for t in PIPELINE_MODEL_TYPES],
    ("llama", 2, "GPipe", 1, (), False, False),
    ("llama", 2, "GPipe", 2, (), True, False),
    ("llama", 2, "1F1B", 1, (4, 0), True, True),  # the depths and the head on a stage alone
    ("qwen3", 4, "1F1B", 1, (), False, False),  # two middle stages without the embedding
]


def assert_hf_pipeline_matches(results: list[dict], ref: list[dict], what: str) -> None:
    names = assert_pipeline_matches(results, ref, what)  # every MTP gradient, on the last stage
    assert names and all(n.startswith("mtp.") for n in names), names


@pytest.mark.parametrize(("model_type", "pp", "schedule", "depth", "layers", "tie", "zero"), CASES)
def test_hf_heads_only_pipeline_equals_single_process(
    rank_pool, model_type, pp, schedule, depth, layers, tie, zero
):
    microbatches = 4
    results = rank_pool(pp).run(
        run_hf_pp, model_type, pp, schedule, depth, microbatches, layers, tie, zero, timeout=120
    )
    what = f"{model_type} pp={pp} {schedule} D={depth} layers={layers} tie={tie}"
    assert_hf_pipeline_matches(results, hf_pp_reference(model_type, depth, tie, zero), what)
    counts = split_layers(HF_LAYERS, pp, layers)
    original = hf_pp_model(model_type, depth, tie).decoder.base.embed_tokens.weight
    rows = len(PP_ROWS) // microbatches
    for r in results:
        stage, last = r["rank"], r["rank"] == pp - 1
        assert r["layers"] == stage_layers(counts, stage), what
        assert (r["trainable"] > 0) == last and (r["records"][0]["grads"] != {}) == last, what
        # Forward activations only: no gradient goes back into the frozen backbone.
        assert (r["sends"], r["recvs"]) == (microbatches * (not last), microbatches * (stage > 0))
        assert r["sent_bytes"] == r["sends"] * rows * SEQ_LEN * DIM * 4, what
        assert r["collectives"] == ["broadcast"], what  # the losses; no embedding sum
        # The first stage's embedding and the last stage's copy: neither trains, so both stay
        # the pretrained one (the middle stages hold none).
        if stage in (0, pp - 1):
            assert torch.equal(r["embedding"], original), what
        else:
            assert r["embedding"] is None, what
