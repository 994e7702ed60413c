"""Actors as AWS Lambda functions: asynchronous invocations through boto3, one function per memory tier.

The function side is ``backends/aws_lambda/`` (a container image whose
handler calls :func:`funcpipe.function.handle`);
:func:`deploy` creates or updates its functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from funcpipe.errors import BackendError, ConfigError, FunctionNotDeployed, PayloadTooLarge
from funcpipe.executors.serverless import ServerlessExecutor, Timing
from funcpipe.platforms import aws_lambda as spec

__all__ = ["DEFAULT_FUNCTION_PREFIX", "DEFAULT_MEMORY_MB", "DEFAULT_TIMEOUT_S", "AWSLambda", "Deployed", "deploy"]

DEFAULT_FUNCTION_PREFIX = "funcpipe-worker"

#: The tier of actors launched without ``memory_mb`` (about 1.2 vCPU).
DEFAULT_MEMORY_MB = 2048

#: The functions' timeout ``funcpipe deploy aws_lambda`` sets: Lambda's limit.
DEFAULT_TIMEOUT_S = int(spec.LIFETIME_S)

#: botocore's own retries ("standard" mode: throttling and transient errors, with backoff).
MAX_ATTEMPTS = 5


def _client(region: str | None, endpoint_url: str | None, max_attempts: int) -> Any:
    session = boto3.session.Session()
    region = region or session.region_name
    if not region:
        raise ConfigError(
            "no AWS region for Lambda; hint: AWSLambda(region='us-east-1'), or set AWS_REGION / "
            "AWS_DEFAULT_REGION, or a region in ~/.aws/config"
        )
    if session.get_credentials() is None:
        raise ConfigError(
            f"no AWS credentials to call Lambda in {region} with; hint: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an IAM role provides them (boto3's chain)"
        )
    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=10,
        read_timeout=60,
    )
    return session.client("lambda", region_name=region, endpoint_url=endpoint_url, config=config)


def _error_code(exc: botocore.exceptions.ClientError) -> tuple[str, str]:
    error = exc.response.get("Error", {})
    return str(error.get("Code", "")), str(error.get("Message", ""))


class AWSLambda(ServerlessExecutor):
    """Run each actor call as an asynchronous AWS Lambda invocation (``InvocationType="Event"``).

    Credentials come from boto3's standard chain (environment, shared config,
    role); the function reads and writes the job's storage with its own role.

    Args:
        region: the AWS region (default: boto3's, from ``AWS_REGION`` or the config file).
        function_prefix: functions are ``{function_prefix}-{memory_mb}``.
        endpoint_url: another Lambda API endpoint (a local emulator); default: AWS's.
        lifetime_s: the functions' timeout (``funcpipe deploy aws_lambda --timeout``).
        lifetime_margin_s: the driver ends a run this long before ``lifetime_s``.
        default_memory_mb: the tier of actors launched without ``memory_mb``.
        payload_limit_bytes: the asynchronous payload limit (1 MB today; 256 KB in older accounts).
        timing: polling, heartbeat and deadline settings.
        allow_local_storage: accept ``file://`` storage (functions on this machine, tests).
        max_attempts: botocore's attempts per request.
    """

    name = "aws_lambda"
    platform_label = "AWS Lambda"
    deploy_command = "funcpipe deploy aws_lambda"

    def __init__(
        self,
        region: str | None = None,
        *,
        function_prefix: str = DEFAULT_FUNCTION_PREFIX,
        endpoint_url: str | None = None,
        lifetime_s: float = spec.LIFETIME_S,
        lifetime_margin_s: float = 60.0,
        default_memory_mb: int = DEFAULT_MEMORY_MB,
        payload_limit_bytes: int = spec.ASYNC_PAYLOAD_BYTES,
        timing: Timing | None = None,
        allow_local_storage: bool = False,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        super().__init__(
            function_prefix=function_prefix,
            default_memory_mb=default_memory_mb,
            lifetime_s=lifetime_s,
            lifetime_margin_s=lifetime_margin_s,
            payload_limit_bytes=payload_limit_bytes,
            timing=timing,
            allow_local_storage=allow_local_storage,
        )
        self._lambda = _client(region, endpoint_url, max_attempts)
        self.region: str = self._lambda.meta.region_name

    def invoke(self, function: str, payload: bytes) -> None:
        try:
            response = self._lambda.invoke(FunctionName=function, InvocationType="Event", Payload=payload)
        except botocore.exceptions.ClientError as exc:
            code, message = _error_code(exc)
            if code == "ResourceNotFoundException":
                raise FunctionNotDeployed(function, f"AWS Lambda {self.region}", self.deploy_command) from exc
            if code == "RequestEntityTooLargeException":
                raise PayloadTooLarge(
                    len(payload), self.payload_limit_bytes, self.platform_label,
                    f"Lambda refused it ({message}); lower AWSLambda(payload_limit_bytes=...) to the "
                    "account's limit so funcpipe checks it before invoking",
                ) from exc
            raise BackendError(f"AWS Lambda refused to invoke {function!r}: {code}: {message}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise BackendError(f"could not reach AWS Lambda to invoke {function!r}: {exc}") from exc
        status = response.get("StatusCode")
        if status != 202:
            raise BackendError(f"AWS Lambda answered {status} to the asynchronous invocation of {function!r}, not 202")


@dataclasses.dataclass(frozen=True)
class Deployed:
    """One function :func:`deploy` created or updated."""

    name: str
    memory_mb: int
    action: str  # "created" or "updated"


def deploy(
    *,
    image_uri: str,
    role_arn: str,
    tiers: Sequence[int] = spec.MEMORY_TIERS_MB,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    function_prefix: str = DEFAULT_FUNCTION_PREFIX,
    region: str | None = None,
    endpoint_url: str | None = None,
    environment: Mapping[str, str] | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> list[Deployed]:
    """Create one container-image function per memory tier, or update the ones that exist.

    Asynchronous invocations are set to zero retries: a retried worker would
    run a second time beside its peers; funcpipe retries from checkpoints.

    Raises:
        ConfigError: a tier or timeout outside Lambda's limits.
        BackendError: Lambda refused a request.
    """
    bad = [mb for mb in tiers if not 128 <= mb <= spec.MAX_MEMORY_MB]
    if bad or not tiers:
        raise ConfigError(f"Lambda memory tiers must be 128–{spec.MAX_MEMORY_MB} MB, got {list(tiers)}")
    if not 1 <= timeout_s <= int(spec.LIFETIME_S):
        raise ConfigError(f"Lambda timeout must be 1–{int(spec.LIFETIME_S)} s, got {timeout_s}")
    client = _client(region, endpoint_url, max_attempts)
    variables = dict(environment or {})
    deployed = []
    for memory_mb in tiers:
        name = f"{function_prefix}-{memory_mb}"
        settings: dict[str, Any] = {
            "Role": role_arn,
            "MemorySize": memory_mb,
            "Timeout": timeout_s,
            "Environment": {"Variables": variables},
            "Description": f"funcpipe stage worker, {memory_mb} MB",
        }
        try:
            try:
                client.create_function(
                    FunctionName=name, PackageType="Image", Code={"ImageUri": image_uri}, **settings
                )
                action = "created"
            except botocore.exceptions.ClientError as exc:
                if _error_code(exc)[0] != "ResourceConflictException":
                    raise
                client.update_function_code(FunctionName=name, ImageUri=image_uri)
                client.get_waiter("function_updated_v2").wait(FunctionName=name)
                client.update_function_configuration(FunctionName=name, **settings)
                action = "updated"
            client.get_waiter("function_updated_v2").wait(FunctionName=name)
            client.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=0)
        except botocore.exceptions.ClientError as exc:
            code, message = _error_code(exc)
            raise BackendError(f"could not deploy Lambda function {name!r}: {code}: {message}") from exc
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.WaiterError) as exc:
            raise BackendError(f"could not deploy Lambda function {name!r}: {exc}") from exc
        deployed.append(Deployed(name, memory_mb, action))
    return deployed
