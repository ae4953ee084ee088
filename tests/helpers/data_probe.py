"""Run in a fresh process by tests/integration/test_data_scale.py and bench/data.py: prepare a
store, or read it through a loader, and print one JSON line with the memory this process (and
its workers) used.

    python data_probe.py prepare CORPUS CACHE [WORKERS]
    python data_probe.py load CORPUS CACHE [BATCHES]
"""

from __future__ import annotations

import json
import resource
import sys
import time

from multitoken.data import PackedLoader, build_store, open_source, train_tokenizer


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _tokenizer(source, cache):
    # A 2 MB sample: the probe measures the store and the loader, not BPE training.
    def sample():
        budget = 2_000_000
        for doc in source:
            yield doc
            budget -= len(doc.text)
            if budget <= 0:
                return

    return train_tokenizer(sample(), 4096, cache, verbose=False, cache_key=source.fingerprint())


def prepare(corpus: str, cache: str, workers: int) -> dict:
    source = open_source(corpus)
    tokenizer = _tokenizer(source, cache)
    start = time.perf_counter()
    store = build_store(source, tokenizer, cache, workers=workers, verbose=False)
    seconds = time.perf_counter() - start
    tokens = sum(store.index["splits"][s]["num_tokens"] for s in ("train", "val"))
    return {
        "seconds": seconds,
        "input_mb": source.total_bytes / 1e6,
        "mb_per_s": source.total_bytes / 1e6 / seconds,
        "tokens": tokens,
        "store_bytes_per_token": store.num_bytes / tokens,
        # VmHWM, not ru_maxrss: Linux carries the launching process's peak across exec into
        # ru_maxrss, so a probe started by a big parent would report the parent's peak.
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def load(corpus: str, cache: str, batches: int) -> dict:
    source = open_source(corpus)
    tokenizer = _tokenizer(source, cache)
    store = build_store(source, tokenizer, cache, verify="size", verbose=False)
    before_anon = _status_kb("RssAnon")
    loader = PackedLoader(store.split("train"), 512, 8, seed=0, pad_id=0, window=8192)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    return {
        "docs": len(store.split("train")),
        "tokens_per_s": batches * 8 * 512 / seconds,
        "rss_mb": _status_kb("VmRSS") / 1024,
        "rss_anon_mb": _status_kb("RssAnon") / 1024,
        "rss_file_mb": _status_kb("RssFile") / 1024,
        "loader_anon_mb": (_status_kb("RssAnon") - before_anon) / 1024,
    }


if __name__ == "__main__":
    mode, corpus, cache = sys.argv[1:4]
    extra = int(sys.argv[4]) if len(sys.argv) > 4 else None
    if mode == "prepare":
        result = prepare(corpus, cache, extra or 2)
    else:
        result = load(corpus, cache, extra or 200)
    print(json.dumps(result))
