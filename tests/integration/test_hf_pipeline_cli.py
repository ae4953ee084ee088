"""``multitoken train model.hf=FOLDER mtp.freeze_base=true parallel.pp=2``: a heads-only
fine-tune of a tiny Llama (two decoder layers, one a stage) under pipeline parallelism logs
the one-process losses step by step, its checkpoint resumes in one process, and what it does
not run is one error line before anything starts."""

from __future__ import annotations

import pytest
from tests.helpers.cli import (
    assert_one_error,
    assert_same_records,
    run_subprocess,
    train_cli,
    train_ok,
    train_records,
)
from tests.helpers.hf_pipeline import save_tiny_with_tokenizer


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("hf_pp") / "llama")


def heads(folder) -> list[str]:
    return [f"model.hf={folder}", "mtp.freeze_base=true"]


@pytest.fixture(scope="module")
def hf_reference(run_root, llama):
    """The heads-only run in one process (checkpoints at steps 3 and 6)."""
    train_ok(run_root, *heads(llama), "run.name=hf_reference")
    return run_root / "hf_reference"


@pytest.mark.parametrize("schedule", ["1F1B", "GPipe"])
def test_hf_heads_only_pp2_logs_the_one_process_losses(run_root, llama, hf_reference, schedule):
    name = f"hf_pp2_{schedule}"
    pp2 = ["parallel.cp=1", "parallel.pp=2", f"parallel.pp_schedule={schedule}"]
    run_subprocess(run_root, *heads(llama), *pp2, f"run.name={name}")
    got, want = train_records(run_root / name), train_records(hf_reference)
    assert len(got) == 6
    assert_same_records(got, want)
    for a, b in zip(got, want):  # the acceptance the last stage measured reaches rank 0
        for key in ("acc_main", "acc_mtp", "agree_mtp", "accept_mtp"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_hf_pp2_checkpoint_resumes_at_pp1(run_root, llama, hf_reference):
    """Saved by two pipeline ranks (the first holds no trainable parameter), resumed by one
    process holding the whole model: the uninterrupted losses."""
    pp2 = ["parallel.cp=1", "parallel.pp=2"]
    run_subprocess(run_root, *heads(llama), *pp2, "run.name=hf_pp2to1", "train.stop_after=3")
    train_ok(run_root, *heads(llama), "run.name=hf_pp2to1", "train.resume=true")
    assert_same_records(train_records(run_root / "hf_pp2to1"), train_records(hf_reference))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mtp.freeze_base=false"], "with model.hf trains the MTP heads only"),
        (["parallel.cp=2"], "with model.hf runs one rank per stage"),
        (["parallel.dp=2"], "with model.hf runs one rank per stage"),
        (["parallel.pp_layers=1,0,1"], "summing to the model's num_hidden_layers=2"),
        (["parallel.pp=3"], "the model's num_hidden_layers=2 does not split evenly"),
        (["features.mode=offline"], "features.mode=offline with parallel.pp > 1"),
    ],
)
def test_bad_hf_pipeline_settings_are_one_line(run_root, llama, args, message):
    pp2 = ["parallel.pp=2", *heads(llama)]
    code, _, err = train_cli(run_root, *pp2, *args, "run.name=bad_hf_pp")
    assert_one_error(code, err, message)
    assert not (run_root / "bad_hf_pp").exists()


def test_hf_pipeline_of_a_moe_model_is_one_line(run_root, tmp_path):
    folder = save_tiny_with_tokenizer("qwen3_moe", tmp_path / "moe")
    code, _, err = train_cli(run_root, *heads(folder), "parallel.pp=2", "run.name=bad_hf_pp")
    assert_one_error(code, err, "pipeline stages are cut for the dense architectures")


def test_hf_pp1_checkpoint_resumes_at_pp2(run_root, llama, hf_reference):
    """Saved by one process, resumed by two pipeline ranks (the first loads nothing)."""
    train_ok(run_root, *heads(llama), "run.name=hf_pp1to2", "train.stop_after=3")
    pp2 = ["parallel.cp=1", "parallel.pp=2"]
    run_subprocess(run_root, *heads(llama), *pp2, "run.name=hf_pp1to2", "train.resume=true")
    assert_same_records(train_records(run_root / "hf_pp1to2"), train_records(hf_reference))
