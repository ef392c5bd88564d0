"""Executors: where the runs of a sweep execute.

An executor runs ``bench.runner.run_one`` for each planned configuration and hands
every result to ``on_result(cfg, row, history)`` in the driver process, which alone
writes the result files (so resume and crash safety do not depend on the executor).

* ``auto`` (the default): the runs packed onto the machine by :mod:`bench.packing` (one
  worker process per ``threads`` cores on a CPU, several runs per GPU when their
  measured memory allows) in worker processes of :mod:`bench.pool`; with one worker, as
  ``local``.
* ``local``: one run after another in this process (progress bars over runs and
  within each epoch when stderr is a terminal; one plain line per run and per epoch
  otherwise, so that a log redirected to a file holds no escape codes).
* ``dask``: one Dask task per run on a ``dask.distributed`` cluster, either an existing
  scheduler (``--scheduler ADDRESS``) or a ``LocalCluster`` of ``--workers N``
  single-threaded worker processes started here.  See ``docs/dask.md``.

A run's torch thread count is part of its configuration (``RunConfig.threads``,
``--threads-per-run``, default 1) and :func:`bench.runner.run_one` sets it for the run,
whichever executor runs it: an executor decides only how many runs go side by side, never
with how many threads, so a run's metrics do not depend on how its sweep was scheduled.

Every executor has ``plan(todo, data_dir) -> lines`` (called once before ``run``: how the
runs will be packed and why, printed with the sweep's plan), ``describe()`` (for
``meta.json``), ``run`` and ``close``.  Every run passes the machine's timing gate
(:mod:`bench.gate`) at each training step and measures its throughput holding it
exclusively, whichever executor runs it, so runs of other sweeps on the same machine do
not pollute its timings either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from .errors import UsageError
from .gate import machine_gate, run_gated
from .packing import plan_packing, probe_cuda_memory_in_child, this_machine
from .pool import WorkerPool
from .provenance import device_name
from .runner import RunConfig, run_one

#: seconds to wait for an existing scheduler before ``--scheduler`` counts as wrong
CONNECT_TIMEOUT_S = 5

#: Dask settings of the LocalCluster started by ``--executor dask --workers N`` (see
#: docs/dask.md for workers started by hand): no ``MALLOC_TRIM_THRESHOLD_=65536`` from the
#: nanny (it makes glibc mmap and unmap every large tensor at each step: 1.4-1.9x slower
#: training, docs/perf.md) and no statistical profiler (a thread that samples every
#: worker thread's stack every 10 ms, holding the GIL).
DASK_WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ": {
        "MALLOC_TRIM_THRESHOLD_": None,
        "OMP_NUM_THREADS": 1,
        "MKL_NUM_THREADS": 1,
        "OPENBLAS_NUM_THREADS": 1,
    },
    "distributed.worker.profile.enabled": False,
}


def _label(device: str, runs: int, threads: int) -> str:
    """The ``packing`` column: ``<device kind> <concurrent runs>x<threads>``."""
    return f"{str(device).split(':')[0]} {runs}x{threads}"


def _threads_text(todo, default: int = 1) -> str:
    """``1 torch thread`` / ``2 torch threads`` / ``1, 2 torch threads``: the runs' own counts
    (``default`` when there are no runs)."""
    counts = sorted({c.threads for c in todo}) or [default]
    return f"{', '.join(map(str, counts))} torch thread{'s' * (counts != [1])}"


class LocalExecutor:
    """One run after another in this process, each with its configuration's torch threads."""

    name = "local"

    def __init__(self, why: str | None = None) -> None:
        self._why = why
        self._threads: list[int] = []

    def plan(self, todo, data_dir=None) -> list[str]:
        self._threads = sorted({c.threads for c in todo})
        why = self._why or "--executor local"
        return [f"local: one run at a time in this process, {_threads_text(todo)} per run ({why})"]

    def describe(self) -> dict:
        return {"executor": "local", "threads": self._threads}

    def close(self) -> None:
        pass

    def run(
        self, plan: list[RunConfig], on_result, *, data_dir, checkpoint_dir=None, progress=True, stream=None
    ) -> None:
        """Run ``plan`` one run after another, passing each result to ``on_result``.

        ``progress``: bars (tqdm) on ``stream`` (default ``sys.stderr``) when it is a
        terminal, one-line messages on it otherwise (one when a run starts, one per epoch
        done); nothing when False.  Every run passes the machine's timing gate
        (:mod:`bench.gate`).
        """
        from tqdm.auto import tqdm

        stream = sys.stderr if stream is None else stream
        bars = progress and _is_terminal(stream)
        host = socket.gethostname()
        gate = machine_gate()
        runs = tqdm(plan, desc="runs", unit="run", disable=not bars, position=0, file=stream)
        for k, cfg in enumerate(runs):
            runs.set_postfix_str(f"{cfg.method} {cfg.task}")
            bar = tqdm(
                total=0,
                desc=f"{cfg.method} epoch",
                unit="batch",
                leave=False,
                disable=not bars,
                position=1,
                file=stream,
            )
            what = f"run {k + 1}/{len(plan)} {cfg.run_id} {cfg.method} {cfg.task} seed {cfg.seed}"
            started = time.perf_counter()

            def tick(done, total, epoch, bar=bar, what=what, started=started):
                if bars:
                    if bar.total != total:
                        bar.reset(total=total)
                        bar.set_description(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}")
                    bar.n = done
                    if done == total or done % 20 == 0:
                        bar.refresh()
                elif done == total:
                    print(
                        f"bench: {what}: epoch {epoch + 1}/{cfg.epochs} done "
                        f"({time.perf_counter() - started:.1f} s)",
                        file=stream,
                        flush=True,
                    )

            if progress and not bars:
                print(f"bench: {what} started", file=stream, flush=True)
            row, history = run_gated(
                gate,
                run_one,
                cfg,
                on_step=tick if progress else None,
                data_dir=data_dir,
                checkpoint_dir=checkpoint_dir,
            )
            bar.close()
            row.update(
                executor="local",
                worker="local",
                host=host,
                packing=_label(cfg.device, 1, cfg.threads),
            )
            on_result(cfg, row, history)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_WORKER_GATE = threading.local()  # a worker thread's timing gate, opened by its first run


