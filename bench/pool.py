"""The worker processes of the ``auto`` executor: a small process pool made for sweeps.

The driver (the ``bench.ablate`` process) starts one worker process per packing slot
(:mod:`bench.packing`) with ``python -m bench.pool``, hands each idle worker the next run
for its device, and receives every result itself: workers never write result files, so
the result store's guarantees (driver-only writes, resume, no duplicates) are those of the
local executor.  Each worker:

* starts from the driver's environment without ``MALLOC_TRIM_THRESHOLD_`` (Dask's nanny
  sets 65536, which turns glibc's dynamic mmap threshold off: every large tensor is then
  mmap'd and unmapped at each step, measured 1.4-1.9x slower, docs/perf.md), with
  ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` set to its threads
  and, on a GPU slot, ``CUDA_VISIBLE_DEVICES`` set to its device, all before Python starts;
* sets its torch threads before any computation (and every run sets its own,
  ``RunConfig.threads``: the slot's threads are the planned runs');
* keeps the last task's data in memory (:func:`bench.runner.get_task`), and the driver
  hands out the runs grouped by their data, so a worker loads each task's data once;
* passes the machine's timing gate (:mod:`bench.gate`) at every training step and holds it
  exclusively while it times its steps, so no neighbour computes during a measurement;
* dies with the driver: ``PR_SET_PDEATHSIG`` on Linux, a check of its parent at every step
  elsewhere, and the end of its connection to the driver while it waits for work.  Ctrl-C
  reaches the driver, which stops the workers; the workers themselves ignore SIGINT.

A worker that dies (killed, out of memory, a crash in native code) costs its current run
only: the run is recorded ``failed`` with the exit status and a fresh worker takes its
place.  A run that raises or diverges is recorded as with the local executor.

``CDBENCH_WORKER_HOOK=module:function`` (for fault-injection tests): every worker calls
``function(cfg, ordinal)`` before each run, ``ordinal`` being the run's position in the
order of dispatch (0-based); the driver dispatches a run of ordinal ``o >= workers`` only
after it recorded at least ``o - workers + 1`` results.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path

__all__ = ["REMOVED_ENV", "THREAD_ENV", "WorkerPool", "data_key", "dispatch_order", "worker_env"]

#: variables a worker does not inherit from the driver (see the module docstring)
REMOVED_ENV = ("MALLOC_TRIM_THRESHOLD_",)
#: thread-count variables set to the worker's threads
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: seconds a worker gets to exit after "stop" before it is killed
STOP_TIMEOUT_S = 30


def worker_env(device: str, threads: int, base=None) -> dict:
    """The environment of a worker process on ``device`` (``cpu`` or ``cuda:i``) with
    ``threads`` torch threads, from ``base`` (default: this process's environment)."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k not in REMOVED_ENV}
    for k in THREAD_ENV:
        env[k] = str(threads)
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        visible = base.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",")] if visible else None
        env["CUDA_VISIBLE_DEVICES"] = ids[index] if ids else str(index)
    package_root = str(Path(__file__).resolve().parent.parent)  # the same bench as the driver
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, base.get("PYTHONPATH")) if p)
    return env


def data_key(cfg) -> tuple:
    """What identifies the data a run loads (runs with one key share one load)."""
    from .runner import task_options

    return (cfg.task, *sorted((k, repr(v)) for k, v in task_options(cfg).items()))


def dispatch_order(plan) -> list:
    """The runs of ``plan`` grouped by their data (:func:`data_key`), in plan order within a
    group and by first appearance between groups: a worker keeps the last task's data, so a
    worker loads each task's data once."""
    first = {}
    for cfg in plan:
        first.setdefault(data_key(cfg), len(first))
    return sorted(plan, key=lambda c: first[data_key(c)])  # sorted() is stable


class _Worker:
    """The driver's handle on one worker process."""

    def __init__(self, index: int, slot, conn: Connection, proc: subprocess.Popen) -> None:
        self.index, self.slot, self.conn, self.proc = index, slot, conn, proc
        self.ready = False
        self.current = None  # the RunConfig of the run it is doing
        self.pid = proc.pid

    @property
    def name(self) -> str:
        return f"pool:{self.index}:{self.pid}"


