"""A failed trial's reason in plain words: its own exception as ``Type: message``, never Ray's wrapper."""
from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning)): (.*)$")


def failure_reason(error: BaseException | str) -> str:
    """The trial's own exception as ``Type: message``, without Ray's wrapper line or ANSI codes.

    ``error`` is an exception Ray Tune reports (its ``cause``, when it wraps one, is the trial's own) or
    the text of a trial's error file, whose last ``Type: message`` line is the trial's exception.
    """
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, BaseException) and not type(cause).__name__.startswith("RayTaskError"):
        return ANSI.sub("", f"{type(cause).__name__}: {cause}").splitlines()[0]
    lines = [ANSI.sub("", line).strip() for line in str(cause).splitlines()]
    found = [f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}" for m in map(EXCEPTION_LINE.match, lines) if m]
    return (found[-1] if found else next((line for line in reversed(lines) if line), "unknown error"))[:500]
