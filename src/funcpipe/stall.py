"""Finding the worker a stalled iteration waits on, from the messages it left in storage.

When the driver's wait for an iteration times out, every worker but one is
usually blocked on a message that the one stuck worker has not sent. Messages
have deterministic keys (:mod:`funcpipe.protocol`), so the driver can walk the
pipeline's data flow and find the first worker whose inputs are all there but
whose output is not: that one hangs (a layer, the loss or an upload blocks).

What a worker needs before it writes an output is read off its task list
(:func:`funcpipe.schedule.worker_tasks`): every message its forwards and
backwards up to that output consume, and every one its download thread is
given before those (it fetches in the order posted). Under GPipe a forward
needs only its own input; under 1F1B the forward of a replica's ``j + k``-th
micro-batch also needs the output gradient of its ``j``-th (its backward
comes first), so a stage waiting for a gradient is not blamed for the
activations it has not sent. For iteration ``i`` of a plan with stages
``0..L``, the steps, walked in this order::

    forward   stage s < L, micro-batch m: act (s+1, m) missing           -> stage s, replica m mod d_s
    backward  stage s > 0 (from L down), m: grad (s-1, m) missing        -> stage s, replica m mod d_s
    sync      stage s, d_s > 1: replica r has not sent its share of a peer's chunk
    report    stage L replica r: no metrics                               -> stage L, replica r

each blamed only when everything it needs is there.

The previous iteration is walked first: the last stage reports an iteration
before the stages above it have finished its backward, so a worker stuck in
iteration ``i - 1`` shows first as missing output of iteration ``i`` upstream.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

from funcpipe.plans import Plan
from funcpipe.protocol import JobKeys, ring_peers
from funcpipe.schedule import worker_tasks
from funcpipe.storage import Storage

__all__ = ["Stall", "find_stall"]

#: ``(stage, replica, keys it needs, key it writes, what that key is)``.
_Step = tuple[int, int, list[str], str, str]


@dataclasses.dataclass(frozen=True)
class Stall:
    """The worker an iteration waits on, and what it has not done."""

    stage: int
    replica: int
    iteration: int
    missing: str  # "its activation of micro-batch 3 for stage 1", ...

    @property
    def worker(self) -> str:
        return f"stage {self.stage} replica {self.replica}"


def find_stall(
    storage: Storage, keys: JobKeys, plan: Plan, gradient_bytes: Sequence[int], iteration: int
) -> Stall | None:
    """The first worker whose inputs of ``iteration`` (or the one before) are there but whose output is not.

    ``None`` when no worker can be blamed: an input the driver feeds is itself
    missing, or every message is there.
    """
    # A key is needed by several steps (a stage's inputs by its forward and its backward): one HEAD each.
    exists = functools.cache(storage.exists)
    for it in (iteration - 1, iteration):
        if it < 0:
            continue
        for stage, replica, needs, missing, what in _steps(keys, plan, gradient_bytes, it):
            if all(exists(key) for key in needs) and not exists(missing):
                return Stall(stage, replica, it, what)
    return None


def _steps(keys: JobKeys, plan: Plan, gradient_bytes: Sequence[int], it: int) -> Iterator[_Step]:
    """Every worker's steps (:data:`_Step`) in data-flow order."""
    steps: list[tuple[tuple[int, int, int], _Step]] = []
    for s, replicas in enumerate(plan.replicas):
        for r in range(replicas):
            steps += _worker_steps(keys, plan, gradient_bytes, it, s, r)
    for _, step in sorted(steps, key=lambda order_step: order_step[0]):
        yield step


def _worker_steps(
    keys: JobKeys, plan: Plan, gradient_bytes: Sequence[int], it: int, s: int, r: int
) -> list[tuple[tuple[int, int, int], _Step]]:
    """The outputs of worker ``(s, r)`` in iteration ``it``, each with what it needs; keyed by walk order."""
    last = plan.num_stages - 1
    posted: list[str] = []  # the keys given to the download thread, in order
    position: dict[tuple[str, int], int] = {}
    waited = 0  # the download thread has delivered posted[:waited] once the compute thread gets here

    def consume(kind: str, m: int) -> None:
        nonlocal waited
        waited = max(waited, position[kind, m] + 1)

    def message(kind: str, stage: int, m: int) -> str:
        return keys.message_for(plan, it, kind, stage, m)

    out: list[tuple[tuple[int, int, int], _Step]] = []
    for op, m in worker_tasks(s, r, replicas=plan.replicas, num_micro_batches=plan.num_micro_batches,
                              schedule=plan.schedule):
        if op in ("recv", "recv_target", "recv_grad"):
            kind = {"recv": "input" if s == 0 else "act", "recv_target": "target", "recv_grad": "grad"}[op]
            position[kind, m] = len(posted)
            posted.append(message(kind, s, m))
        elif op == "forward":
            consume("input" if s == 0 else "act", m)
            if s == last:
                consume("target", m)
        elif op == "backward" and s < last:
            consume("grad", m)
        elif op == "send":
            out.append(((0, s, m), (s, r, posted[:waited], message("act", s + 1, m),
                                    f"its activation of micro-batch {m} for stage {s + 1}")))
        elif op == "send_grad":
            out.append(((1, -s, m), (s, r, posted[:waited], message("grad", s - 1, m),
                                     f"its input gradient of micro-batch {m} for stage {s - 1}")))
        elif op == "sync" and gradient_bytes[s] > 0:
            owner = ring_peers(r, plan.replicas[s])[0][0]  # the first share it sends
            out.append(((2, s, r), (s, r, posted[:waited], keys.chunk(it, s, owner, r),
                                    f"its share of replica {owner}'s gradient chunk (the all-reduce)")))
    if s == last:
        out.append(((3, r, 0), (s, r, posted, keys.metrics(it, s, r),
                                "its report of the iteration (it hangs in a backward, the all-reduce or the update)")))
    return out
