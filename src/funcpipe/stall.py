"""Finding the worker a stalled iteration waits on, from the messages it left in storage.

When the driver's wait for an iteration times out, every worker but one is
usually blocked on a message that the one stuck worker has not sent. Messages
have deterministic keys (:mod:`funcpipe.keys`), so the driver can walk the
pipeline's data flow and find the first worker whose inputs are all there but
whose output is not: that one hangs (a layer, the loss or an upload blocks).

For iteration ``i`` of a plan with stages ``0..L``, the walk is::

    forward   stage s < L:  input/act (s, m) there, act (s+1, m) missing   -> stage s, replica m mod d_s
    backward  stage s > 0:  grad (s, m) (or act and target at L) there,
                            grad (s-1, m) missing                           -> stage s, replica m mod d_s
    sync      stage s, d_s > 1: replica r has not sent its share of a peer's chunk
    report    stage L replica r: every message there, no metrics            -> stage L, replica r

The previous iteration is walked first: the last stage reports an iteration
before the stages above it have finished its backward, so a worker stuck in
iteration ``i - 1`` shows first as missing output of iteration ``i`` upstream.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

from funcpipe.keys import JobKeys
from funcpipe.plan import Plan
from funcpipe.storage import Storage

__all__ = ["Stall", "find_stall"]


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


def _steps(
    keys: JobKeys, plan: Plan, gradient_bytes: Sequence[int], it: int
) -> Iterator[tuple[int, int, list[str], str, str]]:
    """``(stage, replica, keys it needs, key it writes, what that key is)`` in data-flow order."""
    last = plan.num_stages - 1
    d = plan.replicas
    micro_batches = range(plan.num_micro_batches)

    def backward_inputs(s: int, m: int) -> list[str]:
        if s < last:
            return [keys.message(it, "grad", s, plan.replica_of(s, m), m)]
        kind = "input" if s == 0 else "act"
        return [keys.message(it, kind, s, plan.replica_of(s, m), m), keys.message(it, "target", s, plan.replica_of(s, m), m)]

    def all_backward_inputs(s: int, r: int) -> list[str]:
        return [key for m in plan.micro_batches(s, r) for key in backward_inputs(s, m)]

    for s in range(last):
        for m in micro_batches:
            kind = "input" if s == 0 else "act"
            yield (s, plan.replica_of(s, m), [keys.message(it, kind, s, plan.replica_of(s, m), m)],
                   keys.message(it, "act", s + 1, plan.replica_of(s + 1, m), m),
                   f"its activation of micro-batch {m} for stage {s + 1}")
    for s in range(last, 0, -1):
        for m in micro_batches:
            yield (s, plan.replica_of(s, m), backward_inputs(s, m), keys.message(it, "grad", s - 1, plan.replica_of(s - 1, m), m),
                   f"its input gradient of micro-batch {m} for stage {s - 1}")
    for s, replicas in enumerate(d):
        if replicas == 1 or gradient_bytes[s] == 0:
            continue
        for sender in range(replicas):
            owner = (sender + 1) % replicas
            yield (s, sender, all_backward_inputs(s, sender), keys.chunk(it, s, owner, sender),
                   f"its share of replica {owner}'s gradient chunk (the all-reduce)")
    for r in range(d[last]):
        yield (last, r, all_backward_inputs(last, r), keys.metrics(it, last, r),
               "its report of the iteration (it hangs in a backward, the all-reduce or the update)")
