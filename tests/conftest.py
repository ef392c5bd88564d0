import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """The real MNIST (env BENCH_DATA_DIR, else ../shared/data); CI must have it."""
    d = Path(os.environ.get("BENCH_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not d.is_absolute():
        d = (Path.cwd() / d).resolve()
    raw = d / "MNIST" / "raw"
    if not raw.is_dir() or not any(raw.iterdir()):
        if os.environ.get("CI"):
            pytest.fail(f"MNIST not found under {d} (set BENCH_DATA_DIR)")
        pytest.skip(f"MNIST not found under {d}")
    return str(d)


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
