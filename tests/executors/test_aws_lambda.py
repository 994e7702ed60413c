"""AWS Lambda backend end to end: boto3 invokes a loopback Invoke API whose payloads the real
``backends/aws_lambda`` handler runs under awslambdaric in separate processes; workers talk through storage."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import boto3
import pytest
import torch
from torch import nn

from funcpipe import (
    ConfigError,
    FunctionNotDeployed,
    PayloadTooLarge,
    Plan,
    Trainer,
    WorkerFailed,
    WorkerNotStarted,
    WorkerSilent,
    WorkerTimeout,
    data,
    protocol,
)
from funcpipe.backends import AWSLambda, Timing
from funcpipe.executors.base import Resources
from funcpipe.protocol import STATUS_PREFIX
from funcpipe.storage import open_storage
from tests.fakes.actors import Sleeper
from tests.fakes.aws_lambda import FakeLambda
from tests.fakes.layers import Hang
from tests.helpers import (
    assert_fit_fails_not_started,
    assert_no_funcpipe_thread_left,
    assert_same_parameters,
    mlp7,
    plain_training,
    regression_batches,
    sgd_momentum,
)
from tests.leaks import SECRETS, capture_logs, every_version, leaks, record_leaks, versioned_bucket

SGD_MOMENTUM = sgd_momentum  # by reference: test modules are slow to import in a function
FUNCTION = "funcpipe-worker-2048"
FUNCTION_TIMEOUT_S = 900.0
#: Fast polls, so runs end promptly; deadlines that hold on a busy machine (a heartbeat late by
#: seconds is no silence there): only the tests of the deadlines shorten them.
FAST = Timing(poll_s=0.05, heartbeat_s=0.2, start_timeout_s=60.0, silence_timeout_s=30.0)
BUCKET = "funcpipe-lambda-tests"


class Bucket:
    """URLs in a bucket on moto's S3 server, the storage the fake functions and the driver share."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def url(self, prefix: str, **params: str) -> str:
        query = "&".join([f"endpoint_url={self.endpoint}", *(f"{k}={v}" for k, v in params.items())])
        return f"s3://{BUCKET}/{prefix}?{query}"


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> Bucket:
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=BUCKET)
    return Bucket(moto_endpoint)


@pytest.fixture(scope="module")
def fake_lambda(aws_env: dict[str, str]) -> Iterator[FakeLambda]:
    fake = FakeLambda({FUNCTION: FUNCTION_TIMEOUT_S}, runtimes=3, env=aws_env)
    try:
        fake.wait_ready()
        yield fake
    finally:
        fake.close()


def executor(fake: FakeLambda, **options: Any) -> AWSLambda:
    options.setdefault("timing", FAST)
    return AWSLambda("us-east-1", endpoint_url=fake.endpoint_url, **options)


def wait_for_status(url: str, timeout: float = 10.0) -> None:
    """Block until a call has written its first status object (the function started)."""
    storage = open_storage(url)
    deadline = time.monotonic() + timeout
    while not storage.list(STATUS_PREFIX):
        assert time.monotonic() < deadline, "the function did not start"
        time.sleep(0.01)


class S3Log:
    """Every request moto's S3 server answers, as the server saw it: method, path, query, body, status."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str, bytes, int]] = []
        self.lock = threading.Lock()

    def counts(self, bucket: str, prefix: str) -> dict[str, int]:
        """The requests on keys under ``prefix`` in ``bucket`` by kind, as funcpipe's counters name them."""
        out: collections.Counter[str] = collections.Counter()
        with self.lock:
            requests = list(self.requests)
        for method, path, query, body, status in requests:
            _, _, rest = unquote(path).lstrip("/").partition("/")
            on_key = unquote(path).lstrip("/").startswith(f"{bucket}/") and rest.startswith(prefix)
            params = parse_qs(query, keep_blank_values=True)
            if method == "PUT" and on_key:
                out["PUT"] += 1
            elif method in ("GET", "HEAD") and on_key:
                out[method] += 1
                out[f"{method}_miss"] += status == 404
            elif method == "GET" and "list-type" in params and params.get("prefix", [""])[0].startswith(prefix):
                out["LIST"] += 1
            elif method == "POST" and "delete" in params and f"<Key>{prefix}".encode() in body:
                out["DELETE"] += 1
        return {kind: out[kind] for kind in ("PUT", "GET", "HEAD", "LIST", "DELETE", "GET_miss", "HEAD_miss")}


