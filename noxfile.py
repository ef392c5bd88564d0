"""nox sessions: ``nox -s tests`` (the test suite), ``nox -s bench`` (the main sweep),
``nox -s perf`` (pytest-benchmark micro-benchmarks).  Each session makes its own
virtualenv and installs this project into it."""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session):
    """Run the test suite (real MNIST from $BENCH_DATA_DIR, e.g. ../shared/data)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def bench(session):
    """The default sweep: every method, penalty_param 0.1 0.5 1.0, `paper` profile on
    CUDA, `quick` otherwise.  Arguments after `--` pass through to bench.ablate."""
    session.install("-e", ".[ref]")
    session.run("python", "-m", "bench.ablate", "--profile", "auto", "--penalty", "0.1", "0.5", "1.0",
                *session.posargs)


@nox.session
def perf(session):
    """Micro-benchmarks of one train step and one eval forward per method; writes results/perf/."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "bench.perf", *session.posargs)
