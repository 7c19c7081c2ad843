"""Export the best trials of a sweep from MLflow as complete trial-config YAML files.

Each file is the resolved trial config the child run logged (sampled values filled in, seed
included), behind a comment header saying where it came from; ``run_sweep.py train --config FILE``
reruns it.

An export reads a store and never makes one: a local store (an SQLite file, a file-store folder) that
does not exist is refused before MLflow is asked, since MLflow would create it. Opening an existing SQLite
store writes nothing next to it and no ``./mlruns`` (MLflow 3 makes the artifact root lazily, when an
artifact is logged). Nothing is written until every file to write is known and its config is downloaded;
a file that exists already is overwritten only with ``force``; each file is written whole or not at all.
"""
from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from roli_sweep.names import check_name, name_problem
from roli_sweep.tracking import ROLE_TAG, TRIAL_CONFIG_ARTIFACT, filter_value


os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

LISTED = 3
"""At most this many file names in a message; the rest are counted."""


class ExportError(LookupError):
    """No such store or sweep, no completed trial in it, or an output that is in the way."""


def local_store_problem(tracking_uri: str) -> str | None:
    """Why ``tracking_uri`` names no existing local MLflow store, or None when it does.

    Local stores are an SQLite file (``sqlite:///PATH``) and a file-store folder (a plain path or a
    ``file:`` URI). Other URIs (a tracking server, a database server) create nothing on this machine and
    are not checked: None.
    """
    parsed = urlparse(tracking_uri)
    scheme = parsed.scheme.lower()
    if scheme.split("+")[0] == "sqlite":
        return _sqlite_problem(tracking_uri)
    if scheme == "file":
        path = Path(url2pathname(parsed.path))
    elif scheme == "" or len(scheme) == 1:  # a path (a one-letter scheme is a Windows drive)
        path = Path(tracking_uri)
    else:
        return None
    if not path.exists():
        return f"{os.path.abspath(path)} does not exist"
    if not path.is_dir():
        return f"{os.path.abspath(path)} is not a file-store folder"
    return None


def _sqlite_problem(tracking_uri: str) -> str | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(tracking_uri)
    except ArgumentError:
        return "not a valid SQLite URI (sqlite:///PATH)"
    database = url.database or ""
    if database in ("", ":memory:"):
        return "an in-memory SQLite database holds no sweep"
    if url.query.get("uri"):  # sqlite:///file:PATH?...&uri=true: SQLite reads the URI itself
        return None
    path = Path(database)
    shown = os.path.abspath(path)
    if not path.exists():
        return f"{shown} does not exist"
    if not path.is_file():
        return f"{shown} is not a file"
    try:  # read-only: MLflow would add its tables to an SQLite file that lacks them
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    except sqlite3.DatabaseError as err:
        return f"{shown} is not an SQLite database ({err})"
    if not {"experiments", "runs"} <= tables:
        return f"{shown} is an SQLite file without MLflow's tables"
    return None


