"""The fakes' start-up wait (tests/fakes/startup.py): readiness, an exit, a stall; on an injected clock."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.fakes.startup import cpu_ticks, wait_started


@pytest.fixture
def idle() -> Iterator[subprocess.Popen[bytes]]:
    """A process that waits on its stdin: alive, using no CPU."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield process
    process.kill()
    process.wait()


def test_a_stalled_process_times_out_on_the_clock_not_the_wall(idle: subprocess.Popen[bytes]) -> None:
    ticks = itertools.count(0, 10.0)  # ten "seconds" a reading: the stall shows within a few polls
    ready_calls = []
    with pytest.raises(TimeoutError, match=r"Lambda runtime \[0\] not ready and using no CPU for 25 s"):
        wait_started([idle], lambda i: bool(ready_calls.append(i)), what="Lambda runtime", stall_s=25.0,
                     poll_s=0.5, clock=lambda: next(ticks))
    assert 1 <= len(ready_calls) <= 5


def test_readiness_ends_the_wait_and_each_process_is_announced_once(idle: subprocess.Popen[bytes]) -> None:
    polls = itertools.count()
    announced: list[int] = []
    ticks = itertools.count(0, 1.0)
    wait_started([idle, idle], lambda i: next(polls) >= 3 + i, announced.append, what="x", stall_s=1e9,
                 poll_s=0.001, clock=lambda: next(ticks))
    assert sorted(announced) == [0, 1] and len(announced) == 2


def test_an_exit_before_ready_fails_at_once() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    with pytest.raises(RuntimeError, match="FC instance 0 exited with 3 before it was ready"):
        wait_started([process], lambda i: False, what="FC instance", stall_s=1e9)


def test_cpu_ticks_reads_a_live_process_and_none_for_a_gone_one(idle: subprocess.Popen[bytes]) -> None:
    if cpu_ticks(idle.pid) is None:
        pytest.skip("no /proc here")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cpu_ticks(gone.pid) is None
