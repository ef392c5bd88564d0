"""The paired (interleaved) timer: the project's throughput authority.

Timing two steps one after the other in separate runs compares two states of a shared
machine as much as two methods: on this project's 2-core VM consecutive benchmarks run
at speeds 10-30 % apart.  Interleaving cancels that: every round times one call of each
step in a fresh random order, each between two device synchronisations, and a ratio is
taken *within* each round before the median over rounds.

This module knows nothing of methods, models or the command line: it times any
zero-argument callables, so the sweep (``bench.runner``) can pair a method's train step
with an unconstrained step of the same shape in the same process, as ``python -m
bench.perf --paired`` does for whole grids.  It imports only :mod:`bench.measure`.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Mapping

from .. import measure

__all__ = ["interleaved_times", "pairwise_rows", "ratio_stats", "relative_rows"]


def interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 3,
    sync: Callable[[], None] = lambda: None,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each call of each function, round by round.

    Parameters
    ----------
    fns : mapping of str to callable
        The steps to compare, e.g. ``{"unconstrained": base_step, "cd": cd_step}``.
    rounds : int
        Timed rounds (>= 1); round i of every function is paired.
    warmup : int
        Untimed calls of each function before the first round (allocation, kernel
        selection, lazy initialisation).
    sync : callable
        Waits for the device (``bench.measure.synchronizer``); called before each clock read.
    seed : int
        Seed of the order of the calls within each round (shuffled every round).
    clock : callable
        Seconds (``time.perf_counter``); injectable for tests.

    Returns
    -------
    dict of str to list of float
        ``{name: [seconds of round 0, round 1, ...]}``, ``rounds`` values each.

    Raises
    ------
    ValueError
        ``rounds < 1`` or ``warmup < 0``.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0; got rounds={rounds}, warmup={warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    order, rng = list(fns), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            t = measure.time_fn(fns[name], warmup=0, iters=1, sync=sync, clock=clock)
            times[name].append(t.seconds_per_iter)
    return times


def ratio_stats(base: list[float], other: list[float]) -> dict:
    """Throughput of ``other`` relative to ``base`` from paired times (> 1: ``other`` is faster).

    Returns ``ratio`` (median over rounds of t_base / t_other), ``q1``, ``q3`` (its
    quartiles) and ``of_medians`` (median t_base / median t_other).
    """
    r = sorted(a / b for a, b in zip(base, other))
    q1, _, q3 = statistics.quantiles(r, n=4) if len(r) > 1 else (r[0], r[0], r[0])
    return dict(
        ratio=statistics.median(r),
        q1=q1,
        q3=q3,
        of_medians=statistics.median(base) / statistics.median(other),
    )


def relative_rows(times: dict[str, list[float]], baseline: str, **key) -> list[dict]:
    """One row per timed function: ``key``, method, rounds, median_ms and its throughput
    relative to ``baseline`` (:func:`ratio_stats`: ratio, q1, q3, of_medians)."""
    rows = []
    for m, t in times.items():
        st = ratio_stats(times[baseline], t)
        rows.append(dict(**key, method=m, rounds=len(t), median_ms=1e3 * statistics.median(t), **st))
    return rows


def pairwise_rows(times: dict[str, list[float]], **key) -> list[dict]:
    """Every ordered pair (method, baseline) of paired times: throughput of method relative to baseline."""
    rows = []
    for m in times:
        for b in times:
            if m != b:
                st = ratio_stats(times[b], times[m])
                rows.append(
                    dict(
                        **key,
                        method=m,
                        baseline=b,
                        ratio=st["ratio"],
                        q1=st["q1"],
                        q3=st["q3"],
                        of_medians=st["of_medians"],
                    )
                )
    return rows
