"""The job's restore point: where a retry, a resume or the next fit continues from.

Every stage checkpoints its weights and optimizer state
(:meth:`~funcpipe.protocol.JobKeys.checkpoint`) before every
``checkpoint_every``-th iteration and at the end of a run. Once every stage
has a checkpoint of the same iteration, that is the job's *restore point*:
the job manifest records it (:mod:`funcpipe.manifest`), and the job keeps it
and the one complete checkpoint before it (older ones are deleted), so a
checkpoint that fails its check falls back to the one before
(:meth:`JobState.fall_back`). A failed attempt is abandoned: its workers are told to
stop (the abort object), its newest complete checkpoint is kept and the rest
of what it wrote deleted, and the job moves to a fresh attempt, whose keys
nothing of the failed one can be mistaken for. A job whose driver died is
resumed from its manifest. The trained weights are gathered back into the
model from the restore point's checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from funcpipe import checkpoint, protocol
from funcpipe.errors import CheckpointCorrupt, ConfigError, IntegrityError, StorageError
from funcpipe.manifest import JobManifest, find_job, manifest_key
from funcpipe.plans import Plan
from funcpipe.protocol import JobKeys
from funcpipe.storage import Storage

__all__ = ["JobState", "Point"]

log = logging.getLogger(__name__)

#: A restore point: the iteration every stage has a checkpoint before, and the attempt that wrote them.
Point = tuple[int, int]


class JobState:
    """What a trainer knows of its job in storage: the current attempt, the restore point, the manifest.

    Args:
        storage: the job's storage.
        plan: the plan the job trains with.
        model: the model the trained weights are gathered into.
        keys: the keys of the job's first attempt.
        named: the user named the job, so a resume takes over that job (else
            the most recently updated unfinished one).

    Attributes:
        keys: the keys of the job's current attempt.
        points: the complete checkpoints the job keeps, oldest first (at most
            two): :attr:`point`, and the one before it to fall back to. ``None``
            stands for the initial weights, in the model blobs.
        iteration: iterations the trainer has finished; the model holds the
            weights before it.
        extra: attached to the job's manifest (see :class:`~funcpipe.manifest.JobManifest`).
        fit_span: (first iteration, iterations asked for) of the current fit.
    """

    def __init__(self, storage: Storage, plan: Plan, model: nn.Module, keys: JobKeys, *, named: bool) -> None:
        self.storage = storage
        self.plan = plan
        self.model = model
        self.keys = keys
        self.named = named
        self.points: list[Point | None] = [None]
        self.iteration = 0
        self.extra: dict[str, Any] = {}
        self.fit_span = (0, 0)

    @property
    def point(self) -> Point | None:
        """The restore point: the latest state every stage has a checkpoint of (``None``: the initial weights)."""
        return self.points[-1]

    @property
    def oldest_kept_iteration(self) -> int:
        """The iteration of the oldest checkpoint kept (a fall-back replays the batches from there)."""
        oldest = self.points[0]
        return oldest[0] if oldest is not None else 0

    @property
    def restore_iteration(self) -> int:
        """The iteration a relaunch starts from: the restore point's, or 0 (the model blobs' weights)."""
        return self.point[0] if self.point is not None else 0

    @property
    def restore_attempt(self) -> int | None:
        """The attempt whose checkpoints a relaunch loads; ``None``: the model blobs' weights."""
        return self.point[1] if self.point is not None else None

    def checkpoint_keys(self, point: Point) -> list[str]:
        """The checkpoint of every stage that ``point`` is made of."""
        iteration, attempt = point
        keys = self.keys.with_attempt(attempt)
        return [keys.checkpoint(s, iteration) for s in range(self.plan.num_stages)]

    def begin_fit(self, first: int, total: int) -> None:
        """A fit of ``total`` iterations from ``first`` begins (a resumed one began before): record it."""
        self.fit_span = (first, total)
        self._write_manifest(finished=False)

    def complete(self, point: Point) -> None:
        """Every stage has a checkpoint ``point``: make it the restore point; keep the one before, delete older."""
        if point == self.point:
            return
        self.points.append(point)
        dropped = self.points[:-2]
        del self.points[:-2]
        for old in dropped:
            if old is not None and old not in self.points:
                self._delete_checkpoint(old)
        self._write_manifest(finished=False)

    def fall_back(self, corrupt: CheckpointCorrupt) -> bool:
        """The restore point's checkpoint failed its check: make the one before it the restore point.

        Returns whether there was one to fall back to (else the job cannot go on from storage).
        """
        if len(self.points) < 2:
            return False
        bad = self.points.pop()
        log.warning("the checkpoint before iteration %d failed its check (%s); falling back to the one before "
                    "iteration %d", bad[0] if bad else 0, corrupt, self.restore_iteration)
        if bad is not None:
            self._delete_checkpoint(bad)
        self._write_manifest(finished=False)
        return True

    def _delete_checkpoint(self, point: Point) -> None:
        try:
            self.storage.delete(self.checkpoint_keys(point))
        except StorageError as exc:
            log.warning("could not delete the checkpoint before iteration %d: %s", point[0], exc)

    def abandon(self, due: Sequence[int], messages: Sequence[str]) -> None:
        """Move the job to a fresh attempt, after the current one failed and its workers were killed.

        Workers that could not be killed (serverless ones) are told to stop:
        the failed attempt's abort object. The failed attempt's workers wrote a
        checkpoint before each iteration of ``due`` they began, and may have got
        further than the driver saw: its newest complete one becomes the restore
        point. The others, and ``messages`` (what it fed and did not delete),
        are deleted; a storage failure in doing so is only logged, since the
        next attempt has keys of its own.
        """
        failed, self.keys = self.keys, self.keys.with_attempt(self.keys.attempt + 1)
        try:
            self._write_manifest(finished=False)  # a resume after this driver dies starts a newer attempt still
            self.storage.put(failed.abort, protocol.encode_abort(failed.abort))
            newer = [(i, failed.attempt) for i in due if i > self.restore_iteration]
            newest = next((p for p in reversed(newer) if self._in_storage(p)), None)
            if newest is not None:
                self.complete(newest)
            stale = list(messages)
            stale += [key for i in due if (i, failed.attempt) not in self.points
                      for key in self.checkpoint_keys((i, failed.attempt))]
            self.storage.delete(stale)
        except StorageError as exc:
            log.warning("could not clean up after failed attempt %d: %s", failed.attempt, exc)

    def after_failure(self) -> None:
        """Leave the trainer at the restore point, the model holding its weights (a fit failed for good)."""
        try:
            if self.point is not None:
                self._gather_falling_back()
            self._write_manifest(finished=False)
        except StorageError as exc:  # do not hide the failure that got us here
            log.warning("could not load the last checkpoint after the failure: %s", exc)

    def finish(self, iteration: int) -> None:
        """A fit ended before ``iteration``, the restore point: load its weights into the model."""
        self.iteration = iteration
        try:
            self._gather()
        except CheckpointCorrupt as exc:
            if not self.fall_back(exc):
                raise
            self._gather_falling_back()
            self._write_manifest(finished=False)
            raise CheckpointCorrupt(
                f"the fit's final checkpoint (before iteration {iteration}) failed its check ({exc}); the model "
                f"holds the weights before iteration {self.iteration}, the checkpoint before it, from which "
                "the next fit continues"
            ) from exc
        self._write_manifest(finished=True)

    def resume(self, total: int) -> int | None:
        """Take over the job in storage; how many of its fit's iterations are done (None: all).

        The model is loaded with the restore point's weights, and the attempt
        the dead driver left is told to stop.

        Raises:
            ConfigError: no job to resume, or it was trained with another plan
                or model, or its fit was not of ``total`` iterations.
            IntegrityError: its manifest contradicts itself.
        """
        manifest = find_job(self.storage, self.keys.job if self.named else None)
        if Plan.from_dict(manifest.plan) != self.plan or manifest.layers != sum(self.plan.balance):
            raise ConfigError(
                f"job {manifest.job!r} in storage was trained with plan {Plan.from_dict(manifest.plan)} on a "
                f"model of {manifest.layers} layers, not this trainer's plan {self.plan} and {sum(self.plan.balance)} "
                "layers; hint: resume with the same model and plan, or start a new job without resume=True"
            )
        self.keys = JobKeys(manifest.job, manifest.attempt + 1, manifest.run)
        self.extra = dict(manifest.extra)
        try:  # workers the dead driver left running (serverless calls) stop
            abort = self.keys.with_attempt(manifest.attempt).abort
            self.storage.put(abort, protocol.encode_abort(abort))
        except StorageError as exc:
            log.warning("could not write the abort object of attempt %d: %s", manifest.attempt, exc)
        done = self._take_restore_point(manifest)
        if manifest.finished:
            log.info("job %s had finished %d iterations; its final weights are loaded, nothing to resume",
                     manifest.job, self.iteration)
            return None
        if manifest.fit_total != total:
            raise ConfigError(
                f"job {manifest.job!r} was interrupted in a fit of {manifest.fit_total} iterations, but this fit "
                f"asks for {total}; hint: resume with the same data and iterations/epochs as the interrupted call"
            )
        log.info("resuming job %s at iteration %d (%d of its fit's %d iterations done)",
                 manifest.job, self.iteration, done, manifest.fit_total)
        return done

    def clean(self, *, checkpoints: bool) -> None:
        """Delete what the job keeps in storage — every run's objects under the job's prefix (where the store
        lists keys; else this run's model blobs, abort objects and checkpoints), its manifest and its lease —
        but (without ``checkpoints``) the checkpoints this trainer continues from."""
        keep = set() if checkpoints else {k for p in self.points if p is not None for k in self.checkpoint_keys(p)}
        try:
            keys = self.storage.list(f"{self.keys.job}/")
        except StorageError:  # a store that serves objects by key only
            keys = [self.keys.model_blob(s) for s in range(self.plan.num_stages)]
            keys += [self.keys.with_attempt(a).abort for a in range(self.keys.attempt)]
            keys += [k for p in self.points if p is not None for k in self.checkpoint_keys(p)]
        keys = [key for key in keys if key not in keep] + [manifest_key(self.keys.job)]
        if checkpoints:
            self.points = [None]
        elif self.point is not None:
            self.points = [self.point]
        self.storage.delete(keys)

    def _take_restore_point(self, manifest: JobManifest) -> int:
        """Adopt the restore point ``manifest`` records (and the one before it), loading its weights; how
        many iterations of the manifest's fit it is past."""
        if manifest.restore_iteration is None or manifest.restore_attempt is None:
            if manifest.fit_first != 0:
                raise IntegrityError(
                    f"job manifest of {manifest.job!r} has no checkpoint but its fit began at iteration "
                    f"{manifest.fit_first}; cannot resume it"
                )
            self.points, self.iteration = [None], 0
            return 0
        restore = (manifest.restore_iteration, manifest.restore_attempt)
        previous = (None if manifest.previous_iteration is None or manifest.previous_attempt is None
                    else (manifest.previous_iteration, manifest.previous_attempt))
        self.points = [previous, restore] if previous is not None or manifest.fit_first == 0 else [restore]
        self._gather_falling_back()  # also proves every stage's checkpoint is there
        return self.iteration - manifest.fit_first

    def _in_storage(self, point: Point) -> bool:
        return all(self.storage.exists(key) for key in self.checkpoint_keys(point))

    def _gather_falling_back(self) -> None:
        """:meth:`_gather` the restore point; if its checkpoint fails its check, the one before it."""
        while True:
            self.iteration = self.restore_iteration
            try:
                self._gather()
                return
            except CheckpointCorrupt as exc:
                if not self.fall_back(exc):
                    raise

    def _gather(self) -> None:
        """Load the restore point's checkpoints (before the trainer's current iteration) into the model.

        Raises:
            CheckpointCorrupt: one fails its check (its MAC, header or key).
        """
        if self.point is None:  # the initial weights: the model blobs' (the user's model as it was)
            assert self.iteration == 0
            return
        assert self.point[0] == self.iteration
        self.load_into(self.model, self.point)

    def load_into(self, model: nn.Module, point: Point) -> None:
        """Load the weights of checkpoint ``point`` (every stage's) into ``model`` (the trainer's, or a copy).

        Raises:
            CheckpointCorrupt: one fails its check (its MAC, header or key).
        """
        merged: dict[str, torch.Tensor] = {}
        for key in self.checkpoint_keys(point):
            try:
                state, _ = checkpoint.decode_state(self.storage.get(key), key=key)
            except IntegrityError as exc:
                raise CheckpointCorrupt(f"checkpoint {key!r} failed its check: {exc}") from exc
            merged.update(state)
        with torch.no_grad():
            # A traced model's stages hold what its forward uses: the rest of the model stays as it is.
            strict = isinstance(model, nn.Sequential)
            unexpected = model.load_state_dict(merged, strict=strict).unexpected_keys
        assert not unexpected, f"checkpoint keys {unexpected[:5]} are not the model's"  # stages keep the user's names

    def _write_manifest(self, *, finished: bool) -> None:
        fit_first, fit_total = self.fit_span
        restore_iteration, restore_attempt = self.point if self.point is not None else (None, None)
        before = self.points[0] if len(self.points) == 2 else None
        previous_iteration, previous_attempt = before if before is not None else (None, None)
        JobManifest(
            job=self.keys.job,
            attempt=self.keys.attempt,
            run=self.keys.run,
            plan=self.plan.to_dict(),
            layers=sum(self.plan.balance),
            fit_first=fit_first,
            fit_total=fit_total,
            restore_iteration=restore_iteration,
            restore_attempt=restore_attempt,
            previous_iteration=previous_iteration,
            previous_attempt=previous_attempt,
            finished=finished,
            extra=self.extra,
        ).put(self.storage)
