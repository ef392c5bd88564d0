"""Crash-safe result files: ``runs.csv`` (one row per run), ``history.csv`` (one row per
run per epoch), guarded by a lock on the output folder.

* Each row is written whole with a single ``write`` on an ``O_APPEND`` descriptor and
  flushed to disk (``fsync``), so a SIGKILL at any moment leaves files that pandas
  reads: at worst the last line is missing, never half written rows in the middle.
* A sweep holds ``<out>/.lock`` (an OS file lock, released even on SIGKILL) while it
  writes; a second sweep on the same folder refuses with a clear message.
* At the start of a sweep the files are compacted (rewritten atomically): a torn last
  line is dropped, duplicate rows of one run_id are dropped (the first is kept), and rows
  written by an older version are brought up to date (:func:`bench.runner.upgrade_row`:
  the method ``lstm`` renamed ``unconstrained``, columns added since filled with the
  default the run used; run_ids unchanged).  Columns this version does not know (added by
  a newer version or another tool) are kept, after ours; rows appended leave them empty.
* A planned run that is redone (not ``ok``, or every planned run with ``--force``) keeps
  its old row and history rows until its new result is recorded: then both files are
  rewritten atomically (history first, then runs.csv) with the old rows replaced.  A
  sweep killed at any moment loses no row it did not replace.
* A ``runs.csv`` or ``history.csv`` without a ``run_id`` column (not written by these
  tools) is refused with one line naming it, before anything is changed.
* Every rewrite goes to a temporary file beside the target, renamed over it; appends open
  the file with ``O_NOFOLLOW`` (:mod:`bench.fsio`): nothing is written through a link.
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
    return _read_table(path)[1]


def _read_table(path: Path) -> tuple[list[str], list[dict]]:
    """(header, complete rows) of a result CSV; ``([], [])`` when it is missing or empty."""
    if not path.is_file():
        return [], []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def _columns(path: Path, header: list[str], ours: list[str]) -> list[str]:
    """Our columns then the file's others, in its order; refuses a file without ``run_id``."""
    if header and "run_id" not in header:
        raise UsageError(
            f"{path}: no run_id column (header {','.join(header[:3])},...): not a result file of "
            "bench.ablate; move it away or choose another --out"
        )
    return ours + [c for c in header if c and c not in ours]


def _rewrite(path: Path, rows: list[dict], columns: list[str]) -> None:
    # beside the file and renamed over it: a link in its place is replaced, never followed
    data = [_line({c: c for c in columns}, columns)]
    for r in rows:  # columns is ours plus every other column of the file: none is dropped
        data.append(_line({k: v for k, v in r.items() if k in columns}, columns))
    write_atomic(path, b"".join(data))


class ResultStore:
    """The result files of one output folder; use as a context manager (holds the lock)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.runs_path = self.out / "runs.csv"
        self.history_path = self.out / "history.csv"
        self._lock = None
        self._run_columns, self._history_columns = RUN_COLUMNS, HISTORY_COLUMNS
        self._replace: set[str] = set()  # planned run_ids whose old rows record() replaces

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
        """Compact the files for a sweep of ``planned_ids``; return the ids already ``ok``.

        Rows of planned runs to be redone are kept until :meth:`record` replaces them.

        Raises
        ------
        UsageError
            ``runs.csv`` or ``history.csv`` has no ``run_id`` column (nothing is changed).
        """
        run_header, runs = _read_table(self.runs_path)
        hist_header, hist = _read_table(self.history_path)
        self._run_columns = _columns(self.runs_path, run_header, RUN_COLUMNS)
        self._history_columns = _columns(self.history_path, hist_header, HISTORY_COLUMNS)
        kept, seen, done = [], set(), set()
        for r in map(upgrade_row, runs):
            rid = r.get("run_id", "")
            if rid in seen:
                continue
            seen.add(rid)
            kept.append(r)
            if r.get("status") == "ok" and not (force and rid in planned_ids):
                done.add(rid)
        self._replace = (seen & set(planned_ids)) - done
        _rewrite(self.runs_path, kept, self._run_columns)
        # history of a planned run without a run row (killed between the two appends) is redone
        hist = [upgrade_row(h) for h in hist if h.get("run_id") in seen or h.get("run_id") not in planned_ids]
        _rewrite(self.history_path, hist, self._history_columns)
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
        """Record one finished run: its history rows first, then its run row.

        A run that already has rows (redone, or ``--force``) has them replaced: both files are
        rewritten atomically, history first; otherwise the rows are appended.

        Raises
        ------
        ValueError
            A key of ``row`` or of a history row that is not a column (nothing is written).
        """
        run_columns, history_columns = self._run_columns, self._history_columns
        _line(row, run_columns)
        for h in history:
            _line(h, history_columns)
        rid = row.get("run_id")
        if rid in self._replace:
            old_hist = [h for h in read_rows(self.history_path) if h.get("run_id") != rid]
            _rewrite(self.history_path, old_hist + history, history_columns)
            runs = read_rows(self.runs_path)
            at = next((i for i, r in enumerate(runs) if r.get("run_id") == rid), len(runs))
            _rewrite(self.runs_path, runs[:at] + [row] + runs[at + 1 :], run_columns)
            self._replace.discard(rid)
            return
        self._append(self.history_path, history, history_columns)
        self._append(self.runs_path, [row], run_columns)
