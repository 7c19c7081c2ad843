"""The study's report: a markdown table of every cell, the findings F1-F3 computed from it, and plots.

Every number comes from the study state (:mod:`roli_sweep.study.run`): test accuracies of the runs at
the learning rates chosen on validation, as mean +- sample standard deviation over seeds, and
RoLI - RanLI as the mean +- std of the per-seed paired differences (same seed, so the same data
split, data order and attack randomness). Missing runs show as "-" with the seed count given.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from roli_sweep.comparison import paired_t_interval, paired_t_p_value, paired_t_power, pairs_for_power
from roli_sweep.config import StudyConfig
from roli_sweep.data import input_side
from roli_sweep.edges import EdgeWarning, grid_end_warning
from roli_sweep.plots import plot_backbone_comparison, plot_clean_vs_robust, plot_paired_differences
from roli_sweep.records import StudyJobRecord
from roli_sweep.study.run import LrChoice, ProbeKey, RunKey, StudyState, chosen_groups, final_runs

def peft_methods() -> list[str]:
    """The registered transfer methods that freeze the backbone (linear probing and every PEFT method; F1)."""
    from roli_sweep.models.methods import METHODS

    return sorted(name for name, method in METHODS.items() if method.freezes_backbone)


@dataclass
class Stat:
    """Mean and sample std over seeds (std 0 for one value), with the number of values."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def pct(self, signed: bool = False) -> str:
        """``"41.2 ± 1.3"`` in percentage points, or ``-`` when empty."""
        if not self.values:
            return "-"
        sign = "+" if signed else ""
        return f"{100 * self.mean:{sign}.1f} ± {100 * self.std:.1f}"


@dataclass
class Cell:
    """One (backbone, target, method) group: per-init stats at their own best lr and at the matched lr."""

    backbone: str
    target: str
    method: str
    choice: LrChoice
    own: dict[str, dict[str, Stat]]  # head_init -> metric -> Stat
    diff_own: dict[str, Stat]  # metric -> paired RoLI - RanLI at own lrs
    diff_matched: dict[str, Stat]  # metric -> paired RoLI - RanLI at the matched lr
    own_held_out: dict[str, dict[str, Stat]]  # as ``own``, over the seeds that did not choose the lr
    diff_held_out: dict[str, Stat]  # as ``diff_own``, over the seeds that did not choose the lr


@dataclass
class Report:
    folder: Path
    summary: dict[str, float]
    cells: list[Cell]
    edges: dict[str, EdgeWarning]
    """Per cell and head init (``<backbone>-<target>-<method>-<head_init>``): its chosen lr is an end of the grid."""


METRICS = ("test_clean_acc", "test_robust_acc")


def _seed_metrics(study: StudyConfig, state: StudyState, backbone: str, target: str, method: str, init: str,
                  lr: float) -> dict[int, dict[str, float]]:
    found = {}
    for seed in study.seeds:
        metrics = state.completed(RunKey(backbone, target, method, init, lr, seed))
        if metrics is not None:
            found[seed] = metrics
    return found


