"""MLflow records: one experiment per study, one parent run per sweep, one child run per trial.

Conventions (MLflow's documented layout for hyperparameter searches): the child runs carry the tag
``mlflow.parentRunId`` so the UI nests them under the sweep; params are logged once (the
flattened, resolved trial config); metrics are logged per finetune epoch with ``step=epoch``;
tags ``trial_id``, ``sweep``, ``status`` (running / completed / pruned / failed), ``method``,
``head_init``, ``seed``, ``git_commit`` and the package versions; the resolved trial config is
the artifact ``trial_config.yaml``, so every run can be rerun as it was.

Ray Tune's own ``MLflowLoggerCallback`` logs only the sampled values as params and has no parent
run or status; :class:`MlflowTrialCallback` is the sweep glue that does this project's layout.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from roli_sweep.config import ConfigError, SearchSpace, TrialConfig, apply_overrides, dump_yaml, flatten
from roli_sweep.masking import Check, masking_tags
from roli_sweep.provenance import git_commit, package_versions

TRIAL_CONFIG_ARTIFACT = "trial_config.yaml"
ROLE_TAG = "sweep_role"
RAY_BOOKKEEPING = {"training_iteration", "time_this_iter_s", "timestamp", "pid", "done", "time_since_restore",
                   "iterations_since_restore", "epoch"}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def provenance_tags() -> dict[str, str]:
    """Tags that make a run reproducible: git commit and package versions."""
    commit = git_commit()
    tags = {"git_commit": commit, "mlflow.source.git.commit": commit}
    tags.update({f"version.{name}": version for name, version in package_versions().items()})
    return tags


def describe_trial_run(client: MlflowClient, run_id: str, cfg: TrialConfig,
                       provenance: dict[str, str] | None = None) -> None:
    """Log a trial config to a run: flattened params, method / head_init / seed tags, the YAML artifact.

    ``provenance`` (from :func:`provenance_tags`) is read now when not given; a long study reads it
    once at its start, so later commits to the checkout do not relabel its runs.
    """
    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    tags = {"method": cfg.finetune.method, "head_init": cfg.finetune.head_init, "seed": str(cfg.seed),
            **(provenance or provenance_tags())}
    for start in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=params[start:start + 100])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_text(run_id, dump_yaml(cfg), TRIAL_CONFIG_ARTIFACT)


def log_epoch_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any]) -> None:
    """Log the numeric entries of one finetune epoch's metrics at ``step=metrics['epoch']``."""
    now, step = int(time.time() * 1000), int(metrics["epoch"])
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if k not in RAY_BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)]
    client.log_batch(run_id, metrics=batch)


def trial_status(finetune_epochs: int, last_epoch: int | None, errored: bool) -> str:
    """``failed`` on error, ``completed`` when every finetune epoch ran, else ``pruned`` (stopped by ASHA)."""
    if errored:
        return "failed"
    return "completed" if last_epoch == finetune_epochs else "pruned"


def start_parent_run(client: MlflowClient, space: SearchSpace, space_path: Path, sweep: str, resume: bool) -> str:
    """Create the sweep's parent run (or find it again when resuming) and log the search space.

    Returns:
        The parent run id.
    """
    exp = experiment_id(client, space.name)
    if resume:
        found = client.search_runs([exp], filter_string=f"tags.sweep = '{sweep}' and tags.{ROLE_TAG} = 'parent'")
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(exp, run_name=sweep, tags={"sweep": sweep, ROLE_TAG: "parent",
                                                       "space_file": str(space_path), **provenance_tags()})
    run_id = run.info.run_id
    client.log_artifact(run_id, str(space_path))
    client.log_text(run_id, dump_yaml(space), "search_space_resolved.yaml")
    client.log_batch(run_id, params=[
        Param("num_samples", str(space.num_samples)), Param("max_concurrent", str(space.max_concurrent)),
        Param("seed", str(space.seed)), Param("metric", f"{space.metric.name}:{space.metric.goal}"),
        Param("resources", f"cpu={space.resources.cpu},gpu={space.resources.gpu}"),
        Param("scheduler", f"ASHA grace_period={space.scheduler.grace_period} "
                           f"reduction_factor={space.scheduler.reduction_factor} "
                           f"max_t={space.scheduler.max_t or space.base.finetune.epochs}"),
        Param("sampled", ", ".join(space.parameters)),
    ])
    return run_id


