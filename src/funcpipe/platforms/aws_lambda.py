"""AWS Lambda (x86, us-east-1) with S3 as its object store, as funcpipe models it."""

from __future__ import annotations

from funcpipe.platforms.base import TORCH_RUNTIME_OVERHEAD_MB, Platform, estimated_tiers
from funcpipe.storage.base import POLL_BACKOFF_S

__all__ = ["PLATFORM"]

# FuncPipe's pre-created function sizes, MB.
MEMORY_TIERS_MB = (1024, 2048, 3072, 4096, 5120, 6144, 8192, 10240)

# AWS Lambda developer guide, "resource model" (memory and computing power):
# CPU is allocated in proportion to memory, 1,769 MB = the equivalent of 1 vCPU.
MB_PER_VCPU = 1769
# AWS blog (Dec 2020, Lambda functions of up to 10 GB and 6 vCPUs): a 10,240 MB
# function gets 6 vCPUs. The linear rule above gives 5.79 there, so
# the largest size is pinned to the published 6 and the rule is capped at 6.
MAX_MEMORY_MB = 10240
MAX_VCPUS = 6.0

# FuncPipe paper abstract (arXiv 2204.13561): "up to 10 GB memory and 70 MB/s
# bandwidth". Weak: one blog measured 400-700 Mbit/s (about 50-88 MB/s) S3 downloads
# from Lambda. Users should measure their own and call with_link(...).
BANDWIDTH_MB_S = 70.0

# S3 performance guidelines: small-object latency of "tens of ms". Weak: a round
# figure for one request's first byte, not a measurement.
LATENCY_S = 0.03

# AWS Lambda pricing page, us-east-1, x86: USD 0.0000166667 per GB-second and USD 0.20
# per 1M requests (GB = 1024 MB, memory_mb / 1024 GB). Lambda bills no vCPU apart.
PRICE_PER_GB_S = 0.0000166667
PRICE_PER_INVOCATION = 0.20 / 1e6

# Amazon S3 pricing page, S3 Standard, us-east-1: USD 0.005 per 1,000 PUT/COPY/POST/LIST requests,
# USD 0.0004 per 1,000 GET (and all other) requests.
S3_PRICE_PER_PUT = 0.005 / 1000
S3_PRICE_PER_GET = 0.0004 / 1000
# The same page: LIST is priced as a PUT; DELETE and CANCEL requests are free.
S3_PRICE_PER_LIST = S3_PRICE_PER_PUT
S3_PRICE_PER_DELETE = 0.0
# S3 user guide, "Billing for Amazon S3 error responses": bucket owners are billed for HTTP 4XX
# responses (but a listed few), so a GET or HEAD that finds no object yet costs a GET.
S3_PRICE_PER_MISS = S3_PRICE_PER_GET
# funcpipe.storage.S3Storage's back-off while an object is not there yet (poll_initial_s, poll_max_s).
S3_POLL_INITIAL_S, S3_POLL_MAX_S = POLL_BACKOFF_S["s3"]

# AWS Lambda pricing page: duration is "rounded up to the nearest 1 ms" (since Dec 2020; 100 ms before).
BILLING_GRANULARITY_S = 0.001
# AWS Lambda quotas page: function timeout at most 900 s (15 minutes).
LIFETIME_S = 900.0

# AWS Lambda quotas page: 1 MB asynchronous invocation payload in the current docs
# (older pages say 256 KB); taken as 1 MiB.
ASYNC_PAYLOAD_BYTES = 1_048_576


def vcpus(memory_mb: int) -> float:
    """vCPUs of a Lambda function of ``memory_mb``: 1 per 1,769 MB, 6 at 10,240 MB."""
    if memory_mb >= MAX_MEMORY_MB:
        return MAX_VCPUS
    return min(MAX_VCPUS, memory_mb / MB_PER_VCPU)


PLATFORM = Platform(
    name="aws_lambda",
    # Speed is a weak estimate, see funcpipe.platforms.base.PARALLEL_EFFICIENCY; override with a measurement.
    tiers=estimated_tiers(MEMORY_TIERS_MB, vcpus, BANDWIDTH_MB_S),
    latency_s=LATENCY_S,
    price_per_gb_s=PRICE_PER_GB_S,
    price_per_vcpu_s=0.0,
    price_per_invocation=PRICE_PER_INVOCATION,
    price_per_put=S3_PRICE_PER_PUT,
    price_per_get=S3_PRICE_PER_GET,
    lifetime_s=LIFETIME_S,
    # The function entry's resident memory after init (benchmarks/coldstart.py).
    runtime_overhead_mb=TORCH_RUNTIME_OVERHEAD_MB,
    async_payload_bytes=ASYNC_PAYLOAD_BYTES,
    storage="s3",
    price_per_list=S3_PRICE_PER_LIST,
    price_per_delete=S3_PRICE_PER_DELETE,
    price_per_miss=S3_PRICE_PER_MISS,
    poll_initial_s=S3_POLL_INITIAL_S,
    poll_max_s=S3_POLL_MAX_S,
    billing_granularity_s=BILLING_GRANULARITY_S,
)
