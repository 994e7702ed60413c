"""``funcpipe deploy aws_lambda`` against moto's Lambda and IAM: one function per tier, updated when run again."""

from __future__ import annotations

import json

import boto3
import pytest

from funcpipe.cli import main

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/funcpipe-worker:v1"


@pytest.fixture
def role_arn(moto_endpoint: str) -> str:
    iam = boto3.client("iam", endpoint_url=moto_endpoint)
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]}
    try:
        return str(iam.create_role(RoleName="funcpipe-test", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"])
    except iam.exceptions.EntityAlreadyExistsException:
        return str(iam.get_role(RoleName="funcpipe-test")["Role"]["Arn"])


def deploy(moto_endpoint: str, role_arn: str, *extra: str) -> int:
    return main(["deploy", "aws_lambda", "--role", role_arn, "--tiers", "1024", "3072", "--timeout", "600",
                 "--prefix", "deploy-test", "--region", "us-east-1", "--endpoint-url", moto_endpoint, *extra])


def test_deploy_creates_one_function_per_tier_then_updates(
    moto_endpoint: str, role_arn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deploy(moto_endpoint, role_arn, "--image", IMAGE, "--json") == 0
    created = json.loads(capsys.readouterr().out)
    assert [(d["name"], d["memory_mb"], d["action"]) for d in created] == [
        ("deploy-test-1024", 1024, "created"), ("deploy-test-3072", 3072, "created"),
    ]
    client = boto3.client("lambda", endpoint_url=moto_endpoint, region_name="us-east-1")
    for name, memory in (("deploy-test-1024", 1024), ("deploy-test-3072", 3072)):
        config = client.get_function(FunctionName=name)
        assert config["Configuration"]["PackageType"] == "Image"
        assert config["Code"]["ImageUri"] == IMAGE
        assert (config["Configuration"]["MemorySize"], config["Configuration"]["Timeout"]) == (memory, 600)
        assert client.get_function_event_invoke_config(FunctionName=name)["MaximumRetryAttempts"] == 0

    image_v2 = IMAGE.replace(":v1", ":v2")
    assert deploy(moto_endpoint, role_arn, "--image", image_v2, "--env", "FUNCPIPE_LOG=debug") == 0
    out = capsys.readouterr().out
    assert "updated deploy-test-1024 (1024 MB)" in out and "updated deploy-test-3072 (3072 MB)" in out
    config = client.get_function(FunctionName="deploy-test-1024")
    assert config["Code"]["ImageUri"] == image_v2
    assert config["Configuration"]["Environment"]["Variables"] == {"FUNCPIPE_LOG": "debug"}


def test_deploy_without_an_image_names_the_option(
    moto_endpoint: str, role_arn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FUNCPIPE_IMAGE", raising=False)
    assert deploy(moto_endpoint, role_arn) == 2
    assert "no container image; hint: --image URI" in capsys.readouterr().err