def _paired(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> dict[str, Stat]:
    seeds = sorted(set(a) & set(b))
    return {m: Stat([a[s][m] - b[s][m] for s in seeds]) for m in METRICS}


def collect_cells(study: StudyConfig, state: StudyState) -> list[Cell]:
    """Every group whose lrs are chosen, with its seed statistics (needs both RoLI and RanLI in the study)."""
    if set(study.head_inits) != {"random", "roli"}:
        return []
    cells = []
    for (backbone, target, method), choice in chosen_groups(study, state):
        own_runs = {init: _seed_metrics(study, state, backbone, target, method, init, choice.own[init])
                    for init in study.head_inits}
        matched = {init: (_seed_metrics(study, state, backbone, target, method, init, choice.matched)
                          if choice.matched is not None else {}) for init in study.head_inits}
        own = {init: {m: Stat([r[m] for r in runs.values()]) for m in METRICS} for init, runs in own_runs.items()}
        # the selection seed chose each lr on val: its test numbers are not independent of that choice
        held_out = {init: {s: m for s, m in runs.items() if s != study.seeds[0]} for init, runs in own_runs.items()}
        own_held_out = {init: {m: Stat([r[m] for r in runs.values()]) for m in METRICS}
                        for init, runs in held_out.items()}
        cells.append(Cell(backbone, target, method, choice, own, _paired(own_runs["roli"], own_runs["random"]),
                          _paired(matched["roli"], matched["random"]), own_held_out,
                          _paired(held_out["roli"], held_out["random"])))
    return cells


def probe_stats(study: StudyConfig, state: StudyState) -> dict[tuple[str, str], dict[str, Stat]]:
    """Test accuracies of the stage-1 probes, per (backbone, target), over the seeds that have one."""
    stats = {}
    for backbone in study.backbones:
        for target in study.targets:
            found = [state.probes.load(state.probe_path(ProbeKey(backbone, target, s)).stem)[0].metrics
                     for s in study.seeds if state.has_probe(ProbeKey(backbone, target, s))]
            stats[(backbone, target)] = {m: Stat([f[f"probe_{m}"] for f in found]) for m in METRICS}
    return stats


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


F3_EFFECT = 0.02
"""The RoLI - RanLI difference (2 points of test accuracy) F3's test is powered for: the paper's +2.44 robust
(+3.88 clean) averaged over five datasets is of this size (../shared/PAPER.md, F3)."""


@dataclass
class F3Test:
    """F3's paired test over cells: each cell's mean RoLI - RanLI over its held-out seeds (own lr) is one pair, so
    the unit is the cell and the seeds only sharpen each cell's value. Two-sided paired t test of mean 0, its 95 %
    interval, and its power for a true mean of :data:`F3_EFFECT` at the spread over cells that was measured."""

    scope: str
    metric: str
    differences: list[float]  # per cell, fractions

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.differences) if self.n > 1 else 0.0

    @property
    def p_value(self) -> float | None:
        return paired_t_p_value(self.differences)

    @property
    def power(self) -> float | None:
        """Power for a true mean of :data:`F3_EFFECT`; None where the test cannot run (see :attr:`p_value`)."""
        return paired_t_power(self.sd, self.n, F3_EFFECT) if self.p_value is not None else None

    def line(self) -> str:
        what = self.metric.removeprefix("test_").removesuffix("_acc")
        head = f"{self.scope}, test {what}: {100 * self.mean:+.2f} points over {self.n} cells"
        interval, p, power = paired_t_interval(self.differences), self.p_value, self.power
        if interval is None or p is None:
            return head + " (too few cells, or no spread, for a test)"
        needed = pairs_for_power(self.sd, F3_EFFECT)
        return (f"{head}, 95 % CI {100 * interval[0]:+.2f} to {100 * interval[1]:+.2f}, paired t({self.n - 1}) "
                f"p = {p:.3g}; SD over cells {100 * self.sd:.2f} points, so the power to detect a true "
                f"{100 * F3_EFFECT:.0f}-point mean difference at the 5 % level is {power:.2f} "
                f"({'cells for 80 % power: ' + str(needed) if needed else 'more than 100,000 cells for 80 % power'})")


def f3_tests(study: StudyConfig, cells: list[Cell]) -> list[F3Test]:
    """F3's test per scope (every backbone together, then each) and metric, over the held-out seeds at own lr."""
    tests = []
    for scope in ("all", *study.backbones):
        chosen = [c for c in cells if scope == "all" or c.backbone == scope]
        for metric in METRICS:
            values = [c.diff_held_out[metric].mean for c in chosen if c.diff_held_out[metric].n]
            if values:
                tests.append(F3Test("all backbones" if scope == "all" else f"{scope} backbone", metric, values))
    return tests


