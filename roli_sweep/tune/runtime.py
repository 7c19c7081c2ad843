"""The local Ray runtime of a sweep, and the cleanup of one a killed driver left behind.

``ray.init`` starts GCS, raylet, monitor, log monitor and the dashboard head (even with
``include_dashboard=False``), and the raylet starts a dashboard agent and a runtime-env agent. When
the driver is killed (SIGKILL), those two agents outlive it, one still listening. So the processes of
a runtime this package starts are recorded (pid, start time, and the Ray session they belong to), and
the next start with the same storage folder ends those of a stale record.

Where the record lives, and why: not in the storage folder (which may be shared: whoever can write a
file there would choose which of the user's processes the next start ends) but in a per-user folder
on the local disk, :func:`record_dir` (``$XDG_STATE_HOME/roli_sweep/ray_runtimes/``, by default
``~/.local/state/roli_sweep/ray_runtimes/``), mode 0o700 and used only if it is this user's and not
group- or other-writable; one file per storage folder, named by the sha256 of its resolved path (which
the record repeats and which must match), written atomically (a temporary file in the same folder,
then ``os.replace``), mode 0o600. A record that cannot be read or is malformed is treated as absent: a
one-line warning on this module's logger, and it is deleted. ``<storage>/.ray_runtime.json``, where
older versions kept it, is never read.

A recorded process is ended only if all of these hold: the recorded driver is gone, the pid still
belongs to the process recorded (same start time: a reused pid is never touched), it is this user's
(real uid), and it is still a process of the recorded Ray session: its command line names the session
(``session_<date>_<time>_<pid>``: GCS, raylet, monitor, log monitor, dashboard head) or it has a file
of the session's folder open (the dashboard agent and runtime-env agent rename their process title to
``ray::DashboardAgent`` / ``ray::RuntimeEnvAgent``, workers to ``ray::IDLE`` and the like, but keep their
log files there open). Processes a verified one started since (the raylet's workers) are ended with it
if they are this user's. Never by process name.

Ray's token authentication stays on, and its token file stays private (:mod:`roli_sweep.tune.auth_token`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
import ray

from roli_sweep.tune.auth_token import create_token_privately, default_token_path, make_token_private

logger = logging.getLogger(__name__)

LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "mlflow", "alembic", "optuna")
"""The libraries' loggers a sweep sends to its log file instead of the console."""

RECORD_VERSION = 1
"""The ``version`` field of a runtime record; a record with another is treated as absent."""

_MAX_RECORD_BYTES = 1 << 20
_SESSION_NAME = re.compile(r"session_[0-9A-Za-z_.-]{8,200}")
"""A Ray session name (``session_2026-12-04_18-27-58_794952_4125``); an empty or short one would match
any command line."""


class _UnsafeFolder(Exception):
    """The record folder is not this user's private folder."""


# ----------------------------------------------------------------------------------------- the record


