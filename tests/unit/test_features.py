"""Offline backbone features: the same losses as the frozen decoder run online, a build that
resumes after an interruption, and features that are damaged or of another backbone refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.helpers.models import tiny_model

from multitoken import StepBatch
from multitoken.data import PackedLoader, build_store, stdlib_source, train_tokenizer
from multitoken.data.feature_build import build_features
from multitoken.data.features import FeatureError, FeatureLoader, open_features
from multitoken.frozen import backbone_outputs
from multitoken.layout import SequenceLayout
from multitoken.mtp_model import step_loss
from multitoken.train.features import attach_backbone, backbone_hash

SEQ_LEN, DEPTH, PART_TOKENS = 32, 2, 700
# Stated tolerances of half-precision h^0 (docs/training.md#offline-backbone-features), as
# (losses and acceptance: relative, each depth; gradients: relative L2 norm, CE/KL and TV/LK).
# Measured on this model: fp16 losses <= 2e-5, gradients <= 3e-4 and, for TV, 7e-3 (TV's
# gradient holds sign(q - p), which the rounded teacher flips where p_v ~= q_v); bf16 about
# 8x more. float32 features give the online values to 1e-5 elementwise (in fact exactly).
TOLERANCE = {"float16": (1e-4, 1e-3, 2e-2), "bfloat16": (1e-3, 1e-2, 5e-2)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    docs = list(stdlib_source(max_files=10))
    tokenizer = train_tokenizer(docs, 300, root, verbose=False)
    return build_store(stdlib_source(max_files=10), tokenizer, root, val_fraction=0.3,
                       part_tokens=2_000, verbose=False)  # fmt: skip


def frozen_model(seed: int = 0, **mtp) -> torch.nn.Module:
    mtp = dict(freeze_base=True, loss_weight=0.5, **mtp)
    return tiny_model(DEPTH, seed=seed, mtp=mtp, vocab_size=512, max_seq_len=SEQ_LEN)


def identity(model, dtype: str = "float32", store=None) -> dict:
    return {"store": "store-test" if store is None else store.folder.name,
            "backbone": backbone_hash(model), "dtype": dtype, "seq_len": SEQ_LEN,
            "hidden": model.decoder.hidden_size}  # fmt: skip


class Compute:
    """The backbone over a packed batch; counts its calls, and fails at call ``fail_at``."""

    def __init__(self, model, fail_at: int = 0):
        self.model, self.calls, self.fail_at = model, 0, fail_at

    def __call__(self, input_ids, labels, cu_seqlens):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("interrupted build")
        layout = SequenceLayout.from_cu_seqlens(cu_seqlens, input_ids.shape)
        return backbone_outputs(self.model, input_ids, layout, labels)


def build(store, model, folder, dtype="float32", **kw):
    kw = {"rows_per_batch": 3, "part_tokens": PART_TOKENS, "verbose": False, **kw}
    return build_features(store, folder, identity(model, dtype, store), Compute(model), **kw)


@pytest.fixture(scope="module")
def features(store, tmp_path_factory):
    """The seed-0 backbone's features in each dtype (the MTP settings leave it unchanged)."""
    root, built = tmp_path_factory.mktemp("built"), {}

    def get(dtype: str):
        if dtype not in built:
            built[dtype] = build(store, frozen_model(), root / dtype, dtype)
        return built[dtype]

    return get


