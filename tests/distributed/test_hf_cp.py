"""CP (and DP x CP) training steps of Hugging Face models equal the single process.

The HF attention modules get the K/V all-gather hook from :func:`multitoken.parallel.parallelize`
(the same call as for the reference GPT: HFDecoder declares the hooks), the ranks take their
packed shard's step batch, and the sum over ranks of the losses and the CP-summed gradients must
equal the plain model's on the global batch. The last test runs the trainer's own path:
``build_model`` with ``model.hf`` (CP hooks, then FSDP2 over DP x CP) and ``prepare_step`` on a
loader-style global batch.
"""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.batches import cu_seqlens
from tests.helpers.distributed import (
    DP_ROWS,
    IGNORE,
    PAD,
    assert_matches,
    cp_step,
    groups,
    make_batch,
    reference_step,
    step_record,
)

from multitoken import ConfigError, MTPConfig, MTPModel, step_loss
from multitoken.data import dp_slice
from multitoken.hf import SUPPORTED_MODEL_TYPES, HFDecoder, init_mtp_weights
from multitoken.hf.linear_attention import LINEAR_ATTENTION_TYPES
from multitoken.parallel import apply_cp, shard_batch
from multitoken.testing.tiny_hf import save_tiny, tiny_model
from multitoken.train.batching import rank_batch
from multitoken.train.config_io import load_config
from multitoken.train.hf import build_hf_model, hf_tokenizer
from multitoken.train.model import build_model


def hf_model(model_type: str, depth: int) -> MTPModel:
    """The same weights on every rank and in the reference (seeded)."""
    decoder = HFDecoder(tiny_model(model_type, seed=0))
    torch.manual_seed(1)
    model = MTPModel(decoder, MTPConfig(num_depths=depth, loss_weight=0.3), pad_id=PAD)
    init_mtp_weights(model)
    return model


def reference(model_type: str, depth: int) -> dict:
    """CP = 1: the plain model on the global packed batch, in the pytest process."""
    return reference_step(hf_model(model_type, depth), *make_batch(packed=True))


def run_hf_cp(model_type: str, depth: int) -> dict:
    """On every rank of a CP-only pool: this rank's loss share and the CP-summed gradients."""
    g = groups(1, dist.get_world_size())
    model = apply_cp(hf_model(model_type, depth), g.cp_group)
    hooked = [m for m in model.modules() if getattr(m, "kv_gather", None) is not None]
    ids, labels, layout = make_batch(packed=True)
    shard = shard_batch(ids, labels, layout, g.cp, g.cp_rank, depth, PAD, IGNORE)
    result = cp_step(shard, model, g, g.cp_group, g.cp_group)
    result.pop("out")
    result["hooked"] = len(hooked)
    return result


# Qwen3-Next's linear attention carries state along the sequence: cp > 1 is refused for it
# (tests/unit/test_hf_moe.py::test_qwen3_next_is_refused_where_its_state_cannot_follow).
CP_TYPES = [t for t in SUPPORTED_MODEL_TYPES if t not in LINEAR_ATTENTION_TYPES]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("model_type", CP_TYPES)
def test_hf_cp_equals_single_process(pool2, model_type, depth):
    """Llama, Mistral (its window of 6 bites: documents up to 17 tokens), Qwen2, Qwen3."""
    ref = reference(model_type, depth)
    results = pool2.run(run_hf_cp, model_type, depth)
    # Two main layers and one per depth: every attention module gathers.
    assert [r["hooked"] for r in results] == [2 + depth] * 2
    assert_matches(results, ref, f"{model_type} cp=2 D={depth}")


def _config(folder, dp: int = 1, cp: int = 1, tp: int = 1, freeze_base: bool = False):
    overrides = [f"model.hf={folder}", "mtp.num_depths=2", "data.seq_len=24"]
    overrides += [f"mtp.freeze_base={str(freeze_base).lower()}"]
    overrides += [f"parallel.dp={dp}", f"parallel.cp={cp}", f"parallel.tp={tp}"]
    return load_config(None, overrides)


def _global_batch() -> dict[str, torch.Tensor]:
    """DP_ROWS as the loader yields them: ids, labels and the flat cu_seqlens."""
    ids, labels, _ = make_batch(packed=True, rows=DP_ROWS)
    return dict(input_ids=ids, labels=labels, cu_seqlens=cu_seqlens(DP_ROWS))


def run_hf_training_path(folder: str, freeze_base: bool) -> dict:
    """One step as the trainer takes it, on a (dp, cp) = (2, 2) pool."""
    g = groups(2, 2)
    cfg = _config(folder, dp=2, cp=2, freeze_base=freeze_base)
    cpu = torch.device("cpu")
    model, cross_entropy = build_model(cfg, 97, PAD, g, cpu)
    rows = dp_slice(_global_batch(), g.dp_rank, g.dp)  # what this rank's loader yields
    batch = rank_batch(rows, g, cfg.mtp.num_depths, PAD, cpu)
    out = step_loss(model, batch, cfg.mtp.loss_weight, cross_entropy=cross_entropy)
    out.loss.backward()  # FSDP2 sums the gradients over DP x CP
    return step_record(model, out)


@pytest.mark.parametrize("freeze_base", [False, True], ids=["full", "heads_only"])
def test_hf_training_path_dp_cp_equals_single_process(pool4, tmp_path, freeze_base):
    folder = save_tiny("qwen3", tmp_path / "qwen3")
    cfg = _config(folder, freeze_base=freeze_base)
    model = build_hf_model(cfg, PAD)
    ref = reference_step(model, *make_batch(True, rows=DP_ROWS))
    if freeze_base:
        assert all(name.startswith("mtp.") for name in ref["grads"])
    results = pool4.run(run_hf_training_path, str(folder), freeze_base)
    assert_matches(results, ref, f"hf dp x cp = 2 x 2 through build_model {freeze_base=}")


def test_tensor_parallel_is_refused(tmp_path):
    folder = save_tiny("llama", tmp_path / "llama")
    with pytest.raises(ConfigError, match="parallel.tp=2 with model.hf"):
        hf_tokenizer(_config(folder, tp=2))
