"""The serverless micro-batch schedules: each worker's ordered task list.

A worker (one replica of one stage) runs three threads: a *download* thread,
a *compute* thread and an *upload* thread. The schedule is the compute
thread's program, as plain data. A ``recv*`` task posts a download to the
download thread and returns at once; a ``send*`` task hands an output to the
upload thread as soon as it is produced; ``forward``/``backward`` block only
on their own input. Downlink, compute and uplink therefore overlap (FuncPipe
paper, §4.2). Where a ``recv`` sits in the list is where the download is
posted, so the list also bounds what a worker prefetches, and the download
thread fetches in exactly the order the compute thread consumes.

For stage ``s`` with ``d_s`` replicas, replica ``r`` owns the micro-batches
``m`` with ``m mod d_s == r`` (:func:`funcpipe.protocol.owned`). Two schedules:

``gpipe``
    Every input (and, on a stage that is not the last, every output
    gradient) is posted at the start, so the whole iteration is prefetched.
    A stage that is not the last runs every forward, then every backward; it
    holds the activations of all its micro-batches until their backward. The
    last stage runs each micro-batch's backward right after its forward (its
    gradient needs nothing from downstream) and downloads each input right
    before its target.

``1f1b``
    One forward, one backward (PipeDream-Flush; Narayanan et al. 2021). A
    replica keeps at most ``k`` of its micro-batches *in flight* (forward
    done, backward not), :func:`in_flight`: ``k = min(n, ceil(W_s / d_s))``
    where ``n`` is its micro-batch count and ``W_s`` the workers of stage
    ``s`` and of every stage after it. With one replica per stage that is the
    usual ``S - s``; in general it covers the round trip of a micro-batch
    through the rest of a balanced pipeline, in which stage ``s``'s replicas
    together run ``W_s`` micro-batches. Warm-up: ``k`` forwards; then each
    backward is followed by the next forward; cool-down: the last ``k``
    backwards. Downloads are posted one step ahead of their use: the input of
    a micro-batch when the backward ``k + 1`` places before its forward ends,
    the next output gradient after each backward. So a replica holds at most
    ``k`` micro-batches' activations, ``k + 1`` inputs and one output
    gradient, whatever the micro-batch count. The last stage has ``k = 1``.
    One stage with one replica under 1F1B is gradient accumulation.

Stage 1 of 3, one replica, two micro-batches, GPipe::

    recv 0, recv 1, recv_grad 0, recv_grad 1,        <- posted to the download thread
    forward 0, send 0, forward 1, send 1,
    backward 0, send_grad 0, backward 1, send_grad 1,
    sync, update                                     (sync only with replicas > 1)

Stage 0 of 2, one replica (``k = 2``), four micro-batches, 1F1B::

    recv 0, recv 1, recv_grad 0, recv 2,
    forward 0, send 0, forward 1, send 1,            <- warm-up
    backward 0, recv_grad 1, recv 3, forward 2, send 2,
    backward 1, recv_grad 2,         forward 3, send 3,
    backward 2, recv_grad 3,
    backward 3,                                      <- cool-down
    update
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

from funcpipe.protocol import owned

__all__ = ["SCHEDULES", "Op", "Task", "in_flight", "worker_tasks"]

#: The schedules a plan may name.
SCHEDULES = ("gpipe", "1f1b")

Op = Literal[
    "recv",  # input micro-batch: from the driver (stage 0) or the previous stage
    "recv_target",  # targets, last stage only
    "recv_grad",  # gradient of this stage's output, from the next stage
    "forward",
    "send",  # activation to the next stage
    "backward",
    "send_grad",  # gradient of this stage's input, to the previous stage
    "sync",  # all-reduce of the parameter gradients among the stage's replicas
    "update",  # one optimizer step
]


class Task(NamedTuple):
    """One step of a worker's iteration. ``micro_batch`` is -1 for sync and update."""

    op: Op
    micro_batch: int = -1


