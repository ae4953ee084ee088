"""Bounded memory from small to large corpora, and preparation that survives SIGKILL.

Each measurement runs in a fresh process (``data_probe.py``) so that its peak RSS is its own.
The quick versions run in ``make test``; the 1 GB ones are ``slow`` (``make test-slow``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multitoken.data import open_store
from multitoken.testing.synthetic import write_synthetic_jsonl

PROBE = Path(__file__).parents[1] / "helpers" / "data_probe.py"
# Stated bounds (README "Data"): preparation's peak RSS, main process and each worker.
PREP_PEAK_MB = 1536
# Loader RSS for a large and a small corpus: private (anonymous) memory within this margin,
# total RSS (with the memory-mapped store pages) within twice it.
LOADER_MARGIN_MB = 16


def probe(mode: str, corpus: Path, cache: Path, extra: int | None = None) -> dict:
    cmd = [sys.executable, str(PROBE), mode, str(corpus), str(cache)]
    cmd += [str(extra)] if extra else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_memory(tmp_path: Path, small_mb: float, large_mb: float) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    write_synthetic_jsonl(small, small_mb, seed=1)
    write_synthetic_jsonl(large, large_mb, seed=2)
    prepared = probe("prepare", large, tmp_path / "cache", 2)
    print(f"prepare {large_mb} MB: {prepared}")
    assert prepared["peak_rss_mb"] < PREP_PEAK_MB, prepared
    assert prepared["peak_worker_rss_mb"] < PREP_PEAK_MB, prepared
    assert prepared["store_bytes_per_token"] < 2.1  # uint16 tokens, small index
    probe("prepare", small, tmp_path / "cache", 1)
    loaded_small = probe("load", small, tmp_path / "cache")
    loaded_large = probe("load", large, tmp_path / "cache")
    print(f"load {small_mb} MB: {loaded_small}\nload {large_mb} MB: {loaded_large}")
    assert loaded_large["docs"] > 10 * loaded_small["docs"] / 2
    anon_gap = loaded_large["rss_anon_mb"] - loaded_small["rss_anon_mb"]
    assert abs(anon_gap) < LOADER_MARGIN_MB, (loaded_small, loaded_large)
    # Mapped store pages are released every few documents (StoreSplit.release).
    rss_gap = loaded_large["rss_mb"] - loaded_small["rss_mb"]
    assert abs(rss_gap) < 2 * LOADER_MARGIN_MB, (loaded_small, loaded_large)


def test_memory_is_flat_quick(tmp_path):
    check_memory(tmp_path, small_mb=5, large_mb=50)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_memory_is_flat_1gb(tmp_path):
    check_memory(tmp_path, small_mb=50, large_mb=1000)


def store_files(cache: Path) -> dict[str, bytes]:
    (store,) = [p for p in cache.glob("store-*") if p.is_dir() and not p.name.endswith("partial")]
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


BUILD = """
import sys
from multitoken.data import build_store, open_source, stdlib_source, train_tokenizer
tokenizer = train_tokenizer(list(stdlib_source(max_files=20)), 400, sys.argv[2], verbose=False)
build_store(open_source(sys.argv[1]), tokenizer, sys.argv[2], workers=int(sys.argv[3]),
            part_tokens=40_000, work_batch_chars=40_000, verbose=False)
"""


def run_build(corpus: Path, cache: Path, workers: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", BUILD, str(corpus), str(cache), str(workers)]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)


def test_sigkill_then_rerun_gives_the_same_store(tmp_path):
    corpus = tmp_path / "corpus"
    write_synthetic_jsonl(corpus, 3, seed=5, mean_doc_bytes=2000)
    started = time.perf_counter()
    reference = run_build(corpus, tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()[-2000:]
    duration = time.perf_counter() - started
    seed = int(os.environ.get("PYTEST_SIGKILL_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    for attempt in range(2):
        proc = run_build(corpus, tmp_path / "cache")
        time.sleep(rng.uniform(0.3, 0.9) * duration)
        os.killpg(proc.pid, signal.SIGKILL)  # the builder and its workers, mid-flight
        proc.wait()
        for store in (tmp_path / "cache").glob("store-*[0-9a-f]"):
            # Whatever looks complete must be: its index exists and checks out.
            assert (store / "index.json").is_file(), (attempt, seed)
            open_store(store)
    rerun = run_build(corpus, tmp_path / "cache")
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read().decode()[-2000:]
    assert store_files(tmp_path / "cache") == store_files(tmp_path / "reference"), seed
