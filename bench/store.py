"""Crash-safe result files: ``runs.csv`` (one row per run), ``history.csv`` (one row per
run per epoch), guarded by a lock on the output folder.

* Each row is written whole with a single ``write`` on an ``O_APPEND`` descriptor and
  flushed to disk (``fsync``), so a SIGKILL at any moment leaves files that pandas
  reads: at worst the last line is missing, never half written rows in the middle.
* A sweep holds ``<out>/.lock`` (an OS file lock, released even on SIGKILL) while it
  writes; a second sweep on the same folder refuses with a clear message.
* At the start of a sweep the files are compacted (rewritten atomically): a torn last
  line is dropped, rows of planned runs that are not ``ok`` (or all planned rows, with
  ``--force``) are removed so that they are redone, never duplicated, and rows written by
  an older version are brought up to date (:func:`bench.runner.upgrade_row`: the method
  ``lstm`` renamed ``unconstrained``, columns added since filled with the default the run
  used; run_ids unchanged).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .errors import FolderBusy, UsageError
from .fsio import check_folder, open_append, write_atomic
from .runner import HISTORY_COLUMNS, RUN_COLUMNS, upgrade_row

__all__ = ["HISTORY_COLUMNS", "RUN_COLUMNS", "FolderBusy", "ResultStore", "read_rows"]


def _line(values: dict, columns: list[str]) -> bytes:
    unknown = [k for k in values if k not in columns]
    if unknown:  # a key without a column would be dropped silently: refuse it (a bug in the caller)
        raise ValueError(
            f"no column for {', '.join(map(repr, unknown))}; add it to bench.runner's column lists"
        )
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(
        ["" if values.get(c) is None else values.get(c) for c in columns]
    )
    return buf.getvalue().encode()


def read_rows(path: Path) -> list[dict]:
    """Complete rows of a CSV written by this module (a torn last line is ignored)."""
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def _rewrite(path: Path, rows: list[dict], columns: list[str]) -> None:
    # beside the file and renamed over it: a link in its place is replaced, never followed
    data = [_line({c: c for c in columns}, columns)]
    for r in rows:  # rows read back from the file: columns of an older version are dropped
        data.append(_line({k: v for k, v in r.items() if k in columns}, columns))
    write_atomic(path, b"".join(data))


class ResultStore:
    """The result files of one output folder; use as a context manager (holds the lock)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.runs_path = self.out / "runs.csv"
        self.history_path = self.out / "history.csv"
        self._lock = None

    def __enter__(self) -> "ResultStore":
        from filelock import FileLock, Timeout

        check_folder(self.out, f"--out {self.out}")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.out / ".lock"), timeout=0)
            self._lock.acquire()
        except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
            raise FolderBusy(
                f"another sweep is writing to {self.out} (lock {self.out / '.lock'}); wait for it to finish "
                f"or choose another --out"
            ) from None
        except OSError as e:  # a file in the way, a read-only or unwritable folder
            self._lock = None
            raise UsageError(
                f"--out {self.out}: cannot create or write to this folder ({e.strerror or e}); "
                f"choose another --out"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()

    def prepare(self, planned_ids: set[str], force: bool = False) -> set[str]:
        """Compact the files for a sweep of ``planned_ids``; return the ids already ``ok``."""
        runs = [upgrade_row(r) for r in read_rows(self.runs_path)]
        kept, seen, done = [], set(), set()
        for r in runs:
            rid = r.get("run_id", "")
            if rid in seen:
                continue
            if rid in planned_ids and (force or r.get("status") != "ok"):
                continue
            seen.add(rid)
            kept.append(r)
            if r.get("status") == "ok":
                done.add(rid)
        kept_ids = {r["run_id"] for r in kept}
        history = [
            upgrade_row(h)
            for h in read_rows(self.history_path)
            if h.get("run_id") in kept_ids or h.get("run_id") not in planned_ids
        ]
        _rewrite(self.runs_path, kept, RUN_COLUMNS)
        _rewrite(self.history_path, history, HISTORY_COLUMNS)
        return done

    def _append(self, path: Path, rows: list[dict], columns: list[str]) -> None:
        if not rows:
            return
        data = b"".join(_line(r, columns) for r in rows)  # before opening: a bad key writes nothing
        fd = open_append(path)  # O_NOFOLLOW: a linked CSV is refused, never followed
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def record(self, row: dict, history: list[dict]) -> None:
        """Append one finished run: its history rows first, then its run row.

        Raises
        ------
        ValueError
            A key of ``row`` or of a history row that is not a column (nothing is written).
        """
        _line(row, RUN_COLUMNS)
        self._append(self.history_path, history, HISTORY_COLUMNS)
        self._append(self.runs_path, [row], RUN_COLUMNS)
