"""Waiting for a fake's processes to start: as long as they make progress, not a fixed number of seconds.

A process that imports torch takes a second on an idle machine and a minute on a busy one, and
several started at once share the cores. So the wait ends when every process is ready, fails at
once when one exits, and fails on a stall: no process ready and none using CPU for ``stall_s``
(CPU time read from ``/proc``; where there is none, only readiness counts as progress).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence

#: Seconds with neither a process ready nor any CPU used by those still starting.
STALL_S = 30.0
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of ``pid`` in clock ticks, or None where ``/proc`` cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)


def wait_started(
    processes: Sequence[subprocess.Popen[bytes]],
    ready: Callable[[int], bool],
    on_ready: Callable[[int], None] = lambda index: None,
    *,
    what: str,
    stall_s: float = STALL_S,
    poll_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Block until ``ready(i)`` holds for every process ``i``, calling ``on_ready(i)`` as each does.

    Raises:
        RuntimeError: a process exited before it was ready.
        TimeoutError: a stall of ``stall_s`` (no process became ready, none used CPU).
    """
    pending = list(range(len(processes)))
    used = {i: cpu_ticks(processes[i].pid) for i in pending}
    progress = clock()
    while pending:
        for i in list(pending):
            if ready(i):
                pending.remove(i)
                on_ready(i)
                progress = clock()
            elif processes[i].poll() is not None:
                raise RuntimeError(f"{what} {i} exited with {processes[i].returncode} before it was ready")
        for i in pending:
            ticks = cpu_ticks(processes[i].pid)
            if ticks is not None and ticks != used[i]:
                used[i], progress = ticks, clock()
        if pending and clock() - progress > stall_s:
            raise TimeoutError(
                f"{what} {pending} not ready and using no CPU for {stall_s:g} s (stalled, not slow)"
            )
        if pending:
            time.sleep(poll_s)
