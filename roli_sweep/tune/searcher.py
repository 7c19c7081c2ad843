"""Ray Tune's ``OptunaSearch``, telling Optuna what really happened to each trial.

Ray 2.60's ``OptunaSearch`` reports each result under Tune's ``training_iteration``, never sees the
result that made ASHA stop a trial, and tells Optuna an ASHA-stopped trial is COMPLETE with its
truncated value, so TPE learns from numbers of unfinished trials (its ``on_trial_complete``). Here:

- every finetune epoch's value goes to the Optuna trial at ``step = epoch`` (single objective; Optuna has
  no intermediate values for several objectives), each step once, also across a restore;
- a trial that stopped before its last finetune epoch (ASHA) ends as PRUNED, its last value reported;
- a failed trial, or one whose value is not finite, ends as FAIL;
- a trial that ran every epoch ends COMPLETE with its value.

The study lives in the storage it is given (``optuna.storages.RDBStorage`` on SQLite for a sweep), so a
resumed sweep's sampler keeps its history, and :func:`seed_study` can start a new sweep's study with an old
sweep's finished trials (a widened space, :mod:`roli_sweep.widening`).
"""
from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch


class TruthfulOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports every epoch and ends trials as COMPLETE, PRUNED or FAIL (see the module).

    Args:
        finetune_epochs: the epochs of a whole trial; one that stops earlier was pruned.
        *args, **kwargs: as ``OptunaSearch``.
    """

    def __init__(self, *args: Any, finetune_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finetune_epochs = finetune_epochs
        self._reported: dict[str, int] = {}  # trial id -> last epoch reported to Optuna

    def _report(self, trial_id: str, result: dict) -> None:
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None or epoch <= self._reported.get(trial_id, 0):
            return
        if math.isfinite(value):
            self._ot_trials[trial_id].report(value, int(epoch))
        self._reported[trial_id] = int(epoch)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials:
            return
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial, multi = self._ot_trials[trial_id], isinstance(self.metric, list)
        values = None
        if error or not result:
            state = TrialState.FAIL if error else TrialState.PRUNED
        else:
            values = [result.get(m) for m in self.metric] if multi else result.get(self.metric)
            finite = all(v is not None and math.isfinite(v) for v in (values if multi else [values]))
            if not finite:
                state, values = TrialState.FAIL, None
            elif result.get("epoch", 0) < self.finetune_epochs:
                if not multi:
                    self._report(trial_id, result)
                state, values = TrialState.PRUNED, None
            else:
                state = TrialState.COMPLETE
        self._ot_study.tell(ot_trial, values, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)


def seed_study(storage: optuna.storages.BaseStorage, study_name: str, source: optuna.storages.BaseStorage,
               source_name: str, distributions: dict[str, BaseDistribution], directions: list[str]) -> int:
    """Start the study ``study_name`` with the finished trials of ``source_name``, under ``distributions``.

    COMPLETE trials keep their values and PRUNED ones their intermediate values (what TPE reads of them);
    FAIL and unfinished trials are left out. The distributions are the new, possibly widened ones
    (:mod:`roli_sweep.widening` checked that every old value lies in them), so TPE models the old points in
    the new space. :class:`TruthfulOptunaSearch` then loads the study (``load_if_exists``).

    Returns:
        The number of trials copied.

    Raises:
        ValueError: ``study_name`` already has trials (seeding twice would count them twice).
    """
    old = optuna.load_study(study_name=source_name, storage=source)
    new = optuna.create_study(study_name=study_name, storage=storage, directions=directions, load_if_exists=True)
    if new.trials:
        raise ValueError(f"study {study_name!r} already has {len(new.trials)} trials; seed a new sweep")
    kept = [t for t in old.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if set(t.params) == set(distributions)]
    for trial in kept:
        new.add_trial(optuna.trial.create_trial(
            state=trial.state, values=trial.values if trial.state == TrialState.COMPLETE else None,
            params=trial.params, distributions=distributions, intermediate_values=trial.intermediate_values,
            user_attrs={"seeded_from": f"{source_name}#{trial.number}"}))
    return len(kept)
