"""The harness's exception types, in one module that imports nothing else of ``bench``.

Every other module raises and catches these from here, so no module has to import a
command-line module (``bench.ablate``) only to name an error.

* :class:`UsageError` -- bad input (a flag, a config, a combination): the CLI prints one
  line naming the bad value and the allowed ones, exits with status 2 and writes nothing.
* :class:`DataError` -- data that cannot be found or read (one line meant for the user;
  also exit status 2).
* :class:`FolderBusy` -- another sweep holds the output folder's lock (exit status 2).
* :class:`Diverged` -- raised inside a run when its loss turns non-finite or its
  feasibility explodes; the run is recorded ``diverged``, the sweep goes on.
"""

from __future__ import annotations

__all__ = ["DataError", "Diverged", "FolderBusy", "UsageError"]


class UsageError(Exception):
    """Bad input: one line, exit status 2, nothing written."""


class DataError(RuntimeError):
    """Data could not be found or read; the message is one line meant for the user."""


class FolderBusy(RuntimeError):
    """Another sweep holds the output folder's lock."""


class Diverged(Exception):
    """A run's loss turned non-finite or its feasibility exploded.

    Parameters
    ----------
    epoch : int
        The epoch (0-based) in which it was seen.
    """

    def __init__(self, epoch: int) -> None:
        super().__init__(epoch)
        self.epoch = int(epoch)
