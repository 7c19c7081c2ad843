"""Problem messages of bounded size: a value a user gave is shown short, with its type and size.

A search space built with YAML aliases can expand a 1.6 KB file into a value whose ``repr`` runs to
hundreds of kilobytes; echoing it whole buries the one key that is wrong. Values are shown with
:mod:`reprlib` (depth, length and string limits), long ones with their type and size added, no problem
line exceeds :data:`MAX_LINE` characters and no message :data:`MAX_LINES` lines.
"""
from __future__ import annotations

import reprlib

MAX_LINE = 500
"""The most characters one problem line may have."""

_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
for _limit, _value in dict(maxlevel=3, maxtuple=6, maxlist=6, maxarray=6, maxdict=6, maxset=6, maxfrozenset=6,
                           maxdeque=6, maxstring=80, maxlong=60, maxother=80).items():
    setattr(_REPR, _limit, _value)


def shown(value: object) -> str:
    """``repr(value)`` cut to about 100 characters; when cut, its type and size follow (``(list of 4096 items)``)."""
    text = _REPR.repr(value)
    size = ""
    if isinstance(value, (str, bytes)) and len(value) > 80:
        size = f" ({type(value).__name__} of {len(value)} characters)"
    elif isinstance(value, (list, tuple, dict, set, frozenset)) and (len(value) > 6 or "..." in text):
        size = f" ({type(value).__name__} of {len(value)} {'keys' if isinstance(value, dict) else 'items'})"
    elif isinstance(value, int) and not isinstance(value, bool) and len(text) >= 60:
        size = f" (int of {value.bit_length()} bits)"
    if len(text) > 100:
        text = text[:100] + "..."
    return text + size


MAX_LINES = 30
"""The most lines one error message shows; the rest are counted."""


def bounded(message: str) -> str:
    """``message`` with every line cut to :data:`MAX_LINE` characters and at most :data:`MAX_LINES` lines (the
    rest counted, not shown)."""
    lines = [line if len(line) <= MAX_LINE else f"{line[:MAX_LINE - 40]}... ({len(line) - MAX_LINE + 40} characters "
             "more)" for line in message.split("\n")]
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [f"... and {len(lines) - MAX_LINES + 1} more lines of problems"]
    return "\n".join(lines)
