"""Screenshots of a sweep in the MLflow UI, taken with headless Chromium (Debian's ``chromium``), to check what a
researcher sees: the experiment opens on its runs, and a chart comparison of the sweep's trials.

    python benchmarks/ui_screenshots.py --tracking-uri sqlite:///mlflow.db --name SWEEP --out docs/ui

Starts ``mlflow server`` on 127.0.0.1 (a free port) over the store, writes ``opened_plain.png`` (the
experiment's page at its plain address: MLflow 3.17 opens it per its GenAI / Model training switch, which
starts on GenAI in a new browser whatever the experiment's tag), ``runs.png`` (the address the sweep
prints, with ``workflowType=machine_learning``: the training runs) and ``compare.png`` (the compare view
of the sweep's child runs), then stops the server. Needs ``apt-get install -y chromium``. Not a test: it only shows what the UI renders.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shot(url: str, path: Path, budget_ms: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
                    f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"wrote {path} ({url})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--name", required=True, help="sweep name")
    parser.add_argument("--out", type=Path, default=Path("docs/ui"))
    parser.add_argument("--budget-ms", type=int, default=20000, help="Chromium's virtual time budget per page")
    args = parser.parse_args()
    client = MlflowClient(args.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parent = client.search_runs(experiments, filter_string=f"tags.sweep = '{args.name}' and tags.sweep_role = 'parent'")
    if not parent:
        sys.exit(f"no sweep named {args.name!r} in {args.tracking_uri}")
    experiment = parent[0].info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("mlflow server did not start within 90 s")
                time.sleep(0.5)
        args.out.mkdir(parents=True, exist_ok=True)
        _shot(f"{base}/#/experiments/{experiment}", args.out / "opened_plain.png", args.budget_ms)
        _shot(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning", args.out / "runs.png",
              args.budget_ms)
        runs = urllib.parse.quote(json.dumps([c.info.run_id for c in children]))
        _shot(f"{base}/#/compare-runs?runs={runs}&experiments={urllib.parse.quote(json.dumps([experiment]))}"
              "&workflowType=machine_learning",
              args.out / "compare.png", args.budget_ms)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
