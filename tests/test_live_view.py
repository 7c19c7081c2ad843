"""The live table on a terminal: its rendering and its writes (no Ray runtime), the callback's fallback, and a real
small sweep under a pseudo-terminal that is non-blocking and whose reader lags, the condition under which the
first live table's writes failed inside a Ray Tune callback and ended the Tune run with every trial's actor."""
from __future__ import annotations

import copy
import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from roli_sweep.console import ProgressLines
from roli_sweep.live_view import LiveTable, TerminalWriter, column_names
from tests.conftest import write_yaml

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][0-9A-Za-z])")


class Terminal(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _console(out: io.StringIO) -> Console:
    return Console(file=out, force_terminal=True, width=160, markup=False, highlight=False)


def _frame(view: LiveTable) -> str:
    recorder = Console(file=io.StringIO(), width=160, record=True)
    recorder.print(view.render())
    return recorder.export_text()


def test_live_table_rows_stage_accuracies_footer_and_no_markup():
    out = Terminal()
    threads = threading.active_count()
    view = LiveTable(3, ["finetune.lr", "finetune.head_init", "probe.lr"], 2, 6, console=_console(out))
    view.started("t1", {"finetune.lr": 0.001234, "finetune.head_init": "roli", "probe.lr": 0.05})
    view.progress("t1", {"stage": "probe", "probe_epoch": 1, "probe_epochs": 2, "probe_epoch_val_robust_acc": 0.2})
    view.started("[red]t2", {"finetune.lr": 0.01, "finetune.head_init": "[bold]x[/]", "probe.lr": 0.05})
    assert view._live is not None and view._live._refresh_thread is None, "no refresh thread"
    assert threading.active_count() == threads
    assert "│ t1 " in ANSI.sub("", out.getvalue()), "the first event draws the table at once"
    assert "probe 1/2" in _frame(view)
    view.progress("t1", {"stage": "probe_done", "probe": "cached", "probe_val_robust_acc": 0.25, "epoch": 0})
    assert "probe cached" in _frame(view)
    view.progress("t1", {"stage": "finetune", "epoch": 3, "val_clean_acc": 0.61, "val_robust_acc": 0.42})
    frame = _frame(view)
    row = next(line for line in frame.splitlines() if "│ t1 " in line)
    assert re.search(r"│ t1 +│ +0\.00123 │ +roli │ +0\.05 │ +finetune 3/6 │ +0\.610 │ +0\.420 │", row), row
    # user text is never read as markup: the id and the value are shown as typed
    assert re.search(r"│ \[red\]t2 +│ +0\.01 │ +\[bold\]x\[/\] │ +0\.05 │ +starting │ +- │ +- │", frame), frame
    # two parameters named lr: their full paths head the columns
    assert column_names(view.parameters) == ["finetune.lr", "head_init", "probe.lr"]
    assert "0/3 trials finished: 0 completed, 0 pruned, 0 failed; 2 running;" in frame
    assert "of trials left (estimate)" in frame

    view.finished("[red]t2", "failed", "ValueError: bad [/] value")
    view.finished("t1", "completed", "best val clean 0.610, robust 0.420")
    frame = _frame(view)
    assert "│ t1 " not in frame and "t2 " not in frame, "finished trials leave the table"
    assert "2/3 trials finished: 1 completed, 0 pruned, 1 failed; 0 running;" in frame
    time.sleep(view.min_gap)
    view.tick()  # the coalesced redraw
    view.close()
    view.close()  # idempotent
    shown = ANSI.sub("", out.getvalue())
    assert "trial [red]t2 failed (finetune.lr 0.01, head_init [bold]x[/], probe.lr 0.05): ValueError: bad [/] value" \
        in shown, "each end is printed above the table, as typed"
    assert "trial t1 completed (finetune.lr 0.00123, head_init roli, probe.lr 0.05): best val clean 0.610" in shown
    last = [line for line in shown.splitlines() if line.strip()][-1]
    assert last.startswith("2/3 trials finished: 1 completed, 0 pruned, 1 failed; 0 running; "), "the footer stays"
    raw = out.getvalue()
    assert raw.rfind("\x1b[?25h") > raw.rfind("\x1b[?25l"), "the cursor is left visible"


def _pty(nonblocking: bool) -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    os.set_blocking(slave, not nonblocking)
    return master, slave


def test_writes_to_a_non_blocking_terminal_wait_for_a_lagging_reader():
    master, slave = _pty(nonblocking=True)
    data = ("x" * 99 + "\n") * 2000  # 200 KB, ten times what a Linux pty buffers
    got = bytearray()

    def lagging_reader() -> None:
        time.sleep(1.0)
        while select.select([master], [], [], 5)[0]:
            try:
                got.extend(os.read(master, 4096))
            except OSError:  # EIO: the writer closed its end and everything was read
                return
            time.sleep(0.002)

    reader = threading.Thread(target=lagging_reader)
    reader.start()
    refused = False
    while not refused:  # what any write meets while the reader lags: the terminal refuses it
        try:
            os.write(slave, b"y" * 1000)
        except BlockingIOError:
            refused = True
    with os.fdopen(slave, "w") as stream:
        assert TerminalWriter(stream).write(data) == len(data)
    reader.join(timeout=60)
    os.close(master)
    assert bytes(got).count(b"x") == data.count("x"), "every byte arrived, none raised"


def test_a_display_error_falls_back_to_plain_lines_and_never_reaches_tune(capsys):
    from ray.tune.experiment import Trial

    from roli_sweep.tune.callbacks import ConsoleProgress

    master, slave = _pty(nonblocking=False)
    stream = os.fdopen(slave, "w")
    progress = ConsoleProgress(2, ["finetune.lr"], 1, 2)
    progress._view = LiveTable(2, ["finetune.lr"], 1, 2, min_gap=0.0,
                               console=Console(file=TerminalWriter(stream), force_terminal=True, markup=False))
    first = Trial("run_tune_trial", config={"finetune.lr": 0.001}, trial_id="t1", stub=True)
    progress.on_trial_start(0, [first], first)
    assert isinstance(progress.view, LiveTable)
    os.close(master)  # the terminal goes away: every write now fails (EIO)
    progress.on_trial_result(1, [first], first, {"stage": "probe", "probe_epoch": 1,
                                                  "probe_epoch_val_robust_acc": 0.3})
    assert type(progress.view) is ProgressLines, "the live table gave way to plain lines"
    assert progress.view.lines["t1"].epochs_done == 1, "with the progress so far"
    progress.on_step_end(2, [first])
    progress.on_experiment_end([first])
    assert "trial t1: probe epoch 1/1, val robust 0.300" in capsys.readouterr().out
    assert sys.stdout is not None and not type(sys.stdout).__name__ == "FileProxy", "stdout restored"
    stream.close()


def test_the_callback_draws_the_table_on_a_terminal_and_plain_lines_elsewhere(monkeypatch, capsys):
    from roli_sweep.tune.callbacks import ConsoleProgress

    assert type(ConsoleProgress(2, ["finetune.lr"], 1, 2).view) is ProgressLines  # capsys: not a terminal
    master, slave = _pty(nonblocking=False)
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.setenv("TERM", "dumb")
        assert type(ConsoleProgress(2, ["finetune.lr"], 1, 2).view) is ProgressLines, "no redraw on a dumb terminal"
        monkeypatch.setenv("TERM", "xterm-256color")
        progress = ConsoleProgress(2, ["finetune.lr"], 1, 2)
        assert isinstance(progress.view, LiveTable)
        assert progress.__getstate__()["_view"] is None, "the view is not pickled with the experiment state"
        progress.view.close()
    os.close(master)


# ------------------------------------------------------------------ a real sweep under a pseudo-terminal


def _waits_for_the_terminal(pid: int) -> bool:
    """Whether process ``pid``'s main thread sleeps in select / poll (as the live table's writer does while the
    terminal refuses its write; Tune's loop on that thread waits on futexes and sleeps)."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return wchan.startswith(("poll_schedule_timeout", "do_select", "do_sys_poll"))


def run_in_terminal(command: list[str], cwd: Path, env: dict[str, str], timeout: float, lag_after: bytes,
                    columns: int = 200, lines: int = 50) -> tuple[int, str, int | None]:
    """Run ``command`` with a new pseudo-terminal as its controlling terminal and stdin / stdout / stderr, as a
    shell on a terminal would, the terminal's descriptor non-blocking; read everything it writes, except that once
    ``lag_after`` has appeared the reader stops until the terminal is full and the program waits for it (1 s
    more), 30 s at most. Its exit status, output (ANSI codes kept), and the output's length when the reader came
    back after the program waited (None if it never did)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    os.set_blocking(slave, False)  # shared by every process holding this terminal, as some terminal programs set it

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                               preexec_fn=controlling_terminal)
    os.close(slave)
    out, exited, lagged, resumed_at = bytearray(), None, False, None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not lagged and lag_after in out:
                lagged, until = True, time.monotonic() + 30
                while time.monotonic() < until and process.poll() is None:
                    if _waits_for_the_terminal(process.pid):
                        time.sleep(1)
                        resumed_at = len(out)
                        break
                    time.sleep(0.05)
            if select.select([master], [], [], 0.2)[0]:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: no process holds the terminal any more
                    break
                if not data:
                    break
                out += data
            elif process.poll() is not None:
                exited = exited or time.monotonic()
                if time.monotonic() - exited > 5:
                    break
        else:
            process.kill()
    finally:
        os.close(master)
    resumed = None if resumed_at is None else len(bytes(out[:resumed_at]).decode("utf-8", "replace"))
    return process.wait(timeout=30), out.decode("utf-8", "replace"), resumed


