"""A sweep on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and a worker node,
one CPU each, each its own raylet), joined with ``--address`` as a user joins ``ray start`` nodes.

    python -m tests.two_node_sweep SPACE STORAGE TRACKING_URI NAME

Run in its own process by ``tests/test_cluster.py`` (a process holds one Ray driver). Exits with the sweep's status,
or 75 when Ray cannot start the two nodes here.
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from ray.cluster_utils import Cluster

    space, storage, tracking_uri, name = argv
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    except Exception as err:  # noqa: BLE001 - the test skips, saying why
        print(f"Ray cannot start two nodes here: {type(err).__name__}: {err}", flush=True)
        return 75
    try:
        from roli_sweep.cli import main as cli_main

        return cli_main(["--space", space, "--name", name, "--address", cluster.address, "--storage-path", storage,
                         "--tracking-uri", tracking_uri])
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