class WorkerPool:
    """Worker processes for the slots of a :class:`bench.packing.Packing`.

    Parameters
    ----------
    packing : bench.packing.Packing
        The slots (device and threads of each worker) and the ``packing`` labels.
    on_start : callable, optional
        ``on_start(cfg, worker_name)`` in the driver when a run is handed to a worker.
    """

    def __init__(self, packing, on_start=None) -> None:
        self.packing = packing
        self.on_start = on_start
        self.workers: list[_Worker] = []
        self._next_index = 0

    # -- processes ---------------------------------------------------------------------

    def _spawn(self, slot) -> _Worker:
        parent, child = socket.socketpair()
        env = worker_env(slot.device, slot.threads)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.pool", str(child.fileno()), str(os.getpid()), str(slot.threads)],
            env=env,
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child.close()
        conn = Connection(parent.detach())
        w = _Worker(self._next_index, slot, conn, proc)
        self._next_index += 1
        self.workers.append(w)
        return w

    def close(self) -> None:
        """Stop every worker: ask, wait up to ``STOP_TIMEOUT_S``, then kill (idempotent)."""
        for w in self.workers:
            try:
                w.conn.send(("stop",))
            except OSError:
                pass
        for w in self.workers:
            try:
                w.proc.wait(timeout=STOP_TIMEOUT_S if w.current is None else 0.1)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.conn.close()
        self.workers = []

    # -- the sweep ---------------------------------------------------------------------

    def run(self, plan, on_result, *, data_dir, checkpoint_dir=None) -> None:
        """Do every run of ``plan``; ``on_result(cfg, row, history)`` here, once per run.

        Runs are handed out in :func:`dispatch_order`, each to the first idle worker of its
        device kind.  Returns when every run has a result.
        """
        order = dispatch_order(plan)
        queues: dict[str, deque] = {}
        for cfg in order:
            queues.setdefault(str(cfg.device).split(":")[0], deque()).append(cfg)
        remaining = len(order)
        if not remaining:
            return
        kinds_needed = set(queues)
        for slot in self.packing.slots:
            if slot.kind in kinds_needed:
                self._spawn(slot)
        early_deaths: dict[str, int] = {}  # workers of a kind that died before their first run
        dispatched = 0

        def dispatch(w: _Worker) -> None:
            nonlocal dispatched
            q = queues.get(w.slot.kind)
            if not q:
                return
            cfg = q.popleft()
            w.current = cfg
            w.conn.send(("run", dispatched, cfg, data_dir, checkpoint_dir))
            dispatched += 1
            if self.on_start is not None:
                self.on_start(cfg, w.name)

        def record_failed(cfg, what: str, w: _Worker) -> None:
            nonlocal remaining
            on_result(cfg, _failed_row(cfg, what, w, self.packing), [])
            remaining -= 1

        while remaining:
            live = [w for w in self.workers if w.conn is not None]
            if not live:  # the planner gives every device kind of the plan a slot
                raise RuntimeError("bench.pool: runs left but no worker process")
            for conn in wait([w.conn for w in live]):
                w = next(x for x in live if x.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError, pickle.UnpicklingError):
                    msg = None
                if msg is None:  # the worker died: its run (if any) fails, a fresh worker follows
                    code = w.proc.wait()
                    conn.close()
                    w.conn = None
                    self.workers.remove(w)
                    what = f"worker process {w.pid} died (exit status {code})"
                    kind = w.slot.kind
                    if w.current is not None:
                        record_failed(w.current, what, w)
                    elif not w.ready:
                        early_deaths[kind] = early_deaths.get(kind, 0) + 1
                    q = queues.get(kind)
                    if q and early_deaths.get(kind, 0) < 2:
                        self._spawn(w.slot)
                    elif q and not any(x.slot.kind == kind for x in self.workers):
                        while q:  # workers of this kind cannot start: fail its runs rather than loop
                            record_failed(q.popleft(), f"{what} before its first run", w)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    early_deaths.pop(w.slot.kind, None)
                    dispatch(w)
                elif msg[0] == "result":
                    _, _, row, history = msg
                    cfg, w.current = w.current, None
                    row.update(executor="pool", worker=w.name, packing=self.packing.label(str(cfg.device)))
                    on_result(cfg, row, history)
                    remaining -= 1
                    dispatch(w)


def _failed_row(cfg, what: str, w: _Worker, packing) -> dict:
    import dataclasses

    return {
        **dataclasses.asdict(cfg),
        "run_id": cfg.run_id,
        "status": "failed",
        "error": what[:500],
        "executor": "pool",
        "worker": w.name,
        "packing": packing.label(str(cfg.device)),
    }


# ---------------------------------------------------------------------------------------
# The worker process: python -m bench.pool FD PARENT_PID THREADS


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when ``parent`` exits (Linux), and exit now if
    it already has."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def _load_hook():
    spec = os.environ.get("CDBENCH_WORKER_HOOK")
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def worker_main(fd: int, parent: int, threads: int) -> None:
    """The loop of one worker process (see the module docstring)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    conn = Connection(fd)

    import torch

    torch.set_num_threads(threads)  # before any computation: no parallel region has run yet

    from .gate import machine_gate, run_gated
    from .provenance import device_name
    from .runner import run_one

    gate = machine_gate()
    hook = _load_hook()

    def orphaned(done, total, epoch):
        if os.getppid() != parent:
            os._exit(1)

    conn.send(("ready", {"pid": os.getpid(), "threads": torch.get_num_threads()}))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if msg[0] == "stop":
            return
        _, ordinal, cfg, data_dir, checkpoint_dir = msg
        if hook is not None:
            hook(cfg, ordinal)
        row, history = run_gated(
            gate, run_one, cfg, on_step=orphaned, data_dir=data_dir, checkpoint_dir=checkpoint_dir
        )
        row.update(host=socket.gethostname(), device_name=device_name(cfg.device))
        row.setdefault("torch_version", torch.__version__)
        conn.send(("result", ordinal, row, history))


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
