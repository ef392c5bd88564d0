"""Where and with what a result was produced: git commit, CPU and GPU names, library
versions, and the sweep's ``meta.json``.

Used by the sweep driver (``bench.ablate``), the executors (the worker's CPU name) and
``bench.perf`` (``command.txt``); it imports nothing of ``bench`` but :mod:`bench.measure`.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import socket
import subprocess
from pathlib import Path

import torch

from .errors import UsageError
from .fsio import write_atomic
from .measure import cpu_count

__all__ = [
    "cpu_name",
    "device_name",
    "environment",
    "environment_lines",
    "git_commit",
    "utc_now",
    "write_meta",
]

_REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """HEAD of the source checkout this package runs from, with ``-dirty`` when tracked
    files differ from it; ``"unknown"`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The name of ``device`` (``"cpu"``: the CPU model; ``"cuda"``: the first GPU's name)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def utc_now() -> str:
    """The current time in UTC, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment(devices) -> dict:
    """Versions and hardware for ``meta.json``: torch, CUDA, cuDNN, device names, CPU
    count, torch threads, Python, platform, host."""
    cuda = torch.cuda.is_available()
    return {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "device_names": {d: device_name(d) for d in devices},
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
    }


def environment_lines(devices) -> list[str]:
    """The same facts as text lines (``bench.perf``'s ``command.txt``), with the date."""
    env = environment(devices)
    lines = [
        f"torch: {env['torch_version']}",
        f"python: {env['python']}",
        f"cpu: {cpu_name()}",
        f"cpu count: {env['cpu_count']}",
        f"torch threads: {env['torch_threads']}",
    ]
    for d, name in env["device_names"].items():
        if torch.device(d).type == "cuda":
            lines.append(f"cuda device: {name} (CUDA {env['cuda_version']})")
    lines.append(f"date: {utc_now()}")
    return lines


def read_meta(out: Path) -> dict:
    """The ``<out>/meta.json`` of a results folder; ``{}`` when there is none.

    Raises
    ------
    UsageError
        The file is not ours: unparseable JSON, not an object, or ``command`` not a string /
        ``invocations`` not a list of objects (one line naming the file and the problem).
    """
    path = Path(out) / "meta.json"
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(
            f"{path}: not readable as JSON ({e}); move it away or choose another folder"
        ) from None
    problem = None
    if not isinstance(meta, dict):
        problem = f"a JSON {type(meta).__name__}, not an object"
    elif not isinstance(meta.get("command", ""), str):
        problem = "'command' is not a string"
    elif not isinstance(meta.get("invocations", []), list) or not all(
        isinstance(i, dict) for i in meta.get("invocations", [])
    ):
        problem = "'invocations' is not a list of objects"
    if problem:
        raise UsageError(
            f"{path}: not a meta.json of bench.ablate ({problem}); move it away or choose another folder"
        )
    return meta


def write_meta(out: Path, meta: dict) -> None:
    """Write ``<out>/meta.json`` atomically, appending this invocation to the list of
    every invocation that wrote to the folder (``command``, ``started``, ``git_commit``).

    Raises
    ------
    UsageError
        The folder's meta.json is malformed (:func:`read_meta`).
    """
    path = Path(out) / "meta.json"
    previous = read_meta(out).get("invocations", [])
    meta = {
        **meta,
        "invocations": previous
        + [{"command": meta["command"], "started": meta["started"], "git_commit": meta["git_commit"]}],
    }
    write_atomic(path, json.dumps(meta, indent=2, default=str))
