"""Running the benchmarks: the pytest-benchmark driver and interleaved timing of methods.

* :func:`run_benchmarks` writes the plan, runs pytest on ``benchmarks/`` (the tests in
  ``benchmarks/test_steps.py`` read the plan through ``$CDBENCH_PERF_PLAN``) and returns
  pytest's exit code and wall time.
* :func:`time_methods` times the steps of several methods interleaved, round by round
  (:func:`bench.perf.paired.interleaved_times`), each built with
  :func:`bench.runner.make_steps` at the notebook's shape.

Timing rules (see ``benchmarks/test_steps.py``): ``benchmark.pedantic`` with
``iterations=1``; warm-up rounds are run and discarded; the timed function is the step
followed by a device synchronisation (:func:`timed_step`), and the pedantic ``setup``
synchronises too, so each round's clock starts on an idle device and stops after the
device finished.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import measure
from ..fsio import write_atomic
from ..runner import make_steps
from . import paired
from .plan import PLAN_ENV, run_config, shape28_task

__all__ = ["BENCH_DIR", "run_benchmarks", "time_methods", "timed_step"]

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def timed_step(fn, device: str):
    """``fn`` followed by a synchronisation of ``device``, so that a clock read right
    after it sees the device's work finished (``torch.cuda.synchronize`` on CUDA)."""
    sync = measure.synchronizer(device)

    def step():
        fn()
        sync()

    return step


def time_methods(
    methods,
    hidden: int,
    batch: int,
    device: str,
    rounds: int = 40,
    warmup: int = 3,
    kind: str = "train",
    seed: int = 0,
    clock=time.perf_counter,
    ops: dict | None = None,
) -> dict[str, list[float]]:
    """Interleaved step times: ``{method: [seconds per round]}``, round i of every method paired.

    Every method's model is built first (:func:`bench.runner.make_steps`, one fixed batch
    of ``batch`` sequences on ``device``); then :func:`bench.perf.paired.interleaved_times`
    times one step (``kind``: ``"train"`` or ``"eval"``) of each per round, in a random
    order, each between two device synchronisations (``clock``: injectable for tests).
    ``ops``: a dict that receives, after the timing, each method's kernel-launching operators
    of one step (:func:`bench.measure.kernel_op_count`, untimed).
    """
    task = shape28_task(max(batch, 64))
    fns = {m: getattr(make_steps(run_config(m, hidden, batch, device), task), kind) for m in methods}
    times = paired.interleaved_times(
        fns, rounds=rounds, warmup=warmup, sync=measure.synchronizer(device), seed=seed, clock=clock
    )
    if ops is not None:
        ops.update({m: measure.kernel_op_count(fn) for m, fn in fns.items()})
    return times


def run_benchmarks(plan: list[dict], out: Path, json_path: Path) -> tuple[int, float, list[str]]:
    """Write ``plan.json`` in ``out``, run pytest-benchmark on ``benchmarks/`` with it.

    Returns
    -------
    code : int
        pytest's exit code (0 when every benchmark passed).
    wall_s : float
        pytest's wall time in seconds.
    pytest_args : list of str
        The arguments pytest ran with (for ``command.txt``).
    """
    import pytest

    json_path.unlink(missing_ok=True)
    write_atomic(out / "plan.json", json.dumps(plan, indent=1))
    os.environ[PLAN_ENV] = str((out / "plan.json").resolve())
    pytest_args = [
        str(BENCH_DIR),
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
        "-ra",
        "--benchmark-enable",
        f"--benchmark-json={json_path}",
        "--benchmark-columns=median,iqr,min,max,rounds",
        "--benchmark-sort=fullname",
    ]
    t0 = time.perf_counter()
    code = int(pytest.main(pytest_args))
    return code, time.perf_counter() - t0, pytest_args