def finish_parent_run(client: MlflowClient, run_id: str, best: dict[str, float] | None, counts: dict[str, int],
                      best_trial: str | None) -> None:
    """Log the best completed trial's metrics and the trial counts, then close the parent run."""
    metrics = {f"trials_{status}": n for status, n in counts.items()}
    if best:
        metrics.update({f"best_{k}": v for k, v in best.items()})
        client.set_tag(run_id, "best_trial_id", best_trial or "")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, "FINISHED")


def final_eval_record(run_id: str, client: MlflowClient, final: dict[str, Any]) -> None:
    """Log one final evaluation to a run: accuracies as metrics, the threat model as params, and the masking
    checks as tags ``masking`` (pass / warning), ``masking.<check>`` and ``masking.<check>.detail``."""
    now = int(time.time() * 1000)
    if "error" in final:
        client.set_tag(run_id, "final_eval", f"failed: {final['error']}"[:5000])
        return
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in final["metrics"].items()],
                     params=[Param(k, v) for k, v in final["params"].items()])
    tags = {"final_eval": "done", **masking_tags([Check(*c) for c in final["checks"]])}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_final_evaluations(client: MlflowClient, experiment: str, sweep: str, parent_run_id: str,
                          finals: list[tuple[str, dict[str, Any]]]) -> None:
    """Log each top-k trial's final evaluation to its child run, and a summary table to the parent run."""
    exp = experiment_id(client, experiment)
    lines = ["| trial | clean | PGD | AutoAttack | masking |", "|---|---|---|---|---|"]
    for rank, (trial_id, final) in enumerate(finals):
        found = client.search_runs([exp], filter_string=f"tags.trial_id = '{trial_id}' and tags.sweep = '{sweep}'")
        if found:
            final_eval_record(found[0].info.run_id, client, final)
        if "error" in final:
            lines.append(f"| {trial_id} | failed: {final['error']} | | | |")
            continue
        m = final["metrics"]
        masking = masking_tags([Check(*c) for c in final["checks"]])["masking"]
        lines.append(f"| {trial_id} | {m['final_clean_acc']:.4f} | {m['final_pgd_acc']:.4f} | "
                     f"{m.get('final_autoattack_acc', float('nan')):.4f} | {masking} |")
        if rank == 0:
            final_eval_record(parent_run_id, client, {**final, "metrics": {f"best_final_{k}": v for k, v in m.items()}})
    if finals:
        client.log_text(parent_run_id, "\n".join(lines) + "\n", "final_evaluation.md")


