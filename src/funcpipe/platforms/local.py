"""This machine under local Ray with a file store, as funcpipe models it."""

from __future__ import annotations

from funcpipe.platforms.aws_lambda import PRICE_PER_GB_S as LAMBDA_PRICE_PER_GB_S
from funcpipe.platforms.aws_lambda import S3_PRICE_PER_GET, S3_PRICE_PER_PUT
from funcpipe.platforms.base import TORCH_RUNTIME_OVERHEAD_MB, Platform, Tier
from funcpipe.storage.base import POLL_BACKOFF_S

__all__ = ["PLATFORM"]

# Memory caps funcpipe may give a local worker, MB.
MEMORY_TIERS_MB = (1024, 2048, 4096, 8192, 16384)

# One torch thread per worker, as profiled: 1 vCPU and speed 1.0 at every size.
VCPUS = 1.0
SPEED = 1.0

# A local file store: a rough figure, not a measurement; the real rate depends
# on the disk and the page cache.
BANDWIDTH_MB_S = 1000.0
LATENCY_S = 0.001

# Local runs cost nothing. These are nominal prices, AWS Lambda's per-GB-second
# price and S3's request prices, so that the "cost" objective still ranks plans
# by the memory and requests they hold; no invocation or vCPU price.
PRICE_PER_GB_S = LAMBDA_PRICE_PER_GB_S
PRICE_PER_PUT = S3_PRICE_PER_PUT
PRICE_PER_GET = S3_PRICE_PER_GET

# No limit on a run or on a payload; 1e9 rather than infinity so the spec stays JSON-safe.
LIFETIME_S = 1e9
ASYNC_PAYLOAD_BYTES = 1_000_000_000

PLATFORM = Platform(
    name="local",
    tiers=tuple(
        Tier(memory_mb=mb, vcpus=VCPUS, speed=SPEED, uplink_mb_s=BANDWIDTH_MB_S, downlink_mb_s=BANDWIDTH_MB_S)
        for mb in MEMORY_TIERS_MB
    ),
    latency_s=LATENCY_S,
    price_per_gb_s=PRICE_PER_GB_S,
    price_per_vcpu_s=0.0,
    price_per_invocation=0.0,
    price_per_put=PRICE_PER_PUT,
    price_per_get=PRICE_PER_GET,
    lifetime_s=LIFETIME_S,
    # The function entry's resident memory after init (benchmarks/coldstart.py).
    runtime_overhead_mb=TORCH_RUNTIME_OVERHEAD_MB,
    async_payload_bytes=ASYNC_PAYLOAD_BYTES,
    storage="file",
    price_per_list=PRICE_PER_PUT,
    price_per_miss=PRICE_PER_GET,
    # funcpipe.storage.FileStorage's back-off while an object is not there yet.
    poll_initial_s=POLL_BACKOFF_S["file"][0],
    poll_max_s=POLL_BACKOFF_S["file"][1],
)