def in_flight(stage: int, replicas: Sequence[int], num_micro_batches: int, schedule: str) -> int:
    """Most micro-batches one replica of ``stage`` holds activations for at once.

    GPipe: all of the replica's micro-batches on a stage that is not the last;
    one on the last stage (its backward follows each forward). 1F1B:
    ``min(n, ceil(W_s / d_s))`` (see the module docstring); 1 on the last stage.
    """
    _check_schedule(schedule)
    d = replicas[stage]
    n = -(-num_micro_batches // d)
    if stage == len(replicas) - 1:
        return min(n, 1)
    if schedule == "gpipe":
        return n
    downstream = sum(replicas[stage:])
    return min(n, -(-downstream // d))


def worker_tasks(
    stage: int,
    replica: int,
    *,
    replicas: Sequence[int],
    num_micro_batches: int,
    schedule: str = "gpipe",
) -> list[Task]:
    """The ordered task list one worker runs in every iteration.

    Args:
        stage: the worker's stage, ``0 <= stage < len(replicas)``.
        replica: the worker's replica index within the stage.
        replicas: replica count of every stage.
        num_micro_batches: micro-batches per iteration.
        schedule: ``"gpipe"`` or ``"1f1b"``.
    """
    _check_schedule(schedule)
    num_stages = len(replicas)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range for {num_stages} stages")
    if not 0 <= replica < replicas[stage]:
        raise ValueError(f"replica {replica} out of range for {replicas[stage]} replicas")
    first, last = stage == 0, stage == num_stages - 1
    mine = list(owned(replica, replicas[stage], num_micro_batches))
    if schedule == "gpipe":
        tasks = _gpipe(mine, first, last)
    else:
        tasks = _one_f_one_b(mine, in_flight(stage, replicas, num_micro_batches, schedule), first, last)
    if replicas[stage] > 1:
        tasks.append(Task("sync"))
    tasks.append(Task("update"))
    return tasks


def _gpipe(mine: list[int], first: bool, last: bool) -> list[Task]:
    if last:
        # Input and target alternate: the first loss needs only the first pair, not
        # every activation of the iteration ahead of target 0 on the one download thread.
        tasks = [task for m in mine for task in (Task("recv", m), Task("recv_target", m))]
        for m in mine:
            tasks += _backward_after_forward(m, first)
        return tasks
    tasks = [Task("recv", m) for m in mine] + [Task("recv_grad", m) for m in mine]
    for m in mine:
        tasks += [Task("forward", m), Task("send", m)]
    for m in mine:
        tasks.append(Task("backward", m))
        if not first:
            tasks.append(Task("send_grad", m))
    return tasks


def _one_f_one_b(mine: list[int], k: int, first: bool, last: bool) -> list[Task]:
    n = len(mine)
    k = min(k, n)  # a replica that owns fewer micro-batches than the stage's busiest

    def inputs(j: int) -> list[Task]:
        """The downloads of own micro-batch ``j``'s input (and target), if it exists."""
        if j >= n:
            return []
        return [Task("recv", mine[j])] + ([Task("recv_target", mine[j])] if last else [])

    if last:  # k == 1: forward, backward, forward, backward...; inputs one micro-batch ahead
        tasks = inputs(0) + inputs(1)
        for j, m in enumerate(mine):
            tasks += _backward_after_forward(m, first) + inputs(j + 2)
        return tasks
    tasks = [t for j in range(k) for t in inputs(j)]
    tasks += ([Task("recv_grad", mine[0])] if n else []) + inputs(k)
    for j in range(k):
        tasks += [Task("forward", mine[j]), Task("send", mine[j])]
    for j, m in enumerate(mine):
        tasks.append(Task("backward", m))
        if not first:
            tasks.append(Task("send_grad", m))
        if j + 1 < n:
            tasks.append(Task("recv_grad", mine[j + 1]))
        tasks += inputs(j + k + 1)
        if j + k < n:
            tasks += [Task("forward", mine[j + k]), Task("send", mine[j + k])]
    return tasks


def _backward_after_forward(m: int, first: bool) -> list[Task]:
    return [Task("forward", m), Task("backward", m)] + ([] if first else [Task("send_grad", m)])


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
