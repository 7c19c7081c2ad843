"""The local Ray runtime's record (private, atomic, checked before anything is ended) and Ray's token file,
with real Ray runtimes started in subprocesses (this process may already hold the session's runtime) and
real processes; nothing of Ray or psutil is mocked."""
from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from roli_sweep.tune.auth_token import auth_token_path
from roli_sweep.tune.runtime import end_stale_runtime, record_dir, record_path

ROOT = Path(__file__).resolve().parent.parent
SESSION = "session_2026-01-01_00-00-00_000000_1"
"""A well-formed Ray session name no process has."""

REPORT = """
import json, os, stat, sys
from pathlib import Path
import psutil
from roli_sweep.tune import auth_token, runtime
storage = Path(sys.argv[1])
runtime.start_local_runtime(storage, 1)
node = runtime.ray._private.worker.global_worker.node
record = json.loads(runtime.record_path(storage).read_text())
mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
umask = lambda pid: open(f"/proc/{pid}/status").read().split("Umask:")[1].split()[0]
processes = []
for entry in record["processes"]:
    p = psutil.Process(entry["pid"])
    processes.append({"pid": p.pid, "name": p.name(), "cmdline": " ".join(p.cmdline())[:300],
                      "of_session": runtime._of_session(p, record["session_name"]), "umask": umask(p.pid)})
token = auth_token.auth_token_path()
print("REPORT " + json.dumps({
    "record": str(runtime.record_path(storage)), "record_mode": mode(runtime.record_path(storage)),
    "record_dir_mode": mode(runtime.record_dir()), "record_dir_files": os.listdir(runtime.record_dir()),
    "storage_files": os.listdir(storage), "session_name": record["session_name"],
    "node_session": node.session_name, "gcs_address": node.gcs_address, "processes": processes,
    "token": str(token), "token_mode": mode(token), "token_dir_mode": mode(token.parent),
    "driver_umask": umask(os.getpid())}), flush=True)
runtime.stop_local_runtime(storage)
print("STOPPED", runtime.record_path(storage).exists(), flush=True)
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment with a fresh HOME and XDG_STATE_HOME under ``tmp_path``, no Ray token given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    (tmp_path / "home").mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "state"), **extra)
    return env


def _start_and_stop(tmp_path: Path, storage: Path, **extra: str) -> tuple[dict, str]:
    """Run :data:`REPORT` (start_local_runtime, report, stop_local_runtime) in a subprocess; its report and output."""
    done = subprocess.run([sys.executable, "-c", REPORT, str(storage)], cwd=ROOT, env=_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "STOPPED False" in done.stdout, "stop_local_runtime drops the record"
    report = next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(report[len("REPORT "):]), out


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """XDG_STATE_HOME for this test (and the subprocesses it starts): records go to a fresh folder."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def unrelated():
    """A process of this user that no runtime record may end: ``sleep 300``."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


def _entry(pid: int) -> dict:
    return {"pid": pid, "created": psutil.Process(pid).create_time()}


def _dead_driver() -> dict:
    """The pid and start time of a process that has ended."""
    gone = subprocess.Popen(["true"])
    entry = _entry(gone.pid)
    gone.wait()
    return entry


def _write(storage: Path, record: dict | str | bytes) -> Path:
    """Put ``record`` (a dict as JSON, or raw text or bytes) where the record of ``storage`` lives, as the
    runtime would: folder 0o700, file 0o600."""
    path = record_path(storage)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps(record) if isinstance(record, dict) else record
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    path.chmod(0o600)
    return path


def _record(storage: Path, processes: list[dict], driver: dict, session: str = SESSION) -> dict:
    return {"version": 1, "storage_path": str(storage.resolve()), "session_name": session,
            "session_dir": f"/tmp/ray/{session}", "driver": driver, "processes": processes}


# ------------------------------------------------------------------------------------ with a real runtime


@pytest.fixture(scope="module")
def fresh_home_run(tmp_path_factory) -> tuple[dict, Path, str]:
    """One start and stop in a subprocess with a fresh HOME (no token yet) and XDG_STATE_HOME, and RAY_ADDRESS
    naming a cluster that does not exist (a start that tried to join it would fail)."""
    tmp = tmp_path_factory.mktemp("fresh_home")
    storage = tmp / "ray_results"
    report, out = _start_and_stop(tmp, storage, RAY_ADDRESS="127.0.0.1:1")
    return report, tmp, out


def test_the_record_is_private_and_not_in_the_storage_folder(fresh_home_run):
    report, tmp, _ = fresh_home_run
    assert report["storage_files"] == [], "nothing of the record in the storage folder"
    assert Path(report["record"]).parent == tmp / "state" / "roli_sweep" / "ray_runtimes"
    assert report["record_mode"] == 0o600 and report["record_dir_mode"] == 0o700
    assert report["record_dir_files"] == [Path(report["record"]).name], "no temporary file left"
    assert report["session_name"] == report["node_session"]


def test_every_recorded_process_is_recognised_as_one_of_the_session(fresh_home_run):
    """GCS, raylet, monitor, log monitor and dashboard head name the session in their command line; the agents
    (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) do not, but have the session's log files open."""
    report, _, _ = fresh_home_run
    names = {p["name"] for p in report["processes"]}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
    assert all(p["of_session"] for p in report["processes"]), report["processes"]
    by_name = {p["name"]: p for p in report["processes"]}
    assert report["session_name"] in by_name["raylet"]["cmdline"]
    assert report["session_name"] not in by_name["ray::DashboardAgent"]["cmdline"]


