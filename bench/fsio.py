"""Writing the files of a results folder without ever writing through a link.

A results folder can come from someone else (git keeps symbolic links), so a file in it
may be a link to a file outside.  The tools therefore never open a result file for
writing by its name:

* :func:`write_atomic`: the new content goes to a temporary file created beside the target
  (``O_CREAT | O_EXCL``: never an existing file, never through a link), is flushed to disk
  and renamed over the target (:func:`os.replace` replaces a link itself, never what it
  points to).  A reader sees the old file or the new one, never half of one.
* :func:`open_append`: the row-by-row appends of ``runs.csv`` / ``history.csv`` open the
  file with ``O_NOFOLLOW``: a link there is refused, not followed.
* :func:`check_folder`: the folder itself may not be a link (the command names the real
  folder, or it is refused), nor may a sub-folder the tools write into.

Every refusal is a :class:`bench.errors.UsageError` naming the file (one line, exit 2).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .errors import UsageError

__all__ = ["check_folder", "open_append", "save_figure", "write_atomic", "write_csv"]


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` by a regular file holding ``data``, atomically.

    Parameters
    ----------
    path : path-like
        The target; when it is a symbolic link, the link is replaced (its target is left
        alone).
    data : bytes or str
        The whole new content (``str`` is encoded as UTF-8).

    Raises
    ------
    UsageError
        The target cannot be replaced (a folder in its place, an unwritable folder): one
        line naming it; the old file, if any, is unchanged.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_append(path: str | os.PathLike) -> int:
    """A descriptor appending to the regular file ``path`` (created if missing).

    Raises
    ------
    UsageError
        ``path`` is a symbolic link or not a regular file: it is not followed.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise UsageError(f"cannot append to {path}: {_why(path, e)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"cannot append to {path}: not a regular file")
    return fd


def _why(path, e: OSError) -> str:
    return "a symbolic link (never followed)" if os.path.islink(path) else (e.strerror or str(e))


def check_folder(folder: str | os.PathLike, what: str, subfolders=()) -> Path:
    """Refuse a results folder that is itself a symbolic link, or whose ``subfolders`` (those
    the tools write into) are links or not folders.

    Parameters
    ----------
    folder : path-like
        The folder (it may not exist yet).
    what : str
        How the command names it in the message (``"--out results/x"``).
    subfolders : iterable of str
        Names inside ``folder`` that must be real folders when they exist.

    Returns
    -------
    Path
        ``folder``.

    Raises
    ------
    UsageError
        One line naming the link and where it points.
    """
    folder = Path(folder)
    if folder.is_symlink():
        raise UsageError(
            f"{what}: the folder is a symbolic link (to {os.readlink(folder)}); results are written "
            f"only into a real folder: name its target, or choose another folder"
        )
    for name in subfolders:
        sub = folder / name
        if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
            kind = f"a symbolic link (to {os.readlink(sub)})" if sub.is_symlink() else "not a folder"
            raise UsageError(f"{what}: {sub} is {kind}; remove it or choose another folder")
    return folder


def write_csv(frame, path: str | os.PathLike) -> None:
    """Write a pandas ``frame`` (no index) to ``path`` through :func:`write_atomic`."""
    write_atomic(path, frame.to_csv(index=False))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """Render a matplotlib ``fig`` (format from the suffix) and :func:`write_atomic` it to ``path``."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    write_atomic(path, buf.getvalue())
