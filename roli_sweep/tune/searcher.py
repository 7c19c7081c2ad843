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

The space is sampled define-by-run (:class:`DefineByRun`, Optuna's ``trial.suggest_*``), so a conditional
parameter takes the range of the case its ``given`` parameter drew. A space with ``arms`` is searched by
:class:`ArmedSearch`: one Optuna study per arm (``<sweep>.<arm>``), the arm fixed in each, trials dealt to the
arms in turn, so each arm gets ``num_samples / arms`` trials and TPE models each arm on its own history.
The sampler is :func:`make_sampler`'s TPE. References: Ray Tune ``OptunaSearch`` (define-by-run ``space``),
Optuna ``TPESampler`` (``multivariate``, ``group``, ``constant_liar``) docs.
"""
from __future__ import annotations

import math
import pickle
from typing import Any

import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from roli_sweep.config import ParameterSpec, SearchSpace
from roli_sweep.names import case_key

CASE_MARK = "|"
"""Joins a conditional parameter's Optuna name to its case, ``finetune.lr|finetune.head_init=roli``, where the
case is drawn in the same study (each case's range is its own Optuna distribution). Within an arm's study the
arm's case is the only one and the plain name is used."""


def distribution(spec: ParameterSpec) -> BaseDistribution:
    """The Optuna distribution of a plain parameter spec (``int_uniform`` includes ``max``)."""
    if spec.values is not None:
        return CategoricalDistribution(spec.values)
    if spec.distribution == "int_uniform":
        return IntDistribution(int(spec.min), int(spec.max))
    return FloatDistribution(spec.min, spec.max, log=spec.distribution == "log_uniform_values")


def config_key(optuna_name: str) -> str:
    """The trial-config path an Optuna parameter name stands for (the name without its case)."""
    return optuna_name.split(CASE_MARK, 1)[0]


class DefineByRun:
    """The define-by-run space of one study: every parameter of ``space`` but the arm (fixed to ``arm``), the
    plain ones first, each conditional one from the case its ``given`` parameter took. Picklable (Ray Tune saves
    the searcher with the experiment)."""

    def __init__(self, space: SearchSpace, arm: Any = None) -> None:
        self.parameters, self.arms, self.arm = dict(space.parameters), space.arms, arm
        order = sorted(self.parameters, key=lambda k: self.parameters[k].given is not None)
        self.order = [k for k in order if k != self.arms]

    def _named(self, key: str, chosen: dict[str, Any]) -> tuple[str, ParameterSpec]:
        spec = self.parameters[key]
        if spec.given is None:
            return key, spec
        case = case_key(chosen[spec.given])
        return (key if spec.given == self.arms else f"{key}{CASE_MARK}{spec.given}={case}"), spec.cases[case]

    def __call__(self, trial: optuna.Trial) -> dict[str, Any] | None:
        fixed = {self.arms: self.arm} if self.arms else {}
        chosen = dict(fixed)
        for key in self.order:
            name, spec = self._named(key, chosen)
            dist = distribution(spec)
            if isinstance(dist, CategoricalDistribution):
                chosen[key] = trial.suggest_categorical(name, dist.choices)
            elif isinstance(dist, IntDistribution):
                chosen[key] = trial.suggest_int(name, dist.low, dist.high)
            else:
                chosen[key] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
        return fixed or None

    def distributions(self, params: dict[str, Any]) -> dict[str, BaseDistribution] | None:
        """The distributions, in this space, of a finished trial's Optuna ``params``; None when they are not a
        point of it (another parameter set, a case of another arm, or a value outside a range)."""
        chosen = {self.arms: self.arm} if self.arms else {}
        chosen.update({config_key(k): v for k, v in params.items()})
        found = {}
        for key in self.order:
            if key not in chosen:
                return None
            name, spec = self._named(key, chosen)
            dist = distribution(spec)
            if name not in params or not _contains(dist, params[name]):
                return None
            found[name] = dist
        return found if set(found) == set(params) else None


def _contains(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    return dist.low <= value <= dist.high


def make_sampler(seed: int, budget: int) -> optuna.samplers.TPESampler:
    """TPE for one study of ``budget`` trials: multivariate with ``group`` (it models the parameters jointly and
    splits a conditional space into the groups that occur together, so a case's range is modelled with the
    trials that drew it), ``constant_liar`` (trials running in parallel are not proposed the same point), and
    half the budget, at most Optuna's default 10, as random start-up trials, so that a small arm still gets
    some guided trials."""
    import warnings

    with warnings.catch_warnings():  # multivariate, group and constant_liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=max(1, min(10, budget // 2)))


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

    def suggest(self, trial_id: str) -> dict | None:
        """Ray's suggestion, each conditional parameter under its trial-config path (:func:`config_key`)."""
        params = super().suggest(trial_id)
        return None if params is None else {config_key(k): v for k, v in params.items()}

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


class ArmedSearch(Searcher):
    """One :class:`TruthfulOptunaSearch` per arm (``searchers``: case key of the arm's value -> its search, each on
    its own study), trials dealt to the arm with the fewest so far (ties: the order written), ``per_arm`` each;
    every result and ending goes to the trial's own arm. Picklable, with its searchers, for ``Tuner.restore``."""

    def __init__(self, searchers: dict[str, TruthfulOptunaSearch], per_arm: int, metric: Any, mode: Any) -> None:
        super().__init__(metric=metric, mode=mode)
        self.searchers, self.per_arm = searchers, per_arm
        self._arm_of: dict[str, str] = {}
        self._dealt = {arm: 0 for arm in searchers}

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return not config  # the arms' studies hold the space

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._arm_of:
            open_arms = [arm for arm, n in self._dealt.items() if n < self.per_arm]
            if not open_arms:
                return Searcher.FINISHED
            self._arm_of[trial_id] = min(open_arms, key=self._dealt.__getitem__)
            self._dealt[self._arm_of[trial_id]] += 1
        return self.searchers[self._arm_of[trial_id]].suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._arm_of:
            self.searchers[self._arm_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._arm_of:
            self.searchers[self._arm_of[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__dict__, out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as saved:
            self.__dict__.update(pickle.load(saved))


def seed_study(storage: optuna.storages.BaseStorage, study_name: str, source: optuna.storages.BaseStorage,
               source_name: str, space: DefineByRun, directions: list[str]) -> int:
    """Start the study ``study_name`` with the finished trials of ``source_name`` that are points of ``space``.

    COMPLETE trials keep their values and PRUNED ones their intermediate values (what TPE reads of them);
    FAIL and unfinished trials are left out. The distributions are the new, possibly widened ones
    (:mod:`roli_sweep.widening` checked that every old value lies in them, :meth:`DefineByRun.distributions`),
    so TPE models the old points in the new space. :class:`TruthfulOptunaSearch` then loads the study
    (``load_if_exists``).

    Returns:
        The number of trials copied.

    Raises:
        ValueError: ``study_name`` already has trials (seeding twice would count them twice).
    """
    old = optuna.load_study(study_name=source_name, storage=source)
    new = optuna.create_study(study_name=study_name, storage=storage, directions=directions, load_if_exists=True)
    if new.trials:
        raise ValueError(f"study {study_name!r} already has {len(new.trials)} trials; seed a new sweep")
    kept = [(t, found) for t in old.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if (found := space.distributions(t.params)) is not None]
    for trial, distributions in kept:
        new.add_trial(optuna.trial.create_trial(
            state=trial.state, values=trial.values if trial.state == TrialState.COMPLETE else None,
            params=trial.params, distributions=distributions, intermediate_values=trial.intermediate_values,
            user_attrs={"seeded_from": f"{source_name}#{trial.number}"}))
    return len(kept)
