"""The acceptance-aware MTP losses under data parallelism (FSDP2, dp = 2) equal one process."""

from dataclasses import replace

import pytest
from tests.helpers.distributed import (
    DP_ROWS,
    PAD,
    VOCAB,
    assert_matches,
    groups,
    make_batch,
    reference_step,
    step_record,
)
from tests.helpers.models import tiny_model

from multitoken import SequenceLayout, StepBatch, step_loss
from multitoken.parallel import apply_fsdp, global_normalizer


def _model(loss: str):
    mtp = dict(loss=loss, lk_alpha=0.3, teacher_temperature=0.9)
    return tiny_model(2, vocab_size=VOCAB, pad_id=PAD, mtp=mtp)


def run_dp(dp: int, loss: str) -> dict:
    g = groups(dp, 1)
    ids, labels, _ = make_batch(packed=True, rows=DP_ROWS)
    per_rank = len(DP_ROWS) // dp
    rows = slice(per_rank * g.dp_rank, per_rank * (g.dp_rank + 1))
    model = _model(loss)
    apply_fsdp(model, g.token_mesh)
    batch = StepBatch.build(ids[rows], labels[rows], SequenceLayout.from_lengths(DP_ROWS[rows]),
                            2, PAD)  # fmt: skip
    batch = replace(batch, normalizer=global_normalizer(batch.depth_labels, g.token_group))
    out = step_loss(model, batch, model.config.loss_weight)
    out.loss.backward()
    return step_record(model, out)


@pytest.mark.parametrize("loss", ["kl", "tv", "lk"])
def test_dp2_equals_one_process(pool2, loss):
    ref = reference_step(_model(loss), *make_batch(packed=True, rows=DP_ROWS))
    assert_matches(pool2.run(run_dp, 2, loss), ref, f"fsdp dp=2 mtp.loss={loss}")