@pytest.mark.extended
def test_a_sweep_on_a_lagging_terminal_draws_the_table_and_every_trial_finishes(tmp_path, space_dict):
    from mlflow.tracking import MlflowClient

    tree = copy.deepcopy(space_dict)
    tree["num_samples"] = 3
    space = write_yaml(tmp_path / "tiny.yaml", tree)
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "TERM": "xterm-256color", "XDG_STATE_HOME": str(tmp_path / "state")}
    # buffered stdout, so that a write the terminal refuses raises (unbuffered, Python drops it silently)
    for name in ("PYTHONUNBUFFERED", "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE"):
        env.pop(name, None)
    started = time.monotonic()
    code, out, resumed_at = run_in_terminal(
        [sys.executable, str(ROOT / "run_sweep.py"), "--space", str(space), "--name", "live", "--tracking-uri",
         f"sqlite:///{db}", "--storage-path", str(tmp_path / "ray_results"), "--num-cpus", "2"],
        tmp_path, env, timeout=240, lag_after=b"running trials")
    seconds = time.monotonic() - started
    text = ANSI.sub("", out).replace("\r\n", "\n")
    assert code == 0, f"exit {code} after {seconds:.0f} s:\n{text[-5000:]}"
    assert "Error" not in text.split("sweep live: accuracies", 1)[0], text[-5000:]
    live, end = text.split("sweep live: accuracies at the best val robust epoch", 1)
    # the end table: every trial completed or pruned
    ended = {m.group(1): m.group(2) for m in re.finditer(r"^│ (\S+) .*?│ +(completed|pruned|failed|interrupted) │",
                                                          end, re.M)}
    assert len(ended) == 3 and set(ended.values()) <= {"completed", "pruned"}, end
    # the live table drew running trials' rows with their stage, redrawn in place, and printed each trial's end
    # (a trial that starts and ends between two redraws, which are at most 4 a second, may have no row of its own)
    frames = live.replace("\r", "\n")
    staged = re.findall(r"^│ (\S+) +│.*│ +(?:probe 1/1|probe computed|probe cached|finetune \d/2) │", frames, re.M)
    assert set(staged) & set(ended), f"no live row with a stage:\n{frames[-4000:]}"
    for trial_id in ended:
        assert re.search(rf"trial {re.escape(trial_id)} (completed|pruned) \(lr ", frames), trial_id
    assert "running trials" in frames and "3/3 trials finished" in frames
    assert "\x1b[1A" in out and "\x1b[2K" in out, "redrawn in place"
    # the reader lagged until the terminal refused a write and the sweep waited for it, while trials ran
    assert resumed_at is not None, "the terminal never filled up"
    assert out.find("3/3 trials finished") > resumed_at, "the lag was during the trials"
    client = MlflowClient(f"sqlite:///{db}")
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.sweep_role = 'trial'")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(ended)
    assert {c.data.tags["status"] for c in children} <= {"completed", "pruned"}
