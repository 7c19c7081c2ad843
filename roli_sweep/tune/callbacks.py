"""Ray Tune callbacks of a sweep: MLflow child runs (:class:`MlflowTrialCallback`) and the console view
(:class:`ConsoleProgress`: a live table on a terminal, plain lines elsewhere), with failures told as the trial's
own exception, in plain words."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from roli_sweep.names import arm_label, config_fingerprint
from roli_sweep.config import ConfigError, TrialConfig, apply_overrides
from roli_sweep.console import ProgressLines
from roli_sweep.live_view import LiveTable, interactive
from roli_sweep.tracking import (ROLE_TAG, describe_trial_run, experiment_id, filter_value, log_epoch_metrics,
                                  provenance_tags, trial_status)
from roli_sweep.tune.failures import failure_reason

logger = logging.getLogger(__name__)

SEARCH_PAGE = 10_000
"""Runs per page when a restored sweep reads back its child runs (MLflow's SQL store allows up to 50,000)."""


class MlflowTrialCallback(tune.Callback):
    """One MLflow child run per trial under the sweep's parent run.

    Holds only plain data, so Ray can pickle it with the experiment state and ``Tuner.restore`` brings it
    back; the client is recreated on demand. On a restore, a trial that already has a child run (tag
    ``trial_id``) reuses it, and epochs it already logged are not logged again (a checkpoint is registered
    only after its result went to the callbacks, so a resumed trial may report an epoch twice).

    Each child run is tagged ``sweep_role`` (``role``: ``trial`` for the search, ``confirmation``), ``arm`` (RoLI /
    RanLI, :func:`roli_sweep.comparison.arm_label`) when the space has ``arms``, and whatever ``run_tags`` holds
    for the trial's config (:func:`config_fingerprint` -> tags).
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, sweep: str,
                 base: TrialConfig, arms: str | None = None, role: str = "trial",
                 run_tags: dict[str, dict[str, str]] | None = None) -> None:
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self.sweep, self.base, self.arms, self.role, self.run_tags = sweep, base, arms, role, run_tags or {}
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._provenance: dict[str, str] | None = None  # read once per sweep, not once per trial
        self._earlier: dict[str, str] | None = {}  # trial id -> child run of an earlier run of this sweep; None: unread
        self._runs: dict[str, str] = {}
        self._logged: dict[str, int] = {}  # trial id -> last epoch logged

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"], state["_runs"], state["_logged"], state["_earlier"] = None, {}, {}, None
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _earlier_runs(self, experiment: str) -> dict[str, str]:
        """The child runs this sweep's role already has (trial id -> run id): none for a new sweep; for a restored
        one, read with one paged search when the first trial starts, so a trial start never searches the store."""
        if self._earlier is None:
            self._earlier, token = {}, None
            while True:
                page = self.client.search_runs([experiment], filter_string=(
                    f"tags.sweep = {filter_value(self.sweep)} and tags.{ROLE_TAG} = {filter_value(self.role)}"),
                    max_results=SEARCH_PAGE, page_token=token)
                self._earlier.update({run.data.tags["trial_id"]: run.info.run_id for run in page
                                      if "trial_id" in run.data.tags})
                token = page.token
                if not token:
                    break
        return self._earlier

    def _describe(self, run_id: str, trial) -> None:
        """Log the trial's resolved config; a sampled combination the config rejects is logged as such
        (the trial itself then fails on the same error and is recorded as failed)."""
        try:
            cfg = apply_overrides(self.base, trial.config)
        except ConfigError as err:
            self.client.log_text(run_id, str(err), "config_error.txt")
            return
        if self._provenance is None:
            self._provenance = provenance_tags()
        describe_trial_run(self.client, run_id, cfg, self._provenance)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if self._experiment_id is None:
            self._experiment_id = experiment_id(self.client, self.experiment)
        exp = self._experiment_id
        run_id = self._earlier_runs(exp).get(trial.trial_id)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "status", "running")
            steps = [m.step for m in self.client.get_metric_history(run_id, "train_loss")]
            self._logged[trial.trial_id] = max(steps, default=-1)
        else:
            arm = {"arm": arm_label(self.arms, trial.config.get(self.arms))} if self.arms else {}
            run = self.client.create_run(exp, run_name=f"{self.sweep}/{trial.trial_id}", tags={
                "mlflow.parentRunId": self.parent_run_id, "trial_id": trial.trial_id, "sweep": self.sweep,
                ROLE_TAG: self.role, "status": "running", **arm,
                **self.run_tags.get(config_fingerprint(trial.config), {})})
            run_id = self._earlier[trial.trial_id] = run.info.run_id  # a restart of the trial reuses it
            self._describe(run_id, trial)
            self.client.log_batch(run_id, tags=[RunTag(f"sampled.{k}", str(v)) for k, v in trial.config.items()])
            self._logged[trial.trial_id] = -1
        self._runs[trial.trial_id] = run_id

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id, epoch = self._runs.get(trial.trial_id), int(result.get("epoch", -1))
        if run_id is not None and result.get("stage") == "probe_done":  # probe = computed / cached, probe_key, ray_node
            self.client.log_batch(run_id, tags=[RunTag(k, str(result[k])) for k in ("probe", "probe_key", "ray_node")
                                                if result.get(k)])
        if run_id is None or epoch <= self._logged[trial.trial_id]:
            return
        log_epoch_metrics(self.client, run_id, result)
        self._logged[trial.trial_id] = epoch

    def _finish(self, trial, errored: bool) -> None:
        run_id = self._runs.pop(trial.trial_id, None)
        if run_id is None:
            return
        last = trial.last_result or {}
        status = trial_status(self.base.finetune.epochs, last.get("epoch"), errored)
        self.client.set_tag(run_id, "status", status)
        if errored and trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text()
            self.client.log_text(run_id, text, "error.txt")
            self.client.set_tag(run_id, "failure", failure_reason(text))
        self.client.set_terminated(run_id, "FAILED" if errored else "FINISHED")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=True)


class ConsoleProgress(tune.Callback):
    """Feeds the sweep's progress view (Ray's own output is off): each trial's start, probe and finetune epochs and
    end, a failure as the trial's own exception. With the driver's stdout on a terminal that redraws in place the
    view is the live table (:class:`roli_sweep.live_view.LiveTable`, drawn here, on the driver's main thread, at the
    events and from Tune's step loop); otherwise (a pipe, a log file, CI, nohup, ``TERM=dumb``) one plain line per
    event (:class:`roli_sweep.console.ProgressLines`).

    A display error never reaches Ray Tune: an exception raised in a callback ends the Tune run and with it every
    trial's actor (and its message would go to the terminal that failed). The live table then gives way to plain
    lines (a warning on this module's logger says why), and a plain line that cannot be written is dropped.

    Holds only plain data when pickled with the experiment state; the view is rebuilt on a restore.
    """

    def __init__(self, num_samples: int, parameters: list[str], probe_epochs: int, finetune_epochs: int) -> None:
        self.settings = (num_samples, parameters, probe_epochs, finetune_epochs)
        self.finetune_epochs = finetune_epochs
        self._view: ProgressLines | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_view": None}

    @property
    def view(self) -> ProgressLines:
        if self._view is None:
            self._view = LiveTable(*self.settings) if interactive() else ProgressLines(*self.settings)
        return self._view

    def _show(self, update: Callable[[ProgressLines], object]) -> None:
        """Apply ``update`` to the view; on a display error, fall back to plain lines (see the class docstring)."""
        view = self.view
        try:
            update(view)
        except Exception as error:  # noqa: BLE001 - whatever the display raises, the sweep goes on
            if not isinstance(view, LiveTable):
                if not isinstance(error, OSError):  # a line that cannot be written is just lost
                    logger.warning("progress line not shown: %s", failure_reason(error))
                return
            view.abandon()
            self._view = ProgressLines(*self.settings, lines=view.lines, start=view.start)
            logger.warning("live table off, progress as plain lines from here: %s", failure_reason(error))
            try:
                update(self._view)
            except Exception:  # noqa: BLE001
                pass

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._show(lambda view: view.started(trial.trial_id, trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._show(lambda view: view.progress(trial.trial_id, result))

    def on_step_end(self, iteration, trials, **info) -> None:
        if isinstance(self._view, LiveTable):
            self._show(lambda view: view.tick() if isinstance(view, LiveTable) else None)

    def _end(self, trial, errored: bool) -> None:
        last = trial.last_result or {}
        status = trial_status(self.finetune_epochs, last.get("epoch"), errored)
        detail = (f"best val clean {last['best_val_clean_acc']:.3f}, robust {last['best_val_robust_acc']:.3f}"
                  if "best_val_robust_acc" in last else "")
        if errored and trial.error_file and Path(trial.error_file).is_file():
            detail = failure_reason(Path(trial.error_file).read_text())
        self._show(lambda view: view.finished(trial.trial_id, status, detail))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, errored=True)

    def on_experiment_end(self, trials, **info) -> None:
        if isinstance(self._view, LiveTable):
            try:
                self._view.close()
            except Exception:  # noqa: BLE001 - the end tables come next, on the same terminal
                self._view.abandon()
