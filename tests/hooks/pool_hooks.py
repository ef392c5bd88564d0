"""Fault-injection hooks for the pool's worker processes (``CDBENCH_WORKER_HOOK``), used by
tests/test_pool.py.  ``CDBENCH_TEST_DIR`` is where a hook notes what it saw; the ordinal
that triggers the fault is ``CDBENCH_TEST_AT``."""

import os
import signal
import threading
from pathlib import Path


def _note(cfg, ordinal) -> None:
    d = Path(os.environ["CDBENCH_TEST_DIR"])
    (d / f"worker-{os.getpid()}").touch()
    (d / f"run-{ordinal}-{cfg.run_id}").write_text(str(os.getpid()))


def kill_driver(cfg, ordinal) -> None:
    """SIGKILL the sweep's driver (this worker's parent) when run ``CDBENCH_TEST_AT`` starts."""
    _note(cfg, ordinal)
    if ordinal == int(os.environ["CDBENCH_TEST_AT"]):
        os.kill(os.getppid(), signal.SIGKILL)


def kill_self(cfg, ordinal) -> None:
    """SIGKILL this worker when run ``CDBENCH_TEST_AT`` = k >= 1 starts (a crash in native code,
    an out-of-memory kill); the worker of run 0 waits until run k + 1 has started, so runs are
    still queued when the driver sees the death (a fresh worker must take them)."""
    _note(cfg, ordinal)
    at = int(os.environ["CDBENCH_TEST_AT"])
    if ordinal == at:
        os.kill(os.getpid(), signal.SIGKILL)
    if ordinal == 0:
        d, pause = Path(os.environ["CDBENCH_TEST_DIR"]), threading.Event()
        for _ in range(12000):  # a guard of 2 minutes against a pool that never replaces the worker
            if any(d.glob(f"run-{at + 1}-*")):
                return
            pause.wait(0.01)
