"""Shared helpers of the benchmarks: thread pinning, interleaved timing, peak memory, output,
packed batches of random documents.

Every benchmark prints one or more ``rich`` tables and ends with exactly one JSON line on
stdout holding all of its numbers, so ``python bench/x.py | tail -n 1 | jq`` works.

Timing is *interleaved*: one repeat runs every contender once (in an order that rotates from
repeat to repeat), so a slow spell of the shared machine hits all contenders of a repeat alike.
Ratios are taken per repeat and then their median is reported, never a ratio of wall-clock
times measured at different moments.

The clock is this process's CPU time (user + system, ``time.process_time``) by default, not
wall-clock time: the machine is shared, and while a neighbour's job holds the core, wall time
keeps running but CPU time does not. With one intra-op thread (the default) CPU time is the
time the computation took on the core, page faults and allocator work included. ``--clock
wall`` switches to ``time.perf_counter`` (the right clock on a quiet machine or with several
threads, where CPU time adds the threads up).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from multitoken import SequenceLayout

__all__ = [
    "base_parser",
    "setup_threads",
    "clock",
    "time_interleaved",
    "calibrate_number",
    "environment",
    "paired_ratios",
    "median",
    "median_ms",
    "PeakMemory",
    "print_table",
    "emit_json",
    "console",
    "random_doc_lengths",
    "random_packed_layout",
]

# Tables go to stdout, the JSON line last; rich must not wrap the JSON line.
console = Console(file=sys.stdout, width=140)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (keep it fixed across runs)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this process's CPU time (robust on a shared machine); wall: perf_counter",
    )
    return parser


# The clock every timing in a run uses; set once from --clock by setup_threads().
_CLOCK: list[Callable[[], float]] = [time.process_time]


def clock() -> float:
    return _CLOCK[0]()


def setup_threads(threads: int, clock_name: str = "cpu") -> None:
    torch.set_num_threads(threads)
    _CLOCK[0] = time.process_time if clock_name == "cpu" else time.perf_counter


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Milliseconds of one call of ``fn`` on the benchmarks' clock, the median of ``repeats``."""
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append(clock() - start)
    return 1e3 * median(samples)


def time_interleaved(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    number: int = 1,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of every contender, ``repeats`` samples each, interleaved.

    Each sample times ``number`` back-to-back calls and divides by ``number``. The order of
    the contenders rotates every repeat so that none is always first after a pause.
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn = contenders[name]
            gc.collect()
            start = clock()
            for _ in range(number):
                fn()
            samples[name].append((clock() - start) / number)
    return samples


def calibrate_number(fn: Callable[[], object], target_s: float = 0.05, cap: int = 10_000) -> int:
    """Calls per sample so that one sample lasts about ``target_s`` (for microsecond ops)."""
    fn()
    start = clock()
    fn()
    once = max(clock() - start, 1e-7)
    return int(min(cap, max(1, round(target_s / once))))


def paired_ratios(samples: dict[str, list[float]], num: str, den: str) -> list[float]:
    """Per-repeat ratios ``num / den`` (both measured in the same repeat)."""
    return [a / b for a, b in zip(samples[num], samples[den])]


@dataclass
class PeakMemory:
    """Peak bytes of CPU tensor memory allocated inside a ``with`` block, above its start.

    It reads the allocation events of ``torch.profiler`` with ``profile_memory=True``: every
    allocation and free that goes through PyTorch's CPU allocator (tensors, autograd's saved
    tensors, the temporaries that kernels allocate as tensors) is recorded in order with its
    size. A running sum over them gives the live bytes after every event; its maximum is the
    peak. Only memory allocated inside the block counts (a tensor that already existed and is
    freed inside is not subtracted), so this is the extra memory a computation needs on top of
    its inputs. Not counted: buffers a BLAS library allocates with its own ``malloc``.
    """

    peak_bytes: int = 0
    end_bytes: int = 0
    _events: list = field(default_factory=list, repr=False)

    @contextmanager
    def measure(self):
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield self
        # The benchmarks run on CPU only, so every memory event is a CPU allocation or free.
        events = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        ]
        events.sort(key=lambda item: item[0])
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak_bytes, self.end_bytes = peak, live


def random_doc_lengths(seqlen: int, docs: int, gen: torch.Generator) -> list[int]:
    """Lengths of ``docs`` documents (each at least 1 token) that fill ``seqlen`` tokens.

    The cut points are ``docs - 1`` distinct positions drawn at random from ``1 .. seqlen - 1``.
    """
    if not 1 <= docs <= seqlen:
        raise ValueError(f"cannot cut {seqlen} tokens into {docs} non-empty documents")
    cuts = sorted((torch.randperm(seqlen - 1, generator=gen)[: docs - 1] + 1).tolist())
    bounds = [0, *cuts, seqlen]
    return [stop - start for start, stop in zip(bounds[:-1], bounds[1:])]


def random_packed_layout(rows: int, seqlen: int, docs: int, gen: torch.Generator) -> SequenceLayout:
    """``rows`` rows of ``seqlen`` tokens, each packed with ``docs`` random-length documents."""
    return SequenceLayout.from_lengths([random_doc_lengths(seqlen, docs, gen) for _ in range(rows)])


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def emit_json(payload: dict) -> None:
    """The last line of stdout: every number of the run, machine-readable."""
    sys.stdout.flush()
    print(json.dumps(payload, separators=(",", ":")), flush=True)


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": "process_time" if _CLOCK[0] is time.process_time else "perf_counter",
        "python": sys.version.split()[0],
    }
