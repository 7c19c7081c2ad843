"""What a sweep shows while it runs and at its end.

:class:`ProgressLines` prints one line per event as it happens, each with the sweep's elapsed time: a trial
started (with its sampled values), a probe epoch, the probe computed or cached, a finetune epoch (val clean
and robust accuracy), a trial ended (with the trials finished and an estimate of what is left); on a terminal
the live table (:mod:`roli_sweep.live_view`) shows the same events in place. :class:`FinalProgress` prints the
final evaluation's pieces, :func:`print_sweep_end` the end tables and :func:`print_sweep_next_steps` the
commands to run next (quoted with :func:`command`); :class:`StudyLines` and the ``print_study_*`` functions the
study's. It imports neither Ray, torch nor MLflow: the Ray Tune callback that feeds it is
:class:`roli_sweep.tune.callbacks.ConsoleProgress`.
"""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from roli_sweep.messages import bounded
from roli_sweep.names import arm_label
from roli_sweep.records import FinalRecord, StudyJobRecord, eps_fraction


def short(value: Any) -> str:
    """A sampled value as the tables show it: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def clock(seconds: float) -> str:
    """``12 min 05 s`` / ``45 s``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


OPEN = ("pending", "running")
"""The statuses of a trial that has not ended."""


@dataclass
class TrialLine:
    """One trial's state, for the estimate of what is left."""

    trial_id: str
    sampled: dict[str, Any]
    status: str = "pending"
    epochs_done: int = 0
    """Probe plus finetune epochs finished (for the estimate)."""


@dataclass
class ProgressLines:
    """The progress lines of a sweep of ``num_samples`` trials with ``probe_epochs`` + ``finetune_epochs`` epochs each.

    Feed it with :meth:`started`, :meth:`progress` and :meth:`finished`.
    """

    num_samples: int
    parameters: list[str]
    probe_epochs: int
    finetune_epochs: int
    lines: dict[str, TrialLine] = field(default_factory=dict)
    start: float = field(default_factory=time.monotonic)
    by_status: dict[str, int] = field(init=False)
    """Trials by status, kept with :meth:`_set` so that an event costs the same at the 10,000th trial."""
    epochs_done: int = field(init=False)
    open_epochs_done: int = field(init=False)
    """Epochs finished by every trial, and by the trials still pending or running."""

    def __post_init__(self) -> None:
        self.by_status, self.epochs_done, self.open_epochs_done = {}, 0, 0
        for line in self.lines.values():
            self._count(line, 1)

    def _count(self, line: TrialLine, sign: int) -> None:
        self.by_status[line.status] = self.by_status.get(line.status, 0) + sign
        self.epochs_done += sign * line.epochs_done
        if line.status in OPEN:
            self.open_epochs_done += sign * line.epochs_done

    def _line(self, trial_id: str, sampled: dict[str, Any] | None = None) -> TrialLine:
        if trial_id not in self.lines:
            self.lines[trial_id] = TrialLine(trial_id, {k: sampled.get(k) for k in self.parameters} if sampled else {})
            self._count(self.lines[trial_id], 1)
        return self.lines[trial_id]

    def _set(self, line: TrialLine, status: str, epochs_done: int | None = None) -> None:
        self._count(line, -1)
        line.status = str(status)
        line.epochs_done = line.epochs_done if epochs_done is None else epochs_done
        self._count(line, 1)

    def _say(self, text: str) -> None:
        print(f"[{clock(time.monotonic() - self.start)}] {text}", flush=True)

    def started(self, trial_id: str, sampled: dict[str, Any]) -> None:
        line = self._line(trial_id, sampled)
        self._set(line, "running")
        values = ", ".join(f"{k.split('.')[-1]} {short(v)}" for k, v in line.sampled.items())
        self._say(f"trial {trial_id} started: {values}")

    def progress(self, trial_id: str, result: dict[str, Any]) -> None:
        """A result Ray Tune received: a probe epoch (``probe_epoch``), the end of stage 1, or a finetune epoch."""
        line = self._line(trial_id)
        if result.get("stage") == "probe":
            k = int(result["probe_epoch"])
            self._set(line, "running", k)
            self._say(f"trial {trial_id}: probe epoch {k}/{self.probe_epochs}, val robust "
                      f"{result['probe_epoch_val_robust_acc']:.3f}")
        elif result.get("stage") == "probe_done":
            self._set(line, "running", self.probe_epochs)
            self._say(f"trial {trial_id}: stage-1 probe {result.get('probe', 'done')}, val robust "
                      f"{result.get('probe_val_robust_acc', float('nan')):.3f}")
        elif "epoch" in result and "val_robust_acc" in result:
            k = int(result["epoch"])
            self._set(line, "running", self.probe_epochs + k)
            self._say(f"trial {trial_id}: finetune epoch {k}/{self.finetune_epochs}, val clean "
                      f"{result['val_clean_acc']:.3f}, robust {result['val_robust_acc']:.3f}")
        else:
            self._set(line, "running")

    def finished(self, trial_id: str, status: str, detail: str = "") -> None:
        self._set(self._line(trial_id), status)
        done = self.finished_count()
        left = self.estimate_left()
        self._say(f"trial {trial_id} {status}" + (f": {detail}" if detail else "")
                  + f"; {done}/{self.num_samples} trials finished"
                  + (f", about {clock(left)} of trials left (estimate)" if left is not None and done < self.num_samples
                     else ""))

    def estimate_left(self) -> float | None:
        """Seconds left, from the epochs finished so far per second of sweep time (None before the first one)."""
        per_trial = self.probe_epochs + self.finetune_epochs
        if self.epochs_done == 0:
            return None
        left = per_trial * sum(self.by_status.get(status, 0) for status in OPEN) - self.open_epochs_done
        left += per_trial * max(0, self.num_samples - len(self.lines))
        return left * (time.monotonic() - self.start) / self.epochs_done

    def finished_count(self) -> int:
        """Trials that ended, whatever their end."""
        return len(self.lines) - sum(self.by_status.get(status, 0) for status in OPEN)


