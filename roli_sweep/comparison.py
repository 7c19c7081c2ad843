"""The arms compared after their confirmation: each arm's confirmed configuration rerun over the same seeds, its
test accuracies summarised (mean, sample std), and each pair of arms' paired difference seed by seed with a 95 %
paired t interval (Student's t with n - 1 degrees of freedom over the n seeds both arms completed). With arms
``finetune.head_init`` the difference is RoLI - RanLI (other arms: in the order written). Pure computation over the confirmation's
rows; :mod:`roli_sweep.analysis` turns it into the finding that is logged and printed.
References: scipy ``stats.t``; the paper's protocol of comparing inits at their own best lr (../shared/PAPER.md).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Sequence

from scipy import stats

from roli_sweep.records import TrialRow, TrialState

METRICS = ("test_clean_acc", "test_robust_acc")
"""What is compared: test clean and test robust (PGD, ``eval.test_steps`` steps) accuracy, fractions in [0, 1]."""

CONFIDENCE = 0.95

FEW_SEEDS = 10
"""Below this many paired seeds the interval's t quantile is far from the normal's 1.96 (2.26 at 10, 4.30 at 3):
the console and ``comparison.md`` say that the interval is wide because the seeds are few."""

@dataclass
class ArmResult:
    """One confirmed configuration of one arm: the search trial it came from, its settings, and per seed the
    test accuracies of the confirmation runs that completed (``runs``: seed -> row)."""

    arm: str
    rank: int
    source_trial: str
    settings: dict[str, Any]
    runs: dict[int, TrialRow]
    failed: int

    def values(self, metric: str) -> list[float]:
        return [getattr(self.runs[s], metric) for s in sorted(self.runs) if getattr(self.runs[s], metric) is not None]

    def mean_std(self, metric: str) -> tuple[float, float] | None:
        """Mean and sample standard deviation over the seeds (std 0 for one seed); None for none."""
        values = self.values(metric)
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class PairedDifference:
    """``first - second`` on ``metric`` over the seeds both completed: per-seed differences, their mean and the
    95 % paired t interval (None with fewer than 2 pairs)."""

    first: str
    second: str
    metric: str
    seeds: list[int]
    differences: list[float]

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.differences) if self.differences else None

    @property
    def t_quantile(self) -> float | None:
        return float(stats.t.ppf(0.5 + CONFIDENCE / 2, self.n - 1)) if self.n >= 2 else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return paired_t_interval(self.differences)

    def caveat(self) -> str | None:
        """What the reader must know about this interval's strength, or None when the seeds are enough."""
        if self.n < 2:
            return (f"{self.first} - {self.second}: {self.n} paired seed(s), no interval "
                    "(it needs 2; raise confirm.seeds)")
        if self.n < FEW_SEEDS:
            return (f"{self.first} - {self.second}: {self.n} paired seeds, so the 95 % interval uses t = "
                    f"{self.t_quantile:.2f} with {self.n - 1} degrees of freedom: it is wide, and only a large "
                    f"difference excludes 0; more seeds (confirm.seeds) narrow it")
        return None


def paired_t_interval(differences: Sequence[float]) -> tuple[float, float] | None:
    """The 95 % paired t interval of the mean of ``differences`` (Student's t, n - 1 degrees of freedom); None
    with fewer than 2 values."""
    n = len(differences)
    if n < 2:
        return None
    mean = statistics.fmean(differences)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return mean - half, mean + half


