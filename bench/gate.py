"""The machine-wide timing gate: no run computes while another run times its steps.

When runs are packed onto one machine, a run's throughput measurement would time its
neighbours' work too.  Every run of a sweep therefore passes through one gate per machine
(per user): while it computes it holds the gate *shared*; it lets go for an instant at each
step boundary; and it times its steps holding the gate *exclusively*.  An exclusive holder
thus waits until every neighbour has finished its current step, and neighbours wait at
their next step boundary until the measurement is over.

The gate is two ``flock(2)`` locks on files in a per-user folder (``CDBENCH_LOCK_DIR``,
else ``<tempdir>/cdbench-<uid>``), so it works between any processes of one user on one
machine (pool workers, Dask workers, two sweeps run side by side) and is released by the
kernel when a process dies, even by SIGKILL:

* ``turnstile`` -- taken exclusively by a measuring run for the whole measurement, and
  passed through (taken and released at once) by a neighbour before it holds ``work``
  again.  A waiting measurement therefore blocks new steps; without it, two neighbours
  whose steps overlap would keep ``work`` shared forever (flock prefers no one).
* ``work`` -- held shared while computing, exclusively while timing.

Two measurements exclude each other (the second waits on the turnstile).  Waiting is done
in the kernel (no polling, no busy-waiting).  Without ``fcntl`` (Windows) the gate is
absent: :func:`machine_gate` returns None and nothing is exclusive.

``CDBENCH_GATE_TRACE``: when set to a file path, every holder appends one line per
event (``<pid> <event>``) with a single ``O_APPEND`` write made while holding the lock
that the event is about, so the file's order is the order in which the locks were held
(the tests read it to check that no step ran inside another run's measurement).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["TimingGate", "gate_dir", "machine_gate", "run_gated", "sync_devices"]


def sync_devices() -> None:
    """Wait for every kernel this process has queued on a CUDA device (nothing on CPU).

    Passed as ``before_wait`` to :meth:`TimingGate.boundary`, so that a run's queued
    kernels finish before a neighbour's measurement begins, and the wait that follows is
    idle time, not hidden computation.
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def gate_dir() -> Path:
    """The folder of the gate's lock files: ``$CDBENCH_LOCK_DIR``, else a per-user folder in
    the temporary directory (created with mode 0700)."""
    d = os.environ.get("CDBENCH_LOCK_DIR")
    if d:
        return Path(d)
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"cdbench-{uid}"


class TimingGate:
    """One process's handle on the gate in ``folder`` (see the module docstring).

    Parameters
    ----------
    folder : path-like
        Where the lock files ``timing.turnstile`` and ``timing.work`` live (created if
        missing).
    trace : path-like, optional
        Append ``<pid> <event>`` lines there (default: ``$CDBENCH_GATE_TRACE``).

    Notes
    -----
    The lock files are opened once per handle; ``flock`` locks belong to the open file,
    so two handles in one process (two threads) exclude each other like two processes.
    A handle is not thread-safe: one thread per handle.  States: idle (holds nothing),
    working (``work`` shared), measuring (both exclusive).
    """

    def __init__(self, folder, trace=None) -> None:
        if fcntl is None:  # pragma: no cover
            raise OSError("the timing gate needs fcntl.flock (POSIX)")
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._turnstile = os.open(self.folder / "timing.turnstile", os.O_RDWR | os.O_CREAT, 0o600)
        self._work = os.open(self.folder / "timing.work", os.O_RDWR | os.O_CREAT, 0o600)
        trace = trace if trace is not None else os.environ.get("CDBENCH_GATE_TRACE")
        self._trace = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if trace else None
        self.state = "idle"

    def _log(self, event: str) -> None:
        if self._trace is not None:
            os.write(self._trace, f"{os.getpid()} {event}\n".encode())

    def _pass_turnstile(self) -> None:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def enter(self) -> None:
        """Start computing: wait for any measurement in progress, then hold ``work`` shared."""
        if self.state != "idle":
            raise RuntimeError(f"enter() in state {self.state}")
        self._pass_turnstile()
        fcntl.flock(self._work, fcntl.LOCK_SH)
        self.state = "working"
        self._log("enter")

    def leave(self) -> None:
        """Stop computing (between runs): let go of ``work``."""
        if self.state == "working":
            self._log("leave")
            fcntl.flock(self._work, fcntl.LOCK_UN)
            self.state = "idle"

    def boundary(self, before_wait=None) -> float:
        """A step boundary: let a waiting measurement in, then go on computing.

        When no measurement is waiting (the turnstile is free) the handle keeps ``work``
        and returns at once.  Otherwise it calls ``before_wait()`` (e.g. a device
        synchronisation, so that no queued kernel of this run runs inside the
        measurement), lets go of ``work`` and waits for the measurement to end.

        Parameters
        ----------
        before_wait : callable, optional
            Called with no argument just before letting go, only when a measurement waits.

        Returns
        -------
        float
            Seconds spent waiting for a measurement (0.0 when none waited); callers leave
            them out of their training time.
        """
        if self.state != "working":
            raise RuntimeError(f"boundary() in state {self.state}")
        self._log("boundary")  # holding work shared: no measurement is inside
        try:
            fcntl.flock(self._turnstile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # a measurement waits (or a neighbour passes the turnstile): let go
        else:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
            return 0.0
        if before_wait is not None:
            before_wait()
        t0 = time.perf_counter()
        fcntl.flock(self._work, fcntl.LOCK_UN)
        self.state = "idle"
        self.enter()
        return time.perf_counter() - t0

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the machine alone: block new steps, wait for the steps in flight, yield.

        A working handle lets go of ``work`` first and takes it shared again afterwards.
        """
        was_working = self.state == "working"
        if was_working:
            self.leave()
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._work, fcntl.LOCK_EX)
            self.state = "measuring"
            self._log("exclusive")
            try:
                yield self
            finally:
                self._log("release")
                fcntl.flock(self._work, fcntl.LOCK_UN)
                self.state = "idle"
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        if was_working:
            self.enter()

    def close(self) -> None:
        """Let go of everything and close the files (idempotent)."""
        for fd in (self._work, self._turnstile, self._trace):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._work = self._turnstile = self._trace = None
        self.state = "closed"


def machine_gate() -> TimingGate | None:
    """This process's handle on the machine's gate, or None where ``flock`` is missing or
    the folder cannot be made (then measurements are not exclusive)."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        return TimingGate(gate_dir())
    except OSError:
        return None


def run_gated(gate: TimingGate | None, run, cfg, *, on_step=None, **kwargs):
    """``run(cfg, progress=..., timing_lock=..., **kwargs)`` (``bench.runner.run_one``) passing
    through ``gate``: held shared for the run, a boundary at every step (after ``on_step``, the
    caller's own per-step callback), the run's throughput timed holding it exclusively.  Without
    a gate, ``on_step`` alone is the progress callback.  Returns what ``run`` returns."""
    if gate is None:
        return run(cfg, progress=on_step, **kwargs)

    def step(done, total, epoch):
        if on_step is not None:
            on_step(done, total, epoch)
        return gate.boundary(sync_devices)

    gate.enter()
    try:
        return run(cfg, progress=step, timing_lock=gate.exclusive, **kwargs)
    finally:
        gate.leave()
