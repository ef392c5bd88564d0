"""Executors: where the runs of a sweep execute.

An executor runs ``bench.runner.run_one`` for each planned configuration and hands
every result to ``on_result(cfg, row, history)`` in the driver process, which alone
writes the result files (so resume and crash safety do not depend on the executor).

* ``local``: one run after another in this process (progress bars over runs and
  within each epoch).
"""

from __future__ import annotations

import socket

from .runner import RunConfig, run_one


class LocalExecutor:
    name = "local"

    def describe(self) -> dict:
        return {"executor": "local"}

    def close(self) -> None:
        pass

    def run(self, plan: list[RunConfig], on_result, *, data_dir, checkpoint_dir=None, progress=True) -> None:
        from tqdm.auto import tqdm

        host = socket.gethostname()
        runs = tqdm(plan, desc="runs", unit="run", disable=not progress, position=0)
        for cfg in runs:
            runs.set_postfix_str(f"{cfg.method} {cfg.task}")
            bar = tqdm(total=0, desc=f"{cfg.method} epoch", unit="batch", leave=False, disable=not progress,
                       position=1)

            def tick(done, total, epoch, bar=bar):
                if bar.total != total:
                    bar.reset(total=total)
                    bar.set_description(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}")
                bar.n = done
                if done == total or done % 20 == 0:
                    bar.refresh()

            row, history = run_one(cfg, data_dir=data_dir, checkpoint_dir=checkpoint_dir,
                                   progress=tick if progress else None)
            bar.close()
            row.update(executor="local", worker="local", host=host)
            on_result(cfg, row, history)


def make_executor(name: str, scheduler: str | None = None, workers: int | None = None):
    """The executor called ``name``; raises ``bench.ablate.UsageError`` on a bad combination."""
    if name == "local":
        return LocalExecutor()
    from .ablate import UsageError

    raise UsageError(f"unknown executor {name!r}; allowed: local")

