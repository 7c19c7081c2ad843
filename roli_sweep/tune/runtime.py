"""The local Ray runtime of a sweep, and the cleanup of one a killed driver left behind.

``ray.init`` starts GCS, raylet, monitor, log monitor and the dashboard head (even with
``include_dashboard=False``), and the raylet starts a dashboard agent and a runtime-env agent. When
the driver is killed (SIGKILL), those two agents outlive it, one still listening. So the process ids
of a runtime this package starts are recorded, with their start times, in the sweep storage folder;
the next start ends the processes of a stale record, matched by pid and start time (a reused pid is
never touched), never by process name. Ray's token authentication stays on (Ray 2.60 turns it on for
a new local runtime).
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import ray

LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "mlflow", "alembic", "optuna")
"""The libraries' loggers a sweep sends to its log file instead of the console."""

RECORD = ".ray_runtime.json"
"""In the storage folder: the processes of the local runtime a sweep started, while it runs."""


def end_stale_runtime(storage_path: Path) -> list[int]:
    """End the processes of a runtime recorded in ``storage_path`` whose driver is gone; returns their pids.

    Each is ended only if its pid still belongs to the process recorded (same start time), with the
    processes it started since (the raylet's workers): SIGTERM, then SIGKILL after 5 s.
    """
    record = storage_path / RECORD
    if not record.is_file():
        return []
    entries = json.loads(record.read_text())
    if psutil.pid_exists(entries["driver"]["pid"]) and _same(entries["driver"]):
        return []  # that sweep is still running
    stale = []
    for entry in entries["processes"]:
        try:
            process = psutil.Process(entry["pid"])
            if _same(entry, process):
                stale.append(process)
                stale += process.children(recursive=True)  # workers the raylet started after the record
        except psutil.NoSuchProcess:
            continue
    stale = list({p.pid: p for p in stale}.values())
    for process in stale:
        process.terminate()
    _, alive = psutil.wait_procs(stale, timeout=5)
    for process in alive:
        process.kill()
    record.unlink()
    return [p.pid for p in stale]


def _same(entry: dict, process: psutil.Process | None = None) -> bool:
    try:
        process = process or psutil.Process(entry["pid"])
        return abs(process.create_time() - entry["created"]) < 0.01
    except psutil.NoSuchProcess:
        return False


def start_local_runtime(storage_path: Path, num_cpus: int | None) -> None:
    """``ray.init`` a local runtime without a dashboard, after ending a stale one, and record its processes."""
    storage_path.mkdir(parents=True, exist_ok=True)
    end_stale_runtime(storage_path)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    node = ray._private.worker.global_worker.node
    pids = {info.process.pid for infos in node.all_processes.values() for info in infos if info.process}
    for pid in list(pids):
        try:
            pids |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    processes = []
    for pid in sorted(pids):
        try:
            processes.append({"pid": pid, "created": psutil.Process(pid).create_time()})
        except psutil.NoSuchProcess:
            continue
    driver = psutil.Process()
    (storage_path / RECORD).write_text(json.dumps(
        {"driver": {"pid": driver.pid, "created": driver.create_time()}, "processes": processes}))


def stop_local_runtime(storage_path: Path) -> None:
    """``ray.shutdown`` and drop the record."""
    ray.shutdown()
    (storage_path / RECORD).unlink(missing_ok=True)


@contextmanager
def logs_to_file(path: Path) -> Iterator[None]:
    """Send the records of Ray's, MLflow's and Optuna's loggers (:data:`LOGGERS`, INFO and up) to ``path``
    (appended) instead of the console, for the duration of the block; their handlers are restored after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {}
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate, logger.level)
        logger.handlers, logger.propagate = [handler], False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate, logger.level = handlers, propagate, level
        handler.close()
