"""A sweep on two Ray nodes: trials land on both, the probe cache and the final evaluation work, MLflow goes through
``mlflow server`` on 127.0.0.1, storage on a shared folder."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import write_yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(tmp_path: Path, backend: str | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 with ``backend`` as its store (default: a sqlite file), once it answers
    ``/health``."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend or f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("mlflow server did not answer /health within 90 s")


@pytest.mark.extended
def test_sweep_on_two_nodes(tmp_path, space_dict):
    space_dict["num_samples"] = 4
    space_dict["base"]["eval"]["final"]["batch_size"] = 8
    space_dict["base"]["eval"]["final"]["autoattack"] = {"apgd_steps": 3, "fab_steps": 3, "square_queries": 20}
    space_dict["parameters"]["finetune.method_params.r"] = {"values": [4]}  # one probe setting: the cache must share it
    space = write_yaml(tmp_path / "tiny.yaml", space_dict)
    server, url = start_mlflow_server(tmp_path)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        run = subprocess.run([sys.executable, "-m", "tests.two_node_sweep", str(space), str(tmp_path / "shared"), url,
                              "two-nodes"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        if run.returncode == 75:
            pytest.skip(run.stdout.strip())
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        client = MlflowClient(url)
        parent = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                    filter_string="tags.sweep_role = 'parent'")[0]
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(children) == 4
    assert len({c.data.tags["ray_node"] for c in children}) == 2, "trials ran on both nodes"
    assert sorted(c.data.tags["probe"] for c in children) == ["cached", "cached", "cached", "computed"]
    assert len(list((tmp_path / "shared" / "two-nodes" / "probe_cache").glob("*.safetensors"))) == 1
    assert "best_final_autoattack_acc" in parent.data.metrics and parent.data.tags["masking"] in ("pass", "warning")
    assert parent.data.metrics["compute_probe_saved_s"] > 0