def _worker_gate():
    """This Dask worker thread's handle on the machine's gate (a handle serves one thread: a
    worker with several threads runs several runs at once)."""
    if not hasattr(_WORKER_GATE, "gate"):
        _WORKER_GATE.gate = machine_gate()
    return _WORKER_GATE.gate


def run_on_worker(
    cfg: RunConfig, data_dir, checkpoint_dir, packing: str | None = None
) -> tuple[dict, list[dict]]:
    """The Dask task of one run: :func:`bench.runner.run_one` (which sets the run's
    ``cfg.threads`` torch threads) through the machine's timing gate (:mod:`bench.gate`).

    Parameters
    ----------
    cfg : RunConfig
        The run.
    data_dir, checkpoint_dir : str or None
        Absolute paths, valid on the worker.
    packing : str, optional
        The ``packing`` column (the driver's view of the cluster).

    Returns
    -------
    row, history
        As ``run_one``, the row with ``executor``, ``worker`` (the worker's address),
        ``host``, ``device_name``, ``torch_version`` (of the worker) and ``packing`` added.
    """
    import torch
    from dask.distributed import get_worker

    row, history = run_gated(_worker_gate(), run_one, cfg, data_dir=data_dir, checkpoint_dir=checkpoint_dir)
    row.update(
        packing=packing,
        executor="dask",
        worker=get_worker().address,
        host=socket.gethostname(),
        device_name=device_name(cfg.device),
        torch_version=torch.__version__,
    )
    return row, history


def _worker_env(name: str) -> str | None:
    """A variable of the Dask worker's environment (``client.run(os.environ.get, ...)`` would
    pickle the driver's ``os.environ`` and read that)."""
    return os.environ.get(name)


def _profiler_on(dask_worker=None) -> bool:
    """Whether this Dask worker runs its statistical profiler (``client.run`` passes the worker)."""
    import dask

    return bool(dask.config.get("distributed.worker.profile.enabled", default=True))


