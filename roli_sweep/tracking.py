"""MLflow records: one experiment per study, one parent run per sweep, one child run per trial.

Conventions (MLflow's documented layout for hyperparameter searches): the child runs carry the tag
``mlflow.parentRunId`` so the UI nests them under the sweep; params are logged once (the
flattened, resolved trial config); metrics are logged per finetune epoch with ``step=epoch``;
tags ``trial_id``, ``sweep``, ``status`` (running / completed / pruned / failed), ``method``,
``head_init``, ``seed``, ``git_commit`` and the package versions; the resolved trial config is
the artifact ``trial_config.yaml``, so every run can be rerun as it was.

Ray Tune's own ``MLflowLoggerCallback`` logs only the sampled values as params and has no parent
run or status; :class:`roli_sweep.tune.callbacks.MlflowTrialCallback` does this project's layout
with the helpers here. This module does not import Ray.
"""
from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from roli_sweep.names import arm_label
from roli_sweep.config import SearchSpace, StudyConfig, TrialConfig, dump_yaml, flatten
from roli_sweep.records import FinalRecord, StudyJobRecord, SweepOutcome, TrialState, masking_tags
from roli_sweep.provenance import git_commit, package_versions

if TYPE_CHECKING:
    from roli_sweep.study.report import StudyReport
    from roli_sweep.study.run import ProbeKey, RunKey

TRIAL_CONFIG_ARTIFACT = "trial_config.yaml"
ROLE_TAG = "sweep_role"
RAY_BOOKKEEPING = {"training_iteration", "time_this_iter_s", "timestamp", "pid", "done", "time_since_restore",
                   "iterations_since_restore", "epoch"}


def filter_value(value: str) -> str:
    r"""``value`` quoted for MLflow's search filter syntax (``tags.sweep = <here>``), ready to put in a
    ``filter_string``.

    MLflow 3.17 (``mlflow/utils/search_utils.py``) tokenizes a filter with sqlparse and takes a tag or
    param value as its string token with the two end characters cut off: ``SearchUtils._strip_quotes``
    accepts a value quoted in ``'`` (``STRING_VALUE_TYPES``, ``Literal.String.Single``) or ``"`` (a
    sqlparse ``Identifier``) and returns ``_trim_ends(value)``, i.e. ``value[1:-1]``. There is no escape:
    ``'a''b'`` and ``'a\'b'`` parse but match the tag values ``a''b`` and ``a\'b``, never ``a'b``. So
    the value is quoted with a quote it does not contain, ``'`` when it can, else ``"``. sqlparse's
    string patterns (``sqlparse.keywords.SQL_REGEX``: ``'(''|\\'|[^'])*'`` and ``"(""|\\"|[^"])*"``)
    read a backslash before the quote as part of the string, so a value ending in a backslash would
    swallow its closing quote.

    Raises:
        ValueError: ``value`` holds both ``'`` and ``"``, or ends in a backslash: no filter can match it.
    """
    if value.endswith("\\"):
        raise ValueError(f"{value!r} ends in a backslash, which MLflow's search filter cannot quote")
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"{value!r} holds both quote characters, which MLflow's search filter cannot quote")


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3's UI opens an experiment with this tag on its training runs, not on the GenAI traces overview."""


