"""Shared fixtures, and the two tiers of the suite.

``pytest`` (``nox -s tests``) runs the fast tier: every test not marked ``slow``
(``@pytest.mark.slow(reason="...")``: the reason says what makes it slow).
``pytest --all`` (``nox -s tests -- --all``, what ``.ci/run`` runs) runs everything;
``-m`` given explicitly (e.g. ``-m slow``) overrides the default selection.
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One torch thread, in this process and in the processes the tests start, unless the caller
# chose (OMP_NUM_THREADS set): the tests' models are tiny, and on a shared 2-core machine a
# second OpenMP thread per process only adds contention (measured: the fast tier took 11 min
# with two threads under a load of 4-5 and about one with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--all",
        action="store_true",
        default=False,
        help="also run the tests marked slow (the full suite, as CI does)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--all") or config.getoption("markexpr"):
        return
    slow = [it for it in items if it.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [it for it in items if not it.get_closest_marker("slow")]


def mnist_root() -> Path:
    """The real MNIST folder: $BENCH_DATA_DIR, else ../shared/data beside the repository."""
    d = Path(os.environ.get("BENCH_DATA_DIR") or ROOT.parent / "shared" / "data")
    return d if d.is_absolute() else (Path.cwd() / d).resolve()


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """The real MNIST (the four IDX files, plain or .gz, under MNIST/raw); skips without it,
    fails under CI (the environment variable CI set), where it must be present."""
    from bench.tasks import MNIST_FILES

    d = mnist_root()
    raw = d / "MNIST" / "raw"
    if not all((raw / f).is_file() or (raw / (f + ".gz")).is_file() for f in MNIST_FILES):
        if os.environ.get("CI"):
            pytest.fail(f"MNIST not found under {raw} (set BENCH_DATA_DIR)")
        pytest.skip(f"MNIST not found under {raw}; set BENCH_DATA_DIR")
    return str(d)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts with the suite's torch thread count, whatever an earlier test (or code
    under test, e.g. an executor applying --threads-per-run) set in this process."""
    import torch

    threads = os.environ["OMP_NUM_THREADS"]
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Decompressed MNIST goes to a per-session writable cache, never next to the input."""
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def f64():
    """float64 as the default dtype for the duration of a test (numerical checks)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
