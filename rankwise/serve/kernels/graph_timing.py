"""How the serving kernels' launch shapes are timed at warm-up: replayed from a CUDA graph, as a decode step runs."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_us(fn: Callable[[], object], calls: int = 20, replays: int = 3) -> float:
    """Microseconds per call of `fn` replayed from a CUDA graph of `calls` calls (no host launch cost), the median
    of `replays` timed replays after one untimed one. `fn` runs once on a side stream first (compilation,
    allocator warm-up) before capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]
