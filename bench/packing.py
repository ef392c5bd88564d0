"""The packing planner: how many runs of a sweep execute side by side, where, with how
many threads, and why.

A sweep's runs are independent, so a machine is best filled with several of them at once:

* **CPU.**  One worker process per ``k`` physical cores, ``k`` being the runs' torch threads
  (``RunConfig.threads``, ``--threads-per-run``, default 1: one worker per core).  The
  threads are part of each run's configuration, fixed before it is planned: packing decides
  only how many runs go side by side, so a run trains the same arithmetic packed or alone
  (with fewer runs than cores the spare cores stay idle rather than becoming threads, which
  made a resumed sweep's last lone run differ).  Small recurrent models scale better across
  processes than across threads (an OpenMP fork and join around every small kernel, and
  threads that spin waiting for each other when the machine is shared), so one-thread runs
  side by side train more samples per second in total than one run with every thread
  (measured: docs/perf.md).
* **CUDA.**  A run of the notebook's model uses a few hundred MB of a device with tens of
  GB and leaves most of its compute idle, so ``--runs-per-gpu auto`` puts as many runs on
  each device as their *measured* memory allows (:func:`probe_cuda_memory`: peak reserved
  memory of the largest configuration plus the CUDA context), at most one per CPU core
  (a run's host thread launches its kernels), or ``--runs-per-gpu N``.

:func:`plan_packing` is a pure function of the runs and of the machine's facts
(:class:`Machine`), so that the arithmetic is tested with fake machines and fake memory
probes; :func:`this_machine` reads the real facts.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = [
    "CudaMemory",
    "Machine",
    "Packing",
    "Slot",
    "available_memory",
    "physical_cores",
    "plan_packing",
    "probe_cuda_memory",
    "probe_cuda_memory_in_child",
    "process_rss",
    "this_machine",
]

GiB = 2**30


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (Linux: distinct
    ``(package, core)`` pairs of ``sched_getaffinity``; elsewhere the logical CPU count)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if not cpus:
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology"
        try:
            with open(f"{base}/physical_package_id") as f:
                pkg = f.read().strip()
            with open(f"{base}/core_id") as f:
                core = f.read().strip()
        except OSError:
            return len(cpus)
        cores.add((pkg, core))
    return max(1, len(cores))


def available_memory() -> int | None:
    """Bytes of memory available to new processes (``MemAvailable`` of /proc/meminfo), or
    None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_rss() -> int | None:
    """Resident bytes of this process (/proc/self/statm), or None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class CudaMemory:
    """What one CUDA device offers and what one run needs there, in bytes.

    ``per_run`` is ``run_peak + context``: the peak memory the run's allocator reserves
    (measured on the largest configuration) and the CUDA context of a process (measured as
    the device's used memory right after this process made its context: an upper bound,
    since other processes' memory counts too).
    """

    free: int
    total: int
    run_peak: int
    context: int

    @property
    def per_run(self) -> int:
        return self.run_peak + self.context


@dataclass(frozen=True)
class Machine:
    """The facts the planner needs.

    Attributes
    ----------
    cores : int
        Physical cores this process may use.
    memory : int or None
        Bytes available to new processes (None: no memory cap).
    worker_memory : int or None
        Bytes one CPU worker is expected to hold (this process's resident memory after it
        loaded the sweep's data: a worker repeats that).  None: no memory cap.
    gpus : int
        CUDA devices visible.
    cuda_memory : callable, optional
        ``cuda_memory(cfgs) -> [CudaMemory per device]``, called only when runs per GPU
        are chosen automatically (it builds models on a device: :func:`probe_cuda_memory`).
    """

    cores: int
    memory: int | None = None
    worker_memory: int | None = None
    gpus: int = 0
    cuda_memory: Callable[[Sequence], list[CudaMemory]] | None = None


@dataclass(frozen=True)
class Slot:
    """One worker process: the device it runs on (``cpu`` or ``cuda:i``) and its torch threads."""

    device: str
    threads: int

    @property
    def kind(self) -> str:
        return self.device.split(":")[0]


@dataclass
class Packing:
    """How a sweep's runs are packed: the worker slots, one label per device kind (the
    ``packing`` column: ``cpu 2x1`` = 2 concurrent runs x 1 torch thread; ``cuda 3x1`` =
    3 concurrent runs per GPU x 1 thread), and the lines that say how and why."""

    slots: list[Slot]
    labels: dict[str, str]
    lines: list[str] = field(default_factory=list)

    def label(self, device: str) -> str:
        return self.labels[device.split(":")[0]]

    def threads(self, device: str) -> int:
        kind = device.split(":")[0]
        return next(s.threads for s in self.slots if s.kind == kind)

    @property
    def workers(self) -> int:
        return len(self.slots)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else ('es' if word.endswith('s') else 's')}"


def plan_packing(
    cfgs: Sequence,
    machine: Machine,
    *,
    workers: int | None = None,
    runs_per_gpu: int | str = "auto",
) -> Packing:
    """The packing of the runs ``cfgs`` (objects with a ``device`` of ``cpu`` or ``cuda`` and
    ``threads``, their torch threads).

    Parameters
    ----------
    cfgs : sequence of RunConfig
        The runs still to do.
    machine : Machine
        The machine's facts (fakes in tests).
    workers : int, optional
        CPU worker processes, overriding the count from the cores (``--workers``).
    runs_per_gpu : int or "auto"
        Concurrent runs per CUDA device; ``auto`` from the measured memory.

    Returns
    -------
    Packing

    Raises
    ------
    ValueError
        CUDA runs but no visible CUDA device, or a non-positive count.

    Notes
    -----
    A slot's threads are the most threads any run of its device kind has (one value for every
    run of a ``bench.ablate`` sweep: ``--threads-per-run``); each run sets its own
    (:func:`bench.runner.run_one`), so the slots only size the worker count and
    ``OMP_NUM_THREADS``.
    """
    threads: dict[str, int] = {}
    bad = [workers] if workers is not None and workers < 1 else []
    for c in cfgs:
        kind, k = str(c.device).split(":")[0], int(getattr(c, "threads", 1))
        threads[kind] = max(threads.get(kind, k), k)
        bad += [k] if k < 1 else []
    if bad:
        raise ValueError(f"threads and workers must be positive integers; got {bad[0]}")
    if runs_per_gpu != "auto" and (not isinstance(runs_per_gpu, int) or runs_per_gpu < 1):
        raise ValueError(f"runs_per_gpu must be 'auto' or a positive integer; got {runs_per_gpu!r}")
    kinds = Counter(str(c.device).split(":")[0] for c in cfgs)
    slots: list[Slot] = []
    labels: dict[str, str] = {}
    lines: list[str] = []
    cores = max(1, machine.cores)
    gpu_slots = 0

    n_cuda = kinds.get("cuda", 0)
    if n_cuda:
        if machine.gpus < 1:
            raise ValueError("cuda runs planned but no CUDA device is visible")
        per_gpu_needed = -(-n_cuda // machine.gpus)  # ceil: no more slots than runs
        cores_per_gpu = max(1, cores // machine.gpus)
        if runs_per_gpu == "auto":
            mems = machine.cuda_memory([c for c in cfgs if str(c.device).startswith("cuda")])
            fit = min(m.free // max(1, m.per_run) for m in mems)
            r = max(1, min(fit, cores_per_gpu, per_gpu_needed))
            tight = min(mems, key=lambda m: m.free)
            why = (
                f"a run needs {tight.per_run / GiB:.2f} GiB measured (peak reserved "
                f"{tight.run_peak / GiB:.2f} GiB + CUDA context {tight.context / GiB:.2f} GiB) and the "
                f"fullest GPU has {tight.free / GiB:.1f} GiB free: room for {fit}"
            )
            caps = []
            if cores_per_gpu < fit:
                caps.append(f"at most {cores_per_gpu} per GPU: one CPU core drives each run")
            if per_gpu_needed < min(fit, cores_per_gpu):
                caps.append(f"{n_cuda} cuda runs need no more")
            if fit < 1:
                caps.append("less than one run fits: one per GPU anyway (it may run out of memory)")
            why += "".join(f"; {c}" for c in caps)
        else:
            r = runs_per_gpu
            why = f"--runs-per-gpu {runs_per_gpu}"
        kc = threads["cuda"]
        for g in range(machine.gpus):
            slots += [Slot(f"cuda:{g}", kc)] * r
        gpu_slots = r * machine.gpus
        labels["cuda"] = f"cuda {r}x{kc}"
        lines.append(
            f"cuda: {_plural(r, 'run')} per GPU x {_plural(machine.gpus, 'GPU')}, "
            f"{_plural(kc, 'torch thread')} each ({why})"
        )

    n_cpu = kinds.get("cpu", 0)
    if n_cpu:
        cpu_cores = max(1, cores - gpu_slots)
        free_note = f"{cpu_cores} of {cores} physical cores" if gpu_slots else f"{cores} physical cores"
        if gpu_slots and cores - gpu_slots < 1:
            free_note = f"{cores} physical cores, all driving GPU runs: oversubscribed"
        k = threads["cpu"]
        if workers is not None:
            n = min(workers, n_cpu)
            why = f"--workers {workers}"
        elif k > 1:
            n = max(1, min(cpu_cores // k, n_cpu))
            why = f"{free_note} / --threads-per-run {k}"
        else:
            n = min(cpu_cores, n_cpu)
            why = (
                f"{free_note}: one single-threaded run per core, which trains more samples per second "
                f"in total than one run with every thread (docs/perf.md)"
            )
            if n_cpu < cpu_cores:
                why += f"; only {_plural(n_cpu, 'run')} to do (the threads are the runs' configuration)"
        if machine.memory is not None and machine.worker_memory and workers is None:
            fit = max(1, machine.memory // machine.worker_memory)
            if fit < n:
                why += (
                    f"; capped at {fit} by memory ({machine.memory / GiB:.1f} GiB available, "
                    f"{machine.worker_memory / GiB:.2f} GiB per worker measured)"
                )
                n = fit
        slots += [Slot("cpu", k)] * n
        labels["cpu"] = f"cpu {n}x{k}"
        lines.append(
            f"cpu: {_plural(n, 'worker process')} x {_plural(k, 'torch thread')}, "
            f"{_plural(n_cpu, 'run')} ({why})"
        )
    if runs_per_gpu != "auto" and not n_cuda:
        lines.append(f"--runs-per-gpu {runs_per_gpu} ignored: no cuda runs to do")
    return Packing(slots, labels, lines)


def this_machine(*, with_cuda_probe: Callable | None = None) -> Machine:
    """The real facts of this machine (``with_cuda_probe``: the CUDA memory probe to use)."""
    import torch

    return Machine(
        cores=physical_cores(),
        memory=available_memory(),
        worker_memory=process_rss(),
        gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        cuda_memory=with_cuda_probe,
    )


def probe_cuda_memory(cfgs: Sequence, data_dir, *, eval_batch: int = 1000) -> list[CudaMemory]:
    """Measure what one run of ``cfgs`` needs on each visible CUDA device.

    For every distinct model shape among ``cfgs`` (the configuration with the seed, the
    penalty and the epochs set aside), a fresh model is built on ``cuda:0``, two training
    steps and one no-grad forward of ``eval_batch`` test sequences (the batch of
    :func:`bench.runner.evaluate`) are run, and ``torch.cuda.max_memory_reserved`` is read;
    the largest is the run's peak.  The CUDA context is the device's used memory right
    after this process made its context (``torch.cuda.mem_get_info``), before any tensor:
    an upper bound when other processes use the device too.  Run it in a child process
    (:func:`probe_cuda_memory_in_child`), so that the sweep's driver holds no CUDA context:
    the free memory it reports is then a lower bound of what the workers find.

    Returns
    -------
    list of CudaMemory
        One per visible device (the run peak and context measured on device 0).

    Notes
    -----
    Not exercised on a GPU where this was written (no GPU was lent); the planner's
    arithmetic is tested with fake probes.
    """
    import dataclasses

    import torch

    from .runner import get_task, start_training

    free0, total0 = torch.cuda.mem_get_info(0)
    context = total0 - free0
    peak = 0
    seen = set()
    for cfg in cfgs:
        key = dataclasses.replace(cfg, seed=0, penalty_param=None, epochs=1, device="cuda:0")
        if key in seen:
            continue
        seen.add(key)
        task = get_task(cfg, data_dir)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(0)
        tr = start_training(dataclasses.replace(cfg, device="cuda:0"), task)
        gen = torch.Generator().manual_seed(0)
        for _, (x, y) in zip(range(2), task.train_batches(cfg.batch_size, gen)):
            x, y = x.to("cuda:0"), y.to("cuda:0")
            loss = task.loss(tr.model(x), y)
            if tr.built.penalty is not None:
                loss = loss + tr.built.penalty()
            tr.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            tr.optimizer.step()
        with torch.no_grad():
            x, _ = next(task.test_batches(eval_batch))
            tr.model.eval()
            tr.model(x.to("cuda:0"))
        torch.cuda.synchronize(0)
        peak = max(peak, torch.cuda.max_memory_reserved(0))
        del tr
    torch.cuda.empty_cache()
    out = []
    for d in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(d)
        out.append(CudaMemory(free=free, total=total, run_peak=peak, context=context))
    return out


def probe_cuda_memory_in_child(cfgs: Sequence, data_dir) -> list[CudaMemory]:
    """:func:`probe_cuda_memory` in a fresh (spawned) process, which exits afterwards."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(probe_cuda_memory, list(cfgs), data_dir).result()
