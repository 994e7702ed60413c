"""The calibration benchmark a deployed function runs for ``funcpipe calibrate``: matmul speed and storage transfers.

:class:`Probe` is an actor like the stage worker: ``funcpipe calibrate``
(:mod:`funcpipe.calibrate`) launches it by name (``funcpipe.probe:Probe``)
in the function of each memory tier, and :func:`funcpipe.function.handle`
builds it and calls :meth:`Probe.run`, whose JSON result travels back in the
call's status object. It measures, inside the function:

- **compute**: GFLOP/s of one matrix product per micro-batch size and torch
  thread count (:func:`matmul_gflops`): a micro-batch of ``b`` samples is a
  ``(b * ROWS_PER_SAMPLE) x WIDTH`` input times a ``WIDTH x WIDTH`` weight, a
  linear layer on a short sequence per sample, timed by the wall clock (a
  function's CPU share is enforced by throttling, which a CPU clock would not see);
- **storage**: the seconds of single PUTs and GETs of a few sizes of random bytes
  against the job's storage, one request at a time, then the objects deleted.

Function side: it imports torch and the storage adapters only (never the planner,
an executor, yaml...; ``tests/test_imports.py`` holds it). The driver runs the same
:func:`matmul_gflops` at one thread to compare the tiers with the profiling machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from funcpipe.errors import ConfigError, WorkerFailed
from funcpipe.storage import open_storage

__all__ = ["ROWS_PER_SAMPLE", "WIDTH", "Probe", "host_info", "matmul_gflops"]

#: The matmul benchmark: rows of one sample and the width of the square weight.
ROWS_PER_SAMPLE = 64
WIDTH = 1024


def matmul_gflops(
    batch: int,
    threads: int,
    *,
    min_time_s: float,
    clock: Callable[[], float] = time.perf_counter,
    cancelled: threading.Event | None = None,
) -> float:
    """GFLOP/s of ``(batch * ROWS_PER_SAMPLE, WIDTH) @ (WIDTH, WIDTH)`` with ``threads`` torch threads.

    One untimed product, then products until at least two ran and ``min_time_s``
    passed on ``clock``; the thread count is restored afterwards.
    """
    if not (isinstance(batch, int) and batch >= 1 and isinstance(threads, int) and threads >= 1 and min_time_s > 0):
        raise ConfigError(
            f"matmul benchmark needs batch >= 1, threads >= 1 and min_time_s > 0, got {batch!r}, {threads!r}, "
            f"{min_time_s!r}"
        )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch * ROWS_PER_SAMPLE, WIDTH, generator=generator)
        w = torch.randn(WIDTH, WIDTH, generator=generator)
        out = torch.empty(batch * ROWS_PER_SAMPLE, WIDTH)
        torch.mm(x, w, out=out)
        calls, started = 0, clock()
        while True:
            torch.mm(x, w, out=out)
            calls += 1
            elapsed = clock() - started
            if calls >= 2 and elapsed >= min_time_s:
                break
            if cancelled is not None and cancelled.is_set():
                raise WorkerFailed("calibration probe", "cancelled by the driver")
        return 2.0 * batch * ROWS_PER_SAMPLE * WIDTH * WIDTH * calls / elapsed / 1e9
    finally:
        torch.set_num_threads(previous)


def host_info() -> dict[str, Any]:
    """Where this runs: CPU model, cores, the cgroup's CPU quota (vCPUs, or ``None``), torch's threads and version."""
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count() or 1,
        "cpu_quota": _cpu_quota(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class Probe:
    """The calibration benchmark of one function, an actor built from plain data.

    Args:
        storage_url: the storage the transfers are timed against (the job's).
        prefix: the keys its objects go under, deleted at the end.
    """

    def __init__(self, storage_url: str, prefix: str) -> None:
        self.storage_url = storage_url
        self.prefix = prefix.rstrip("/")
        self._cancelled = threading.Event()

    def run(
        self, batch_sizes: Sequence[int], threads: Sequence[int], object_bytes: Sequence[int], repeats: int,
        min_time_s: float,
    ) -> dict[str, Any]:
        """Measure; return ``{"host": ..., "matmul": [{batch, threads, gflops}], "transfers": [{bytes, put_s,
        get_s}]}``.

        Thread counts above the function's cores (``os.cpu_count()``) are left out.
        """
        if not (isinstance(repeats, int) and repeats >= 1) or not object_bytes or not batch_sizes or not threads:
            raise ConfigError(
                f"calibration probe needs batch sizes, threads, object sizes and repeats >= 1, got "
                f"{list(batch_sizes)}, {list(threads)}, {list(object_bytes)}, {repeats!r}"
            )
        host = host_info()
        usable = sorted({t for t in threads if t <= host["cpu_count"]} or {1})
        matmul = [
            {"batch": b, "threads": t,
             "gflops": matmul_gflops(b, t, min_time_s=min_time_s, cancelled=self._cancelled)}
            for b in batch_sizes for t in usable
        ]
        return {"host": host, "matmul": matmul, "transfers": self._transfers(object_bytes, repeats)}

    def _transfers(self, object_bytes: Sequence[int], repeats: int) -> list[dict[str, Any]]:
        storage = open_storage(self.storage_url)
        keys: list[str] = []
        try:
            rows = []
            for size in object_bytes:
                data = os.urandom(size)
                put_s, get_s = [], []
                for i in range(repeats):
                    if self._cancelled.is_set():
                        raise WorkerFailed("calibration probe", "cancelled by the driver")
                    key = f"{self.prefix}/{size}/{i}"
                    keys.append(key)
                    started = time.perf_counter()
                    storage.put(key, data)
                    put_s.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    back = storage.get(key)
                    get_s.append(time.perf_counter() - started)
                    if back != data:
                        raise WorkerFailed(
                            "calibration probe", f"storage returned {len(back)} other bytes for {key!r} "
                            f"({size} written)",
                        )
                rows.append({"bytes": size, "put_s": put_s, "get_s": get_s,
                             "put_median_s": statistics.median(put_s), "get_median_s": statistics.median(get_s)})
            return rows
        finally:
            try:
                storage.delete(keys)
            finally:
                storage.close()

    def cancel(self) -> None:
        """Stop at the next measurement."""
        self._cancelled.set()


def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo's on Linux (platform.processor() there says only "x86_64")."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip() == "model name" and value.strip():
                        return value.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_quota() -> float | None:
    """The vCPUs the cgroup allows (cgroup v2 ``cpu.max``, else v1's CFS quota), ``None`` if unlimited or unknown."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="utf-8") as f:
            quota, _, period = f.read().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or "100000")
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="utf-8") as f:
            quota_us = int(f.read().strip())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="utf-8") as f:
            period_us = int(f.read().strip())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
