"""Executors: where the runs of a sweep execute.

An executor runs ``bench.runner.run_one`` for each planned configuration and hands
every result to ``on_result(cfg, row, history)`` in the driver process, which alone
writes the result files (so resume and crash safety do not depend on the executor).

* ``local``: one run after another in this process (progress bars over runs and
  within each epoch when stderr is a terminal; one plain line per run and per epoch
  otherwise, so that a log redirected to a file holds no escape codes).
* ``dask``: one Dask task per run on a ``dask.distributed`` cluster, either an existing
  scheduler (``--scheduler ADDRESS``) or a ``LocalCluster`` of ``--workers N``
  single-threaded worker processes started here.  See ``docs/dask.md``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from .errors import UsageError
from .provenance import device_name
from .runner import RunConfig, run_one

#: seconds to wait for an existing scheduler before ``--scheduler`` counts as wrong
CONNECT_TIMEOUT_S = 5


class LocalExecutor:
    name = "local"

    def describe(self) -> dict:
        return {"executor": "local"}

    def close(self) -> None:
        pass

    def run(
        self, plan: list[RunConfig], on_result, *, data_dir, checkpoint_dir=None, progress=True, stream=None
    ) -> None:
        """Run ``plan`` one run after another, passing each result to ``on_result``.

        ``progress``: bars (tqdm) on ``stream`` (default ``sys.stderr``) when it is a
        terminal, one-line messages on it otherwise (one when a run starts, one per epoch
        done); nothing when False.
        """
        from tqdm.auto import tqdm

        stream = sys.stderr if stream is None else stream
        bars = progress and _is_terminal(stream)
        host = socket.gethostname()
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
            row, history = run_one(
                cfg, data_dir=data_dir, checkpoint_dir=checkpoint_dir, progress=tick if progress else None
            )
            bar.close()
            row.update(executor="local", worker="local", host=host)
            on_result(cfg, row, history)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run_on_worker(cfg: RunConfig, data_dir, checkpoint_dir) -> tuple[dict, list[dict]]:
    """The Dask task of one run: :func:`bench.runner.run_one` with one torch thread.

    Parameters
    ----------
    cfg : RunConfig
        The run.
    data_dir, checkpoint_dir : str or None
        Absolute paths, valid on the worker.

    Returns
    -------
    row, history
        As ``run_one``, the row with ``executor``, ``worker`` (the worker's address),
        ``host``, ``device_name`` and ``torch_version`` (of the worker) added.
    """
    import torch
    from dask.distributed import get_worker

    torch.set_num_threads(1)  # one run per worker thread: N workers use N cores, not N x cores
    row, history = run_one(cfg, data_dir=data_dir, checkpoint_dir=checkpoint_dir)
    row.update(
        executor="dask",
        worker=get_worker().address,
        host=socket.gethostname(),
        device_name=device_name(cfg.device),
        torch_version=torch.__version__,
    )
    return row, history


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
        Start a ``LocalCluster`` of this many single-threaded worker processes.

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

    def __init__(self, scheduler: str | None = None, workers: int | None = None) -> None:
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
        try:
            if workers is not None:
                self._cluster = LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
                )
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


def make_executor(name: str, scheduler: str | None = None, workers: int | None = None):
    """The executor called ``name``; raises ``bench.errors.UsageError`` on a bad combination."""
    if name == "local":
        return LocalExecutor()
    if name == "dask":
        return DaskExecutor(scheduler=scheduler, workers=workers)
    raise UsageError(f"unknown executor {name!r}; allowed: local, dask")