def findings(study: StudyConfig, cells: list[Cell], probes: dict[tuple[str, str], dict[str, Stat]]) -> tuple[list[str], dict[str, float]]:
    """Lines stating F1-F3 with their numbers, and the same numbers as summary metrics."""
    lines, summary = [], {}
    robust_key = "test_robust_acc"
    # F1: standard vs robust backbone, PEFT methods (both inits, own lr)
    peft_names = peft_methods()
    lines.append("**F1 (standard backbone: PEFT stays far less robust).** Mean test robust accuracy of "
                 f"{', '.join(peft_names)} (both inits, own lr), and of full finetuning:")
    for target in study.targets:
        row = []
        for backbone in study.backbones:
            peft = [c.own[i][robust_key].mean for c in cells if c.backbone == backbone and c.target == target
                    and c.method in peft_names for i in c.own if c.own[i][robust_key].n]
            full = [c.own[i][robust_key].mean for c in cells if c.backbone == backbone and c.target == target
                    and c.method == "full" for i in c.own if c.own[i][robust_key].n]
            if peft:
                summary[f"f1_{target}_{backbone}_peft_robust"] = statistics.fmean(peft)
                row.append(f"{backbone}: PEFT {100 * statistics.fmean(peft):.1f} %"
                           + (f", full {100 * statistics.fmean(full):.1f} %" if full else ""))
        lines.append(f"- {target}: " + "; ".join(row))
    # F2: probe vs RanLI finetuning on the robust backbone
    lines.append("")
    lines.append("**F2 (robust backbone: the adversarial linear probe keeps robustness and can beat RanLI "
                 "finetuning).** Probe test robust accuracy vs each method with RanLI (own lr):")
    for (backbone, target), stat in probes.items():
        ranli = {c.method: c.own["random"][robust_key].mean for c in cells
                 if c.backbone == backbone and c.target == target and c.own["random"][robust_key].n}
        if not stat[robust_key].n or not ranli:
            continue
        beaten = [m for m, v in ranli.items() if stat[robust_key].mean >= v]
        summary[f"f2_{backbone}_{target}_probe_beats_ranli"] = len(beaten)
        lines.append(f"- {backbone} / {target}: probe {stat[robust_key].pct()} %; at or above RanLI for "
                     f"{len(beaten)} of {len(ranli)} methods ({', '.join(beaten) or 'none'})")
    # F3: RoLI - RanLI, own lr and matched lr
    lines.append("")
    lines.append("**F3 (RoLI beats RanLI).** Mean over cells of the paired RoLI - RanLI difference "
                 "(percentage points; cells with a positive mean / all cells):")
    for scope in ("all", *study.backbones):
        chosen = [c for c in cells if scope == "all" or c.backbone == scope]
        parts = []
        for label, attr in (("own lr", "diff_own"), ("own lr, held-out seeds", "diff_held_out"),
                            ("matched lr", "diff_matched")):
            for metric in METRICS:
                means = [getattr(c, attr)[metric].mean for c in chosen if getattr(c, attr)[metric].n]
                if not means:
                    continue
                key = f"f3_{scope}_{attr}_{metric}"
                summary[key] = statistics.fmean(means)
                positive = sum(v > 0 for v in means)
                parts.append(f"{label} {metric.removeprefix('test_').removesuffix('_acc')} "
                             f"{100 * statistics.fmean(means):+.2f} ({positive}/{len(means)})")
        lines.append(f"- {'all backbones' if scope == 'all' else scope + ' backbone'}: " + "; ".join(parts))
    lines += ["", "**F3's test** (each cell's RoLI - RanLI at its own lrs, averaged over the seeds that did not "
              "choose the lr, is one pair; two-sided paired t test over cells):"]
    for test in f3_tests(study, cells):
        lines.append(f"- {test.line()}")
        key = f"f3_test_{test.scope.split()[0]}_{test.metric}"
        summary[f"{key}_mean"] = test.mean
        if test.p_value is not None:
            summary[f"{key}_p"] = test.p_value
            summary[f"{key}_power_2pt"] = test.power
    return lines, summary