def test_a_fresh_homes_token_file_is_600_and_the_runtime_keeps_the_users_umask(fresh_home_run):
    report, tmp, out = fresh_home_run
    assert report["token"] == str(tmp / "home" / ".ray" / "auth_token")
    assert report["token_mode"] == 0o600 and report["token_dir_mode"] == 0o700
    assert "127.0.0.1:1" not in report["gcs_address"], "a new local runtime, not the one RAY_ADDRESS names"
    assert {p["umask"] for p in report["processes"]} == {report["driver_umask"]}, \
        "only the token was written under umask 0o077, not the runtime's processes (nor the trials' files)"


@pytest.mark.parametrize("bad", ["truncated", "wrong_shape"])
def test_a_truncated_or_wrong_shaped_record_does_not_block_a_start(tmp_path, state, bad):
    storage = tmp_path / "ray_results"
    good = json.dumps(_record(storage, [_dead_driver()], _dead_driver()))
    _write(storage, good[: len(good) // 2] if bad == "truncated" else json.dumps([_dead_driver()]))
    token = tmp_path / "home" / ".ray" / "auth_token"  # an older token, written with umask 022
    token.parent.mkdir(parents=True)
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    token.write_text(generate_new_authentication_token())
    token.chmod(0o644)
    report, out = _start_and_stop(tmp_path, storage)
    assert "unreadable or malformed" in out and "ignored and deleted" in out
    assert report["record_mode"] == 0o600, "the start wrote its own record"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600, "an existing token file is made private too"


def test_a_killed_drivers_agents_are_ended_but_an_unrelated_process_in_the_record_is_not(tmp_path, state, unrelated):
    storage = tmp_path / "ray_results"
    code = ("import sys, time\nfrom pathlib import Path\nfrom roli_sweep.tune.runtime import start_local_runtime\n"
            "start_local_runtime(Path(sys.argv[1]), 1)\nprint('READY', flush=True)\ntime.sleep(300)\n")
    driver = subprocess.Popen([sys.executable, "-c", code, str(storage)], cwd=ROOT, env=_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert driver.stdout.readline().strip() == "READY"
        assert end_stale_runtime(storage) == [] and record_path(storage).exists(), "its driver still runs"
        record = json.loads(record_path(storage).read_text())
        record["processes"].append(_entry(unrelated.pid))
        _write(storage, record)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 20  # the GCS and raylet follow their driver; the agents stay
        while time.time() < deadline and {"gcs_server", "raylet"} & _names(_running_in(driver.pid)):
            time.sleep(0.2)
        agent_names = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}
        agents = {pid for pid in _running_in(driver.pid) if _names({pid}) & agent_names}
        assert len(agents) == 2, "Ray's two agents outlive a killed driver"
        ended = end_stale_runtime(storage)
        assert agents <= set(ended) and unrelated.pid not in ended
        assert unrelated.poll() is None, "the unrelated process still runs"
        assert not record_path(storage).exists()
        deadline = time.time() + 10  # and a worker of the raylet, if one was still exiting, is gone too
        while _running_in(driver.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _running_in(driver.pid)
    finally:
        for process in _of_session_id(driver.pid):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        driver.kill()
        driver.wait()


def _running_in(sid: int) -> set[int]:
    """The pids of the processes of process session ``sid`` that are running (not zombies)."""
    running = set()
    for process in _of_session_id(sid):
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                running.add(process.pid)
        except psutil.NoSuchProcess:
            continue
    return running


def _names(pids: set[int]) -> set[str]:
    names = set()
    for pid in pids:
        try:
            names.add(psutil.Process(pid).name())
        except psutil.NoSuchProcess:
            continue
    return names


def _of_session_id(sid: int) -> list[psutil.Process]:
    """The processes in process session ``sid`` (what the test's driver started with ``start_new_session``)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except OSError:
            continue
    return found


# -------------------------------------------------------------------------------- without a runtime (fast)


def test_a_record_naming_an_unrelated_process_of_this_user_never_ends_it(tmp_path, state, unrelated):
    storage = tmp_path / "ray_results"
    path = _write(storage, _record(storage, [_entry(unrelated.pid)], _dead_driver()))
    assert end_stale_runtime(storage) == []
    assert unrelated.poll() is None
    assert not path.exists(), "the stale record is dropped"


MALFORMED = {
    "empty": b"", "truncated": b'{"version": 1, "storage_pa', "not_utf8": b"\xff\xfe{}", "null": b"null",
    "a_list": b"[]", "fields_missing": b'{"driver": {"pid": 1, "created": 0}, "processes": []}',
    "other_version": {"version": 2}, "bool_version": {"version": True}, "extra_field": {"extra": 1},
    "empty_session": {"session_name": ""}, "short_session": {"session_name": "session_1"},
    "session_not_a_string": {"session_name": None}, "session_dir_not_a_string": {"session_dir": 5},
    "other_storage": {"storage_path": "/elsewhere"}, "driver_null": {"driver": None},
    "processes_object": {"processes": {}}, "pid_string": {"processes": [{"pid": "1", "created": 0}]},
    "pid_bool": {"processes": [{"pid": True, "created": 0}]},
    "pid_negative": {"processes": [{"pid": -5, "created": 0}]},
    "created_missing": {"processes": [{"pid": 1}]}, "created_string": {"processes": [{"pid": 1, "created": "0"}]},
}


@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_record_is_treated_as_absent_and_deleted(tmp_path, state, unrelated, caplog, bad):
    storage = tmp_path / "ray_results"
    if isinstance(bad, bytes):
        data = bad
    else:
        record = _record(storage, [_entry(unrelated.pid)], _dead_driver(), session=f"{SESSION}0")
        data = json.dumps({**record, **bad}).encode()
    path = _write(storage, data)
    with caplog.at_level(logging.WARNING, logger="roli_sweep"):
        assert end_stale_runtime(storage) == []
    assert unrelated.poll() is None
    assert not path.exists()
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


def test_the_old_record_in_the_storage_folder_is_never_read(tmp_path, state, unrelated):
    storage = tmp_path / "ray_results"
    storage.mkdir()
    old = storage / ".ray_runtime.json"
    old.write_text(json.dumps({"driver": _dead_driver(), "processes": [_entry(unrelated.pid)]}))
    assert end_stale_runtime(storage) == []
    assert unrelated.poll() is None and old.exists()


def test_a_record_folder_others_can_write_is_ignored(tmp_path, state, unrelated, caplog):
    storage = tmp_path / "ray_results"
    path = _write(storage, _record(storage, [_entry(unrelated.pid)], _dead_driver()))
    path.parent.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="roli_sweep"):
        assert end_stale_runtime(storage) == []
    assert path.exists(), "not read, not deleted"
    assert unrelated.poll() is None
    assert "not this user's private folder" in caplog.text


def test_where_the_record_lives(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path))
    assert record_dir() == tmp_path / ".local" / "state" / "roli_sweep" / "ray_runtimes"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "s"))
    assert record_path(tmp_path / "a" / ".." / "b") == record_path(tmp_path / "b")
    assert record_path(tmp_path / "b").parent == tmp_path / "s" / "roli_sweep" / "ray_runtimes"


def test_auth_token_path_follows_rays_order(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token_path() == tmp_path / ".ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert auth_token_path() == tmp_path / "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "given")
    assert auth_token_path() is None, "the token is in the variable, not in a file"
