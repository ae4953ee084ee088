"""`train.compile=true` logs the same losses as eager training (per-layer torch.compile)."""

from __future__ import annotations

from tests.helpers.cli import assert_same_records, run_subprocess, train_ok, train_records
from tests.helpers.models import tiny_model

# Inductor reorders fp32 sums: the compiled step is not bitwise eager (measured: 8e-8 relative
# over 10 steps), so the tolerance is that of the layout tests.
RTOL = 1e-5


def test_compiled_training_matches_eager(run_root):
    # Eager in this process; compiled as its own process (no compiled state left behind here).
    ten = ["parallel.cp=1", "train.steps=10", "train.save_every=10", "train.eval_every=5"]
    train_ok(run_root, *ten, "run.name=eager")
    compiled = run_subprocess(run_root, *ten, "run.name=compiled", "train.compile=true")
    assert "training eagerly" not in compiled.stdout  # it really compiled
    eager, comp = train_records(run_root / "eager"), train_records(run_root / "compiled")
    assert len(eager) == 10
    assert_same_records(comp, eager, rtol=RTOL)


def test_compile_falls_back_with_a_message(monkeypatch, capsys):
    import torch

    from multitoken.models.parallelize import compile_gpt

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_model(1, vocab_size=50, dim=16, n_heads=2)
    assert compile_gpt(model) is False
    out = capsys.readouterr().out
    assert "torch.compile cannot run here (RuntimeError: no C++ compiler found)" in out
    assert "training eagerly" in out
    ids = torch.randint(1, 50, (1, 8))
    assert model(ids)[0].shape == (1, 8, 16)  # still an eager model
