"""The serverless micro-batch schedule: each worker's ordered task list.

A worker (one replica of one stage) runs three threads: a *download* thread,
a *compute* thread and an *upload* thread. The schedule is the compute
thread's program, as plain data. A ``recv*`` task posts a download to the
download thread and returns at once, so every input of the iteration is
prefetched while compute runs; a ``send*`` task hands an output to the upload
thread as soon as it is produced; ``forward``/``backward`` block only on
their own input. Downlink, compute and uplink therefore overlap (FuncPipe
paper, §4.2).

For stage ``s`` with ``d_s`` replicas, replica ``r`` owns the micro-batches
``m`` with ``m mod d_s == r``. A stage that is not the last runs every
forward, then every backward (GPipe order); the last stage runs each
micro-batch's backward right after its forward, since its gradient needs
nothing from downstream and sending it early starts the previous stage's
backward sooner. The last stage downloads each input right before its
target, so its first loss does not wait for every activation of the iteration.

Stage 1 of 3, one replica, two micro-batches::

    recv 0, recv 1, recv_grad 0, recv_grad 1,        <- posted to the download thread
    forward 0, send 0, forward 1, send 1,
    backward 0, send_grad 0, backward 1, send_grad 1,
    sync, update                                     (sync only with replicas > 1)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["Op", "Task", "worker_tasks"]

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


def worker_tasks(
    stage: int, replica: int, *, replicas: tuple[int, ...] | list[int], num_micro_batches: int
) -> list[Task]:
    """The ordered task list one worker runs in every iteration.

    Args:
        stage: the worker's stage, ``0 <= stage < len(replicas)``.
        replica: the worker's replica index within the stage.
        replicas: replica count of every stage.
        num_micro_batches: micro-batches per iteration.
    """
    num_stages = len(replicas)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range for {num_stages} stages")
    if not 0 <= replica < replicas[stage]:
        raise ValueError(f"replica {replica} out of range for {replicas[stage]} replicas")
    first, last = stage == 0, stage == num_stages - 1
    mine = range(replica, num_micro_batches, replicas[stage])

    if last:
        # Input and target alternate: the first loss needs only the first pair, not
        # every activation of the iteration ahead of target 0 on the one download thread.
        tasks = [task for m in mine for task in (Task("recv", m), Task("recv_target", m))]
        for m in mine:
            tasks.append(Task("forward", m))
            tasks.append(Task("backward", m))
            if not first:
                tasks.append(Task("send_grad", m))
    else:
        tasks = [Task("recv", m) for m in mine] + [Task("recv_grad", m) for m in mine]
        for m in mine:
            tasks += [Task("forward", m), Task("send", m)]
        for m in mine:
            tasks.append(Task("backward", m))
            if not first:
                tasks.append(Task("send_grad", m))
    if replicas[stage] > 1:
        tasks.append(Task("sync"))
    tasks.append(Task("update"))
    return tasks
