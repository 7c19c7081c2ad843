"""A trial's last finished epoch on the sweep's storage: its checkpoint folder and the report that went with it.

Why not Ray Tune's checkpoints: with ``CheckpointConfig(num_to_keep=k)`` Ray 2.60 forces a snapshot of the whole
experiment state (every trial and the searcher, serialised) after every ``k`` checkpoints of a trial
(``ray.tune.execution.experiment_state``, ``on_trial_checkpoint``), so a sweep that checkpoints every epoch and
keeps one spends time growing with its trial count on every epoch: 35 % of the driver's time at 1,000 trivial
trials (``benchmarks/driver_scale.py``), and quadratic in all. Keeping every checkpoint (``num_to_keep=None``)
instead would keep every epoch's model. So a trial keeps its own: :meth:`EpochStore.save` writes the epoch's folder
beside the report, then swaps it in for the previous one with renames (the folder is complete before it is
named ``current``; a stop between the two renames leaves both complete and :meth:`EpochStore.latest` takes the
newer), and Ray Tune gets the report without a checkpoint, its experiment state saved on its own period.

On a restore Ray Tune restarts an unfinished trial that has no checkpoint; the trial finds its store by its trial id,
continues after the saved epoch and first reports that epoch again, since the driver may have stopped before it
processed it (the MLflow callback, the Optuna search and ASHA each take an epoch once). A store written for another
config (a reused sweep name) is not resumed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from roli_sweep.names import config_fingerprint

TRIAL_STATE = "trial_state"
"""In the sweep's folder: ``<experiment>/<trial id>/`` of every trial (the search's experiment is the sweep's name;
the confirmation's is ``confirmation``)."""

REPORT_FILE = "report.json"
"""In a saved folder: ``{"seq": n, "config": fingerprint, "report": the result reported for that epoch}``."""

CURRENT = "current"


class EpochStore:
    """The saved epochs of one trial: the folder ``<state_root>/<experiment>/<trial id>`` (``state_root`` is the
    sweep's ``trial_state`` folder, on its storage, which every node of a cluster shares).

    Args:
        config: the trial's sampled values (Ray Tune's trial config); a saved epoch of another config is ignored.
    """

    def __init__(self, state_root: Path, experiment: str, trial_id: str, config: dict[str, Any]) -> None:
        self.root, self.config = Path(state_root) / experiment / trial_id, config_fingerprint(config)

    def _candidates(self) -> list[tuple[int, Path, dict[str, Any]]]:
        found = []
        if not self.root.is_dir():
            return found
        for folder in self.root.iterdir():
            if folder.name != CURRENT and not folder.name.startswith((".next-", ".old-")):
                continue
            try:
                saved = json.loads((folder / REPORT_FILE).read_text())
            except (OSError, ValueError):
                continue  # not complete: its report is written last
            if saved.get("config") == self.config:
                found.append((int(saved["seq"]), folder, saved["report"]))
        return sorted(found, key=lambda item: item[0])

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete saved folder of this config and its report, or None."""
        found = self._candidates()
        return (found[-1][1], found[-1][2]) if found else None

    def save(self, folder: Path, report: dict[str, Any]) -> None:
        """Save ``folder`` (the trial's checkpoint folder after an epoch) with ``report`` as the newest epoch, then
        remove the older one and any copy a stop left behind. ``report`` must be JSON (numbers and strings).
        One writer per trial (its own process)."""
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self._candidates()
        seq = previous[-1][0] + 1 if previous else 0
        tag = uuid.uuid4().hex[:12]
        staging = self.root / f".next-{tag}"
        shutil.copytree(folder, staging)
        with open(staging / REPORT_FILE, "w", encoding="utf-8") as out:  # last: it marks the folder complete
            json.dump({"seq": seq, "config": self.config, "report": report}, out)
        current = self.root / CURRENT
        if current.exists():
            os.rename(current, self.root / f".old-{tag}")
        os.rename(staging, current)
        for left in self.root.iterdir():  # the previous epoch, and what a stop during a save left
            if left.name.startswith((".next-", ".old-")):
                shutil.rmtree(left, ignore_errors=True)
