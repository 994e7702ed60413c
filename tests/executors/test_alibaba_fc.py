"""Function Compute backend end to end: the real FC SDK invokes a loopback FC API whose payloads the
real ``backends/alibaba_fc`` container server runs in separate processes; workers talk through storage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alibabacloud_credentials import models as credential_models
from alibabacloud_credentials.client import Client as CredentialClient
from torch import nn

from funcpipe import ConfigError, FunctionNotDeployed, PayloadTooLarge, Plan, Trainer, protocol
from funcpipe.backends import AlibabaFC, Timing
from tests.fakes.alibaba_fc import FakeFC
from tests.helpers import (
    assert_fit_fails_not_started,
    assert_same_parameters,
    mlp7,
    plain_training,
    regression_batches,
    sgd_momentum,
)
from tests.leaks import SECRETS, capture_logs, every_version, leaks, record_leaks, versioned_bucket

SGD_MOMENTUM = sgd_momentum  # by reference: test modules are slow to import in a function
FUNCTION = "funcpipe-worker-2048"
FAST = Timing(poll_s=0.05, heartbeat_s=0.2, start_timeout_s=60.0, silence_timeout_s=30.0)


#: The driver's keys for the FC API (the fake does not check them); scanned for like the others.
FC_ACCESS_KEY_ID = "LTAIfuncpipeFcInvokeKeyId"
FC_ACCESS_KEY_SECRET = "funcpipe-fc-invoke-secret-do-not-leak"


def credential() -> CredentialClient:
    """Explicit test keys: the SDK's default chain reads the environment once, at import."""
    return CredentialClient(credential_models.Config(
        type="access_key", access_key_id=FC_ACCESS_KEY_ID, access_key_secret=FC_ACCESS_KEY_SECRET
    ))


BUCKET = "funcpipe-fc-test"


@pytest.fixture(scope="module")
def storage_url(moto_endpoint: str, oss_env: dict[str, str]) -> str:
    """An OSS bucket on moto's S3-compatible server: oss2 does objects by key there (the whole data
    path: the driver deletes finished iterations by their known keys, never by listing).

    Uploads stay single PUTs (moto cannot parse oss2's multipart upload)."""
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return f"oss://{BUCKET}/fc?endpoint={moto_endpoint}&multipart_threshold={64 * 2**20}"


@pytest.fixture(scope="module")
def fake_fc(oss_env: dict[str, str]) -> Iterator[FakeFC]:
    fake = FakeFC([FUNCTION], instances=3, env=oss_env)  # the functions' own credentials
    try:
        fake.wait_ready()
        yield fake
    finally:
        fake.close()


def under(url: str, name: str) -> str:
    """The storage URL of one test: its own prefix in the bucket."""
    return url.replace("/fc?", f"/fc/{name}?")


def executor(fake: FakeFC, **options: Any) -> AlibabaFC:
    options.setdefault("timing", FAST)
    return AlibabaFC("cn-hangzhou", endpoint=fake.endpoint, protocol="http", credential=credential(), **options)


def two_stage_plan() -> Plan:
    return Plan.manual([3, 4], replicas=[1, 2], micro_batch_size=2, global_batch_size=8)


def test_training_on_function_compute_equals_plain_pytorch(fake_fc: FakeFC, storage_url: str) -> None:
    model = mlp7()
    batches = regression_batches(3, 8)
    expected = plain_training(model, nn.functional.mse_loss, SGD_MOMENTUM, batches)
    before = len(fake_fc.invocations)
    trainer = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                      backend=executor(fake_fc), storage=under(storage_url, "equivalence"))
    history = trainer.fit(batches, progress=False)
    assert len(history) == 3
    assert_same_parameters(trainer.model, expected)
    invocations = fake_fc.invocations[before:]
    assert [i.function for i in invocations] == [FUNCTION] * 3
    assert all(i.ended.wait(5) and (i.status, i.x_fc_status) == (200, "200") for i in invocations)
    # Measured: each invocation, billed by FC's millisecond at 2 GB (1 vCPU by funcpipe's FC tiers):
    # 0.15 CU per GB-s and 1 CU per vCPU-s at $0.000020 per CU; 75 CU per 10,000 invocations.
    assert [r["invocations"] for r in history.runs] == [3] and len(history.workers) == 3
    assert all(c["billed"] and c["memory_mb"] == 2048 and c["status_requests"]["PUT"] >= 2 for c in history.workers)
    cost = history.measured_cost("alibaba_fc")
    assert cost is not None and cost.billed and cost.invocations == 3
    billed = sum(math.ceil(c["call_s"] * 1000) / 1000 for c in history.workers)
    assert cost.compute_usd == pytest.approx(billed * (2 * 0.15 + 1.0) * 0.000020)
    assert cost.invocations_usd == pytest.approx(3 * 75 * 0.000020 / 10_000)