def final_table(study: StudyConfig, state: StudyState) -> tuple[list[str], dict[str, float]]:
    """The final evaluations (seed 0, each cell at its own lr) as a markdown table, and their summary."""
    rows, warned, done = [], 0, 0
    params: dict[str, str] = {}
    for key in final_runs(study, state):
        record = state.final(key)
        if record is None:
            continue
        if record.failed:
            rows.append(f"| {key.backbone} | {key.target} | {key.method} | {key.head_init} | failed | | | |")
            continue
        done += 1
        params = record.params
        m = record.metrics
        bad = [check.name for check in record.warnings()]
        warned += bool(bad)
        aa = m.get("final_autoattack_acc")
        rows.append(f"| {key.backbone} | {key.target} | {key.method} | {'RoLI' if key.head_init == 'roli' else 'RanLI'} "
                    f"| {100 * m['final_clean_acc']:.1f} | {100 * m['final_pgd_acc']:.1f} | "
                    f"{'-' if aa is None else f'{100 * aa:.1f}'} | {'pass' if not bad else 'warning: ' + ', '.join(bad)} |")
    if not rows:
        return [], {}
    threat = ", ".join(f"{k.removeprefix('final_eval.')} {v}" for k, v in params.items())
    masking = study.base.eval.final.masking
    lines = ["", f"## Final evaluation (seed {study.seeds[0]}, each cell at its own lr; test, %)", "",
             f"Threat model: {threat}. Masking checks on the first {masking.n_examples} of these examples: "
             f"eps sweep x{masking.eps_factors} and {masking.large_eps}, PGD-{masking.pgd_steps} vs "
             f"PGD-{masking.more_steps}, Square {masking.square_queries} queries, input gradients, determinism.",
             "", "| backbone | target | method | init | clean | PGD (restarts) | AutoAttack | masking checks |",
             "|---|---|---|---|---|---|---|---|", *rows]
    return lines, {"final_evaluations": done, "final_masking_warnings": warned}


def lr_grid_edges(study: StudyConfig, cells: list[Cell]) -> dict[str, EdgeWarning]:
    """The cells whose chosen lr (each init's own) is the largest or smallest of the method's lr grid: the grid,
    not the method, may be what limits that number (:func:`roli_sweep.edges.grid_end_warning`)."""
    edges = {}
    for c in cells:
        for init, lr in c.choice.own.items():
            where = f"{c.backbone}-{c.target}-{c.method}-{init}"
            warning = grid_end_warning("finetune.lr", study.methods[c.method].grid(init), lr, where)
            if warning:
                edges[where] = warning
    return edges


def _grids(method: str, spec) -> str:
    if spec.shared:
        return f"{method} {[_lr(v) for v in spec.lrs]}"
    return f"{method} " + ", ".join(f"{_INIT_LABEL[i]} {[_lr(v) for v in g]}" for i, g in spec.lrs.items())


_INIT_LABEL = {"random": "RanLI", "roli": "RoLI"}


