"""The benchmark grid of ``bench.perf``: which steps to time, with how many rounds.

The grid is every available method x hidden {64, 128, 256, 512} x batch {64, 256} x
device (cpu, and cuda when available) at the notebook's shape: 28 steps of 28 features,
10 classes, 2 layers, bidirectional, ``penalty_param`` 0.5 for the penalty methods.
The data is synthetic (:func:`shape28_task`); only the shapes matter for timing.

Cost estimate: before anything is timed, each configuration is built once and one
warm-up train step and one eval step are timed (:func:`measure_cost`); a benchmark
whose (warm-up + timed) rounds would exceed ``max_seconds`` at that cost is cut to one
warm-up round and as many timed rounds as fit (at least one).  No table of flop counts
per method: a new method is estimated the same way as the others.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from .. import measure
from ..methods import METHODS
from ..runner import RunConfig, make_steps
from ..tasks import Task

__all__ = [
    "BATCH",
    "HIDDEN",
    "KINDS",
    "PLAN_ENV",
    "REFERENCE",
    "available_methods",
    "case_id",
    "default_devices",
    "load_plan",
    "make_plan",
    "measure_cost",
    "rounds_for",
    "run_config",
    "shape28_task",
]

HIDDEN = (64, 128, 256, 512)
BATCH = (64, 256)
QUICK_HIDDEN = (64, 128)
QUICK_BATCH = (64,)
KINDS = ("train", "eval")
SEQ_LEN = 28
INPUT_SIZE = 28
CLASSES = 10
NUM_LAYERS = 2
BIDIRECTIONAL = True
PENALTY = 0.5
#: the unconstrained method every other one is paired with (ratios are relative to it)
REFERENCE = "unconstrained"
#: default (warm-up, timed) rounds per device type
DEFAULT_ROUNDS = {"cpu": (3, 5), "cuda": (10, 30)}
DEFAULT_MAX_SECONDS = 30.0
PLAN_ENV = "CDBENCH_PERF_PLAN"


def shape28_task(n: int) -> Task:
    """A synthetic task of the notebook's shape: ``n`` random sequences of 28 steps x 28
    features in [0, 1] with random labels 0..9 (timing only; the values do not matter).

    Parameters
    ----------
    n : int
        Number of training sequences (at least the batch size, so that the first batch
        of :func:`bench.runner.make_steps` is full).

    Returns
    -------
    Task
    """
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(n, SEQ_LEN, INPUT_SIZE, generator=g), torch.randint(CLASSES, (n,), generator=g))
    test = (torch.rand(8, SEQ_LEN, INPUT_SIZE, generator=g), torch.randint(CLASSES, (8,), generator=g))
    return Task(
        name="shape28", input_size=INPUT_SIZE, output_size=CLASSES, metric="acc", train=train, test=test
    )


def run_config(method: str, hidden: int, batch: int, device: str) -> RunConfig:
    """The :class:`~bench.runner.RunConfig` of one benchmark (the notebook's model)."""
    return RunConfig(
        method=method,
        task="shape28",
        num_layers=NUM_LAYERS,
        hidden_size=hidden,
        bidirectional=BIDIRECTIONAL,
        batch_size=batch,
        device=device,
        penalty_param=PENALTY if METHODS[method].uses_penalty else None,
    )


def measure_cost(method: str, hidden: int, batch: int, device: str) -> dict[str, float]:
    """Seconds to build one benchmark's model and of one warm-up step of each kind.

    Returns
    -------
    dict
        ``{"build": s, "train": s, "eval": s}``: :func:`bench.runner.make_steps`, then
        one train step and one eval step, each timed alone between device
        synchronisations.  A first step carries one-time costs (allocation, kernel
        selection), so the estimate errs on the slow side.
    """
    sync = measure.synchronizer(device)
    sync()
    t0 = time.perf_counter()
    steps = make_steps(run_config(method, hidden, batch, device), shape28_task(max(batch, 64)))
    sync()
    cost = {"build": time.perf_counter() - t0}
    for kind in KINDS:
        cost[kind] = measure.time_fn(getattr(steps, kind), warmup=0, iters=1, sync=sync).seconds_per_iter
    return cost


def rounds_for(est_s: float, warmup: int, rounds: int, max_seconds: float | None) -> tuple[int, int]:
    """(warm-up, timed) rounds of one benchmark: the defaults, or, when
    ``(warmup + rounds) * est_s > max_seconds``, one warm-up round and as many timed rounds
    as fit in ``max_seconds`` (at least one)."""
    if max_seconds is None or (warmup + rounds) * est_s <= max_seconds:
        return warmup, rounds
    return min(warmup, 1), max(1, min(rounds, int(max_seconds // est_s) - 1))


def make_plan(
    methods,
    hidden,
    batch,
    devices,
    *,
    warmup=None,
    rounds=None,
    max_seconds=DEFAULT_MAX_SECONDS,
    cost: Callable[[str, int, int, str], dict] | None = measure_cost,
) -> list[dict]:
    """Every benchmark of the grid, with its rounds and estimated seconds.

    Parameters
    ----------
    methods, hidden, batch, devices : sequences
        The grid.
    warmup, rounds : int, optional
        Warm-up and timed rounds; None: ``DEFAULT_ROUNDS`` of the device type.
    max_seconds : float or None
        Per-benchmark time budget (see :func:`rounds_for`); None: never cut rounds.
    cost : callable or None
        ``cost(method, hidden, batch, device) -> {"build", "train", "eval"}`` seconds
        (:func:`measure_cost`: measured here, once per configuration); None: no estimate
        and no cuts (``est_*`` are None).

    Returns
    -------
    list of dict
        Keys method, device, hidden, batch, kind, warmup, rounds, cut (True when the
        budget reduced the rounds), est_step_s (one round: the method's step plus the
        paired ``REFERENCE`` step), est_s (builds plus all rounds).
    """
    plan = []
    for device in devices:
        dw, dr = DEFAULT_ROUNDS[torch.device(device).type]
        w0, r0 = dw if warmup is None else warmup, dr if rounds is None else rounds
        for h in hidden:
            for b in batch:
                costs = {}
                if cost is not None:
                    for m in dict.fromkeys([*methods, REFERENCE]):
                        costs[m] = cost(m, h, b, device)
                for m in methods:
                    for kind in KINDS:
                        est = est_s = None
                        w, r = w0, r0
                        if costs:
                            paired = [m] if m == REFERENCE else [m, REFERENCE]  # each round also times one
                            est = sum(costs[x][kind] for x in paired)  # REFERENCE step (paired ratio)
                            w, r = rounds_for(est, w0, r0, max_seconds)
                            est_s = sum(costs[x]["build"] for x in paired) + (w + r) * est
                        plan.append(
                            {
                                "method": m,
                                "device": device,
                                "hidden": h,
                                "batch": b,
                                "kind": kind,
                                "warmup": w,
                                "rounds": r,
                                "cut": (w, r) != (w0, r0),
                                "est_step_s": est,
                                "est_s": est_s,
                            }
                        )
    return plan


def case_id(case: dict) -> str:
    """pytest id of a benchmark, e.g. ``cd-cpu-H64-B256``."""
    return f"{case['method']}-{case['device']}-H{case['hidden']}-B{case['batch']}"


def load_plan(kind: str) -> list[dict]:
    """The benchmarks of ``kind`` that ``benchmarks/test_steps.py`` runs: those of the plan
    file named by ``$CDBENCH_PERF_PLAN``, else the full default grid with default rounds
    (no estimate: nothing is measured at collection)."""
    path = os.environ.get(PLAN_ENV)
    if path:
        plan = json.loads(Path(path).read_text())
    else:
        plan = make_plan(available_methods(), HIDDEN, BATCH, default_devices(), cost=None)
    return [c for c in plan if c["kind"] == kind]


def available_methods() -> list[str]:
    return [m for m, spec in METHODS.items() if spec.available()]


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
