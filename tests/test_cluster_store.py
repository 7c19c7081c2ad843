"""The cluster store recipe (README, "On a cluster"): MLflow through ``mlflow server`` on a PostgreSQL database and
the sweep's Optuna studies in another database of the same PostgreSQL server, passwords in a ``PGPASSFILE`` rather
than in the URLs. The test starts a real PostgreSQL (Debian's ``postgresql`` package, which ``.ci/run`` installs) on
127.0.0.1 with password authentication, runs a small sweep against it and reads both stores back."""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from roli_sweep.cli import main
from tests.conftest import write_yaml
from tests.test_cluster import free_port, start_mlflow_server

USER = "roli"


class Postgres:
    """A PostgreSQL server of this test: its own data folder, 127.0.0.1 only, SCRAM password authentication, the
    superuser :data:`USER`. Run as the ``postgres`` system user when the tests run as root (initdb refuses root)."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            pytest.fail("PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)")
        self.bin = found[-1].parent
        self.folder = Path(tempfile.mkdtemp(prefix="roli_pg_"))
        self.data, self.port, self.password = self.folder / "data", free_port(), secrets.token_hex(16)
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        password_file = self.folder / "initdb_password"
        password_file.write_text(self.password)
        if self.prefix:
            shutil.chown(password_file, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={password_file}", "--auth=scram-sha-256",
                  "--encoding=UTF8", "--no-instructions")
        password_file.unlink()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.folder}", "start")

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self.prefix, str(self.bin / program), *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{program}: {done.stdout}{done.stderr}"

    def url(self, database: str) -> str:
        """A SQLAlchemy URL without the password (the client reads it from ``PGPASSFILE``)."""
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{database}"

    def create_databases(self, *names: str) -> None:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                                      dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                for name in names:
                    cursor.execute(f"CREATE DATABASE {name}")
        finally:
            connection.close()

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                                      dbname=database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall()
        finally:
            connection.close()

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def postgres(tmp_path, monkeypatch):
    server = Postgres()
    try:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{server.port}:*:{USER}:{server.password}\n")
        passfile.chmod(0o600)  # libpq ignores a password file others can read
        monkeypatch.setenv("PGPASSFILE", str(passfile))
        server.create_databases("mlflow", "optuna")
        yield server
    finally:
        server.stop()


@pytest.mark.extended
def test_sweep_on_postgres_store(tmp_path, space_dict, postgres, ray_runtime, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space_dict["base"]["eval"]["final"]["autoattack"] = {"apgd_steps": 3, "fab_steps": 3, "square_queries": 20}
    space = write_yaml(tmp_path / "tiny.yaml", space_dict)
    mlflow_server, url = start_mlflow_server(tmp_path, backend=postgres.url("mlflow"))
    try:
        code = main(["--space", str(space), "--name", "pg", "--tracking-uri", url,
                     "--study-storage", postgres.url("optuna"), "--storage-path", str(tmp_path / "ray_results")])
        assert code == 0
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("tiny").experiment_id
        (parent,) = client.search_runs([experiment], filter_string="tags.sweep_role = 'parent'")
        children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    finally:
        mlflow_server.terminate()
        mlflow_server.wait(timeout=30)
    assert len(children) == 4
    assert {c.data.tags["status"] for c in children} <= {"completed", "pruned"}
    assert all("best_val_robust_acc" in c.data.metrics for c in children)
    assert "best_final_autoattack_acc" in parent.data.metrics
    # the runs are rows of the PostgreSQL database, not of a file beside the server
    stored = {row[0] for row in postgres.query("mlflow", "SELECT run_uuid FROM runs")}
    assert {parent.info.run_id, *(c.info.run_id for c in children)} <= stored
    assert not (tmp_path / "server.db").exists()
    # the Optuna study is in the other database of the same server, told what happened to each trial
    study = optuna.load_study(study_name="pg", storage=postgres.url("optuna"))
    states = sorted(t.state.name for t in study.trials)
    assert len(states) == 4 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    assert postgres.query("optuna", "SELECT study_name FROM studies") == [("pg",)]
    assert not (tmp_path / "ray_results" / "pg" / "optuna.db").exists()
