"""The driver of ``tests/executors/test_ray_cluster.py``, run as a process of its own.

The suite's process already runs a local Ray, and a process has one Ray at a
time, so the driver that joins the test's cluster is this script:
``python -m tests.executors.ray_cluster_driver ADDRESS STORAGE_URL OUT_DIR``.
It trains on the cluster and writes what the test checks into ``OUT_DIR``:
``model.safetensors`` (the trained weights) and ``report.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

#: Longest wait for the cluster's second node to be listed alive (it may still be joining).
NODES_TIMEOUT_S = 120.0


def main(address: str, storage_url: str, out_dir: str) -> None:
    import ray
    import safetensors.torch
    from torch import nn

    from funcpipe import ConfigError, Plan, Trainer
    from funcpipe.executors import ray as ray_executor
    from funcpipe.executors.base import Resources
    from funcpipe.executors.ray import Ray
    from tests.helpers import mlp7, regression_batches, sgd_momentum

    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    deadline = time.monotonic() + NODES_TIMEOUT_S
    while len([node for node in ray.nodes() if node["Alive"]]) < 2:
        if time.monotonic() > deadline:
            raise SystemExit(f"the cluster at {address} has not 2 live nodes after {NODES_TIMEOUT_S:g} s")
        time.sleep(0.2)  # polling a cluster that is joining, not a race in the code under test
    report: dict[str, object] = {}
    try:  # a Ray that is not the one this process joined
        Ray(address="127.0.0.1:1").fit_resources([Resources(1.0)])
        report["other_address"] = "accepted"
    except ConfigError as exc:
        report["other_address"] = str(exc)
    try:  # every node of this cluster is on this machine: a local directory is shared
        Ray(address=address).check_storage("file:///tmp/funcpipe-cluster-check")
        report["file_storage"] = "accepted"
    except ConfigError as exc:
        report["file_storage"] = str(exc)

    plan = Plan.manual([4, 3], micro_batch_size=2, global_batch_size=4)
    # One CPU per worker and one per node, not shrunk to fit: one worker is placed on each node.
    executor = Ray(address=address, oversubscribe=False)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, plan, backend=executor, storage=storage_url)
    history = trainer.fit(regression_batches(4, 4), progress=False)
    hosts = [host for idle in ray_executor._IDLE.values() for host in idle]  # the job's, kept for reuse
    report["worker_nodes"] = ray.get(
        [host.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for host in hosts],
        timeout=60,
    )
    report["cluster_nodes"] = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    report["losses"] = list(history.losses)
    executor.shutdown()
    out = Path(out_dir)
    safetensors.torch.save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()},
                                str(out / "model.safetensors"))
    (out / "report.json").write_text(json.dumps(report), encoding="utf-8")
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