def record_dir() -> Path:
    """The per-user folder of runtime records: ``$XDG_STATE_HOME/roli_sweep/ray_runtimes`` (an
    ``XDG_STATE_HOME`` that is unset, empty or relative is ignored, as the XDG spec says), by default
    ``~/.local/state/roli_sweep/ray_runtimes``."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "roli_sweep" / "ray_runtimes"


def record_path(storage_path: Path) -> Path:
    """Where the record of the local runtime started for ``storage_path`` lives: a file in
    :func:`record_dir` named by the sha256 of the resolved storage path."""
    return record_dir() / f"{_key(storage_path)}.json"


def _key(storage_path: Path) -> str:
    return hashlib.sha256(str(Path(storage_path).resolve()).encode()).hexdigest()


def _open_dir(create: bool) -> int | None:
    """An fd of :func:`record_dir` (created with mode 0o700 when ``create``), or None if it does not exist.

    Raises:
        _UnsafeFolder: it is a symlink or not a folder, not this user's, or group- or other-writable.
    """
    folder = record_dir()
    if create:
        folder.parent.parent.mkdir(parents=True, exist_ok=True)
        for part in (folder.parent, folder):
            try:
                part.mkdir(mode=0o700)
            except FileExistsError:
                pass
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as error:  # a symlink (ELOOP), not a folder (ENOTDIR), unreadable
        raise _UnsafeFolder(f"{folder}: {error.strerror}") from None
    info = os.fstat(fd)
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        os.close(fd)
        raise _UnsafeFolder(f"{folder} is not this user's private folder (owner uid {info.st_uid}, "
                            f"mode {stat.S_IMODE(info.st_mode):o})")
    return fd


def _write_record(storage_path: Path, record: dict) -> None:
    """Write ``record`` as the record of ``storage_path``: a temporary file (mode 0o600) in the record
    folder, then ``os.replace``, so a reader sees the old record or the new one, never a part."""
    fd = _open_dir(create=True)
    name = f"{_key(storage_path)}.json"
    temporary = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        try:
            with os.fdopen(out, "w", encoding="utf-8") as file:
                json.dump(record, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            try:
                os.unlink(temporary, dir_fd=fd)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(fd)


def _read_record(storage_path: Path) -> dict | None:
    """The record of ``storage_path``, or None if there is none. One that cannot be read or is malformed
    is deleted and treated as absent, with a warning; so is one in a folder that is not private."""
    path = record_path(storage_path)
    try:
        fd = _open_dir(create=False)
    except _UnsafeFolder as error:
        logger.warning("runtime record folder ignored: %s", error)
        return None
    if fd is None:
        return None
    name = path.name
    try:
        try:
            file = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError:
            return None
        try:
            info = os.fstat(file)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise ValueError("not a regular file of this user")
            data = os.read(file, _MAX_RECORD_BYTES + 1)
        finally:
            os.close(file)
        if len(data) > _MAX_RECORD_BYTES:
            raise ValueError("too large")
        return _parse(data, storage_path)
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        logger.warning("stale Ray runtime record %s is unreadable or malformed (%s); ignored and deleted",
                       path, str(error).splitlines()[0] if str(error) else type(error).__name__)
        try:
            os.unlink(name, dir_fd=fd)
        except OSError:
            pass
        return None
    finally:
        os.close(fd)


def _parse(data: bytes, storage_path: Path) -> dict:
    """The record in ``data``, checked field by field.

    Raises:
        ValueError: bad JSON or UTF-8, a missing or extra field, a wrong type, a storage path that is not
            ``storage_path``'s.
    """
    record = json.loads(data.decode("utf-8"))
    fields = {"version", "storage_path", "session_name", "session_dir", "driver", "processes"}
    if not isinstance(record, dict) or set(record) != fields:
        raise ValueError(f"not an object with the fields {sorted(fields)}")
    if record["version"] != RECORD_VERSION or isinstance(record["version"], bool):
        raise ValueError(f"version {record['version']!r}, not {RECORD_VERSION}")
    if record["storage_path"] != str(Path(storage_path).resolve()):
        raise ValueError(f"it is the record of {record['storage_path']!r}")
    if not isinstance(record["session_name"], str) or not _SESSION_NAME.fullmatch(record["session_name"]):
        raise ValueError(f"session_name {record['session_name']!r} is not a Ray session name")
    if not isinstance(record["session_dir"], str):
        raise ValueError("session_dir is not a string")
    if not isinstance(record["processes"], list):
        raise ValueError("processes is not a list")
    for entry in [record["driver"], *record["processes"]]:
        if not _is_entry(entry):
            raise ValueError(f"{entry!r} is not a {{'pid': int > 0, 'created': number}} entry")
    return record


def _is_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and set(entry) == {"pid", "created"}
            and type(entry["pid"]) is int and entry["pid"] > 0
            and type(entry["created"]) in (int, float) and math.isfinite(entry["created"]))


def _remove_record(storage_path: Path, driver_pid: int | None = None) -> None:
    """Delete the record of ``storage_path`` (only if its driver is ``driver_pid``, when given)."""
    try:
        fd = _open_dir(create=False)
    except _UnsafeFolder:
        return
    if fd is None:
        return
    name = f"{_key(storage_path)}.json"
    try:
        if driver_pid is not None:
            try:
                with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd), "rb") as file:
                    if json.loads(file.read(_MAX_RECORD_BYTES))["driver"]["pid"] != driver_pid:
                        return  # another sweep's runtime, started since with the same storage folder
            except FileNotFoundError:
                return
            except (OSError, ValueError, TypeError, KeyError):
                pass  # malformed: nobody's
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ the stale runtime


def end_stale_runtime(storage_path: Path) -> list[int]:
    """End the processes of the runtime recorded for ``storage_path`` whose driver is gone; returns their pids.

    A recorded driver still running (same pid and start time) means that sweep is still going: nothing is
    ended and the record is kept. Otherwise each recorded process is ended only if it still is the process
    recorded (same start time), this user's, and a process of the recorded Ray session (its command line
    names the session, or it has a file of the session's folder open), together with the processes it
    started since (the raylet's workers) that are this user's: SIGTERM, then SIGKILL after 5 s. Then the
    record is deleted. See the module docstring for where the record lives.
    """
    record = _read_record(storage_path)
    if record is None:
        return []
    if _same(record["driver"]):
        return []  # that sweep is still running
    me, session = os.getuid(), record["session_name"]
    verified: dict[int, psutil.Process] = {}
    for entry in record["processes"]:
        try:
            process = psutil.Process(entry["pid"])
            if _same(entry, process) and _owner(process) == me and _of_session(process, session):
                verified[process.pid] = process
        except psutil.Error:
            continue
    stale = dict(verified)
    for process in verified.values():  # workers the raylet started after the record
        try:
            children = process.children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            if child.pid not in stale and _owner(child) == me:
                stale[child.pid] = child
    ended = list(stale.values())
    for process in ended:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    for process in _running(ended, seconds=5):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    _remove_record(storage_path)
    return [p.pid for p in ended]


def _running(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after up to ``seconds`` (a zombie has ended: an orphan's is
    reaped by init when it gets to it)."""
    deadline = time.monotonic() + seconds
    while True:
        left = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    left.append(process)
            except psutil.NoSuchProcess:
                continue
        if not left or time.monotonic() >= deadline:
            return left
        processes = left
        time.sleep(0.1)


def _same(entry: dict, process: psutil.Process | None = None) -> bool:
    """Whether the pid of ``entry`` still belongs to the process recorded (same start time)."""
    try:
        process = process or psutil.Process(entry["pid"])
        return abs(process.create_time() - entry["created"]) < 0.01
    except psutil.Error:
        return False


def _owner(process: psutil.Process) -> int | None:
    """The real uid of ``process``, or None if it is gone or cannot be read."""
    try:
        return process.uids().real
    except psutil.Error:
        return None


def _of_session(process: psutil.Process, session_name: str) -> bool:
    """Whether ``process`` belongs to the Ray session ``session_name``: its command line names it (GCS,
    raylet, monitor, log monitor, dashboard head), or it has a file in the session's folder open (the
    agents and workers, which rename their process title but keep their logs there open)."""
    try:
        if session_name in " ".join(process.cmdline()):
            return True
        return any(session_name in Path(f.path).parts for f in process.open_files())
    except psutil.Error:
        return False


# ------------------------------------------------------------------------------- the runtime


def start_local_runtime(storage_path: Path, num_cpus: int | None) -> None:
    """Start a new local Ray runtime without a dashboard, after ending a stale one, and record its processes.

    ``ray.init(address="local", ...)``: always a new local runtime, never one recorded in Ray's temp folder
    (``ray_current_cluster``, written by ``ray start`` and ``ray.cluster_utils.Cluster``) or named by
    ``RAY_ADDRESS`` (with no address Ray would join that one, or refuse ``num_cpus`` for it). Its token file
    ends up at mode 0o600 (written under umask 0o077 when Ray creates it). The record (module docstring)
    goes to :func:`record_path`; if it cannot be written, a warning says so and the sweep goes on.
    """
    storage_path.mkdir(parents=True, exist_ok=True)
    end_stale_runtime(storage_path)
    token_folder = default_token_path().parent
    created_folder = None if token_folder.exists() else token_folder
    make_token_private(None)
    create_token_privately()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    make_token_private(created_folder)
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
    record = {"version": RECORD_VERSION, "storage_path": str(storage_path.resolve()),
              "session_name": node.session_name, "session_dir": node.get_session_dir_path(),
              "driver": {"pid": driver.pid, "created": driver.create_time()}, "processes": processes}
    try:
        _write_record(storage_path, record)
    except (OSError, _UnsafeFolder) as error:
        logger.warning("Ray runtime not recorded (a killed driver's runtime will not be ended at the next "
                       "start): %s", error)


def stop_local_runtime(storage_path: Path) -> None:
    """``ray.shutdown`` and drop the record (if it is still this process's)."""
    ray.shutdown()
    _remove_record(storage_path, driver_pid=os.getpid())


def set_tune_environment() -> None:
    """The Ray Tune settings a sweep runs with (unless the user set them), before its runtime starts."""
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials run in the driver's working directory
    # the end of stage 1 is reported (epoch 0, with the probe as checkpoint) before any finetune metric exists;
    # ASHA and the searcher skip results without their metric, Tune's strict check would refuse it
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ray Tune's new output engine prints its "Configuration for experiment" box and a TensorBoard hint even at
    # verbose=0; the legacy one prints nothing there. The sweep's own view is roli_sweep.tune.callbacks'.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


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