def _failed_row(cfg: RunConfig, exc: BaseException) -> dict:
    """The ``runs.csv`` row of a run whose Dask task failed (as ``run_one`` builds it)."""
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return {
        **dataclasses.asdict(cfg),
        "run_id": cfg.run_id,
        "status": "failed",
        "error": msg[:500],
        "executor": "dask",
    }


def _scheduler_address(scheduler: str) -> str:
    """The address in ``scheduler`` (an address or a scheduler file), checked to answer.

    A Dask handshake within ``CONNECT_TIMEOUT_S`` proves a scheduler listens there;
    probing first keeps a failed ``Client`` (slow, noisy to clean up) from being made.
    """
    import asyncio

    from distributed.comm import connect

    address = json.loads(Path(scheduler).read_text())["address"] if os.path.isfile(scheduler) else scheduler

    async def probe():
        comm = await connect(address, timeout=CONNECT_TIMEOUT_S)
        await comm.close()

    asyncio.run(asyncio.wait_for(probe(), CONNECT_TIMEOUT_S + 1))
    return address


def _absolute(path) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


class DaskExecutor:
    """Run each configuration as one task on a ``dask.distributed`` cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``) or the path of its
        scheduler file.  Exactly one of ``scheduler`` and ``workers`` is given.
    workers : int, optional
        Start a ``LocalCluster`` of this many single-threaded worker processes (with
        :data:`DASK_WORKER_CONFIG`).
    threads : int, optional
        The torch threads of the planned runs (``--threads-per-run``, default 1): the
        ``OMP_NUM_THREADS`` of the workers started here (each run sets its own torch
        threads, ``RunConfig.threads``).

    Raises
    ------
    bench.errors.UsageError
        Neither or both of ``scheduler`` and ``workers``, dask not installed, the
        scheduler unreachable within ``CONNECT_TIMEOUT_S``, or the cluster not starting.

    Notes
    -----
    The driver (this process) collects results as they complete and hands them to
    ``on_result``; workers never write result files.  A run on ``cuda`` asks for the
    worker resource ``GPU=1``, so GPU workers must be started with ``--resources GPU=1``
    (one worker per GPU).  A task whose worker dies is rescheduled by Dask (up to
    ``distributed.scheduler.allowed-failures`` times), a task that raises is retried
    once; after that the run is recorded ``failed``.
    """

    name = "dask"

    def __init__(
        self, scheduler: str | None = None, workers: int | None = None, threads: int | None = None
    ) -> None:
        if (scheduler is None) == (workers is None):
            raise UsageError(
                "--executor dask needs exactly one of --scheduler ADDRESS (an existing "
                "cluster) or --workers N (a LocalCluster started here)"
            )
        try:
            import dask
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise UsageError("--executor dask needs dask.distributed: pip install 'cdbench[dask]'") from None
        self._cluster = None
        self._token = uuid.uuid4().hex[:8]  # keeps the task keys of concurrent sweeps apart
        self.threads = threads or 1
        try:
            if workers is not None:
                config = dict(DASK_WORKER_CONFIG)
                config["distributed.nanny.pre-spawn-environ"] = {
                    k: (self.threads if v == 1 else v)
                    for k, v in DASK_WORKER_CONFIG["distributed.nanny.pre-spawn-environ"].items()
                }
                saved = dict(os.environ)  # the nanny writes its pre-spawn environment into ours
                # and keeps a variable our environment has: the workers' values must be ours
                os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
                os.environ.update(
                    {k: str(v) for k, v in config["distributed.nanny.pre-spawn-environ"].items() if v}
                )
                try:
                    with dask.config.set(config):
                        self._cluster = LocalCluster(
                            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
                        )
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
                self.client = Client(self._cluster, set_as_default=False)
            else:
                address = _scheduler_address(scheduler)
                self.client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except Exception as e:  # noqa: BLE001 - any failure to get a cluster is bad input
            self.close()
            what = f"scheduler {scheduler!r}" if workers is None else f"a LocalCluster of {workers} workers"
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")
            raise UsageError(f"cannot reach {what}: {msg[:300]}") from None
        self.scheduler = self.client.scheduler.address
        self._n_workers = len(self.client.scheduler_info()["workers"])
        self._versions = {"dask_version": dask.__version__}

    def plan(self, todo, data_dir=None) -> list[str]:
        """How the runs go out, and a warning about workers whose settings slow training."""
        how = "a LocalCluster started here" if self._cluster is not None else f"scheduler {self.scheduler}"
        lines = [
            f"dask: one task per run on {how}, {self._n_workers} workers at the start, "
            f"{_threads_text(todo, self.threads)} per run"
        ]
        try:
            trim = self.client.run(_worker_env, "MALLOC_TRIM_THRESHOLD_")
            profiling = self.client.run(_profiler_on)
        except Exception:  # noqa: BLE001 - a worker leaving meanwhile: no warning rather than no sweep
            trim, profiling = {}, {}
        slow = sorted({a for a, v in trim.items() if v} | {a for a, v in profiling.items() if v})
        if slow:
            lines.append(
                f"dask: warning: {len(slow)} worker(s) have MALLOC_TRIM_THRESHOLD_ set or the statistical "
                f"profiler on (Dask's defaults), which slow training (docs/dask.md, 'Worker settings')"
            )
        return lines

    def describe(self) -> dict:
        """What goes into ``meta.json``: scheduler address, workers at start, how started."""
        return {
            "executor": "dask",
            "scheduler": self.scheduler,
            "workers": self._n_workers,
            "local_cluster": self._cluster is not None,
            **self._versions,
        }

    def close(self) -> None:
        """Close the client and the LocalCluster started here (if any); idempotent."""
        # workers that imported torch may take seconds to exit; their nannies then kill them
        # (as wanted) with a warning each that would only alarm
        nanny_log = logging.getLogger("distributed.nanny")
        level = nanny_log.level
        nanny_log.setLevel(logging.ERROR)
        try:
            for obj in (getattr(self, "client", None), self._cluster):
                if obj is not None:
                    try:
                        obj.close()
                    except Exception:  # noqa: BLE001 - closing is best effort
                        pass
        finally:
            nanny_log.setLevel(level)
        self.client = self._cluster = None

    def run(self, plan: list[RunConfig], on_result, *, data_dir, checkpoint_dir=None, progress=True) -> None:
        """Submit every run, then pass each result to ``on_result`` as it completes.

        Parameters
        ----------
        plan : list of RunConfig
            The runs to do.
        on_result : callable
            ``on_result(cfg, row, history)``, called in this process once per run.
        data_dir, checkpoint_dir : path-like or None
            Made absolute here; they must name the same folder on every worker.
        progress : bool
            A progress bar over runs.
        """
        from dask.distributed import as_completed
        from tqdm.auto import tqdm

        if not plan:
            return
        data_dir, checkpoint_dir = _absolute(data_dir), _absolute(checkpoint_dir)
        info = self.client.scheduler_info()["workers"]
        if not info:
            print(
                "bench.ablate: note: the scheduler has no workers yet; runs wait until workers connect",
                file=sys.stderr,
                flush=True,
            )
        elif any(c.device == "cuda" for c in plan) and not any(
            w.get("resources", {}).get("GPU") for w in info.values()
        ):
            print(
                "bench.ablate: note: cuda runs wait for workers started with --resources GPU=1; none "
                "connected now",
                file=sys.stderr,
                flush=True,
            )
        futures, cfg_of = [], {}
        for cfg in plan:
            fut = self.client.submit(
                run_on_worker,
                cfg,
                data_dir,
                checkpoint_dir,
                pure=False,
                retries=1,
                key=f"run-{cfg.run_id}-{self._token}",
                resources={"GPU": 1} if cfg.device == "cuda" else None,
                packing=_label("dask", self._n_workers, cfg.threads),
            )
            futures.append(fut)
            cfg_of[fut.key] = cfg
        bar = tqdm(total=len(plan), desc="runs", unit="run", disable=not progress)
        try:
            for fut in as_completed(futures, loop=self.client.loop):
                cfg = cfg_of[fut.key]
                try:
                    row, history = fut.result()
                except Exception as e:  # noqa: BLE001 - KilledWorker, lost scheduler, ...: this run only
                    row, history = _failed_row(cfg, e), []
                fut.release()
                on_result(cfg, row, history)
                bar.set_postfix_str(f"{cfg.method} {row['status']}")
                bar.update()
        finally:
            bar.close()