@pytest.fixture
def s3_log(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Log:
    """Log every request the moto server answers while the test runs (a WSGI wrapper of its app)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication

    log = S3Log()
    serve = DomainDispatcherApplication.__call__

    def logged(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        answered: list[int] = []

        def capture(status: str, headers: Any, exc_info: Any = None) -> Any:
            answered.append(int(status.split()[0]))
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        result = serve(self, environ, capture)
        with log.lock:
            log.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                 environ.get("QUERY_STRING", ""), body, answered[0] if answered else 0))
        return result

    monkeypatch.setattr(DomainDispatcherApplication, "__call__", logged)
    return log


def two_stage_plan() -> Plan:
    return Plan.manual([3, 4], replicas=[1, 2], micro_batch_size=2, global_batch_size=8)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_training_on_lambda_equals_plain_pytorch(fake_lambda: FakeLambda, bucket: Bucket, schedule: str) -> None:
    model = mlp7()
    batches = regression_batches(3, 8)
    expected = plain_training(model, nn.functional.mse_loss, SGD_MOMENTUM, batches)
    before = len(fake_lambda.invocations)
    # Under 1F1B, micro-batches of one sample: stage 0 runs 8 in windows of 3.
    plan = (two_stage_plan() if schedule == "gpipe" else
            Plan.manual([3, 4], replicas=[1, 2], micro_batch_size=1, global_batch_size=8, schedule="1f1b"))
    trainer = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, plan,
                      backend=executor(fake_lambda), storage=bucket.url(f"equivalence-{schedule}"))
    history = trainer.fit(batches, progress=False)
    assert len(history) == 3
    assert_same_parameters(trainer.model, expected)
    # One invocation per worker (3), each through the Invoke API and run by a runtime.
    invocations = fake_lambda.invocations[before:]
    assert [i.function for i in invocations] == [FUNCTION] * 3
    assert all(i.outcome == "response" for i in invocations), fake_lambda.errors


def test_workers_on_lambda_read_a_stored_data_set_from_s3(fake_lambda: FakeLambda, bucket: Bucket) -> None:
    # A run on Lambda has a time budget: the driver writes one go object per iteration, and no data.
    x, y = torch.randn(20, 8, generator=torch.Generator().manual_seed(5)), torch.randn(20, 3)
    url = bucket.url("stored")
    stored = data.upload((x, y), url, global_batch_size=8)
    order = [data.order(20, epoch, seed=4) for epoch in range(2)]
    batches = [(x[o[j * 8:(j + 1) * 8]], y[o[j * 8:(j + 1) * 8]]) for o in order for j in range(2)]
    model = mlp7()
    expected = plain_training(model, nn.functional.mse_loss, SGD_MOMENTUM, batches)
    trainer = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(), backend=executor(fake_lambda),
                      storage=url)
    history = trainer.fit(stored, epochs=2, seed=4, progress=False)
    assert len(history) == 4
    assert_same_parameters(trainer.model, expected)


def measured_call_overhead_s(fake: FakeLambda, bucket: Bucket) -> float:
    """What a run's margin must hold, measured now on this machine: the longest call's seconds
    outside its iterations (setup, checkpoint, report) plus its slowest iteration, in a one-run fit
    of two iterations on the same storage. A busy machine makes it longer, and the margin with it."""
    trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(), backend=executor(fake),
                      storage="throttled+" + bucket.url("lifetime-probe", latency_ms="20"))
    history = trainer.fit(regression_batches(2, 8), progress=False)
    return max(c["call_s"] - c["iterations_s"] + c["iterations_s"] / max(1, c["iterations"])
               for c in history.workers)


def test_lifetime_limit_chains_invocations(fake_lambda: FakeLambda, bucket: Bucket, s3_log: S3Log) -> None:
    # Runs of 2 s, in functions whose lifetime adds a margin of three times the measured overhead of
    # a call (at least 3 s). Every storage request pays 20 ms, so twelve iterations take well over
    # one run's 2 s and need several invocations per worker; the parameters equal one plain run.
    margin_s = max(3.0, 3 * measured_call_overhead_s(fake_lambda, bucket))
    model = mlp7()
    batches = regression_batches(12, 8)
    expected = plain_training(model, nn.functional.mse_loss, SGD_MOMENTUM, batches)
    before = len(fake_lambda.invocations)
    lifetime_s = 2.0 + margin_s
    fake_lambda.functions[FUNCTION] = lifetime_s
    try:
        trainer = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                          backend=executor(fake_lambda, lifetime_s=lifetime_s, lifetime_margin_s=margin_s),
                          storage="throttled+" + bucket.url("lifetime", latency_ms="20"))
        history = trainer.fit(batches, progress=False)
    finally:
        fake_lambda.functions[FUNCTION] = FUNCTION_TIMEOUT_S
    assert len(history) == 12
    assert_same_parameters(trainer.model, expected)
    invocations = fake_lambda.invocations[before:]
    runs = len(invocations) // 3
    assert len(invocations) == 3 * runs and runs >= 2, f"{len(invocations)} invocations"
    # Every invocation ended before its deadline, with a response (not killed, not failed).
    assert all(i.outcome == "response" and i.finished < i.deadline for i in invocations), fake_lambda.errors
    stage0 = [w["iterations"] for w in history.workers if w["stage"] == 0]
    assert len(stage0) == runs and sum(stage0) == 12
    # Measured: every invocation the fake Lambda took, the re-invocations of each lifetime stop included.
    assert len(history.runs) == runs and sum(r["invocations"] for r in history.runs) == len(invocations)
    assert len(history.workers) == len(invocations) and all(c["billed"] for c in history.workers)
    assert all(c["memory_mb"] == 2048 for c in history.workers)  # the function's, from Lambda's environment
    for c in history.workers:  # a function's seconds hold its iterations; its status object beat
        assert c["call_s"] >= c["iterations_s"] and c["status_requests"]["PUT"] >= 2
    # Every request on the job's keys, as moto's S3 server answered them, is counted once: by a worker,
    # a function's status object, the driver or its watcher.
    measured: collections.Counter[str] = collections.Counter(history.driver_requests)
    for run in history.runs:
        measured.update(run["watcher_requests"])
    for c in history.workers:
        measured.update(c["requests"])
        measured.update(c["status_requests"])
    assert dict(measured) == s3_log.counts(BUCKET, "lifetime/")
    cost = history.measured_cost("aws_lambda")
    assert cost is not None and cost.billed and cost.runs == runs and cost.invocations == len(invocations)
    # Lambda bills each call rounded up to the millisecond, 2 GB at $0.0000166667 per GB-s.
    billed = sum(math.ceil(c["call_s"] * 1000) / 1000 for c in history.workers)
    assert cost.compute_usd == pytest.approx(billed * 2 * 0.0000166667)
    prediction = dataclasses.replace(two_stage_plan(), platform="aws_lambda", predicted_iteration_s=0.1,
                                     predicted_cost_usd=1e-5, memory_mb=(2048, 2048))
    text = str(history.compare(prediction))
    assert f"{len(invocations)} over 12 iteration(s) in {runs} run(s) ({runs - 1} re-launch(es)" in text
    assert f"{len(invocations)} invocation(s) in {runs} run(s), {cost.billed_s:.3f} function-s" in text


def test_function_not_deployed_names_the_deploy_command(fake_lambda: FakeLambda, bucket: Bucket) -> None:
    plan = two_stage_plan()
    trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, plan,
                      backend=executor(fake_lambda, function_prefix="not-deployed"),
                      storage=bucket.url("missing"))
    with pytest.raises(FunctionNotDeployed, match=r"'not-deployed-2048'.*`funcpipe deploy aws_lambda`"):
        trainer.fit(regression_batches(1, 8), progress=False)


def test_payload_over_the_limit_is_refused_before_invoking(fake_lambda: FakeLambda, bucket: Bucket) -> None:
    before = len(fake_lambda.invocations)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                      backend=executor(fake_lambda, payload_limit_bytes=512), storage=bucket.url("big"))
    with pytest.raises(PayloadTooLarge, match=r"over the 512-byte asynchronous limit of AWS Lambda; hint:") as info:
        trainer.fit(regression_batches(1, 8), progress=False)
    assert info.value.size > 512
    assert len(fake_lambda.invocations) == before


def test_a_function_on_other_versions_fails_the_fit_at_once(fake_lambda: FakeLambda, bucket: Bucket) -> None:
    """A driver whose torch differs from the functions' (the image was built for another): every worker
    refuses its call with VersionMismatch, and fit raises it without retrying or rolling back."""
    lam = executor(fake_lambda)
    lam.versions = {**protocol.versions(), "torch": "1.0.0"}  # what the payload carries as the driver's
    before = len(fake_lambda.invocations)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(), backend=lam,
                      storage=bucket.url("versions"))
    with pytest.raises(WorkerFailed, match=r"VersionMismatch: this function runs torch .* but the driver runs "
                                           r"torch 1\.0\.0") as info:
        trainer.fit(regression_batches(2, 8), progress=False, max_retries=3)
    assert "TORCH_VERSION" in info.value.cause
    assert len(fake_lambda.invocations) - before == 3  # one attempt: 3 workers, no retry


def test_a_failing_call_reports_the_remote_traceback(fake_lambda: FakeLambda, bucket: Bucket) -> None:
    lam = executor(fake_lambda)
    lam.check_storage(bucket.url("fail"))
    handle = lam.launch(Sleeper, "x", name="sleeper", resources=Resources())
    with pytest.raises(WorkerFailed, match="ValueError: boom") as info:
        handle.call("fail", "boom").result(timeout=10)
    assert "Traceback" in info.value.remote_traceback and "fakes/actors.py" in info.value.remote_traceback
    lam.shutdown()


def test_kill_stops_a_running_call(fake_lambda: FakeLambda, bucket: Bucket) -> None:
    lam = executor(fake_lambda)
    lam.check_storage(bucket.url("kill"))
    handle = lam.launch(Sleeper, "x", name="sleeper", resources=Resources())
    before = len(fake_lambda.invocations)
    future = handle.call("sleep", 60.0)
    invocation = fake_lambda.invocations[before]
    assert invocation.taken.wait(10)
    killed = time.time()
    handle.kill()
    with pytest.raises(WorkerFailed, match="killed by the driver"):
        future.result(timeout=1)
    # The function saw the cancel object at a heartbeat and ended its 60 s sleep.
    assert invocation.ended.wait(5)
    assert invocation.outcome == "response" and invocation.finished - killed < 2
    lam.shutdown()


def test_a_function_that_never_starts(aws_env: dict[str, str], bucket: Bucket) -> None:
    fake = FakeLambda({FUNCTION: FUNCTION_TIMEOUT_S}, runtimes=0, env=aws_env)  # accepted, never run
    try:
        lam = executor(fake, timing=Timing(poll_s=0.05, heartbeat_s=0.2, start_timeout_s=1.0, silence_timeout_s=2.0))
        lam.check_storage(bucket.url("never"))
        handle = lam.launch(Sleeper, "x", name="stage 0 replica 0", resources=Resources())
        started = time.monotonic()
        with pytest.raises(WorkerNotStarted, match=r"stage 0 replica 0 failed: the function never reported"):
            handle.call("sleep", 1.0).result(timeout=10)
        assert 1.0 <= time.monotonic() - started < 3.0
        lam.shutdown()
    finally:
        fake.close()


def test_a_function_that_stops_reporting(aws_env: dict[str, str], bucket: Bucket) -> None:
    fake = FakeLambda({FUNCTION: FUNCTION_TIMEOUT_S}, runtimes=1, env=aws_env)
    try:
        fake.wait_ready()
        silence_s = 2.0
        lam = executor(fake, timing=dataclasses.replace(FAST, silence_timeout_s=silence_s))
        lam.check_storage(bucket.url("silent"))
        handle = lam.launch(Sleeper, "x", name="stage 1 replica 0", resources=Resources())
        called = time.monotonic()
        future = handle.call("sleep", 60.0)
        wait_for_status(bucket.url("silent"), timeout=60.0)  # it started: now it dies
        # From call to first status: an invocation, a status write and the driver's reading of it,
        # which is what noticing the silence takes beyond silence_s; measured now, so a busy machine
        # gets the slack it needs (at least 1 s).
        slack_s = max(1.0, time.monotonic() - called)
        fake.kill_runtime(0)
        killed = time.monotonic()
        with pytest.raises(WorkerSilent, match=r"stage 1 replica 0 failed: the function stopped reporting"):
            future.result(timeout=silence_s + 2 * slack_s)
        assert time.monotonic() - killed < silence_s + slack_s
        lam.shutdown()
    finally:
        fake.close()


def test_training_writes_no_credential_anywhere(
    fake_lambda: FakeLambda, moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 6: no credential value in any invocation payload, stored object (model blob, checkpoint,
    message, status) or log record of a training run. The bucket keeps every version, so objects the
    driver deleted during the run are read too."""
    bucket = "funcpipe-lambda-leaks"
    versioned_bucket(moto_endpoint, bucket)
    capture_logs(caplog)
    before = len(fake_lambda.invocations)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                      backend=executor(fake_lambda), storage=f"s3://{bucket}/run?endpoint_url={moto_endpoint}")
    trainer.fit(regression_batches(2, 8), progress=False)
    payloads = [i.payload for i in fake_lambda.invocations[before:]]
    assert len(payloads) == 3 and all(json.loads(p)["funcpipe"] == protocol.PAYLOAD_FORMAT for p in payloads)
    # The driver's versions travel in each payload; the functions (the same install) accepted them.
    assert all(json.loads(p)["versions"] == protocol.versions() for p in payloads)
    assert [leaks(p) for p in payloads] == [[]] * 3
    objects = list(every_version(moto_endpoint, bucket, "run/"))
    kinds = {key.split("/")[-1].split(".")[0] for key, _ in objects}
    # What was scanned: messages of every kind, reports, status objects, the model blobs, checkpoints.
    assert {"input", "target", "act", "grad", "chunk", "merged", "metrics", "s0", "s1"} <= kinds, kinds
    assert any("/model/" in key for key, _ in objects) and any("/checkpoint/" in key for key, _ in objects)
    assert any(key.startswith("run/funcpipe-calls/") for key, _ in objects)
    assert {key: leaks(data) for key, data in objects if leaks(data)} == {}
    assert caplog.records and record_leaks(caplog.records) == []
    assert all(secret.encode() not in trainer.storage.get(trainer.keys.model_blob(0)) for secret in SECRETS)