def write_report(study: StudyConfig, state: StudyState) -> Report:
    """Write ``RESULTS.md`` and three PNG plots into ``<state folder>/report`` from what has finished."""
    folder = state.folder / "report"
    folder.mkdir(exist_ok=True)
    cells = collect_cells(study, state)
    probes = probe_stats(study, state)
    base = study.base
    run_seconds = 0.0
    completed = failed = 0
    for path in sorted(state.folder.glob("runs/*.json")):
        record = StudyJobRecord.from_json(json.loads(path.read_text()))
        run_seconds += record.seconds
        completed += not record.failed
        failed += record.failed
    sizes = "; ".join(f"{t}: {d.name}{' classes ' + str(d.classes) if d.classes else ''}, train {d.train_size}, "
                      f"val {d.val_size}, test {d.test_size}" for t, d in study.targets.items())
    sides = ", ".join(f"{t} {input_side(d)}x{input_side(d)}" for t, d in study.targets.items())
    lines = [
        f"# Study {study.name}",
        "",
        f"Threat model: L-inf eps {base.eval.eps if base.eval.eps is not None else base.attack.eps:.4g} in [0, 1] pixels, "
        f"attacked at each target's input ({sides}). Training: PGD-{base.attack.steps} "
        f"(step {'2.5 eps / steps' if base.attack.step_size is None else base.attack.step_size}), random start. "
        f"Validation (lr and epoch selection): PGD-{base.eval.val_steps}. Test: clean and PGD-{base.eval.test_steps}, "
        f"step {base.eval.step_size}, 1 random start, best iterate per example.",
        f"Data: {sizes}.",
        f"Stage 1: {base.probe.epochs} epochs SGD lr {base.probe.lr}; stage 2: {base.finetune.epochs} epochs "
        f"{base.finetune.optimizer} with {base.finetune.warmup_epochs} warm-up epochs. Seeds {study.seeds} "
        f"(lr chosen with seed {study.seeds[0]} on val robust accuracy).",
        "lr grids: " + "; ".join(_grids(m, s) for m, s in study.methods.items()) + ".",
        f"Runs: {completed} completed, {failed} failed; {run_seconds / 3600:.2f} h of run time summed over runs "
        "(probes not included).",
        "",
        "## Stage-1 adversarial linear probes (test, % mean ± std over seeds)",
        "",
        "| backbone | target | seeds | clean | robust |",
        "|---|---|---|---|---|",
    ]
    for (backbone, target), stat in probes.items():
        lines.append(f"| {backbone} | {target} | {stat['test_clean_acc'].n} | {stat['test_clean_acc'].pct()} | "
                     f"{stat['test_robust_acc'].pct()} |")
    lines += [
        "",
        "## Finetuning (test, % mean ± std over seeds; Δ = paired RoLI - RanLI, points)",
        "",
        "| backbone | target | method | RanLI lr | RanLI clean | RanLI robust | RoLI lr | RoLI clean | RoLI robust "
        "| Δ clean (own lr) | Δ robust (own lr) | matched lr | Δ clean (matched) | Δ robust (matched) | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        r, o = c.own["random"], c.own["roli"]
        lines.append(
            f"| {c.backbone} | {c.target} | {c.method} | {_lr(c.choice.own['random'])} | {r['test_clean_acc'].pct()} | "
            f"{r['test_robust_acc'].pct()} | {_lr(c.choice.own['roli'])} | {o['test_clean_acc'].pct()} | "
            f"{o['test_robust_acc'].pct()} | {c.diff_own['test_clean_acc'].pct(True)} | "
            f"{c.diff_own['test_robust_acc'].pct(True)} | {_lr(c.choice.matched)} | "
            f"{c.diff_matched['test_clean_acc'].pct(True)} | {c.diff_matched['test_robust_acc'].pct(True)} | "
            f"{min(r['test_robust_acc'].n, o['test_robust_acc'].n)} |")
    held_out = study.seeds[1:]
    lines += [
        "",
        f"## Finetuning on the seeds that did not choose the lr ({held_out}; test, % mean ± std, own lr)",
        "",
        "| backbone | target | method | RanLI clean | RanLI robust | RoLI clean | RoLI robust | Δ clean | Δ robust "
        "| seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        r, o = c.own_held_out["random"], c.own_held_out["roli"]
        lines.append(
            f"| {c.backbone} | {c.target} | {c.method} | {r['test_clean_acc'].pct()} | {r['test_robust_acc'].pct()} | "
            f"{o['test_clean_acc'].pct()} | {o['test_robust_acc'].pct()} | "
            f"{c.diff_held_out['test_clean_acc'].pct(True)} | {c.diff_held_out['test_robust_acc'].pct(True)} | "
            f"{min(r['test_robust_acc'].n, o['test_robust_acc'].n)} |")
    edges = lr_grid_edges(study, cells)
    lines += ["", "## lr grid edges", "",
              *([f"- {w.message}" for w in edges.values()] or ["Every chosen lr lies inside its method's grid."])]
    final_lines, final_summary = final_table(study, state)
    text, summary = findings(study, cells, probes)
    summary.update(final_summary)
    lines += final_lines
    lines += ["", "## Findings at this scale", "", *text, "",
              "Plots: clean_vs_robust.png, roli_minus_ranli.png, robust_vs_standard.png."]
    (folder / "RESULTS.md").write_text("\n".join(lines) + "\n")
    if cells:
        plot_clean_vs_robust(cells, probes, folder / "clean_vs_robust.png")
        plot_paired_differences(cells, folder / "roli_minus_ranli.png")
        plot_backbone_comparison(cells, folder / "robust_vs_standard.png")
    summary.update({"runs_completed": completed, "runs_failed": failed, "run_hours": run_seconds / 3600})
    return Report(folder, summary, cells, edges)
