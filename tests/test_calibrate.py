"""Calibration end to end: `funcpipe calibrate` invokes the loopback fakes of Lambda and Function Compute, whose
real function entries run the probe; the platform file it writes is read by `plan` and `simulate`. And the fits."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from funcpipe import ConfigError, FunctionNotDeployed, Plan, platforms
from funcpipe.backends import AlibabaFC, AWSLambda, Timing
from funcpipe.calibrate import Calibration, TierMeasurement, calibrate, fit_line, fit_speed
from funcpipe.cli import main
from funcpipe.platforms import Tier
from funcpipe.profiler import LayerProfile, ModelProfile
from tests.executors.test_alibaba_fc import credential
from tests.fakes.alibaba_fc import FakeFC
from tests.fakes.aws_lambda import FakeLambda

FAST = Timing(poll_s=0.05, heartbeat_s=0.2, start_timeout_s=30.0, silence_timeout_s=5.0)
BUCKET = "funcpipe-calibrate-tests"
#: The emulated link the functions' storage has: the probe must find these (MB/s, ms).
#: Slow enough that the emulated link, not moto on a loaded machine, takes most of each transfer's time.
UP_MB_S, DOWN_MB_S, LATENCY_MS = 2, 8, 50
#: A short benchmark: two micro-batch sizes, 16 KB to 1 MB objects three times each (about 3 s of transfers).
QUICK = ["--batch-sizes", "1", "4", "--object-kb", "16", "128", "1024", "--repeats", "3"]


@pytest.fixture(scope="module")
def s3_url(moto_endpoint: str) -> str:
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=BUCKET)
    return (f"throttled+s3://{BUCKET}/calibrate?endpoint_url={moto_endpoint}"
            f"&up_mb_s={UP_MB_S}&down_mb_s={DOWN_MB_S}&latency_ms={LATENCY_MS}")


@pytest.fixture(scope="module")
def fake_lambda(aws_env: dict[str, str]) -> Iterator[FakeLambda]:
    fake = FakeLambda({"funcpipe-worker-1024": 900.0, "funcpipe-worker-2048": 900.0}, runtimes=1, env=aws_env)
    try:
        fake.wait_ready()
        yield fake
    finally:
        fake.close()


def small_profile(path: Path, output_bytes: float = 4e4) -> Path:
    """Three layers of 1 MB of parameters and ``output_bytes`` of activations per sample."""
    layers = tuple(
        LayerProfile(name=name, forward_alpha_s=0.001, forward_beta_s=0.004, backward_alpha_s=0.002,
                     backward_beta_s=0.008, param_bytes=10**6, optimizer_bytes=2 * 10**6, update_s=0.01,
                     output_bytes_per_sample=output_bytes, held_bytes_per_sample=2 * output_bytes)
        for name in ("embed", "body", "head")
    )
    ModelProfile(layers, 1e3, 8.0).save(path)
    return path


def test_calibrate_on_lambda_writes_a_platform_file_plan_and_simulate_take(
    fake_lambda: FakeLambda, s3_url: str, moto_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lambda.yaml"
    before = len(fake_lambda.invocations)
    assert main(["calibrate", "aws_lambda", "--tiers", "2048", "1024", "--storage", s3_url, "--region", "us-east-1",
                 "--endpoint-url", fake_lambda.endpoint_url, "--out", str(out), "--json", *QUICK]) == 0, \
        capsys.readouterr().err
    captured = capsys.readouterr()
    assert f"platform file saved to {out}" in captured.err
    measured = json.loads(captured.out)
    # One invocation per tier, run by the real handler, ascending by memory.
    invocations = fake_lambda.invocations[before:]
    assert [i.function for i in invocations] == ["funcpipe-worker-1024", "funcpipe-worker-2048"]
    assert all(i.outcome == "response" for i in invocations), fake_lambda.errors
    # 1024 MB (0.58 vCPU) runs one thread; 2048 MB (1.16 vCPU) one and two, where the function has two cores.
    assert [sorted({(r["batch"], r["threads"]) for r in t["matmul"]}) for t in measured["tiers"]] == [
        [(1, 1), (4, 1)], sorted((b, t) for b in (1, 4) for t in range(1, min(2, os.cpu_count() or 1) + 1)),
    ]
    assert [[r["bytes"] for r in t["transfers"]] for t in measured["tiers"]] == [[2**14, 2**17, 2**20]] * 2
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# funcpipe calibrate aws_lambda, measured ")
    assert "functions funcpipe-worker-{memory_mb} on AWS Lambda us-east-1" in text
    assert "endpoint_url" not in text  # the storage URL's query stays out of the file
    data = yaml.safe_load(text)
    assert data == measured["fields"]
    assert data["base"] == "aws_lambda"
    assert [t["memory_mb"] for t in data["tiers"]] == [1024, 2048]
    assert [t["vcpus"] for t in data["tiers"]] == [pytest.approx(1024 / 1769, rel=1e-3),
                                                   pytest.approx(2048 / 1769, rel=1e-3)]
    for tier in data["tiers"]:
        # The emulated link, plus moto's own time on a loaded machine: added to a PUT, overlapping a GET's
        # emulated wait. Slow small requests raise the intercept and flatten the line, and slow large ones
        # steepen it; the bounds still tell the links apart (swapped, each would be 4x off).
        assert 0.5 * UP_MB_S <= tier["uplink_mb_s"] <= 1.6 * UP_MB_S, tier
        assert 0.5 * DOWN_MB_S <= tier["downlink_mb_s"] <= 1.6 * DOWN_MB_S, tier
        assert tier["speed"] > 0
    assert 0.8 * LATENCY_MS / 1000 <= data["latency_s"] <= 3 * LATENCY_MS / 1000
    platform = platforms.load(out)
    assert platform.name == "aws_lambda" and [t.memory_mb for t in platform.tiers] == [1024, 2048]
    assert platform.price_per_gb_s == platforms.get("aws_lambda").price_per_gb_s
    # No probe object left in the bucket.
    listed = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="calibrate/")
    assert listed.get("KeyCount", 0) == 0

    profile = small_profile(tmp_path / "small.json")
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(profile), "--platform", str(out), "--global-batch", "8", "--micro-batch", "2",
                 "--time-limit", "5", "--out", str(plan_path), "--json"]) == 0
    plan = Plan.from_dict({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "per_epoch"})
    assert plan.memory_mb is not None and set(plan.memory_mb) <= {1024, 2048}
    assert main(["simulate", str(profile), "--plan", str(plan_path), "--platform", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["iteration_s"] > 0


def test_a_tier_not_deployed_names_its_deploy_command(fake_lambda: FakeLambda, s3_url: str) -> None:
    backend = AWSLambda("us-east-1", endpoint_url=fake_lambda.endpoint_url, timing=FAST,
                        function_prefix="funcpipe-worker")
    with pytest.raises(FunctionNotDeployed, match=r"'funcpipe-worker-512'.*`funcpipe deploy aws_lambda --tiers 512`"):
        calibrate(backend, s3_url, [512, 1024], batch_sizes=[1], object_bytes=[10, 20], repeats=1, min_time_s=0.01)
    backend = AWSLambda("us-east-1", endpoint_url=fake_lambda.endpoint_url, timing=FAST, function_prefix="mine")
    with pytest.raises(FunctionNotDeployed, match=r"`funcpipe deploy aws_lambda --tiers 1024 --prefix mine`"):
        calibrate(backend, s3_url, [1024], batch_sizes=[1], object_bytes=[10, 20], repeats=1, min_time_s=0.01)


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ([1024, 20480], r"memory sizes of 128 to 10240 MB on aws_lambda, got \[1024, 20480\] \(bad: \[20480\]\)"),
        ([1024, "2048"], r"\(bad: \['2048'\]\)"),
        ([], r"got \[\]"),
        ([2048, 1024, 2048], r"name \[2048\] more than once"),
    ],
)
def test_bad_tiers_are_named_before_anything_is_invoked(
    fake_lambda: FakeLambda, s3_url: str, tiers: list[Any], message: str
) -> None:
    before = len(fake_lambda.invocations)
    backend = AWSLambda("us-east-1", endpoint_url=fake_lambda.endpoint_url, timing=FAST)
    with pytest.raises(ConfigError, match=message):
        calibrate(backend, s3_url, tiers)
    assert len(fake_lambda.invocations) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_sizes": [1, 0]}, r"batch sizes must be whole numbers >= 1, got \[1, 0\]"),
        ({"object_bytes": [2**20, 2**20]}, r"at least two different sizes >= 1 byte, got \[1048576, 1048576\]"),
        ({"repeats": 0}, r"repeats must be a whole number >= 1, got 0"),
        ({"min_time_s": float("nan")}, r"min_time_s must be a positive number of seconds, got nan"),
    ],
)
def test_bad_benchmark_options_are_named_before_anything_is_invoked(
    fake_lambda: FakeLambda, s3_url: str, options: dict[str, Any], message: str
) -> None:
    before = len(fake_lambda.invocations)
    backend = AWSLambda("us-east-1", endpoint_url=fake_lambda.endpoint_url, timing=FAST)
    with pytest.raises(ConfigError, match=message):
        calibrate(backend, s3_url, [1024], **options)
    assert len(fake_lambda.invocations) == before


def test_bad_tiers_on_the_command_line_are_one_line(
    aws_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["calibrate", "aws_lambda", "--tiers", "20480", "--storage", "s3://b/p", "--region", "us-east-1",
                 "--endpoint-url", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "128 to 10240 MB on aws_lambda, got [20480]" in err[0] and "--tiers 1024 2048" in err[0]
    with pytest.raises(SystemExit):
        main(["calibrate", "aws_lambda", "--tiers", "big", "--storage", "s3://b/p"])
    assert "argument --tiers: invalid int value: 'big'" in capsys.readouterr().err


def test_bad_tiers_on_function_compute_are_named() -> None:
    backend = AlibabaFC("cn-hangzhou", account_id="1", credential=credential())
    with pytest.raises(ConfigError, match=r"a multiple of 64 MB from 128 to 32768 MB on alibaba_fc.*\(bad: \[1000\]\)"):
        calibrate(backend, "oss://bucket/prefix", [1000, 2048])


def test_calibrate_on_function_compute(moto_endpoint: str, oss_env: dict[str, str], tmp_path: Path) -> None:
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET + "-fc")
    url = (f"throttled+oss://{BUCKET}-fc/calibrate?endpoint={moto_endpoint}&multipart_threshold={64 * 2**20}"
           f"&up_mb_s={UP_MB_S}&down_mb_s={DOWN_MB_S}&latency_ms={LATENCY_MS}")
    fake = FakeFC(["funcpipe-worker-2048"], instances=1, env=oss_env)
    try:
        fake.wait_ready()
        backend = AlibabaFC("cn-hangzhou", endpoint=fake.endpoint, protocol="http", credential=credential(),
                            timing=FAST)
        with pytest.raises(FunctionNotDeployed, match=r"`funcpipe deploy alibaba_fc --tiers 1024`"):
            calibrate(backend, url, [1024, 2048], batch_sizes=[1], object_bytes=[10, 20], repeats=1, min_time_s=0.01)
        result = calibrate(backend, url, [2048], batch_sizes=[1, 4], object_bytes=[2**14, 2**17, 2**20], repeats=3,
                           min_time_s=0.05)
        assert [i.function for i in fake.invocations] == ["funcpipe-worker-2048"]
        assert fake.invocations[0].ended.wait(10) and fake.invocations[0].status == 200
    finally:
        fake.close()
    (tier,) = result.tiers
    assert tier.memory_mb == 2048 and tier.vcpus == 1.0
    assert {row["threads"] for row in tier.matmul} == {1}  # a 1-vCPU tier runs one thread
    fields = result.fields()
    assert fields["base"] == "alibaba_fc"
    assert 0.5 * UP_MB_S <= fields["tiers"][0]["uplink_mb_s"] <= 1.6 * UP_MB_S
    assert 0.5 * DOWN_MB_S <= fields["tiers"][0]["downlink_mb_s"] <= 1.6 * DOWN_MB_S
    path = tmp_path / "fc.yaml"
    result.save(path)
    assert platforms.load(path) == result.platform()
    assert result.platform().price_per_vcpu_s == platforms.get("alibaba_fc").price_per_vcpu_s


# -- the fits and the file, from figures given --------------------------------------------------------------


def test_fit_speed_recovers_the_tier_model_it_is_given_and_a_constant() -> None:
    tier = Tier(memory_mb=4096, vcpus=2.3, speed=2.5, uplink_mb_s=1, downlink_mb_s=1, speed_half_batch=3.2)
    speed, half = fit_speed({b: tier.speed_at(b) for b in (1, 4, 16, 64)})
    assert speed == pytest.approx(2.5) and half == pytest.approx(3.2)
    assert fit_speed({1: 0.8, 4: 0.8, 64: 0.8}) == (pytest.approx(0.8), 0.0)
    with pytest.raises(ConfigError, match="positive numbers"):
        fit_speed({1: 0.0})


def test_fit_line_finds_latency_and_bandwidth() -> None:
    points = [(n, 0.02 + n / 50e6) for n in (2**16, 2**20, 2**23) for _ in range(2)]
    latency, per_byte = fit_line(points)
    assert latency == pytest.approx(0.02) and 1 / per_byte == pytest.approx(50e6)
    assert fit_line([(1e6, 0.01), (2e6, 0.03)]) == (0.0, pytest.approx(1.4e-8))  # a negative intercept: through 0
    with pytest.raises(ConfigError, match="does not grow"):
        fit_line([(1e6, 0.2), (2e6, 0.1)])
    with pytest.raises(ConfigError, match="two distinct sizes"):
        fit_line([(1e6, 0.2), (1e6, 0.1)])


def synthetic(uplink_mb_s: float) -> Calibration:
    """A calibration of tier 2048 MB: twice the driver's speed at every size, links of given speed, 25 ms."""
    sizes = (2**16, 2**20, 2**23)
    transfers = tuple({"bytes": n, "put_s": [0.025 + n / (uplink_mb_s * 1e6)], "get_s": [0.025 + n / 80e6]}
                      for n in sizes)
    host = {"cpu": "Test CPU", "cpu_count": 2, "cpu_quota": 1.16, "torch": "2.x"}
    tier = TierMeasurement(2048, 1.16, host, ({"batch": 4, "threads": 1, "gflops": 50.0},
                                              {"batch": 4, "threads": 2, "gflops": 60.0}), transfers)
    return Calibration("aws_lambda", "2026-01-01T00:00:00+00:00", "f-{memory_mb}", "s3://b/p",
                       {"cpu": "Driver CPU", "torch": "2.x", "gflops": {4: 30.0}}, (tier,))


