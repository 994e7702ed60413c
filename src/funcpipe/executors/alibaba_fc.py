"""Actors as Alibaba Cloud Function Compute 3.0 functions: asynchronous invocations, one function per tier.

The function side is ``backends/alibaba_fc/`` (a custom container whose HTTP
server answers ``POST /invoke`` by calling
:func:`funcpipe.function.handle`); :func:`deploy` creates or
updates its functions.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

from alibabacloud_credentials.client import Client as CredentialClient
from alibabacloud_credentials.exceptions import CredentialException
from alibabacloud_fc20230330 import models as fc_models
from alibabacloud_fc20230330.client import Client as FCClient
from alibabacloud_tea_openapi import utils_models as openapi_models
from darabonba.runtime import RuntimeOptions

from funcpipe.errors import BackendError, ConfigError, FunctionNotDeployed, PayloadTooLarge
from funcpipe.executors.serverless import ServerlessExecutor, Timing
from funcpipe.platforms import alibaba_fc as spec

__all__ = ["DEFAULT_FUNCTION_PREFIX", "DEFAULT_MEMORY_MB", "DEFAULT_TIMEOUT_S", "AlibabaFC", "Deployed", "deploy"]

DEFAULT_FUNCTION_PREFIX = "funcpipe-worker"
DEFAULT_MEMORY_MB = 2048
#: The functions' timeout ``funcpipe deploy alibaba_fc`` sets, and the executor's default lifetime.
DEFAULT_TIMEOUT_S = 3600
#: The port the container's HTTP server listens on (backends/alibaba_fc/server.py).
CONTAINER_PORT = 9000
#: Attempts per request, the SDK's own retry (network errors and throttling).
MAX_ATTEMPTS = 3

_REGION_ENV = "ALIBABA_CLOUD_REGION"
_ACCOUNT_ENV = "ALIBABA_CLOUD_ACCOUNT_ID"


def _client(
    region: str | None, account_id: str | None, endpoint: str | None, protocol: str, credential: Any
) -> tuple[FCClient, str]:
    region = region or os.environ.get(_REGION_ENV)
    account_id = account_id or os.environ.get(_ACCOUNT_ENV)
    if endpoint is None:
        if not region or not account_id:
            raise ConfigError(
                f"Function Compute needs a region and an account ID (got region={region!r}, "
                f"account_id={account_id!r}); hint: AlibabaFC(region='cn-hangzhou', account_id='...'), "
                f"or set {_REGION_ENV} and {_ACCOUNT_ENV}, or give endpoint=..."
            )
        endpoint = f"{account_id}.{region}.fc.aliyuncs.com"
    # The SDK's default credential chain: ALIBABA_CLOUD_ACCESS_KEY_ID / _SECRET /
    # _SECURITY_TOKEN, the CLI profile, an ECS or FC role.
    credential = credential if credential is not None else CredentialClient()
    try:
        credential.get_credential()  # resolved now, so a missing one is named before anything is launched
    except CredentialException as exc:
        raise ConfigError(
            f"no Alibaba Cloud credentials to call Function Compute with ({exc}); hint: set "
            "ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET, or configure a profile "
            "(`aliyun configure`), or pass AlibabaFC(credential=...)"
        ) from exc
    config = openapi_models.Config(
        credential=credential,
        endpoint=endpoint,
        protocol=protocol,
        region_id=region,
        connect_timeout=10_000,
        read_timeout=60_000,
    )
    return FCClient(config), f"Function Compute {region or endpoint}"


def _runtime() -> RuntimeOptions:
    return RuntimeOptions(autoretry=True, max_attempts=MAX_ATTEMPTS)


def _sdk_error(exc: Exception) -> tuple[str, int | None, str]:
    return str(getattr(exc, "code", "") or ""), getattr(exc, "status_code", None), str(getattr(exc, "message", exc))


class AlibabaFC(ServerlessExecutor):
    """Run each actor call as an asynchronous Function Compute invocation (``x-fc-invocation-type: Async``).

    Args:
        region: e.g. ``"cn-hangzhou"`` (default: ``ALIBABA_CLOUD_REGION``).
        account_id: the Alibaba Cloud account (default: ``ALIBABA_CLOUD_ACCOUNT_ID``).
        endpoint: the FC API endpoint (``host[:port]``); default
            ``{account_id}.{region}.fc.aliyuncs.com``.
        protocol: ``"https"``, or ``"http"`` for a local emulator.
        credential: an ``alibabacloud_credentials`` client; default: the SDK's
            chain (``ALIBABA_CLOUD_ACCESS_KEY_ID`` / ``_SECRET`` / ``_SECURITY_TOKEN``,
            profile, role).
        function_prefix: functions are ``{function_prefix}-{memory_mb}``.
        lifetime_s: the functions' timeout (``funcpipe deploy alibaba_fc --timeout``).
        lifetime_margin_s: the driver ends a run this long before ``lifetime_s``.
        default_memory_mb: the tier of actors launched without ``memory_mb``.
        payload_limit_bytes: the asynchronous payload limit (128 KB).
        timing: polling, heartbeat and deadline settings.
        allow_local_storage: accept ``file://`` storage (functions on this machine, tests).
    """

    name = "alibaba_fc"
    platform_label = "Function Compute"
    deploy_command = "funcpipe deploy alibaba_fc"

    def __init__(
        self,
        region: str | None = None,
        *,
        account_id: str | None = None,
        endpoint: str | None = None,
        protocol: str = "https",
        credential: Any = None,
        function_prefix: str = DEFAULT_FUNCTION_PREFIX,
        lifetime_s: float = DEFAULT_TIMEOUT_S,
        lifetime_margin_s: float = 60.0,
        default_memory_mb: int = DEFAULT_MEMORY_MB,
        payload_limit_bytes: int = spec.ASYNC_PAYLOAD_BYTES,
        timing: Timing | None = None,
        allow_local_storage: bool = False,
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
        self._fc, self._where = _client(region, account_id, endpoint, protocol, credential)

    def invoke(self, function: str, payload: bytes) -> None:
        headers = fc_models.InvokeFunctionHeaders(x_fc_invocation_type="Async")
        request = fc_models.InvokeFunctionRequest(body=io.BytesIO(payload))
        try:
            response = self._fc.invoke_function_with_options(function, request, headers, _runtime())
        except Exception as exc:  # the Tea SDK raises its own ClientException and plain network errors
            code, status, message = _sdk_error(exc)
            if code == "FunctionNotFound":
                raise FunctionNotDeployed(function, self._where, self.deploy_command) from exc
            if status == 413 or "TooLarge" in code:
                raise PayloadTooLarge(
                    len(payload), self.payload_limit_bytes, self.platform_label,
                    f"Function Compute refused it ({code}: {message}); lower AlibabaFC(payload_limit_bytes=...)",
                ) from exc
            raise BackendError(
                f"Function Compute refused to invoke {function!r}: {code or type(exc).__name__}: {message}"
            ) from exc
        if response.status_code != 202:
            raise BackendError(
                f"Function Compute answered {response.status_code} to the asynchronous invocation of "
                f"{function!r}, not 202"
            )


@dataclasses.dataclass(frozen=True)
class Deployed:
    """One function :func:`deploy` created or updated."""

    name: str
    memory_mb: int
    action: str  # "created" or "updated"


def deploy(
    *,
    image: str,
    role: str | None = None,
    tiers: Sequence[int] = spec.MEMORY_TIERS_MB,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    function_prefix: str = DEFAULT_FUNCTION_PREFIX,
    region: str | None = None,
    account_id: str | None = None,
    endpoint: str | None = None,
    protocol: str = "https",
    credential: Any = None,
    environment: Mapping[str, str] | None = None,
) -> list[Deployed]:
    """Create one custom-container function per memory tier, or update the ones that exist.

    Each gets ``memory / 2 GB`` vCPUs (the platform spec's ratio), the
    container image's HTTP server on port 9000, and zero asynchronous retries
    (funcpipe retries from checkpoints; a platform retry would run a worker twice).

    Raises:
        ConfigError: a tier or timeout outside Function Compute's limits.
        BackendError: Function Compute refused a request.
    """
    bad = [mb for mb in tiers if not 128 <= mb <= spec.MEMORY_TIERS_MB[-1] or mb % 64]
    if bad or not tiers:
        raise ConfigError(
            f"Function Compute memory tiers must be multiples of 64 MB up to {spec.MEMORY_TIERS_MB[-1]}, "
            f"got {list(tiers)}"
        )
    if not 1 <= timeout_s <= int(spec.LIFETIME_S):
        raise ConfigError(f"Function Compute timeout must be 1–{int(spec.LIFETIME_S)} s, got {timeout_s}")
    client, _ = _client(region, account_id, endpoint, protocol, credential)
    deployed = []
    for memory_mb in tiers:
        name = f"{function_prefix}-{memory_mb}"
        # vCPU in 0.05 steps, within FC's 1:1 to 1:4 vCPU:GB ratio.
        cpu = max(round(spec.vcpus(memory_mb) * 20) / 20, 0.05, round(memory_mb / 1024 / 4 * 20) / 20)
        settings: dict[str, Any] = {
            "runtime": "custom-container",
            "handler": "not-used",
            "memory_size": memory_mb,
            "cpu": cpu,
            "disk_size": 512,
            "timeout": timeout_s,
            "custom_container_config": fc_models.CustomContainerConfig(image=image, port=CONTAINER_PORT),
            "environment_variables": {**(environment or {}), "FUNCPIPE_FUNCTION_TIMEOUT_S": str(timeout_s)},
            "description": f"funcpipe stage worker, {memory_mb} MB",
        }
        if role:
            settings["role"] = role
        try:
            try:
                client.create_function_with_options(
                    fc_models.CreateFunctionRequest(body=fc_models.CreateFunctionInput(function_name=name, **settings)),
                    {}, _runtime(),
                )
                action = "created"
            except Exception as exc:
                if _sdk_error(exc)[0] != "FunctionAlreadyExists":
                    raise
                client.update_function_with_options(
                    name, fc_models.UpdateFunctionRequest(body=fc_models.UpdateFunctionInput(**settings)),
                    {}, _runtime(),
                )
                action = "updated"
            client.put_async_invoke_config_with_options(
                name,
                fc_models.PutAsyncInvokeConfigRequest(
                    body=fc_models.PutAsyncInvokeConfigInput(max_async_retry_attempts=0)
                ),
                {}, _runtime(),
            )
        except Exception as exc:
            code, _, message = _sdk_error(exc)
            raise BackendError(
                f"could not deploy Function Compute function {name!r}: {code or type(exc).__name__}: {message}"
            ) from exc
        deployed.append(Deployed(name, memory_mb, action))
    return deployed