def step(model, rows, offline: bool):
    ids, labels = rows["input_ids"], rows["labels"]
    layout = SequenceLayout.from_cu_seqlens(rows["cu_seqlens"], ids.shape)
    batch = StepBatch.build(ids, labels, layout, DEPTH, model.pad_id)
    if offline:
        batch = attach_backbone(batch, rows, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    out = step_loss(model, batch, 0.5, acceptance=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    "mtp",
    [dict(), dict(targets="base"), dict(loss="kl"), dict(loss="tv"), dict(loss="lk")],
    ids=["ce-data", "ce-base", "kl", "tv", "lk"],
)
def test_offline_features_give_the_online_losses(store, features, dtype, mtp):
    """Every depth's loss, accuracy, agreement and acceptance, and every MTP gradient, on
    shuffled packed batches (align 8: pieces sit in other rows than when they were built)."""
    model = frozen_model(**mtp)
    split = features(dtype).split("train")
    assert len(features(dtype).index["splits"]["train"]["parts"]) > 2
    offline = FeatureLoader(PackedLoader(store.split("train"), SEQ_LEN, 4, seed=1, align=8), split)
    for _ in range(2):
        rows = next(offline)
        (on, g_on), (off, g_off) = step(model, rows, False), step(model, rows, True)
        assert g_on.keys() == g_off.keys() and all(n.startswith("mtp.") for n in g_on)
        assert torch.equal(on.depth_tokens, off.depth_tokens)
        assert torch.equal(on.depth_correct[0], off.depth_correct[0])  # main: stored argmax
        torch.testing.assert_close(off.depth_loss[0], on.depth_loss[0], rtol=1e-5, atol=0)
        if dtype == "float32":
            for a, b in [(off.depth_loss, on.depth_loss), (off.accept, on.accept)]:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
            assert torch.equal(off.depth_correct, on.depth_correct)
            assert torch.equal(off.agree, on.agree)
            for name, grad in g_on.items():
                torch.testing.assert_close(g_off[name], grad, rtol=1e-5, atol=1e-7)
            continue
        values, grads_ce, grads_tv = TOLERANCE[dtype]
        torch.testing.assert_close(off.depth_loss, on.depth_loss, rtol=values, atol=0)
        torch.testing.assert_close(off.accept, on.accept, rtol=values, atol=0)
        tol = grads_tv if mtp.get("loss") in ("tv", "lk") else grads_ce
        for name, grad in g_on.items():
            assert (g_off[name] - grad).norm() <= tol * grad.norm(), name


def test_the_feature_loader_resumes_as_the_token_loader(store, tmp_path):
    model = frozen_model()
    split = build(store, model, tmp_path / "f").split("train")
    first = FeatureLoader(PackedLoader(store.split("train"), SEQ_LEN, 4, seed=2), split)
    next(first)
    state = first.state_dict()
    expected = next(first)
    second = FeatureLoader(PackedLoader(store.split("train"), SEQ_LEN, 4, seed=2), split)
    second.load_state_dict(state)
    got = next(second)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_an_interrupted_build_resumes_to_the_same_bytes(store, tmp_path):
    model = frozen_model()
    whole = Compute(model)
    build_features(store, tmp_path / "whole", identity(model, store=store), whole,
                   rows_per_batch=3, part_tokens=PART_TOKENS, verbose=False)  # fmt: skip
    folder = tmp_path / "resumed"
    interrupted = Compute(model, fail_at=whole.calls * 3 // 4)
    with pytest.raises(KeyboardInterrupt):
        build_features(store, folder, identity(model, store=store), interrupted,
                       rows_per_batch=3, part_tokens=PART_TOKENS, verbose=False)  # fmt: skip
    partial = folder.with_name("resumed.partial")
    assert not folder.exists() and partial.is_dir()
    finished = {p.name: p.stat().st_mtime_ns for p in partial.glob("train-*.bin")}
    assert len(finished) >= 3  # at least one part was finished before the interruption
    rest = Compute(model)
    build_features(store, folder, identity(model, store=store), rest, rows_per_batch=3,
                   part_tokens=PART_TOKENS, verbose=False)  # fmt: skip
    # The finished parts were kept, not computed again.
    assert 0 < rest.calls < whole.calls
    assert {name: (folder / name).stat().st_mtime_ns for name in finished} == finished
    for path in (tmp_path / "whole").iterdir():
        assert path.read_bytes() == (folder / path.name).read_bytes(), path.name


def test_a_corrupted_feature_file_is_refused(store, tmp_path):
    model = frozen_model()
    folder = build(store, model, tmp_path / "f").folder
    index = json.loads((folder / "index.json").read_text())
    path = folder / index["splits"]["train"]["parts"][1]["files"]["hidden"]["file"]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size: only the checksum sees it
    path.write_bytes(bytes(data))
    open_features(folder, "size", identity(model, store=store))  # sizes agree
    with pytest.raises(FeatureError, match=f"{path.name} does not match its checksum.*remove"):
        build(store, model, folder)
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(FeatureError, match=f"{path.name} has .* bytes, the index"):
        open_features(folder, "size", identity(model, store=store))


def test_features_of_another_backbone_are_refused(store, tmp_path):
    folder = build(store, frozen_model(seed=0), tmp_path / "f").folder
    other = frozen_model(seed=1)
    assert backbone_hash(other) != backbone_hash(frozen_model(seed=0))
    with pytest.raises(FeatureError, match="built for another backbone"):
        build(store, other, folder)
    with pytest.raises(FeatureError, match="dtype is 'float32', this run needs 'float16'"):
        build(store, frozen_model(seed=0), folder, "float16")


def test_the_backbone_hash_ignores_the_mtp_depths_and_reads_every_weight():
    a, b = frozen_model(seed=0), frozen_model(seed=0)
    torch.nn.init.zeros_(b.mtp.depths[0].eh_proj.weight)
    assert backbone_hash(a) == backbone_hash(b)
    with torch.no_grad():
        b.decoder.norm.weight[3] += 1e-6
    assert backbone_hash(a) != backbone_hash(b)


def test_float16_overflow_is_refused(store, tmp_path):
    model = frozen_model()
    with torch.no_grad():
        model.decoder.norm.weight.fill_(1e6)  # h^0 far beyond float16's 65504
    with pytest.raises(FeatureError, match="exceeds float16's range.*bfloat16"):
        build(store, model, tmp_path / "f", "float16")
    assert np.isfinite(build(store, model, tmp_path / "g", "bfloat16").split("val")
                       .gather(np.arange(5))["hidden"].float().numpy()).all()  # fmt: skip
