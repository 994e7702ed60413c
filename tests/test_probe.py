"""The calibration probe a function runs: the matmul's flops and clock, the thread counts, the timed transfers."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from funcpipe import ConfigError, WorkerFailed
from funcpipe.probe import Probe, matmul_gflops
from funcpipe.storage import open_storage


def test_matmul_gflops_counts_the_products_flops_on_the_clock_it_is_given() -> None:
    ticks = itertools.count()  # each reading of the clock one second later
    before = torch.get_num_threads()
    # Micro-batch 2: a (128 x 1024) @ (1024 x 1024) product, 2 * 128 * 1024 * 1024 = 268,435,456 flops. The
    # clock is read before the first timed product and after each; 3 products pass 2.5 "seconds" in 3.
    gflops = matmul_gflops(2, 1, min_time_s=2.5, clock=lambda: float(next(ticks)))
    assert gflops == pytest.approx(0.268435456)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("batch", "threads", "min_time_s"), [(0, 1, 0.1), (1, 0, 0.1), (1, 1, 0.0)])
def test_matmul_gflops_refuses_bad_arguments(batch: int, threads: int, min_time_s: float) -> None:
    with pytest.raises(ConfigError, match="matmul benchmark needs"):
        matmul_gflops(batch, threads, min_time_s=min_time_s)


def test_the_probe_times_each_put_and_get_on_the_link_and_deletes_its_objects(tmp_path: Path) -> None:
    # An emulated function link: 10 MB/s up, 25 MB/s down, 20 ms per request (sleeps: never shorter).
    url = f"throttled+file://{tmp_path}?up_mb_s=10&down_mb_s=25&latency_ms=20"
    result = Probe(url, "calib/2048").run([1], [1, 10**6], [2**10, 2**20], 2, 0.01)
    assert [row["bytes"] for row in result["transfers"]] == [2**10, 2**20]
    for row in result["transfers"]:
        assert len(row["put_s"]) == len(row["get_s"]) == 2
        assert min(row["put_s"]) >= 0.02 + row["bytes"] / 10e6
        assert min(row["get_s"]) >= 0.02 + row["bytes"] / 25e6
    assert open_storage(f"file://{tmp_path}").list("calib/") == []
    # A thread count above the cores is left out; the host says what it is.
    assert [(row["batch"], row["threads"]) for row in result["matmul"]] == [(1, 1)]
    assert result["host"]["cpu_count"] == os.cpu_count()
    assert result["host"]["torch"] == torch.__version__


def test_a_cancelled_probe_stops_and_says_so(tmp_path: Path) -> None:
    probe = Probe(f"file://{tmp_path}", "calib")
    probe.cancel()
    with pytest.raises(WorkerFailed, match="cancelled by the driver"):
        probe.run([1], [1], [10, 20], 1, 0.01)


def test_the_probe_refuses_an_empty_benchmark(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repeats >= 1"):
        Probe(f"file://{tmp_path}", "calib").run([1], [1], [], 1, 0.01)
