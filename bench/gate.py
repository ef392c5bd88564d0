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

Two measurements exclude each other (the second waits on the turnstile).  Without ``fcntl``
(Windows) the gate is absent: :func:`machine_gate` returns None and nothing is exclusive.

Every wait is bounded, so that a holder that stopped (Ctrl-Z, a debugger) cannot hang the
other runs of the user: a lock that is not free at once is polled (every 1 ms, the interval
doubling up to 50 ms); after ``CDBENCH_GATE_NOTICE_S`` seconds (default
:data:`NOTICE_S`) one line on stderr names the gate's folder and who holds the lock (pid and
command, from ``/proc/locks`` where there is one); after ``CDBENCH_GATE_TIMEOUT_S`` (default
:data:`TIMEOUT_S`) the handle gives up with one more line and goes on without the gate: a
measurement then runs unexclusive (``timing_exclusive`` False in its row), and until the lock
is free again the handle only tries it, never waits (so a stopped holder costs each other
run one timeout, not one per step).

The folder must be the user's: one owned by another user, or writable by its group or by
others (where anyone could replace the lock files), is refused with one line, as are lock
files that cannot be opened; either way the run's timings are not exclusive, and say so.

``CDBENCH_GATE_TRACE``: when set to a file path, every holder appends one line per
event (``<pid> <event>``) with a single ``O_APPEND`` write made while holding the lock
that the event is about, so the file's order is the order in which the locks were held
(the tests read it to check that no step ran inside another run's measurement).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "NOTICE_S",
    "TIMEOUT_S",
    "GateRefused",
    "TimingGate",
    "gate_dir",
    "machine_gate",
    "run_gated",
    "sync_devices",
]

#: default seconds a wait at the gate lasts before its one-line notice (``CDBENCH_GATE_NOTICE_S``)
NOTICE_S = 60.0
#: default seconds a wait at the gate lasts before the handle goes on without the gate
#: (``CDBENCH_GATE_TIMEOUT_S``); a measurement waits for its neighbours' steps in flight and a
#: step for one measurement: both are seconds to a minute or two in every profile
TIMEOUT_S = 600.0


class GateRefused(PermissionError):
    """The gate's folder is not safe to use (another user's, or writable by others)."""


def _seconds(name: str, default: float) -> float:
    try:
        v = float(os.environ.get(name, default))
    except ValueError:
        return default
    return v if v >= 0 else default


def _holders(path: Path) -> str:
    """Who holds a ``flock`` on ``path``, as ``pid N (command)``, from ``/proc/locks`` (Linux);
    ``an unknown process`` where that cannot be read."""
    try:
        ino = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "an unknown process"
    pids = []
    for line in lines:
        f = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after the ordinal
        if len(f) >= 6 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(ino) and f[4] not in pids:
            pids.append(f[4])
    if not pids:
        return "an unknown process"
    out = []
    for pid in pids:
        try:
            cmd = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
                .strip()
            )
        except OSError:
            cmd = ""
        out.append(f"pid {pid} ({cmd[:100]})" if cmd else f"pid {pid}")
    return ", ".join(out)