def mlflow_key(key: str) -> str:
    """A metric or tag key MLflow accepts (letters, digits, ``_ - . /`` and spaces): any other character, such as
    the ``=`` of an arm ``r=4`` or the ``|`` of a conditional parameter's Optuna name, becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed, tagged so that the UI opens it on the runs
    (:data:`EXPERIMENT_KIND`; added to an existing experiment that lacks it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


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


def trial_status(finetune_epochs: int, last_epoch: int | None, errored: bool) -> TrialState:
    """``failed`` on error, ``completed`` when every finetune epoch ran, else ``pruned`` (stopped by ASHA)."""
    if errored:
        return TrialState.FAILED
    return TrialState.COMPLETED if last_epoch == finetune_epochs else TrialState.PRUNED


def start_parent_run(client: MlflowClient, space: SearchSpace, space_path: Path, sweep: str, resume: bool) -> str:
    """Create the sweep's parent run (or find it again when resuming) and log the search space.

    Returns:
        The parent run id.
    """
    exp = experiment_id(client, space.name)
    if resume:
        found = client.search_runs([exp], filter_string=(
            f"tags.sweep = {filter_value(sweep)} and tags.{ROLE_TAG} = {filter_value('parent')}"))
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            client.set_tag(found[0].info.run_id, "status", "running")
            return found[0].info.run_id
    run = client.create_run(exp, run_name=sweep, tags={"sweep": sweep, ROLE_TAG: "parent", "status": "running",
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
        Param("arms", space.arms or "none"),
        Param("arm_labels", ",".join(arm_label(space.arms, v) for v in space.arm_values()) if space.arms else ""),
        Param("confirm", f"seeds={space.confirm.seeds} top_k={space.confirm.top_k}"),
    ])
    return run_id


def log_sweep_end(client: MlflowClient, outcome: SweepOutcome) -> None:
    """The end of a finished sweep on its parent run, then closed: the final evaluations (also on their child
    runs, :func:`log_final_evaluations`), every analysis' finding (:mod:`roli_sweep.analysis`: its metrics, tags
    and figure; e.g. ``search_space.edge.<parameter>``, ``importance.<parameter>``, ``importance.png``), the best
    completed trial's metrics, the trial counts and where the compute went."""
    run_id, name = outcome.parent_run_id, outcome.name
    log_final_evaluations(client, outcome.experiment, name, run_id, [(r.trial_id, r.final) for r in outcome.rows
                                                                     if r.final])
    now = int(time.time() * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        for found in outcome.findings:
            client.log_batch(run_id, metrics=[Metric(mlflow_key(k), v, now, 0) for k, v in found.metrics.items()],
                             tags=[RunTag(mlflow_key(k), v[:5000]) for k, v in found.tags.items()])
            if found.figure and found.plot:
                found.plot(Path(tmp) / found.figure)
                client.log_artifact(run_id, str(Path(tmp) / found.figure))
            if found.text:
                client.log_text(run_id, found.text[1], found.text[0])
    counts = {s.value: sum(r.status == s for r in outcome.rows)
              for s in (TrialState.COMPLETED, TrialState.PRUNED, TrialState.FAILED)}
    metrics = {f"trials_{status}": n for status, n in counts.items()} | (outcome.compute or {})
    best = outcome.best()
    if best is not None:
        metrics.update({"best_val_clean_acc": best.val_clean_acc, "best_val_robust_acc": best.val_robust_acc,
                        "best_test_clean_acc": best.test_clean_acc, "best_test_robust_acc": best.test_robust_acc})
        client.set_tag(run_id, "best_trial_id", best.trial_id)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None])
    client.set_tag(run_id, "status", "finished")
    client.set_terminated(run_id, "FINISHED")