def paired_t_p_value(differences: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t test of mean ``differences`` = 0 (scipy ``stats.ttest_1samp``); None
    with fewer than 2 values or no spread."""
    if len(differences) < 2 or statistics.stdev(differences) == 0:
        return None
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def paired_t_power(sd: float, n: int, effect: float, alpha: float = 1 - CONFIDENCE) -> float:
    """Power of the two-sided paired t test at level ``alpha`` over ``n`` pairs whose differences have standard
    deviation ``sd``, when the true mean difference is ``effect`` (same units as ``sd``): the probability that
    it rejects 0, from the noncentral t with n - 1 degrees of freedom and noncentrality effect / (sd / sqrt(n))
    (scipy ``stats.nct``; Cohen, Statistical Power Analysis, 1988, ch. 2).

    Raises:
        ValueError: ``n`` below 2 or ``sd`` not positive.
    """
    if n < 2 or not sd > 0:
        raise ValueError(f"paired_t_power: needs n >= 2 and sd > 0, got n={n}, sd={sd}")
    df, ncp = n - 1, effect / (sd / math.sqrt(n))
    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(critical, df, ncp) + stats.nct.cdf(-critical, df, ncp))


def pairs_for_power(sd: float, effect: float, power: float = 0.8, alpha: float = 1 - CONFIDENCE,
                    most: int = 100_000) -> int | None:
    """The fewest pairs (>= 2) for which :func:`paired_t_power` reaches ``power``; None beyond ``most``."""
    low, high = 2, 2
    while paired_t_power(sd, high, effect, alpha) < power:
        if high >= most:
            return None
        low, high = high, min(2 * high, most)
    while low < high:  # power grows with n: the first n that reaches it
        middle = (low + high) // 2
        low, high = (middle + 1, high) if paired_t_power(sd, middle, effect, alpha) < power else (low, middle)
    return high


@dataclass
class Comparison:
    """The confirmation's answer: per arm its confirmed configurations, and per pair of arms (rank 1 of each) the
    paired differences on every metric of :data:`METRICS`."""

    arms: list[ArmResult]
    differences: list[PairedDifference]
    seeds: list[int]


def compare(rows: Sequence[TrialRow], confirmed: Sequence[tuple[str, int, TrialRow]], arms: str | None,
            seeds: Sequence[int]) -> Comparison:
    """The comparison of the confirmation runs ``rows`` (each with ``sampled`` = the confirmed trial's sampled
    values plus ``seed``) of the ``confirmed`` search trials ``(arm label, rank, search row)``.

    A confirmation run belongs to the confirmed trial whose sampled values it repeats; runs that did not complete
    count as ``failed`` and leave their seed out of that arm's values and of every pair that needs it.
    """
    results = []
    for arm, rank, source in confirmed:
        mine = [r for r in rows if {k: v for k, v in r.sampled.items() if k != "seed"} == source.sampled]
        done = {int(r.sampled["seed"]): r for r in mine if r.status == TrialState.COMPLETED}
        results.append(ArmResult(arm, rank, source.trial_id, source.sampled, done, len(mine) - len(done)))
    firsts = sorted((r for r in results if r.rank == 1), key=lambda r: r.arm != "RoLI")  # RoLI - RanLI, else as written
    differences = []
    for a, b in combinations(firsts, 2):
        for metric in METRICS:
            both = [s for s in sorted(set(a.runs) & set(b.runs))
                    if getattr(a.runs[s], metric) is not None and getattr(b.runs[s], metric) is not None]
            differences.append(PairedDifference(a.arm, b.arm, metric, both,
                                                [getattr(a.runs[s], metric) - getattr(b.runs[s], metric)
                                                 for s in both]))
    return Comparison(results, differences, list(seeds))


def points(value: float) -> str:
    """An accuracy difference in percentage points, signed: ``+2.3``."""
    return f"{100 * value:+.1f}"


def describe(diff: PairedDifference) -> str:
    """``RoLI - RanLI test robust: +2.3 points (95 % CI -1.0 to +5.6, paired t over 3 seeds)``."""
    what = diff.metric.removeprefix("test_").removesuffix("_acc")
    if diff.mean is None:
        return f"{diff.first} - {diff.second} test {what}: no seed completed in both arms"
    interval = diff.interval
    ci = (f"95 % CI {points(interval[0])} to {points(interval[1])}, paired t over {diff.n} seeds" if interval
          else f"{diff.n} seed, no interval")
    return f"{diff.first} - {diff.second} test {what}: {points(diff.mean)} points ({ci})"


def markdown(comparison: Comparison, sweep: str, threat: str) -> str:
    """``comparison.md``: the confirmed configurations' mean ± std per arm, every seed's value, the paired
    differences and their caveats."""
    seeds = comparison.seeds
    lines = [f"# Sweep {sweep}: the arms confirmed over seeds {seeds}", "",
             f"Each arm's best search trial (by val robust accuracy) rerun as whole trials over seeds {seeds} (the "
             "search ran on another seed); test accuracy on the test split, robust under " + threat + ".", "",
             "| arm | rank | search trial | settings | seeds completed | test clean (mean ± std) | "
             "test robust (mean ± std) |", "|---|---|---|---|---|---|---|"]
    for arm in comparison.arms:
        cells = []
        for metric in METRICS:
            found = arm.mean_std(metric)
            cells.append("-" if found is None else f"{found[0]:.4f} ± {found[1]:.4f}")
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in arm.settings.items())
        lines.append(f"| {arm.arm} | {arm.rank} | {arm.source_trial} | {settings} | {len(arm.runs)} of "
                     f"{len(seeds)} | {cells[0]} | {cells[1]} |")
    lines += ["", "Per seed (test clean / test robust):", "", "| arm | rank | " + " | ".join(map(str, seeds)) + " |",
              "|---|---|" + "---|" * len(seeds)]
    for arm in comparison.arms:
        per_seed = [f"{arm.runs[s].test_clean_acc:.4f} / {arm.runs[s].test_robust_acc:.4f}" if s in arm.runs
                    else "failed" for s in seeds]
        lines.append(f"| {arm.arm} | {arm.rank} | " + " | ".join(per_seed) + " |")
    lines += ["", "## Paired differences (rank 1 of each arm, seed by seed)", ""]
    lines += [f"- {describe(d)}" for d in comparison.differences]
    caveats = sorted({c for d in comparison.differences if (c := d.caveat())})
    lines += [""] + [f"Note: {c}." for c in caveats]
    return "\n".join(lines) + "\n"