def _say(line: str) -> None:
    print(f"cdbench: {line}", file=sys.stderr, flush=True)


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
        Where the lock files ``timing.turnstile`` and ``timing.work`` live (created, mode
        0700, if missing).
    trace : path-like, optional
        Append ``<pid> <event>`` lines there (default: ``$CDBENCH_GATE_TRACE``).
    notice_s, timeout_s : float, optional
        Seconds before a wait's notice, and before the handle gives up waiting (default:
        ``$CDBENCH_GATE_NOTICE_S`` / ``$CDBENCH_GATE_TIMEOUT_S``, else :data:`NOTICE_S` /
        :data:`TIMEOUT_S`).

    Raises
    ------
    GateRefused
        ``folder`` is not owned by this user, or its group or others may write in it.
    OSError
        The folder or its lock files cannot be made or opened.

    Notes
    -----
    The lock files are opened once per handle; ``flock`` locks belong to the open file,
    so two handles in one process (two threads) exclude each other like two processes.
    A handle is not thread-safe: one thread per handle.  States: idle (holds nothing),
    working (``work`` shared), measuring (both exclusive).
    """

    def __init__(self, folder, trace=None, notice_s=None, timeout_s=None) -> None:
        if fcntl is None:  # pragma: no cover
            raise OSError("the timing gate needs fcntl.flock (POSIX)")
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_folder()
        self.notice_s = _seconds("CDBENCH_GATE_NOTICE_S", NOTICE_S) if notice_s is None else notice_s
        self.timeout_s = _seconds("CDBENCH_GATE_TIMEOUT_S", TIMEOUT_S) if timeout_s is None else timeout_s
        self._gave_up = False  # a wait timed out: only try the locks until they are free again
        self._holds_work = False
        self.last_exclusive = None  # whether the last exclusive() held the machine alone
        self._turnstile = os.open(self.folder / "timing.turnstile", os.O_RDWR | os.O_CREAT, 0o600)
        self._work = os.open(self.folder / "timing.work", os.O_RDWR | os.O_CREAT, 0o600)
        trace = trace if trace is not None else os.environ.get("CDBENCH_GATE_TRACE")
        self._trace = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if trace else None
        self.state = "idle"

    def _check_folder(self) -> None:
        uid = os.getuid()
        for st, what in ((os.lstat(self.folder), "its name"), (os.stat(self.folder), "the folder")):
            if st.st_uid != uid:
                raise GateRefused(
                    f"timing gate {self.folder}: {what} is owned by uid {st.st_uid}, not by you (uid {uid}): "
                    "refused (set CDBENCH_LOCK_DIR to a folder of your own)"
                )
        mode = os.stat(self.folder).st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise GateRefused(
                f"timing gate {self.folder}: writable by {'others' if mode & stat.S_IWOTH else 'its group'} "
                f"(mode {stat.S_IMODE(mode):o}): refused (chmod 700 it, or set CDBENCH_LOCK_DIR)"
            )

    def _lock(self, fd: int, mode: int, name: str) -> bool:
        """``flock(fd, mode)``, bounded (see the module docstring): True when taken, False when
        the wait timed out, or at once when an earlier one did and the lock is still busy."""
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            self._gave_up = False
            return True
        except BlockingIOError:
            if self._gave_up:
                return False
        path = self.folder / name
        start, delay, noticed = time.monotonic(), 0.001, False
        while True:
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            waited = time.monotonic() - start
            if waited >= self.timeout_s:
                _say(
                    f"timing gate {self.folder}: {name} still held by {_holders(path)} after {waited:.1f} s: "
                    "going on without the gate (timings not exclusive, timing_exclusive False) until "
                    "it is free"
                )
                self._gave_up = True
                return False
            if not noticed and waited >= self.notice_s:
                noticed = True
                _say(
                    f"timing gate {self.folder}: waiting {waited:.1f} s for {name}, held by {_holders(path)} "
                    f"(a stopped sweep? going on without the gate after {self.timeout_s:g} s, "
                    "CDBENCH_GATE_TIMEOUT_S)"
                )

    def _log(self, event: str) -> None:
        if self._trace is not None:
            os.write(self._trace, f"{os.getpid()} {event}\n".encode())

    def enter(self) -> None:
        """Start computing: wait for any measurement in progress, then hold ``work`` shared
        (both waits bounded: after a timeout the handle computes without holding it)."""
        if self.state != "idle":
            raise RuntimeError(f"enter() in state {self.state}")
        if self._lock(self._turnstile, fcntl.LOCK_EX, "timing.turnstile"):
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
            self._holds_work = self._lock(self._work, fcntl.LOCK_SH, "timing.work")
        self.state = "working"
        self._log("enter" if self._holds_work else "enter ungated")

    def leave(self) -> None:
        """Stop computing (between runs): let go of ``work``."""
        if self.state == "working":
            self._log("leave")
            if self._holds_work:
                fcntl.flock(self._work, fcntl.LOCK_UN)
                self._holds_work = False
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
            busy = True  # a measurement waits (or a neighbour passes the turnstile): let go
        else:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
            if self._holds_work:
                return 0.0
            busy = False
        if not self._holds_work and self._gave_up and busy:
            return 0.0  # ungated since a wait timed out, and the gate is still taken: go on
        if before_wait is not None and busy:
            before_wait()
        t0 = time.perf_counter()
        if self._holds_work:
            fcntl.flock(self._work, fcntl.LOCK_UN)
            self._holds_work = False
        self.state = "idle"
        self.enter()
        return time.perf_counter() - t0

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the machine alone: block new steps, wait for the steps in flight, yield.

        Yields True, or False when a wait timed out (see the module docstring): the block
        then runs without holding the machine alone; :attr:`last_exclusive` says which.  A
        working handle lets go of ``work`` first and takes it shared again afterwards.
        """
        was_working = self.state == "working"
        if was_working:
            self.leave()
        turnstile = self._lock(self._turnstile, fcntl.LOCK_EX, "timing.turnstile")
        try:
            alone = turnstile and self._lock(self._work, fcntl.LOCK_EX, "timing.work")
            self.last_exclusive = alone
            if alone:
                self.state = "measuring"
                self._log("exclusive")
            try:
                yield alone
            finally:
                if alone:
                    self._log("release")
                    fcntl.flock(self._work, fcntl.LOCK_UN)
                self.state = "idle"
        finally:
            if turnstile:
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
    """This process's handle on the machine's gate, or None where ``flock`` is missing, the
    folder is refused (:class:`GateRefused`) or its lock files cannot be made or opened: then
    measurements are not exclusive, and (except without ``flock``) one line on stderr says
    why."""
    if fcntl is None:  # pragma: no cover
        return None
    folder = gate_dir()
    try:
        return TimingGate(folder)
    except GateRefused as e:
        _say(f"{e}; timings are not exclusive (timing_exclusive False)")
    except OSError as e:
        _say(
            f"timing gate {folder}: cannot open its lock files ({e.strerror or e}): timings are not "
            "exclusive (timing_exclusive False)"
        )
    return None


def run_gated(gate: TimingGate | None, run, cfg, *, on_step=None, **kwargs):
    """``run(cfg, progress=..., timing_lock=..., **kwargs)`` (``bench.runner.run_one``) passing
    through ``gate``: held shared for the run, a boundary at every step (after ``on_step``, the
    caller's own per-step callback), the run's throughput timed holding it exclusively.  Without
    a gate, ``on_step`` alone is the progress callback.  Returns what ``run`` returns, with
    ``timing_exclusive`` False in the row when the measurement's wait at the gate timed out."""
    if gate is None:
        return run(cfg, progress=on_step, **kwargs)

    def step(done, total, epoch):
        if on_step is not None:
            on_step(done, total, epoch)
        return gate.boundary(sync_devices)

    gate.enter()
    gate.last_exclusive = None
    try:
        row, history = run(cfg, progress=step, timing_lock=gate.exclusive, **kwargs)
    finally:
        gate.leave()
    if gate.last_exclusive is False and row.get("timing_exclusive"):
        row["timing_exclusive"] = False
    return row, history
