"""Data at scale: tokenisation throughput, store size, loader speed and RSS against corpus size.

Three questions, one table each:

1. **Tokenisation throughput** (MB of text per second, wall clock) on the same in-memory
   documents: the tokenizer's own single ``encode_batch_fast`` call (its Rust threads, ids
   left as Python lists), and :func:`build_store` (encode, append ids, write shards) with 1
   worker (this process, the tokenizer's threads) and with N worker processes.
2. **Per corpus size** (synthetic JSONL, 50 MB / 500 MB / 1 GB): preparation time and MB/s
   with N workers, store bytes per token, peak RSS of the preparing process and of its
   largest worker; then a fresh process opens the store, packs with an 8192-document window
   and draws 200 batches of 8 x 512: tokens/s and its RSS (total, anonymous, file-backed).
3. **Padding** of one epoch of the default run's corpus (stdlib, seq_len 512): windowed
   best-fit for several windows next to the global best-fit.

Every measurement of (2) runs in its own process (``tests/helpers/data_probe.py``), so
each peak RSS is that process's own. The machine is shared: wall-clock rates vary with the
neighbours' load; the RSS figures do not.

Run: ``python bench/data.py`` (about 20 minutes on 2 cores) or ``--quick`` (5 / 20 MB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import base_parser, emit_json, environment, print_table
from multitoken.data import PackedLoader, build_store, open_source, train_tokenizer
from multitoken.testing.synthetic import write_synthetic_jsonl
from multitoken.train.config import alignment
from multitoken.train.config_io import load_config
from multitoken.train.data import prepare_data

PROBE = Path(__file__).resolve().parents[1] / "tests" / "helpers" / "data_probe.py"


def probe(mode: str, corpus: Path, cache: Path, extra: int) -> dict:
    cmd = [sys.executable, str(PROBE), mode, str(corpus), str(cache), str(extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def throughput(folder: Path, megabytes: float, workers: int) -> list[dict]:
    corpus = folder / "throughput"
    write_synthetic_jsonl(corpus, megabytes, seed=7)
    source = open_source(corpus)
    docs = list(source)
    mb = sum(len(doc.text.encode()) for doc in docs) / 1e6
    tokenizer = train_tokenizer(docs[:200], 4096, folder / "tok", verbose=False)
    start = time.perf_counter()
    tokenizer.encode_batch([doc.text for doc in docs])
    results = [
        {"method": "encode_batch_fast (one call)", "mb_per_s": mb / (time.perf_counter() - start)}
    ]
    for count in sorted({1, workers}):
        start = time.perf_counter()
        build_store(source, tokenizer, folder / f"tp{count}", workers=count, verbose=False)
        seconds = time.perf_counter() - start
        results.append({"method": f"build_store, {count} worker(s)", "mb_per_s": mb / seconds})
    return results


def padding() -> list[dict]:
    """One epoch's padding on the default run's data (``prepare_data`` of the default config)."""
    cfg = load_config(None, ["data.pack_window=0"])
    train = prepare_data(cfg, verbose=False).train_loader.corpus
    rows = []
    for window in (0, 64, 256, 1024):
        loader = PackedLoader(train, 512, 8, seed=0, pad_id=0, align=alignment(cfg), window=window)
        rows.append({"window": window or "global", "padding": loader.epoch_padding()})
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    sizes = [5, 20] if args.quick else [50, 500, 1000]
    results: dict = {"environment": environment(), "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tp = throughput(folder, 5 if args.quick else 20, args.workers)
        results["throughput"] = tp
        print_table(
            "tokenisation throughput (MB of text / s, wall)",
            ["method", "MB/s"],
            [[r["method"], f"{r['mb_per_s']:.2f}"] for r in tp],
        )
        per_size = []
        for megabytes in sizes:
            corpus = folder / f"corpus{megabytes}"
            write_synthetic_jsonl(corpus, megabytes, seed=megabytes)
            prepared = probe("prepare", corpus, folder / "cache", args.workers)
            loaded = probe("load", corpus, folder / "cache", 200)
            per_size.append({"megabytes": megabytes, **prepared, **loaded})
            for path in corpus.iterdir():  # keep the disk use to one corpus at a time
                path.unlink()
        results["sizes"] = per_size
        print_table(
            f"per corpus size ({args.workers} workers; loader: window 8192, 200 batches 8x512)",
            [
                "corpus",
                "prep s",
                "prep MB/s",
                "B/token",
                "prep peak RSS",
                "worker peak RSS",
                "loader tok/s",
                "loader RSS",
                "anon",
                "file",
            ],
            [
                [
                    f"{r['megabytes']} MB ({r['tokens'] / 1e6:.0f} M tok)",
                    f"{r['seconds']:.0f}",
                    f"{r['mb_per_s']:.2f}",
                    f"{r['store_bytes_per_token']:.3f}",
                    f"{r['peak_rss_mb']:.0f} MB",
                    f"{r['peak_worker_rss_mb']:.0f} MB",
                    f"{r['tokens_per_s'] / 1e6:.1f} M",
                    f"{r['rss_mb']:.0f} MB",
                    f"{r['rss_anon_mb']:.0f} MB",
                    f"{r['rss_file_mb']:.0f} MB",
                ]
                for r in per_size
            ],
        )
    pads = padding()
    results["padding"] = pads
    print_table(
        "padding of one epoch, default run's corpus (seq_len 512)",
        ["window (documents)", "padding"],
        [[r["window"], f"{r['padding']:.3%}"] for r in pads],
    )
    emit_json(results)


if __name__ == "__main__":
    main()
