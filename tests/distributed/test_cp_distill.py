"""The acceptance-aware losses (mtp.loss = kl|tv|lk) under context parallelism: the teacher
rows h^0_{i+k} past a stripe come from the CP peers (RowHalo, one all_to_all on the CP group),
and cp 2 and 4 equal one process, value and gradients at rtol 1e-5, on packed documents with
stripes shorter than D."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from tests.helpers.distributed import (
    ATOL,
    IGNORE,
    PACKED_ROWS,
    PAD,
    RTOL,
    VOCAB,
    groups,
    make_batch,
    reference_step,
    step_record,
)
from tests.helpers.models import tiny_model

from multitoken import InputError, StepBatch
from multitoken.mtp_model import step_loss
from multitoken.parallel import apply_cp, global_normalizer, shard_batch, sync_gradients
from multitoken.parallel.row_halo import RowHalo
from multitoken.testing.comms import count_comms

DEPTH = 3
KINDS = ["kl", "tv", "lk"]


def model_for(kind: str):
    mtp = dict(loss=kind, lk_alpha=0.3, teacher_temperature=1.5)
    return tiny_model(DEPTH, vocab_size=VOCAB, pad_id=PAD, mtp=mtp)


def run_cp_distill(kind: str) -> dict:
    g = groups(1, dist.get_world_size())
    ids, labels, layout = make_batch(True, rows=PACKED_ROWS)
    model = apply_cp(model_for(kind), g.cp_group)
    shard = shard_batch(ids, labels, layout, g.cp, g.cp_rank, DEPTH, PAD, IGNORE)
    batch = shard.step_batch(global_normalizer(shard, g.cp_group))
    try:  # a shard without the peers' teacher rows: one clear error, before any loss
        step_loss(model, batch, model.config.loss_weight)
        refused = ""
    except InputError as err:
        refused = str(err)
    batch = replace(batch, rows_ahead=RowHalo(shard.plan, g.cp_rank, DEPTH, g.cp_group))
    model.zero_grad(set_to_none=True)
    with count_comms() as log:
        out = step_loss(model, batch, model.config.loss_weight, acceptance=True)
    out.loss.backward()
    sync_gradients(model, g.cp_group)
    teacher_calls = [r for r in log.records if r.name == "all_to_all_single"]
    return {
        **step_record(model, out), "refused": refused, "agree": out.agree,
        "accept": out.accept,
        "a2a": [r.group is g.cp_group for r in teacher_calls],
    }  # fmt: skip


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_cp_with_each_loss_equals_one_process(rank_pool, cp, kind):
    model = model_for(kind)
    ids, labels, layout = make_batch(True, rows=PACKED_ROWS)
    with torch.no_grad():
        whole = step_loss(
            model, StepBatch.build(ids, labels, layout, DEPTH, PAD), 0.3, acceptance=True
        )
    ref = reference_step(model, ids, labels, layout)
    results = rank_pool(cp).run(run_cp_distill, kind)
    # The logged acceptance metrics too: each rank's share sums to the whole batch's.
    assert torch.equal(sum(r["agree"] for r in results), whole.agree)
    torch.testing.assert_close(
        sum(r["accept"] for r in results), whole.accept, rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(sum(r["loss"] for r in results), ref["loss"], rtol=RTOL, atol=ATOL)
    depth_loss = sum(r["depth_loss"] for r in results)
    torch.testing.assert_close(depth_loss, ref["depth_loss"], rtol=RTOL, atol=ATOL)
    assert torch.equal(sum(r["depth_tokens"] for r in results), ref["depth_tokens"])
    for r in results:
        # The teacher rows travel once per step, on the CP group.
        assert r["a2a"] == [True]
        assert "needs its teacher rows i + k from the peers" in r["refused"]
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=RTOL, atol=ATOL, msg=name)
