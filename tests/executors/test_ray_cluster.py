"""A real multi-node Ray cluster on this machine: ``ray start --head`` and a second node, S3 storage on loopback.

The cluster runs with token authentication (``RAY_AUTH_MODE=token``, as a
cluster whose head found a token starts), two nodes of one CPU each, so the
two workers of a two-stage plan are placed one on each. The storage is a
real S3 server (seaweedfs) on loopback. The driver is a process of its own
(``ray_cluster_driver.py``): the suite's process runs the session's local Ray.
The test starts and stops its cluster itself, by the processes it started
(``ray stop`` would stop every Ray on the machine, the session's too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
from torch import nn

from tests.conftest import _free_ports
from tests.helpers import assert_same_parameters, mlp7, plain_training, regression_batches, sgd_momentum

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

ROOT = Path(__file__).resolve().parents[2]

#: Longest wait for a node to start (its processes on a loaded 2-core machine) and for the driver's run.
NODE_START_S = 120.0
DRIVER_S = 240.0
STOP_S = 60.0

RAY = str(Path(sys.executable).with_name("ray"))


def _node_args(ports: list[int]) -> list[str]:
    """Every listener of a node on a port of its own, so it never meets the session's Ray or another node's."""
    node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics = ports
    return [
        "--block", "--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
    ]


def _processes_of(directory: Path, sessions: set[int]) -> list[int]:
    """PIDs of the processes whose command line names ``directory`` (the cluster's temp dir) or in ``sessions``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
                session = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            if str(directory).encode() in command or session in sessions:
                found.append(int(entry.name))
    return found


class Node:
    """One ``ray start --block`` process (its own session) and its log."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen([RAY, "start", *args], env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_started(self) -> None:
        """Until ``ray start`` says the node runs (it then blocks), or it exited, or NODE_START_S passed."""
        import time

        deadline = time.monotonic() + NODE_START_S
        while b"Ray runtime started" not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not start a node; its log:\n{self.log_path.read_text()}")
            time.sleep(0.2)  # polling a starting server, not a race in the code under test

    def stop(self) -> None:
        """SIGTERM to ``ray start --block``, which stops the node's processes; then SIGKILL to its session."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of its session is left
        self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def two_nodes(
    tmp_path_factory: pytest.TempPathFactory, aws_env: dict[str, str]
) -> Iterator[tuple[str, dict[str, str]]]:
    """``(address, env)`` of a running two-node cluster; stopped, every process of it gone, afterwards."""
    root = tmp_path_factory.mktemp("ray-cluster")
    # Ray keeps its sockets here, whose paths may not exceed 107 bytes: a short one.
    temp_dir = Path(tempfile.mkdtemp(prefix="fp-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    port, *ports = _free_ports(13)
    head = Node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                 *_node_args(ports[:6])], env, root / "head.log")
    nodes = [head]
    try:
        head.wait_started()
        address = f"127.0.0.1:{port}"
        second = Node([f"--address={address}", *_node_args(ports[6:])], env, root / "second.log")
        nodes.append(second)
        second.wait_started()
        yield address, env
    finally:
        for node in reversed(nodes):
            node.stop()
    assert _processes_of(temp_dir, {node.process.pid for node in nodes}) == []
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_two_node_cluster_with_s3_storage_trains_as_plain_pytorch(
    two_nodes: tuple[str, dict[str, str]], seaweedfs_endpoint: str, tmp_path: Path
) -> None:
    import boto3
    import ray

    address, env = two_nodes
    client = boto3.session.Session().client("s3", endpoint_url=seaweedfs_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="funcpipe-ray-cluster")
    client.close()
    storage = f"s3://funcpipe-ray-cluster/run?endpoint_url={seaweedfs_endpoint}"
    driver = subprocess.run(
        [sys.executable, "-m", "tests.executors.ray_cluster_driver", address, storage, str(tmp_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=DRIVER_S, check=False,
    )
    assert driver.returncode == 0, driver.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert len(report["cluster_nodes"]) == 2
    assert sorted(report["worker_nodes"]) == sorted(report["cluster_nodes"])  # one worker on each node
    assert report["file_storage"] == "accepted"  # both nodes on this machine
    assert report["other_address"].startswith(
        "Ray(address='127.0.0.1:1') asks for another Ray than the one this process already runs"
    )
    batches = regression_batches(4, 4)
    losses: list[float] = []
    expected = plain_training(mlp7(), nn.functional.mse_loss, sgd_momentum, batches, losses=losses)
    trained = mlp7()
    trained.load_state_dict(safetensors.torch.load_file(str(tmp_path / "model.safetensors")))
    assert_same_parameters(trained, expected)
    assert report["losses"] == pytest.approx(losses, rel=1e-4)
    assert ray.get(ray.put("still here"), timeout=60) == "still here"  # the session's own Ray lives on
