"""Interleaved timing: every case is run once per round, rounds alternate the case order, and the
figures are medians over rounds, so load that comes and goes (shared CPU cores, GPU clocks) hits all
cases alike. Device work is synchronised before and after each timed call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def synchronize(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleaved(
    cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, device="cpu", calls_per_round: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each case: ``warmup`` untimed calls each, then ``rounds`` rounds in which
    every case is timed over ``calls_per_round`` back-to-back calls (order reversed every other round)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = cases[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls_per_round):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / calls_per_round)
    return samples


def summary(seconds: list[float]) -> dict:
    """Median, quartiles and minimum of a list of timings (seconds)."""
    q = statistics.quantiles(seconds, n=4) if len(seconds) >= 2 else [seconds[0]] * 3
    return {
        "median_s": statistics.median(seconds),
        "q1_s": q[0],
        "q3_s": q[2],
        "min_s": min(seconds),
        "n": len(seconds),
    }
