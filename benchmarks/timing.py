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


def graph_ms(fn, calls: int = 10, reps: int = 10) -> float:
    """Median time of one fn() replayed from a CUDA graph of ``calls`` back-to-back calls (how the engine's
    decode step runs it: no host launch gaps), over reps replays; fn must be capturable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, reps) / calls
