"""Fixtures of the micro-benchmarks in this folder (run them with ``python -m bench.perf``).

Running ``pytest benchmarks`` directly also works: the project's pytest ``addopts`` carry
``--benchmark-disable``, so each step then runs once as a smoke test; add
``-o addopts= --benchmark-enable`` to time them (the full default grid unless
``$CDBENCH_PERF_PLAN`` names a plan file written by ``bench.perf``).
"""

import gc

import pytest
import torch

from bench.perf import plan


@pytest.fixture
def task_for():
    """``task_for(batch)``: the synthetic notebook-shaped task with ``batch`` sequences."""
    return plan.shape28_task


@pytest.fixture(autouse=True)
def _release_memory():
    """Free the previous benchmark's model before the next one is built."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