class FinalProgress:
    """The final evaluation's progress: which piece finished (examples batch with PGD and AutoAttack, or a
    masking check) and how many are done, one plain line per piece."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, trial_id: str, piece: str, done: int, total: int) -> None:
        kind, index = piece.split(":", 1)
        what = (f"examples batch {int(index) + 1} (clean, PGD, AutoAttack)" if kind == "batch"
                else f"masking check {index}")
        print(f"final evaluation of trial {trial_id}: {what} done, {done}/{total} pieces, "
              f"{clock(time.monotonic() - self.start)}", flush=True)


def default_console() -> Console:
    """The console of the command line: full width on a terminal, 160 columns in a log file.

    Rich markup is off: a key, value, path or error message holding ``[/]`` or ``[bold]`` is printed as typed,
    never read as a style (nor crashes the printer). The tool's own styles go through :func:`marked`.
    """
    return Console(width=None if sys.stdout.isatty() else 160, markup=False, highlight=False)


def marked(template: str, *values: object) -> Text:
    """``template``'s own rich markup, with each ``{}`` filled by a value printed as plain text (escaped, so never
    read as markup)."""
    return Text.from_markup(template.format(*(escape(str(v)) for v in values)))


def print_error(console: Console, message: str) -> None:
    """``error: <message>`` in red, every line bounded (:func:`roli_sweep.messages.bounded`), markup-free."""
    console.print(Text.assemble(("error:", "red"), " ", bounded(message)), soft_wrap=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_sweep_end(console: Console, outcome, space) -> None:
    """The end of a sweep (:class:`roli_sweep.records.SweepOutcome` of ``space``): every trial's sampled values,
    status and accuracies at its best val robust epoch; the best trial; the final evaluation of the best trials
    with its threat model as the field writes it and the masking checks (warnings in red); every analysis'
    finding (its warnings, table and notes: each arm's best, range edges, Pareto front, importance, the
    confirmation's comparison); where the compute went; and the failures, each with its own reason."""
    from roli_sweep.config import evaluation_attack

    threat = evaluation_attack(space.base.attack, space.base.eval)
    eps = ("each trial's training eps" if space.base.eval.eps is None and "attack.eps" in space.parameters
           else eps_fraction(threat.eps))
    table = Table(title=f"sweep {outcome.name}: accuracies at the best val robust epoch (L-inf {eps}, "
                        f"val PGD-{space.base.eval.val_steps}, test PGD-{space.base.eval.test_steps})")
    table.add_column("trial")
    for key in space.parameters:
        table.add_column(key.split(".")[-1], justify="right")
    for column in ("status", "epochs", "val clean", "val robust", "test clean", "test robust"):
        table.add_column(column, justify="right")
    ranked = sorted(outcome.rows, key=lambda r: -(r.val_robust_acc or -1))
    for row in ranked:
        table.add_row(row.trial_id, *[short(row.sampled.get(k)) for k in space.parameters], row.status, str(row.epochs),
                      _fmt(row.val_clean_acc), _fmt(row.val_robust_acc), _fmt(row.test_clean_acc),
                      _fmt(row.test_robust_acc))
    console.print(table)
    best = outcome.best()
    if best is not None:
        console.print(f"best trial {best.trial_id}: val robust {best.val_robust_acc:.3f} at "
                      + ", ".join(f"{k.split('.')[-1]} {short(best.sampled.get(k))}" for k in space.parameters))
    finals = [r for r in ranked if r.final]
    if finals:
        threat = next((r.final.threat for r in finals if not r.final.failed), None)
        console.print(f"final evaluation of the best trials on test: {threat.summary() if threat else 'failed'}")
        final_table = Table()
        for column in ("trial", "clean", "PGD", "AutoAttack", "masking checks"):
            final_table.add_column(column, justify="right")
        for row in finals:
            name = f"{row.trial_id} ({arm_label(space.arms, row.sampled.get(space.arms))})" if space.arms else row.trial_id
            if row.final.failed:
                final_table.add_row(name, Text("failed", style="red"), "", "", row.final.error)
                continue
            m = row.final.metrics
            warned = [check.name for check in row.final.warnings()]
            final_table.add_row(name, _fmt(m["final_clean_acc"]), _fmt(m["final_pgd_acc"]),
                                _fmt(m.get("final_autoattack_acc")),
                                Text("pass", style="green") if not warned
                                else Text(f"warning: {', '.join(warned)}", style="bold red"))
        console.print(final_table)
        for row in finals:
            for check in row.final.warnings():
                console.print(marked("[bold red]trial {} masking check {}: warning[/] ({})", row.trial_id, check.name,
                                     check.detail))
    for found in outcome.findings:
        for label, message in found.warnings:
            console.print(marked("[bold yellow]{}:[/] {}", label, message), soft_wrap=True)
        if found.table is not None:
            title, columns, rows = found.table
            table = Table(title=title)
            for i, column in enumerate(columns):
                table.add_column(column, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*row)
            console.print(table)
        for note in found.notes:
            console.print(note, soft_wrap=True, markup=False)
    if outcome.compute:
        c = outcome.compute
        console.print(f"compute: trials {c['compute_trials_s']:.0f} core-s, confirmation "
                      f"{c.get('compute_confirmation_s', 0.0):.0f} core-s, final evaluation "
                      f"{c['compute_final_eval_s']:.0f} core-s, saved by cached probes {c['compute_probe_saved_s']:.0f} "
                      f"core-s; idle {100 * c['idle_fraction']:.0f} % of the CPUs over {clock(c['wall_s'])}")
    for row in [*outcome.rows, *outcome.confirmation]:
        if row.error:
            console.print(marked("[red]trial {} failed:[/] {}", row.trial_id, row.error))


def _script() -> str:
    """How the user called the entry point (``run_sweep.py`` as typed), for the commands printed."""
    return sys.argv[0] if sys.argv and sys.argv[0].endswith("run_sweep.py") else "run_sweep.py"


def command(*words: object) -> str:
    """A command line for the user to run, every word quoted for a POSIX shell (:func:`shlex.join`), so it runs as
    printed whatever the paths hold."""
    return shlex.join(["python", _script(), *map(str, words)])


def print_sweep_next_steps(console: Console, outcome, resume: str) -> None:
    """Where the sweep's runs and files are, and what to run next: ``mlflow ui`` on its store, the ``--resume``
    command ``resume`` after Ctrl+C, every distinct failure reason when every trial failed, else the ``export``
    command."""
    console.print(marked("MLflow: experiment [bold]{}[/], parent run [bold]{}[/] ({}); browse with\n  {}\n"
                         "and open http://127.0.0.1:5000/#/experiments/{}/runs?workflowType=machine_learning "
                         "(MLflow 3.17's UI starts on its GenAI view otherwise)", outcome.experiment, outcome.name,
                         outcome.parent_run_id, shlex.join(["mlflow", "ui", "--backend-store-uri", outcome.tracking_uri]),
                         outcome.experiment_id), soft_wrap=True)
    console.print(f"Ray Tune results and the sweep's log: {outcome.storage_path / outcome.name}")
    if outcome.interrupted:
        console.print(marked("[bold yellow]interrupted[/]: finished epochs are kept; continue with\n  {}", resume),
                      soft_wrap=True)
    elif outcome.all_failed():
        console.print(marked("[bold red]every trial failed[/] ({}); the reasons:", len(outcome.rows)))
        for reason in sorted({row.error or "unknown error" for row in outcome.rows}):
            console.print(f"  {reason}", soft_wrap=True)
    else:
        console.print("export the best: " + command("export", "--name", outcome.name, "--top-k", 3, "--out",
                                                    "exported", "--tracking-uri", outcome.tracking_uri), soft_wrap=True)


class StudyLines:
    """The study's progress on the console, one line per finished job (a :class:`roli_sweep.study.run.StudyObserver`)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def on_probe(self, key, record: StudyJobRecord) -> None:
        m = record.metrics
        line = (f"probe failed\n{record.error}" if record.failed else
                f"probe test clean {m['probe_test_clean_acc']:.3f} robust {m['probe_test_robust_acc']:.3f}")
        self.console.print(f"probe {key.id}: {line}", style="red" if record.failed else None)

    def on_run(self, key, record: StudyJobRecord) -> None:
        m = record.metrics
        line = ("failed" if record.failed else f"val robust {m['val_robust_acc']:.3f}, test clean "
                f"{m['test_clean_acc']:.3f} robust {m['test_robust_acc']:.3f}, {record.seconds:.0f} s")
        self.console.print(f"{key.id}: {line}", style="red" if record.failed else None)

    def on_final(self, key, record: FinalRecord) -> None:
        if record.failed:
            self.console.print(f"final evaluation of {key.id} failed\n{record.error}", style="red")
            return
        m = record.metrics
        self.console.print(f"final {key.id}: clean {m['final_clean_acc']:.3f}, PGD {m['final_pgd_acc']:.3f}, "
                           f"AutoAttack {m.get('final_autoattack_acc', float('nan')):.3f}, {record.seconds or 0:.0f} s")
        for check in record.warnings():
            self.console.print(marked("[bold red]  masking check {}: warning[/] ({})", check.name, check.detail))


def print_study_progress(console: Console, name: str, progress) -> None:
    """What one study invocation did (:class:`roli_sweep.study.run.StudyProgress`)."""
    console.print(f"study {name}: {progress.probes_run} probes, {progress.runs_completed} runs completed, "
                  f"{progress.runs_failed} failed, {progress.finals_done} final evaluations in {progress.seconds:.0f} s")


def print_study_report(console: Console, name: str, report, parent_run_id: str) -> None:
    """The study report's lr-grid edge warnings and where it is (:class:`roli_sweep.study.report.StudyReport`)."""
    for warning in report.edges.values():
        console.print(marked("[bold yellow]lr grid edge:[/] {}", warning.message), soft_wrap=True)
    console.print(f"report: {report.folder / 'RESULTS.md'} (also in MLflow, experiment {name!r}, "
                  f"parent run {parent_run_id})")
