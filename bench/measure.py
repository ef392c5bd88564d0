"""Timing and memory measurement shared by the harness and ``nox -s perf``.

Rules: warm-up iterations are run and discarded; the device is synchronised before
every clock read (CUDA kernels are asynchronous); the clock is ``time.perf_counter``.
Both the clock and the synchronisation are injectable, so the rules are testable
without depending on the machine's speed.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for all queued work on ``device`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Timing:
    seconds_per_iter: float
    iters: int
    warmup: int

    @property
    def per_s(self) -> float:
        return 1.0 / self.seconds_per_iter if self.seconds_per_iter > 0 else float("inf")


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    iters: int = 10,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Mean seconds per call of ``fn`` over ``iters`` calls after ``warmup`` discarded calls.

    ``sync`` is called after the warm-up and after the last timed call, before each
    clock read.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0; got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    sync()
    t0 = clock()
    for _ in range(iters):
        fn()
    sync()
    return Timing((clock() - t0) / iters, iters, warmup)


def reset_peak_memory(device: torch.device | str) -> None:
    """Reset the peak-memory counter: CUDA allocator peak, or the process's peak RSS on Linux."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets VmHWM (peak RSS) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory in MiB since the last reset: CUDA allocator peak on GPU, peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: aten operators that launch no kernel and are never counted by :func:`count_kernel_ops`, besides
#: every view (``OpOverload.is_view``: its output aliases its input, e.g. ``view``, ``t``,
#: ``transpose``, ``as_strided``, ``unbind``, ``detach``): allocation without initialisation,
#: metadata-only operators (``_unsafe_view`` is a view that its schema does not declare) and the
#: profiler's markers (``torch.optim`` optimisers enter one per step)
NON_KERNEL_OPS = frozenset(
    {
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::set_",
        "aten::lift_fresh",
        "aten::_unsafe_view",
        "aten::resize_",
        "aten::_has_compatible_shallow_copy_type",
        "aten::is_same_size",
        "aten::sym_size",
        "aten::sym_stride",
        "aten::sym_numel",
        "aten::sym_storage_offset",
        "profiler::_record_function_enter_new",
        "profiler::_record_function_exit",
    }
)


def is_kernel_op(func) -> bool:
    """True for an aten operator that :func:`count_kernel_ops` counts: not a view and not in
    :data:`NON_KERNEL_OPS`."""
    return not func.is_view and func._schema.name not in NON_KERNEL_OPS


def count_kernel_ops(fn: Callable[[], object]):
    """The kernel-launching aten operators that one call of ``fn`` dispatches, by name.

    Counted with a :class:`torch.utils._python_dispatch.TorchDispatchMode`: what reaches the
    dispatcher below autograd (composite operators decomposed, an autograd backward's
    operators included, a multi-tensor ``_foreach_*`` operator counted once), minus
    :func:`is_kernel_op`'s exclusions.  On a CPU each counted operator is a kernel call, on
    CUDA about one launch.  Deterministic: the same code path counts the same every call.

    Returns
    -------
    collections.Counter
        ``{"aten::addmm": 12, ...}``; ``sum(...values())`` is the total.
    """
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if is_kernel_op(func):
                counts[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return counts


def kernel_op_count(fn: Callable[[], object], warmup: int = 1) -> int:
    """Total kernel-launching operators of one call of ``fn`` after ``warmup`` uncounted calls
    (lazy initialisation, caches): ``sum(count_kernel_ops(fn).values())``.  What ``bench.perf``
    reports beside the times (``kernel_ops``) and the tests hold the methods to."""
    for _ in range(warmup):
        fn()
    return sum(count_kernel_ops(fn).values())