def test_a_function_that_never_starts_fails_fit_within_the_start_timeout(
    aws_env: dict[str, str], bucket: Bucket
) -> None:
    fake = FakeLambda({FUNCTION: FUNCTION_TIMEOUT_S}, runtimes=0, env=aws_env)  # accepted, never run
    try:
        start_timeout_s = 2.0
        timing = Timing(poll_s=0.05, heartbeat_s=0.2, start_timeout_s=start_timeout_s, silence_timeout_s=2.0)
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                          backend=executor(fake, timing=timing), storage=bucket.url("never-fit"))
        assert_fit_fails_not_started(trainer, start_timeout_s, lambda: len(fake.invocations))
    finally:
        fake.close()


def test_a_function_that_hangs_mid_iteration_is_named_and_stopped(
    fake_lambda: FakeLambda, bucket: Bucket, tmp_path: Path
) -> None:
    timeout_s = 15.0
    release = tmp_path / "release"
    # Stage 0 (layers 0-2) runs 4 forwards per iteration: the 5th, micro-batch 0 of iteration 1, hangs.
    model = nn.Sequential(nn.Linear(8, 16), Hang(str(release), after=4), nn.Tanh(),
                          nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 3))
    before = len(fake_lambda.invocations)
    trainer = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                      backend=executor(fake_lambda), storage=bucket.url("hang"), timeout_s=timeout_s)
    started = time.monotonic()
    try:
        with pytest.raises(WorkerTimeout) as info:
            trainer.fit(regression_batches(3, 8), progress=False)
        elapsed = time.monotonic() - started
    finally:
        release.touch()
    assert timeout_s <= elapsed < timeout_s + 30
    assert str(info.value).startswith(
        "stage 0 replica 0 failed: no progress in iteration 1 for 15 s: stage 0 has not written its activation "
        "of micro-batch 0 for stage 1"
    )
    assert Path(f"{release}.entered").exists()
    # The driver asked every call to stop: released, the hung one ends at once (it would otherwise
    # wait 2 * 15 + 10 s for its next object), and so did the others; no runtime stays busy.
    invocations = fake_lambda.invocations[before:]
    assert len(invocations) == 3
    assert all(i.ended.wait(20) for i in invocations), [json.loads(i.payload)["name"] for i in invocations]
    assert_no_funcpipe_thread_left(within_s=10)