def test_training_writes_no_credential_anywhere(
    fake_fc: FakeFC, moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 6: no credential value (the OSS keys and STS token of the functions and the driver, the
    driver's FC API keys) in any invocation payload, stored object, or log record of a training run.
    The bucket keeps every version, so objects the driver deleted during the run are read too."""
    bucket = "funcpipe-fc-leaks"
    versioned_bucket(moto_endpoint, bucket)
    secrets = (*SECRETS, FC_ACCESS_KEY_ID, FC_ACCESS_KEY_SECRET)
    capture_logs(caplog)
    before = len(fake_fc.invocations)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(), backend=executor(fake_fc),
                      storage=f"oss://{bucket}/run?endpoint={moto_endpoint}&multipart_threshold={64 * 2**20}")
    trainer.fit(regression_batches(2, 8), progress=False)
    payloads = [i.payload for i in fake_fc.invocations[before:]]
    assert len(payloads) == 3 and all(json.loads(p)["funcpipe"] == protocol.PAYLOAD_FORMAT for p in payloads)
    assert [leaks(p, secrets) for p in payloads] == [[]] * 3
    objects = list(every_version(moto_endpoint, bucket, "run/"))
    kinds = {key.split("/")[-1].split(".")[0] for key, _ in objects}
    assert {"input", "target", "act", "grad", "chunk", "merged", "metrics", "s0", "s1"} <= kinds, kinds
    assert any("/model/" in key for key, _ in objects) and any("/checkpoint/" in key for key, _ in objects)
    assert any(key.startswith("run/funcpipe-calls/") for key, _ in objects)
    assert {key: leaks(data, secrets) for key, data in objects if leaks(data, secrets)} == {}
    assert caplog.records and record_leaks(caplog.records, secrets) == []


def test_a_function_that_never_starts_fails_fit_within_the_start_timeout(storage_url: str) -> None:
    fake = FakeFC([FUNCTION], instances=0, env={})  # accepted, never run
    try:
        start_timeout_s = 2.0
        timing = Timing(poll_s=0.05, heartbeat_s=0.2, start_timeout_s=start_timeout_s, silence_timeout_s=2.0)
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                          backend=executor(fake, timing=timing), storage=under(storage_url, "never"))
        assert_fit_fails_not_started(trainer, start_timeout_s, lambda: len(fake.invocations))
    finally:
        fake.close()


def test_function_not_deployed_names_the_deploy_command(fake_fc: FakeFC, storage_url: str) -> None:
    trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                      backend=executor(fake_fc, function_prefix="not-deployed"), storage=under(storage_url, "missing"))
    with pytest.raises(FunctionNotDeployed, match=r"'not-deployed-2048'.*`funcpipe deploy alibaba_fc`"):
        trainer.fit(regression_batches(1, 8), progress=False)


def test_payload_over_the_limit_is_refused_before_invoking(fake_fc: FakeFC, storage_url: str) -> None:
    before = len(fake_fc.invocations)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                      backend=executor(fake_fc, payload_limit_bytes=512), storage=under(storage_url, "big"))
    with pytest.raises(PayloadTooLarge, match=r"over the 512-byte asynchronous limit of Function Compute"):
        trainer.fit(regression_batches(1, 8), progress=False)
    assert len(fake_fc.invocations) == before


def test_default_payload_limit_is_the_platforms() -> None:
    fc = AlibabaFC("cn-hangzhou", account_id="123", credential=credential())
    assert fc.payload_limit_bytes == 128 * 1024


def test_local_storage_is_refused_by_default() -> None:
    with pytest.raises(ConfigError, match=r"Function Compute functions cannot reach; hint"):
        Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                backend=AlibabaFC("cn-hangzhou", account_id="123", credential=credential()),
                storage="file:///tmp/x")


def test_region_and_account_are_required_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIBABA_CLOUD_REGION", raising=False)
    monkeypatch.delenv("ALIBABA_CLOUD_ACCOUNT_ID", raising=False)
    with pytest.raises(ConfigError, match="needs a region and an account ID"):
        AlibabaFC(credential=credential())


def test_missing_credentials_are_named_before_anything_is_launched(tmp_path: Path) -> None:
    """In a process of its own: the credential SDK reads the environment once, when it is imported."""
    script = (
        "import torch\n"
        "from torch import nn\n"
        "from funcpipe import ConfigError, Plan, Trainer\n"
        "plan = Plan.manual([1], micro_batch_size=1, global_batch_size=1)\n"
        "try:\n"
        "    Trainer(nn.Sequential(nn.Linear(2, 2)), nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.1),\n"
        "            plan, backend='alibaba_fc', storage='oss://bucket/p?endpoint=http://127.0.0.1:9')\n"
        "except ConfigError as exc:\n"
        "    print(f'ConfigError: {exc}')\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path),
        "ALIBABA_CLOUD_REGION": "cn-hangzhou", "ALIBABA_CLOUD_ACCOUNT_ID": "123",
        "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true",  # no instance-role lookup
    }
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = "ConfigError: no Alibaba Cloud credentials to call Function Compute with ("
    assert done.stdout.startswith(expected), done.stdout
    assert "hint: set ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET" in done.stdout