def test_the_file_holds_the_fitted_fields_and_a_measured_field_moves_the_prediction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = small_profile(tmp_path / "small.json", 4e6)  # 8 MB per micro-batch between stages
    plan = Plan.manual([1, 1, 1], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8, memory_mb=2048)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan.to_dict()), encoding="utf-8")
    seconds = {}
    for uplink in (40.0, 10.0):
        path = tmp_path / f"up{uplink:g}.yaml"
        synthetic(uplink).save(path)
        (tier,) = yaml.safe_load(path.read_text(encoding="utf-8"))["tiers"]
        assert tier == {"memory_mb": 2048, "vcpus": 1.16, "speed": 2.0, "speed_half_batch": 0.0,
                        "uplink_mb_s": uplink, "downlink_mb_s": 80.0}
        assert platforms.load(path).latency_s == pytest.approx(0.025)
        assert main(["simulate", str(profile), "--plan", str(plan_path), "--platform", str(path), "--json"]) == 0
        seconds[uplink] = json.loads(capsys.readouterr().out)["iteration_s"]
    assert seconds[10.0] > seconds[40.0]
    text = (tmp_path / "up10.yaml").read_text(encoding="utf-8")
    assert "2048 MB (Test CPU, 2 cores, quota 1.16 vCPU): 60.0 (2 thr)" in text
    assert "the best thread counts were 2: a worker runs Trainer(threads_per_worker=...)" in text
    data = json.loads(json.dumps(synthetic(10.0).to_dict()))  # what `funcpipe calibrate --json` prints
    assert data["fields"]["tiers"][0]["uplink_mb_s"] == 10.0 and data["driver"]["gflops"] == {"4": 30.0}
    assert data["tiers"][0]["matmul"][1] == {"batch": 4, "threads": 2, "gflops": 60.0}
    with pytest.raises(ConfigError, match=r"must end in \.yaml or \.yml"):
        synthetic(10.0).save(tmp_path / "x.json")
