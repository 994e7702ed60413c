"""Alibaba Cloud Function Compute 3.0 with OSS as its object store, as funcpipe models it."""

from __future__ import annotations

from funcpipe.platforms.aws_lambda import S3_PRICE_PER_GET, S3_PRICE_PER_PUT
from funcpipe.platforms.base import FC_RUNTIME_OVERHEAD_MB, Platform, estimated_tiers
from funcpipe.storage.base import POLL_BACKOFF_S

__all__ = ["PLATFORM"]

# Function Compute 3.0 docs (per the project's platform notes): 0.05-16 vCPU, with
# a vCPU:GB ratio between 1:1 and 1:4. The sizes below are funcpipe's choice, MB;
# each gets 1 vCPU per 2 GB (a 1:2 ratio, mid-range of the allowed), capped at 16.
MEMORY_TIERS_MB = (512, 1024, 2048, 3072, 4096, 8192, 16384, 32768)
GB_PER_VCPU = 2.0
MAX_VCPUS = 16.0

# Function Compute 3.0 billing (per the project's platform notes): compute units
# (CU) at USD 0.000020 per CU:
#   active vCPU: 1 CU per vCPU-second,
#   memory: 0.15 CU per GB-second,
#   invocations: 75 CU per 10,000.
USD_PER_CU = 0.000020
PRICE_PER_VCPU_S = 1 * USD_PER_CU
PRICE_PER_GB_S = 0.15 * USD_PER_CU
PRICE_PER_INVOCATION = 75 * USD_PER_CU / 10_000

# The original FuncPipe's Alibaba constants: "OSS bandwidth 50 MB/s and 50 ms
# latency per function", the bandwidth not growing with memory.
BANDWIDTH_MB_S = 50.0
LATENCY_S = 0.05

# OSS request prices: assumed equal to S3's; no OSS figure at hand. (Alibaba's
# "API operation calling fees" page bills PUT and GET requests per 10,000 but the
# unit price is on the OSS pricing page, which was not found; one third-party
# blog (kandaoni.com/news/26917.html) lists CNY 0.01 per 10,000 Standard PUT or
# GET requests in mainland China, unconfirmed.)
PRICE_PER_PUT = S3_PRICE_PER_PUT
PRICE_PER_GET = S3_PRICE_PER_GET
# Alibaba Cloud OSS "Request fees" (help/en/oss/api-operation-calling-fees, updated Nov 2025): PUT
# requests include those that upload, copy or delete objects, and GetBucket (ListObjects); requests
# answered 4xx or 5xx are not charged, so a poll that finds no object yet is free.
PRICE_PER_LIST = PRICE_PER_PUT
PRICE_PER_DELETE = PRICE_PER_PUT
PRICE_PER_MISS = 0.0
# funcpipe.storage.OSSStorage's back-off while an object is not there yet (poll_initial_s, poll_max_s).
POLL_INITIAL_S, POLL_MAX_S = POLL_BACKOFF_S["oss"]

# Function Compute bills an on-demand call's duration in 1 ms units (its billing overview; weak: from
# the 2021 change from 100 ms to 1 ms, not re-checked for 3.0). Override with platform.replace(...).
BILLING_GRANULARITY_S = 0.001
# FC 2.0 limit: 86,400 s (24 h) per invocation, probably still in force in 3.0.
LIFETIME_S = 86_400.0

# FC 2.0 limit: 128 KB asynchronous invocation payload.
ASYNC_PAYLOAD_BYTES = 128 * 1024


def vcpus(memory_mb: int) -> float:
    """vCPUs funcpipe gives an FC function of ``memory_mb``: 1 per 2 GB, at most 16."""
    return min(MAX_VCPUS, memory_mb / 1024 / GB_PER_VCPU)


PLATFORM = Platform(
    name="alibaba_fc",
    # Speed is a weak estimate, see funcpipe.platforms.base.PARALLEL_EFFICIENCY; override with a measurement.
    tiers=estimated_tiers(MEMORY_TIERS_MB, vcpus, BANDWIDTH_MB_S),
    latency_s=LATENCY_S,
    price_per_gb_s=PRICE_PER_GB_S,
    price_per_vcpu_s=PRICE_PER_VCPU_S,
    price_per_invocation=PRICE_PER_INVOCATION,
    price_per_put=PRICE_PER_PUT,
    price_per_get=PRICE_PER_GET,
    lifetime_s=LIFETIME_S,
    # The function entry's resident memory after init (benchmarks/coldstart.py).
    runtime_overhead_mb=FC_RUNTIME_OVERHEAD_MB,
    async_payload_bytes=ASYNC_PAYLOAD_BYTES,
    storage="oss",
    price_per_list=PRICE_PER_LIST,
    price_per_delete=PRICE_PER_DELETE,
    price_per_miss=PRICE_PER_MISS,
    poll_initial_s=POLL_INITIAL_S,
    poll_max_s=POLL_MAX_S,
    billing_granularity_s=BILLING_GRANULARITY_S,
)