class MlflowTrialCallback(Callback):
    """Ray Tune callback: one MLflow child run per trial under the sweep's parent run.

    Holds only plain data, so Ray can pickle it with the experiment state and ``Tuner.restore``
    brings it back; the client is recreated on demand. On a restore, a trial that already has a
    child run (tag ``trial_id``) reuses it instead of creating a duplicate.
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, sweep: str, base: dict[str, Any]) -> None:
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self.sweep, self.base = sweep, base
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"], state["_runs"] = None, {}
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _describe(self, run_id: str, trial) -> None:
        """Log the trial's resolved config; a sampled combination the config rejects is logged as such
        (the trial itself then fails on the same error and is recorded as failed)."""
        try:
            cfg = apply_overrides(TrialConfig.model_validate(self.base), trial.config)
        except ConfigError as err:
            self.client.log_text(run_id, str(err), "config_error.txt")
            return
        describe_trial_run(self.client, run_id, cfg)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        exp = experiment_id(self.client, self.experiment)
        found = self.client.search_runs(
            [exp], filter_string=f"tags.trial_id = '{trial.trial_id}' and tags.sweep = '{self.sweep}'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "status", "running")
        else:
            run = self.client.create_run(exp, run_name=f"{self.sweep}/{trial.trial_id}", tags={
                "mlflow.parentRunId": self.parent_run_id, "trial_id": trial.trial_id, "sweep": self.sweep,
                ROLE_TAG: "trial", "status": "running"})
            run_id = run.info.run_id
            self._describe(run_id, trial)
            self.client.log_batch(run_id, tags=[RunTag(f"sampled.{k}", str(v)) for k, v in trial.config.items()])
        self._runs[trial.trial_id] = run_id

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if trial.trial_id in self._runs:
            log_epoch_metrics(self.client, self._runs[trial.trial_id], result)

    def _finish(self, trial, errored: bool) -> None:
        run_id = self._runs.pop(trial.trial_id, None)
        if run_id is None:
            return
        last = trial.last_result or {}
        status = trial_status(self.base["finetune"]["epochs"], last.get("epoch"), errored)
        self.client.set_tag(run_id, "status", status)
        if errored and trial.error_file and Path(trial.error_file).is_file():
            self.client.log_text(run_id, Path(trial.error_file).read_text(), "error.txt")
        self.client.set_terminated(run_id, "FAILED" if errored else "FINISHED")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=True)


class StudyRecorder:
    """MLflow layout of a study: one parent run (tag ``study``), one child run per finished grid run.

    On a resumed study the parent run is found again by its tags and runs already logged (tag
    ``run_key``) are not logged twice.
    """

    def __init__(self, tracking_uri: str, study: str, config_path: Path, config_text: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.provenance = provenance_tags()
        self.experiment = experiment_id(self.client, study)
        found = self.client.search_runs([self.experiment], filter_string=f"tags.{ROLE_TAG} = 'study_parent'")
        if found:
            self.parent_run_id = found[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment, run_name=study, tags={
                "study": study, ROLE_TAG: "study_parent", "config_file": str(config_path), **self.provenance})
            self.parent_run_id = run.info.run_id
            self.client.log_text(self.parent_run_id, config_text, "study_config.yaml")
        children = self.client.search_runs([self.experiment], filter_string=f"tags.{ROLE_TAG} = 'study_run'",
                                           max_results=50000)
        self.logged = {r.data.tags.get("run_key") for r in children}

    def log_run(self, run_key: str, labels: dict[str, str], cfg: TrialConfig, record: dict[str, Any]) -> None:
        """One child run: the resolved config as params, the run's metrics, labels and status as tags."""
        if run_key in self.logged:
            return
        run = self.client.create_run(self.experiment, run_name=run_key, tags={
            "mlflow.parentRunId": self.parent_run_id, ROLE_TAG: "study_run", "run_key": run_key,
            "status": record["status"], **labels})
        describe_trial_run(self.client, run.info.run_id, cfg, self.provenance)
        now = int(time.time() * 1000)
        metrics = {**record.get("metrics", {}), "run_seconds": record.get("seconds", 0.0)}
        self.client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        if record["status"] == "failed":
            self.client.log_text(run.info.run_id, record.get("error", ""), "error.txt")
        self.client.set_terminated(run.info.run_id, "FINISHED" if record["status"] == "completed" else "FAILED")
        self.logged.add(run_key)

    def log_final(self, run_key: str, record: dict[str, Any]) -> None:
        """Add a final evaluation (and its masking tags) to the child run of ``run_key``."""
        found = self.client.search_runs([self.experiment], filter_string=f"tags.run_key = '{run_key}'")
        if found:
            final_eval_record(found[0].info.run_id, self.client,
                              record if record["status"] == "completed" else {"error": record["error"]})

    def finish(self, report_dir: Path | None, summary: dict[str, float]) -> None:
        """Log the report folder (markdown table, PNG plots) and summary metrics to the parent run."""
        if report_dir is not None:
            self.client.log_artifacts(self.parent_run_id, str(report_dir), "report")
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
        self.client.set_terminated(self.parent_run_id, "FINISHED")