class AutoExecutor:
    """The runs packed onto this machine (:mod:`bench.packing`) in worker processes
    (:mod:`bench.pool`); one worker runs in this process, as :class:`LocalExecutor`.

    Parameters
    ----------
    workers, runs_per_gpu
        As :func:`bench.packing.plan_packing` (``--workers``, ``--runs-per-gpu``); the threads
        of each run are its configuration's (``RunConfig.threads``).
    machine : bench.packing.Machine, optional
        The machine's facts (default: :func:`bench.packing.this_machine`, measured in
        :meth:`plan`); tests pass fakes.
    """

    name = "auto"

    def __init__(self, workers=None, runs_per_gpu="auto", machine=None) -> None:
        self.workers, self.runs_per_gpu = workers, runs_per_gpu
        self.machine = machine
        self.packing = None
        self._inner = None  # the LocalExecutor when one worker is planned
        self._lines: list[str] = []

    def plan(self, todo, data_dir=None) -> list[str]:
        """Plan the packing of ``todo`` (measures the machine, and on CUDA the runs' memory)."""
        machine = self.machine or this_machine(
            with_cuda_probe=lambda cfgs: probe_cuda_memory_in_child(cfgs, data_dir)
        )
        try:
            self.packing = plan_packing(
                todo,
                machine,
                workers=self.workers,
                runs_per_gpu=self.runs_per_gpu,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        lines = [f"executor auto: {line}" for line in self.packing.lines]
        slots = self.packing.slots
        if len(slots) == 1 and slots[0].kind == "cpu":
            self._inner = LocalExecutor(why="one worker: in this process")
            self._inner.plan(todo, data_dir)
            lines.append("executor auto: one worker, so the runs go one at a time in this process")
        elif slots:
            lines.append(
                f"executor auto: {len(slots)} worker processes; each run times its throughput "
                f"holding the machine's timing gate, while its neighbours wait at their next step"
            )
        self._lines = lines
        return lines

    def describe(self) -> dict:
        out = {"executor": "auto", "plan": self._lines}
        if self.packing is not None:
            out.update(
                packing=self.packing.labels,
                workers=self.packing.workers,
                slots=[f"{s.device} x{s.threads} threads" for s in self.packing.slots],
                in_process=self._inner is not None,
            )
        return out

    def close(self) -> None:
        pass

    def run(self, plan: list[RunConfig], on_result, *, data_dir, checkpoint_dir=None, progress=True) -> None:
        """Do the runs of ``plan`` (planned first with :meth:`plan`, or here)."""
        if self.packing is None:
            self.plan(plan, data_dir)
        if self._inner is not None:
            return self._inner.run(
                plan, on_result, data_dir=data_dir, checkpoint_dir=checkpoint_dir, progress=progress
            )
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc="runs", unit="run", disable=not (progress and sys.stderr.isatty()))

        def counted(cfg, row, history):
            on_result(cfg, row, history)
            bar.set_postfix_str(f"{cfg.method} {row['status']}")
            bar.update()

        def started(cfg, worker):
            if progress:
                tqdm.write(f"start {cfg.run_id} {cfg.method} on {worker}", file=sys.stdout)

        pool = WorkerPool(self.packing, on_start=started)
        try:
            pool.run(plan, counted, data_dir=_absolute(data_dir), checkpoint_dir=_absolute(checkpoint_dir))
        finally:
            pool.close()
            bar.close()


EXECUTORS = ["auto", "local", "dask"]


def make_executor(
    name: str,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_run: int | None = None,
    runs_per_gpu: int | str = "auto",
):
    """The executor called ``name``; raises ``bench.errors.UsageError`` on a bad combination."""
    if name == "auto":
        return AutoExecutor(workers=workers, runs_per_gpu=runs_per_gpu)
    if name == "local":
        return LocalExecutor()
    if name == "dask":
        return DaskExecutor(scheduler=scheduler, workers=workers, threads=threads_per_run)
    raise UsageError(f"unknown executor {name!r}; allowed: {', '.join(EXECUTORS)}")
