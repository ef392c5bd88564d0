"""Micro-benchmarks of one train step and one eval forward per method (``nox -s perf``,
``python -m bench.perf``).

* :mod:`bench.perf.paired` -- the paired (interleaved) timer and its ratios: the
  throughput authority; generic, reusable outside the CLI.
* :mod:`bench.perf.plan` -- the grid at the notebook's shape, each benchmark's rounds and
  its cost estimate from a measured warm-up step.
* :mod:`bench.perf.run` -- the pytest-benchmark driver and interleaved timing of methods.
* :mod:`bench.perf.report` -- pytest-benchmark JSON to ``table.csv``/``table.md`` and plots.
* :mod:`bench.perf.cli` -- the command line (``python -m bench.perf``).

This package imports none of its modules here, so that ``bench.perf.paired`` can be
imported (e.g. by the trainer) without the rest.
"""
