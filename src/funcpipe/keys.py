"""Deterministic storage keys: ``job/attempt/iteration/kind.stage.replica.micro-batch``.

Every object a job writes has exactly one key computed from what it is, so a
retried iteration overwrites rather than duplicates, and a reader waits for
one known key (a GET by key, never a bucket listing). Below the iteration the
key is flat (dots, not slashes): on a file system an iteration is one
directory, made once and removed at once, instead of a tree of them. Each
object also carries the key it was written for, and readers refuse any other
(:mod:`funcpipe.binding`): a key alone cannot tell a copied or left-over object
from the one it names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from funcpipe.plan import Plan

__all__ = ["JobKeys"]


@dataclasses.dataclass(frozen=True)
class JobKeys:
    """Key builder for one job and attempt."""

    job: str
    attempt: int = 0

    @property
    def root(self) -> str:
        return f"{self.job}/a{self.attempt}"

    def iteration_prefix(self, iteration: int) -> str:
        return f"{self.root}/i{iteration:08d}/"

    def message(self, iteration: int, kind: str, stage: int, replica: int, micro_batch: int) -> str:
        """A point-to-point message for ``replica`` of ``stage``.

        ``kind`` is ``input`` (driver -> stage 0), ``target`` (driver -> last
        stage), ``act`` (stage s-1 -> s) or ``grad`` (stage s+1 -> s); the
        stage and replica are the *receiver's*.
        """
        return f"{self.iteration_prefix(iteration)}{kind}.s{stage}.r{replica}.m{micro_batch}"

    def chunk(self, iteration: int, stage: int, owner: int, sender: int, piece: int = 0) -> str:
        """Scatter-reduce: ``sender``'s share of (a piece of) the gradient chunk ``owner`` reduces."""
        return f"{self.iteration_prefix(iteration)}chunk.s{stage}.r{owner}.from{sender}.p{piece}"

    def merged(self, iteration: int, stage: int, owner: int, piece: int = 0) -> str:
        """Scatter-reduce: (a piece of) the reduced chunk that ``owner`` publishes to its peers."""
        return f"{self.iteration_prefix(iteration)}merged.s{stage}.r{owner}.p{piece}"

    def metrics(self, iteration: int, stage: int, replica: int) -> str:
        """Per-iteration report of a last-stage worker, JSON ``{"loss": <float>, "key": <this key>}``."""
        return f"{self.iteration_prefix(iteration)}metrics.s{stage}.r{replica}"

    def iteration_keys(self, iteration: int, plan: Plan, gradient_bytes: Sequence[int]) -> list[str]:
        """Every key the driver and the workers write for ``iteration`` of ``plan``.

        ``gradient_bytes[s]`` is the size of stage ``s``'s flat gradient (0: the
        stage has nothing to train, so it does not sync). The driver deletes a
        finished iteration by these keys — storage is never listed on the data
        path (some S3-compatible stores' listings are slow or differ).
        """
        from funcpipe.collectives import piece_count  # collectives imports this module

        last = plan.num_stages - 1
        out = []
        for m in range(plan.num_micro_batches):
            out.append(self.message(iteration, "input", 0, plan.replica_of(0, m), m))
            out.append(self.message(iteration, "target", last, plan.replica_of(last, m), m))
            for s in range(1, plan.num_stages):
                out.append(self.message(iteration, "act", s, plan.replica_of(s, m), m))
                out.append(self.message(iteration, "grad", s - 1, plan.replica_of(s - 1, m), m))
        out += [self.metrics(iteration, last, r) for r in range(plan.replicas[last])]
        for s, d in enumerate(plan.replicas):
            if d == 1 or gradient_bytes[s] == 0:
                continue
            pieces = piece_count(gradient_bytes[s], d) if plan.stage_sync(s) == "pipelined" else 1
            for owner in range(d):
                for q in range(pieces):
                    out += [self.chunk(iteration, s, owner, sender, q) for sender in range(d) if sender != owner]
                    out.append(self.merged(iteration, s, owner, q))
        return out

    def model_blob(self, stage: int) -> str:
        """The signed definition of one stage (layers, optimizer factory, loss)."""
        return f"{self.job}/model/s{stage}"

    def checkpoint(self, stage: int, iteration: int) -> str:
        """Weights and optimizer state of one stage before ``iteration``, as this attempt wrote them.

        Keyed by iteration, so stages that stopped at different points never
        mix: a run resumes every stage from the same iteration. Keyed by
        attempt, so a worker of a failed attempt that is still running (a
        serverless call cannot be killed) never overwrites the checkpoint a
        later attempt restores from.
        """
        return f"{self.root}/checkpoint/i{iteration:08d}/s{stage}"

    def stop(self, first_iteration: int) -> str:
        """Written by the driver to end the run that began at ``first_iteration`` early.

        It holds the iteration (JSON ``{"iteration": N, "key": <this key>}``) before which every
        worker of that run stops, checkpoints and returns, so a run that would
        outlive the function's lifetime ends at one boundary for all stages and
        replicas. Keyed by the run's first iteration, so the run that continues
        from ``N`` never sees it.
        """
        return f"{self.root}/stop.from{first_iteration:08d}"

    @property
    def abort(self) -> str:
        """Written by the driver to tell workers of this attempt to stop (JSON ``{"key": <this key>}``)."""
        return f"{self.root}/abort"
