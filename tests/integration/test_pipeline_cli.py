"""`multitoken train` under pipeline parallelism, through the real command line: the pp = 2
run logs the one-process losses step by step, and its checkpoints resume at another pp.

The tiny run has one main layer: ``parallel.pp_layers=1,0`` puts it on the first stage and
gives the MTP depths and the head a stage of their own (Megatron's ``m`` stage).
"""

from __future__ import annotations

import pytest
from tests.helpers.cli import (
    HEADS2,
    assert_one_error,
    assert_same_records,
    run_subprocess,
    train_cli,
    train_ok,
    train_records,
)

PP2 = ["parallel.cp=1", "parallel.pp=2", "parallel.pp_layers=1,0"]


def test_pp2_logs_the_one_process_losses(run_root, reference):
    run_subprocess(run_root, *PP2, "run.name=pp2")
    pp2, one = train_records(run_root / "pp2"), train_records(reference)
    assert_same_records(pp2, one)
    for a, b in zip(pp2, one):  # the acceptance the last stage measured reaches rank 0
        for key in ("acc_main", "acc_mtp", "agree_mtp", "accept_mtp"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_pp2_checkpoint_resumes_at_pp1(run_root, reference):
    """Saved by two pipeline ranks (each its stages' parameters and optimiser state, the
    embedding on both), loaded by one process holding the whole model."""
    run_subprocess(run_root, *PP2, "run.name=pp2to1", "train.stop_after=3")
    train_ok(run_root, "run.name=pp2to1", "train.resume=true")
    assert_same_records(train_records(run_root / "pp2to1"), train_records(reference))


def test_pp1_checkpoint_resumes_at_pp2(run_root, reference):
    train_ok(run_root, "run.name=pp1to2", "train.stop_after=3")
    run_subprocess(run_root, *PP2, "run.name=pp1to2", "train.resume=true")
    assert_same_records(train_records(run_root / "pp1to2"), train_records(reference))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["parallel.pp=2"], "model.n_layers=1 does not split evenly over 2 pipeline stages"),
        ([*PP2, "parallel.pp_microbatches=3"], "parallel.pp_microbatches=3 does not divide"),
        ([*PP2, "parallel.pp_layers=0,1"], "parallel.pp_layers must give 2 layer counts"),
        (["parallel.pp_schedule=Wave"], "parallel.pp_schedule must be one of"),
        ([*PP2, "model.hf=."], "parallel.pp > 1 with model.hf trains the MTP heads only"),
        (
            ["parallel.pp=2", "parallel.pp_layers=1,0", "parallel.cp=2", "mtp.loss=kl"],
            "mtp.loss=kl with parallel.pp > 1 and parallel.cp > 1",
        ),
    ],
)
def test_bad_pipeline_settings_are_one_line(run_root, args, message):
    code, _, err = train_cli(run_root, *args, "run.name=bad_pp")
    assert_one_error(code, err, message)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.cp=2"])
def test_pp2_with_tp2_or_cp2_logs_the_one_process_losses(run_root, reference_heads2, layout):
    """Four ranks: pp 2 x tp 2 (sequence parallel) and pp 2 x cp 2 log the one-process
    losses step by step."""
    name = f"pp2_{layout.split('.')[1].replace('=', '')}"
    run_subprocess(run_root, *HEADS2, *PP2, layout, f"run.name={name}")
    assert_same_records(train_records(run_root / name), train_records(reference_heads2))


@pytest.mark.slow
def test_pp2_checkpoint_resumes_at_pp4(run_root):
    """Three layers: saved at pp = 2 (layers 2 + 1), resumed at pp = 4 (1 + 1 + 1, the
    depths alone on the last stage), logging the uninterrupted one-process losses."""
    layers3 = ["model.n_layers=3", "parallel.cp=1"]
    train_ok(run_root, "model.n_layers=3", "run.name=reference_l3")
    pp2 = [*layers3, "parallel.pp=2", "parallel.pp_layers=2,1"]
    run_subprocess(run_root, *pp2, "run.name=pp2to4", "train.stop_after=3")
    pp4 = [*layers3, "parallel.pp=4", "parallel.pp_layers=1,1,1,0"]
    run_subprocess(run_root, *pp4, "run.name=pp2to4", "train.resume=true")
    one = train_records(run_root / "reference_l3")
    assert_same_records(train_records(run_root / "pp2to4"), one)
