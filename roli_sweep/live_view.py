"""The live table a sweep shows while it runs with its output on a terminal.

:class:`LiveTable` is :class:`roli_sweep.console.ProgressLines` (the same events and the same estimate of the time
left) drawn as a rich ``Live`` table redrawn in place: one row per running trial with its id, sampled values, stage
(``starting``, ``probe 1/2``, ``probe cached``, ``finetune 3/6``) and last val clean / robust accuracy, and under it a
footer with the trials finished (completed, pruned, failed), the elapsed time and the estimate of what is left.
Each trial's end is also printed as a line above the table, so the scrollback keeps every trial.

Why it is built this way. A redrawn table writes the whole table again at every redraw (1-2 KB), about a hundred
times what a progress line writes, so it fills a terminal's output buffer (about 20 KB on a Linux pty) as soon as
whatever reads the terminal lags. On a blocking terminal the write then waits; on a terminal whose descriptor
is non-blocking (``O_NONBLOCK`` is shared by every process holding the terminal, and some terminal programs set
it) it raises ``BlockingIOError``. Raised inside a Ray Tune callback, that ends the Tune run: Tune destroys every
trial's actor (running ones "placement group was removed", starting ones "cancelled before it started") and the
exception itself cannot be printed, since it goes to the same terminal. Hence:

* :class:`TerminalWriter` writes to the terminal's descriptor and, when the terminal cannot take more yet, waits
  until it can (``select``) instead of raising: a lagging reader slows the view down, never ends the sweep.
* It is drawn only from the thread that feeds it (the Tune callback
  :class:`roli_sweep.tune.callbacks.ConsoleProgress`, on the driver's main thread): ``auto_refresh`` is off, so
  rich starts no refresh thread; redraws are coalesced to at most one per :attr:`LiveTable.min_gap` seconds and
  :meth:`LiveTable.tick` (Tune's step loop) redraws the clock once a second.
* The callback never lets a display error reach Ray Tune (it falls back to plain lines, see ConsoleProgress).

Print calls during the sweep (the Ctrl+C notice, warnings) go through rich's stdout / stderr proxy and land above
the table. The cursor stays visible, so an exit that skips the cleanup (a second Ctrl+C is ``os._exit``) leaves the
terminal as it was. Every cell is a :class:`rich.text.Text`: no sampled value, parameter name or error message is
read as markup. It imports neither Ray, torch nor MLflow. Reference: rich ``Live`` docs.
"""
from __future__ import annotations

import atexit
import io
import os
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from roli_sweep.console import ProgressLines, clock, short

ENDED = ("completed", "pruned", "failed")
"""The end states a trial reaches during a sweep, in the footer's order."""

STYLE = {"completed": "green", "pruned": "yellow", "failed": "red"}


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stdout) is a terminal that can redraw in place (not ``TERM=dumb``)."""
    stream = stream or sys.stdout
    try:
        return stream.isatty() and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")
    except (AttributeError, ValueError, OSError):
        return False


class TerminalWriter(io.TextIOBase):
    """The terminal as the live table writes to it: every write goes whole to the terminal's descriptor, waiting
    while the terminal cannot take more (its output buffer full, on a non-blocking descriptor) instead of raising
    ``BlockingIOError``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._fd = stream.fileno()
        self._encoding = getattr(stream, "encoding", None) or "utf-8"

    @property
    def encoding(self) -> str:
        return self._encoding

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = memoryview(text.encode(self._encoding, "replace"))
        while data:
            try:
                data = data[os.write(self._fd, data):]
            except BlockingIOError:
                select.select([], [self._fd], [], 1.0)
            except InterruptedError:
                continue
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered here."""


def _flush(stream: TextIO) -> None:
    """Flush what ``stream`` holds (so it comes out before the table), waiting on a non-blocking terminal."""
    for _ in range(600):
        try:
            stream.flush()
            return
        except BlockingIOError:
            try:
                select.select([], [stream.fileno()], [], 0.1)
            except (OSError, ValueError):
                return
        except (OSError, ValueError):
            return


def column_names(parameters: list[str]) -> list[str]:
    """Each parameter's column header: its last dotted part (``finetune.lr`` -> ``lr``), or its full path where two
    parameters share that last part."""
    last = [key.split(".")[-1] for key in parameters]
    return [name if last.count(name) == 1 else key for key, name in zip(parameters, last)]


@dataclass
class TrialRow:
    """What a running trial's row shows besides its sampled values."""

    stage: str = "starting"
    val_clean: float | None = None
    val_robust: float | None = None


def _accuracy(value: float | None) -> Text:
    return Text("-" if value is None else f"{value:.3f}")


def terminal_console() -> Console:
    """The console of the live table: stdout through a :class:`TerminalWriter`, markup and highlighting off."""
    _flush(sys.stdout)
    return Console(file=TerminalWriter(sys.stdout), force_terminal=True, markup=False, highlight=False)