def find_parent_run(client: MlflowClient, sweep: str):
    """The parent run of sweep ``sweep`` in any experiment.

    Raises:
        ExportError: no parent run carries that sweep name.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=(
        f"tags.sweep = {filter_value(sweep)} and tags.{ROLE_TAG} = {filter_value('parent')}"))
    if not runs:
        raise ExportError(f"no sweep named {sweep!r} in the MLflow store {client.tracking_uri}")
    return runs[0]


def _listed(paths: list[Path]) -> str:
    names = ", ".join(p.name for p in paths[:LISTED])
    return names + (f" and {len(paths) - LISTED} more" if len(paths) > LISTED else "")


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` is a folder or can be made one: its nearest existing ancestor is a folder."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                shown = "it" if path == out_dir else f"its parent {path}"
                raise ExportError(f"--out: {out_dir} cannot be a folder: {shown} is a file")
            return


def _write_whole(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_best(tracking_uri: str, sweep: str, top_k: int, out_dir: Path, force: bool = False) -> list[Path]:
    """Write the ``top_k`` completed search trials of ``sweep`` (of each arm when it has arms), best validation robust
    accuracy first. Confirmation runs are not exported: they repeat a search trial's config with another seed.

    Args:
        force: overwrite files of the same names; without it, any existing one stops the export before
            anything is written.

    Returns:
        The written paths, ``<out_dir>/<sweep>-rank<i>-<trial_id>.yaml`` (with arms
        ``<sweep>-<arm>-rank<i>-<trial_id>.yaml``, e.g. ``s1-RoLI-rank1-3f2a.yaml``).

    Raises:
        ExportError: a sweep name that is not allowed, no such local store, an unknown sweep, no completed
            trial, ``out_dir`` not a folder, or files in the way (without ``force``).
    """
    try:
        check_name(sweep, "--name")
    except ValueError as err:
        raise ExportError(str(err)) from None
    out_dir = Path(out_dir)
    problem = local_store_problem(tracking_uri)
    if problem:
        raise ExportError(f"no MLflow store at {tracking_uri}: {problem}; --tracking-uri names the store "
                          "the sweep logged to")
    _check_out_dir(out_dir)
    try:
        client = MlflowClient(tracking_uri)
    except MlflowException as err:
        raise ExportError(f"cannot open the MLflow store at {tracking_uri}: {err.message}") from None
    parent = find_parent_run(client, sweep)
    arms = [a for a in parent.data.params.get("arm_labels", "").split(",") if a]
    selected = []  # (file name prefix, rank, run): the top k of each arm, or of the sweep
    for arm in arms or [None]:
        where = f" and tags.arm = {filter_value(arm)}" if arm else ""
        runs = client.search_runs(
            [parent.info.experiment_id],
            filter_string=(f"tags.mlflow.parentRunId = {filter_value(parent.info.run_id)} and tags.status = "
                           f"{filter_value('completed')} and tags.{ROLE_TAG} = {filter_value('trial')}{where}"),
            order_by=["metrics.best_val_robust_acc DESC"], max_results=top_k)
        prefix = f"{sweep}-{re.sub(r'[^A-Za-z0-9_.-]', '-', arm)}" if arm else sweep
        selected += [(prefix, rank, run) for rank, run in enumerate(runs, start=1)]
    if not selected:
        raise ExportError(f"sweep {sweep!r} has no completed trial to export")
    children = [run for _, _, run in selected]

    trial_ids = [run.data.tags.get("trial_id", run.info.run_id) for run in children]
    safe = [name_problem(trial_id) is None for trial_id in trial_ids]  # Ray's are; else the run id names the file
    targets = [out_dir / f"{prefix}-rank{rank}-{trial_id if ok else run.info.run_id}.yaml"
               for (prefix, rank, run), trial_id, ok in zip(selected, trial_ids, safe)]
    not_files = [p for p in targets if p.exists() and not p.is_file()]
    if not_files:
        raise ExportError(f"--out: {out_dir} holds folders named as the files to write: {_listed(not_files)}")
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise ExportError(f"--out: {out_dir} already holds {len(existing)} of the {len(targets)} files to write "
                          f"({_listed(existing)}); --force overwrites them")

    texts = []
    for (prefix, rank, run), trial_id, ok in zip(selected, trial_ids, safe):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                logged = client.download_artifacts(run.info.run_id, TRIAL_CONFIG_ARTIFACT, tmp)
            except (MlflowException, OSError) as err:
                raise ExportError(f"run {run.info.run_id} of sweep {sweep!r} has no readable "
                                  f"{TRIAL_CONFIG_ARTIFACT}: {err}") from None
            config_text = Path(logged).read_text(encoding="utf-8")  # the resolved config, validated when it ran
        m = run.data.metrics
        of = sum(p == prefix for p, _, _ in selected)
        arm = f", arm {run.data.tags['arm']}" if "arm" in run.data.tags and arms else ""
        header = (f"# sweep {sweep}{arm}, rank {rank} of {of} by best val_robust_acc\n"
                  f"# trial {trial_id if ok else repr(trial_id)}, MLflow run {run.info.run_id}\n"
                  f"# val clean {m.get('best_val_clean_acc', float('nan')):.4f}, "
                  f"val robust {m.get('best_val_robust_acc', float('nan')):.4f}, "
                  f"test clean {m.get('test_clean_acc', float('nan')):.4f}, "
                  f"test robust {m.get('test_robust_acc', float('nan')):.4f}\n")
        texts.append(header + config_text)

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"--out: cannot make the folder {out_dir}: {err.strerror or err}") from None
    for path, text in zip(targets, texts):
        try:
            _write_whole(path, text)
        except OSError as err:
            raise ExportError(f"--out: cannot write {path}: {err.strerror or err}") from None
    return targets