def mark_interrupted(client: MlflowClient, parent_run_id: str) -> set[str]:
    """After Ctrl+C: the parent run and its unfinished child runs KILLED, with tag ``status=interrupted``.

    Returns:
        The trial ids of the child runs marked.
    """
    run = client.get_run(parent_run_id)
    children = client.search_runs([run.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = {filter_value(parent_run_id)} and tags.status = {filter_value('running')}"),
        max_results=10000)
    for child in children:
        client.set_tag(child.info.run_id, "status", "interrupted")
        client.set_terminated(child.info.run_id, "KILLED")
    client.set_tag(parent_run_id, "status", "interrupted")
    client.set_terminated(parent_run_id, "KILLED")
    return {child.data.tags.get("trial_id", "") for child in children}


def final_eval_record(run_id: str, client: MlflowClient, final: FinalRecord, metric_prefix: str = "") -> None:
    """Log one final evaluation to a run: accuracies as metrics (named ``<metric_prefix><name>``), the threat
    model as params, and the masking checks as tags ``masking`` (pass / warning), ``masking.<check>`` and
    ``masking.<check>.detail``; a failed one as the tag ``final_eval = failed: <reason>``."""
    now = int(time.time() * 1000)
    if final.failed:
        client.set_tag(run_id, "final_eval", f"failed: {final.error}"[:5000])
        return
    client.log_batch(run_id, metrics=[Metric(metric_prefix + k, float(v), now, 0) for k, v in final.metrics.items()],
                     params=[Param(k, v) for k, v in final.params.items()])
    tags = {"final_eval": "done", **masking_tags(final.checks)}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_final_evaluations(client: MlflowClient, experiment: str, sweep: str, parent_run_id: str,
                          finals: list[tuple[str, FinalRecord]]) -> None:
    """Log each top-k trial's final evaluation to its child run, and a summary table to the parent run."""
    exp = experiment_id(client, experiment)
    lines = ["| trial | clean | PGD | AutoAttack | masking |", "|---|---|---|---|---|"]
    for rank, (trial_id, final) in enumerate(finals):
        found = client.search_runs([exp], filter_string=(
            f"tags.trial_id = {filter_value(trial_id)} and tags.sweep = {filter_value(sweep)}"))
        if found:
            final_eval_record(found[0].info.run_id, client, final)
        if final.failed:
            lines.append(f"| {trial_id} | failed: {final.error} | | | |")
            continue
        m = final.metrics
        masking = masking_tags(final.checks)["masking"]
        lines.append(f"| {trial_id} | {m['final_clean_acc']:.4f} | {m['final_pgd_acc']:.4f} | "
                     f"{m.get('final_autoattack_acc', float('nan')):.4f} | {masking} |")
        if rank == 0:
            final_eval_record(parent_run_id, client, final, metric_prefix="best_")
    if finals:
        client.log_text(parent_run_id, "\n".join(lines) + "\n", "final_evaluation.md")


class StudyRecorder:
    """MLflow layout of a study: one parent run (tag ``study``), one child run per finished grid run.

    On a resumed study the parent run is found again by its tags and runs already logged (tag
    ``run_key``) are not logged twice.
    """

    def __init__(self, tracking_uri: str, study: StudyConfig, config_path: Path) -> None:
        self.study = study
        self.client = MlflowClient(tracking_uri)
        self.provenance = provenance_tags()
        self.experiment = experiment_id(self.client, study.name)
        found = self.client.search_runs([self.experiment], filter_string=(
            f"tags.{ROLE_TAG} = {filter_value('study_parent')}"))
        if found:
            self.parent_run_id = found[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment, run_name=study.name, tags={
                "study": study.name, ROLE_TAG: "study_parent", "config_file": str(config_path), **self.provenance})
            self.parent_run_id = run.info.run_id
            self.client.log_text(self.parent_run_id, config_path.read_text(), "study_config.yaml")
        children = self.client.search_runs(
            [self.experiment], filter_string=f"tags.{ROLE_TAG} = {filter_value('study_run')}", max_results=50000)
        self.logged = {r.data.tags.get("run_key") for r in children}

    def on_probe(self, key: ProbeKey, record: StudyJobRecord) -> None:
        """Probes are logged with the runs that use them (nothing to log here)."""

    def on_run(self, key: RunKey, record: StudyJobRecord) -> None:
        """One child run: the resolved config as params, the run's metrics, labels and status as tags."""
        run_key = key.id
        if run_key in self.logged:
            return
        cfg = self.study.run_config(key.backbone, key.target, key.method, key.head_init, key.lr, key.seed)
        labels = {"backbone": key.backbone, "target": key.target, "lr": f"{key.lr:.3g}"}
        run = self.client.create_run(self.experiment, run_name=run_key, tags={
            "mlflow.parentRunId": self.parent_run_id, ROLE_TAG: "study_run", "run_key": run_key,
            "status": record.status.value, **labels})
        describe_trial_run(self.client, run.info.run_id, cfg, self.provenance)
        now = int(time.time() * 1000)
        metrics = {**record.metrics, "run_seconds": record.seconds}
        self.client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        if record.failed:
            self.client.log_text(run.info.run_id, record.error, "error.txt")
        self.client.set_terminated(run.info.run_id, "FAILED" if record.failed else "FINISHED")
        self.logged.add(run_key)

    def on_final(self, key: RunKey, record: FinalRecord) -> None:
        """Add a final evaluation (and its masking tags) to the child run of ``key``."""
        run_key = key.id
        found = self.client.search_runs([self.experiment], filter_string=f"tags.run_key = {filter_value(run_key)}")
        if found:
            final_eval_record(found[0].info.run_id, self.client, record)

    def finish(self, report: StudyReport) -> None:
        """Log the report folder (markdown table, PNG plots), its summary metrics and its lr-grid edge warnings
        (tags ``search_space.edge.finetune.lr.<cell>``) to the parent run, and close it."""
        self.client.log_artifacts(self.parent_run_id, str(report.folder), "report")
        now = int(time.time() * 1000)
        tags = {f"search_space.edge.finetune.lr.{where}": w.message for where, w in report.edges.items()}
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0)
                                                           for k, v in report.summary.items()],
                              tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
        self.client.set_terminated(self.parent_run_id, "FINISHED")
