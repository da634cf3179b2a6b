"""The one GPU timer of the benchmark scripts (run as `python benchmarks/bench_*.py`, so importable as `timing`)."""
from __future__ import annotations

import statistics

import torch


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms over reps calls, each timed with CUDA events after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
