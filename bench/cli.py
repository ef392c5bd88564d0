"""What the command-line tools share: a parser whose errors are one line, and the
argument types that name the bad value and what is allowed.

``bench.ablate`` and ``bench.perf`` both use these, so a bad value reads the same in
both: ``<prog>: error: <what> must be ...; got '<value>'`` on one line, exit status 2.
"""

from __future__ import annotations

import argparse
import math

from .errors import UsageError

__all__ = ["Parser", "choice", "number"]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises :class:`bench.errors.UsageError` (one line, no
    usage block) instead of printing and exiting; the tool's ``main`` prints it."""

    def error(self, message):
        raise UsageError(message)


def number(name: str, kind: type = int, *, minimum: float | None = None, strict: bool = False):
    """An argparse ``type`` that parses a finite ``kind`` (int or float) >= ``minimum``
    (> ``minimum`` when ``strict``); its error names ``name``, the rule and the value.

    Examples
    --------
    >>> number("hidden size", int, minimum=0, strict=True)("64")
    64
    >>> number("lr", float, minimum=0, strict=True)("nan")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: lr must be a finite number > 0; got 'nan'
    """
    if kind is int:
        what = {
            (None, False): "an integer",
            (0, True): "a positive integer",
            (0, False): "a non-negative integer",
        }.get((minimum, strict))
    else:
        what = (
            "a finite number" if minimum is None else f"a finite number {'>' if strict else '>='} {minimum:g}"
        )
    if what is None:
        what = f"an integer {'>' if strict else '>='} {minimum:g}"

    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            v = None
        ok = v is not None and math.isfinite(v)
        if ok and minimum is not None:
            ok = v > minimum if strict else v >= minimum
        if not ok:
            raise argparse.ArgumentTypeError(f"{name} must be {what}; got {s!r}")
        return v

    return parse


def choice(name: str, allowed, aliases=None):
    """An argparse ``type`` accepting one of ``allowed``, or an alias (``{alias: allowed value}``),
    returned as the value it stands for; its error lists both.

    Examples
    --------
    >>> choice("method", ["unconstrained", "cd"], {"lstm": "unconstrained"})("lstm")
    'unconstrained'
    >>> choice("method", ["unconstrained", "cd"], {"lstm": "unconstrained"})("x")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: unknown method 'x'; allowed: unconstrained, cd (lstm: alias of unconstrained)
    """
    allowed, aliases = list(allowed), dict(aliases or {})

    def parse(s: str):
        if s in aliases:
            return aliases[s]
        if s not in allowed:
            also = "".join(f" ({a}: alias of {v})" for a, v in aliases.items())
            raise argparse.ArgumentTypeError(f"unknown {name} {s!r}; allowed: {', '.join(allowed)}{also}")
        return s

    return parse