class TestStorageChecks:
    def test_local_storage_is_refused_by_default(self, aws_env: dict[str, str]) -> None:
        with pytest.raises(ConfigError, match=r"AWS Lambda functions cannot reach; hint: use object storage"):
            Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                    backend=AWSLambda("us-east-1"), storage="file:///tmp/x")

    def test_memory_storage_is_refused_even_when_local_is_allowed(self, aws_env: dict[str, str]) -> None:
        with pytest.raises(ConfigError, match="cannot reach"):
            AWSLambda("us-east-1", allow_local_storage=True).check_storage("memory://x")

    def test_backend_by_name(self, aws_env: dict[str, str]) -> None:
        with pytest.raises(ConfigError, match="cannot reach"):
            Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                    backend="aws_lambda", storage="file:///tmp/x")

    def test_missing_credentials_are_named_before_anything_is_launched(
        self, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
        with pytest.raises(ConfigError, match=r"no AWS credentials to call Lambda in us-east-1 with; hint: set "
                                              r"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
            Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, two_stage_plan(),
                    backend="aws_lambda", storage=f"s3://{BUCKET}/p")

    def test_password_in_the_storage_url_is_refused(self, aws_env: dict[str, str]) -> None:
        with pytest.raises(ConfigError, match="carries a password"):
            AWSLambda("us-east-1").check_storage("s3://user:secret@bucket/prefix")
