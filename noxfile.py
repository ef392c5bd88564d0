"""nox sessions.

* ``nox -s tests``: the fast tier of the test suite (every test not marked slow; under 2
  minutes on a 2-core CPU), with the 15 slowest durations; ``nox -s tests -- --all`` runs
  everything (what CI runs).
* ``nox -s tests_oldest``: the tests of the ``cdcore`` library on the lowest torch the
  project claims (``OLDEST``).
* ``nox -s lint``: ``ruff check`` and ``ruff format --check`` on the whole tree.
* ``nox -s bench``: the main sweep.  ``nox -s perf``: the micro-benchmarks.
* ``nox -s packbench``: the wall time of a sweep packed (``--executor auto``) and one at a
  time (``--executor local``), measured in one sitting.

Each session makes its own virtualenv and installs this project into it.
"""

import re
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

#: ruff pinned, so that CI formats exactly as the developers' environment does
RUFF = "ruff==0.17.6"
#: the lowest torch / torchvision pair pyproject.toml admits
OLDEST = ["torch==2.11.*", "torchvision==0.26.*"]


def cdcore_tests() -> list[str]:
    """The test modules of the library alone (README examples included): those whose source
    never names the harness ``bench``."""
    names_bench = re.compile(r"\bbench\b")
    return sorted(str(p) for p in Path("tests").glob("test_*.py") if not names_bench.search(p.read_text()))


@nox.session
def tests(session):
    """The fast tier (real MNIST from $BENCH_DATA_DIR, e.g. ../shared/data); `-- --all`: everything."""
    session.install("-e", ".[test]")
    session.run("pytest", "--durations=15", *session.posargs)


@nox.session
def tests_oldest(session):
    """The cdcore tests (fast and slow) on the lowest supported torch."""
    session.install("-e", ".[test]", *OLDEST)
    session.run(
        "python",
        "-c",
        "import torch, torchvision; print('torch', torch.__version__, 'torchvision', "
        "torchvision.__version__)",
    )
    session.run("pytest", "--all", "--durations=5", *cdcore_tests(), *session.posargs)


@nox.session
def lint(session):
    """ruff: lint rules and formatting of the whole tree (configuration in pyproject.toml)."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session):
    """The default sweep: every method, penalty_param 0.1 0.5 1.0, `paper` profile on
    CUDA, `quick` otherwise.  Arguments after `--` pass through to bench.ablate."""
    session.install("-e", ".[ref]")
    session.run(
        "python",
        "-m",
        "bench.ablate",
        "--profile",
        "auto",
        "--penalty",
        "0.1",
        "0.5",
        "1.0",
        *session.posargs,
    )


@nox.session
def perf(session):
    """Micro-benchmarks of one train step and one eval forward per method; writes results/perf/."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "bench.perf", *session.posargs)


@nox.session
def packbench(session):
    """A sweep packed and one at a time in one sitting: the ratio of wall times
    (bench.packbench; writes results/packbench/).  Arguments after `--` pass through."""
    session.install("-e", ".[ref]")
    session.run("python", "-m", "bench.packbench", *session.posargs)