@dataclass
class LiveTable(ProgressLines):
    """The live view of a sweep of ``num_samples`` trials: feed it with :meth:`started`, :meth:`progress` and
    :meth:`finished`; :meth:`tick` redraws what changed and the clock; :meth:`close` ends the display, leaving the
    footer (and the rows of trials still running, after Ctrl+C)."""

    console: Console = field(default_factory=terminal_console)
    rows: dict[str, TrialRow] = field(default_factory=dict)
    min_gap: float = 0.25
    """Seconds between two redraws at least (events in between are drawn by the next one)."""
    clock_every: float = 1.0
    """Seconds between two redraws of an unchanged table by :meth:`tick` (the elapsed time and estimate move)."""
    _live: Live | None = None
    _drawn: float = 0.0
    _dirty: bool = False
    _closed: bool = False

    # ---------------------------------------------------------------- the events (ProgressLines' own)

    def _say(self, text: str) -> None:
        """ProgressLines prints each event as a line; here an event redraws the table instead."""
        self.refresh()

    def started(self, trial_id: str, sampled: dict[str, Any]) -> None:
        self.rows[trial_id] = TrialRow()
        super().started(trial_id, sampled)

    def progress(self, trial_id: str, result: dict[str, Any]) -> None:
        row = self.rows.setdefault(trial_id, TrialRow())
        if result.get("stage") == "probe" and "probe_epoch" in result:
            row.stage = f"probe {int(result['probe_epoch'])}/{self.probe_epochs}"
        elif result.get("stage") == "probe_done":
            row.stage = f"probe {result.get('probe', 'done')}"
        elif "epoch" in result and "val_robust_acc" in result:
            row.stage = f"finetune {int(result['epoch'])}/{self.finetune_epochs}"
            row.val_clean, row.val_robust = result.get("val_clean_acc"), result.get("val_robust_acc")
        super().progress(trial_id, result)

    def finished(self, trial_id: str, status: str, detail: str = "") -> None:
        status = str(status)
        self.rows.pop(trial_id, None)
        line = self.lines.get(trial_id)
        values = ", ".join(f"{name} {short(line.sampled.get(key))}" for key, name in
                           zip(self.parameters, column_names(self.parameters))) if line and line.sampled else ""
        self.print(Text.assemble(f"[{clock(time.monotonic() - self.start)}] trial {trial_id} ",
                                 (status, STYLE.get(status, "")), f" ({values})" if values else "",
                                 f": {detail}" if detail else ""))
        super().finished(trial_id, status, detail)

    # ---------------------------------------------------------------- drawing

    def print(self, text: Text) -> None:
        """A line above the table (the table is drawn again under it)."""
        self._open()
        self.console.print(text, soft_wrap=True)

    def _open(self) -> None:
        if self._live is None and not self._closed:
            self._live = Live(self.render(), console=self.console, auto_refresh=False, transient=False,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.start()
            self.console.show_cursor(True)  # rich hides it; an os._exit (second Ctrl+C) would leave it hidden
            atexit.register(self.close)

    def refresh(self, force: bool = False) -> None:
        """Redraw now, or at the next :meth:`tick` when the last redraw is less than :attr:`min_gap` old."""
        if self._closed:
            return
        self._open()
        if not force and time.monotonic() - self._drawn < self.min_gap:
            self._dirty = True
            return
        self._dirty, self._drawn = False, time.monotonic()
        self._live.update(self.render(), refresh=True)

    def tick(self) -> None:
        """Redraw what changed since the last redraw, or the clock once every :attr:`clock_every` seconds."""
        if self._live is None:
            return
        since = time.monotonic() - self._drawn
        if (self._dirty and since >= self.min_gap) or since >= self.clock_every:
            self.refresh(force=True)

    def counts(self) -> dict[str, int]:
        """Finished trials by end state (``completed``, ``pruned``, ``failed``)."""
        return {state: self.by_status.get(state, 0) for state in ENDED}

    def running(self) -> list[str]:
        return [trial_id for trial_id in self.rows if getattr(self.lines.get(trial_id), "status", "") == "running"]

    def footer(self) -> Text:
        """``2/10 trials finished: 1 completed, 1 pruned, 0 failed; 2 running; 3 min 10 s elapsed; about ... left``."""
        counts = self.counts()
        done = sum(counts.values())
        left = self.estimate_left()
        text = Text(f"{done}/{self.num_samples} trials finished: ")
        for i, state in enumerate(ENDED):
            text.append(", " if i else "")
            text.append(f"{counts[state]} {state}", STYLE[state] if counts[state] else "")
        text.append(f"; {len(self.running())} running; {clock(time.monotonic() - self.start)} elapsed; ")
        if done >= self.num_samples:
            text.append("trials done")
        elif left is None:
            text.append("time left: estimated after the first epoch")
        else:
            text.append(f"about {clock(left)} of trials left (estimate)")
        return text

    def table(self) -> Table:
        """One row per running trial: id, sampled values, stage, last val clean / robust accuracy."""
        table = Table(title=Text("running trials"), title_justify="left")
        table.add_column(Text("trial"))
        for name in column_names(self.parameters):
            table.add_column(Text(name), justify="right")
        for name in ("stage", "val clean", "val robust"):
            table.add_column(Text(name), justify="right")
        for trial_id in self.running():
            line, row = self.lines[trial_id], self.rows[trial_id]
            table.add_row(Text(trial_id), *[Text(short(line.sampled.get(key))) for key in self.parameters],
                          Text(row.stage), _accuracy(row.val_clean), _accuracy(row.val_robust))
        return table

    def render(self) -> Group:
        """The table of the running trials and the footer."""
        return Group(self.table(), self.footer())

    def close(self) -> None:
        """End the live display: its last frame (the footer, and the rows of trials still running) stays on the
        terminal. Idempotent; also run at exit."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._live is not None:
            live, self._live = self._live, None
            live.update(self.render() if self.running() else self.footer(), refresh=False)
            live.stop()

    def abandon(self) -> None:
        """End the live display without drawing again (after a display error): stdout and stderr are restored."""
        self._closed = True
        atexit.unregister(self.close)
        live, self._live = self._live, None
        if live is not None:
            try:
                live.stop()  # restores stdout / stderr even when its last draw fails
            except Exception:  # noqa: BLE001 - the display is broken already
                pass
