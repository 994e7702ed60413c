"""The job's restore point: where a retry, a resume or the next fit continues from.

Every stage checkpoints its weights and optimizer state
(:meth:`~funcpipe.protocol.JobKeys.checkpoint`) before every
``checkpoint_every``-th iteration and at the end of a run. Once every stage
has a checkpoint of the same iteration, that is the job's *restore point*:
the job manifest records it (:mod:`funcpipe.manifest`) and the checkpoint
before it is deleted. A failed attempt is abandoned: its workers are told to
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
from funcpipe.errors import ConfigError, IntegrityError, StorageError
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
        point: the latest state every stage has a checkpoint of, or ``None``:
            the initial weights, in the model blobs.
        iteration: iterations the trainer has finished; the model holds the
            weights before it.
        extra: attached to the job's manifest (see :class:`~funcpipe.manifest.JobManifest`).
        fit_span: (first iteration, iterations asked for) of the current fit.
    """

    def __init__(self, storage: Storage, plan: Plan, model: nn.Sequential, keys: JobKeys, *, named: bool) -> None:
        self.storage = storage
        self.plan = plan
        self.model = model
        self.keys = keys
        self.named = named
        self.point: Point | None = None
        self.iteration = 0
        self.extra: dict[str, Any] = {}
        self.fit_span = (0, 0)

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
        keys = JobKeys(self.keys.job, attempt)
        return [keys.checkpoint(s, iteration) for s in range(self.plan.num_stages)]

    def begin_fit(self, first: int, total: int) -> None:
        """A fit of ``total`` iterations from ``first`` begins (a resumed one began before): record it."""
        self.fit_span = (first, total)
        self._write_manifest(finished=False)

    def complete(self, point: Point) -> None:
        """Every stage has a checkpoint ``point``: make it the restore point, and delete the one before."""
        old, self.point = self.point, point
        if old is not None and old != self.point:
            try:
                self.storage.delete(self.checkpoint_keys(old))
            except StorageError as exc:
                log.warning("could not delete the checkpoint before iteration %d: %s", old[0], exc)
        self._write_manifest(finished=False)

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
        failed, self.keys = self.keys, JobKeys(self.keys.job, self.keys.attempt + 1)
        try:
            self.storage.put(failed.abort, protocol.encode_abort(failed.abort))
            newer = [(i, failed.attempt) for i in due if i > self.restore_iteration]
            newest = next((p for p in reversed(newer) if self._in_storage(p)), None)
            if newest is not None:
                self.complete(newest)
            stale = list(messages)
            stale += [key for i in due if (i, failed.attempt) != self.point
                      for key in self.checkpoint_keys((i, failed.attempt))]
            self.storage.delete(stale)
        except StorageError as exc:
            log.warning("could not clean up after failed attempt %d: %s", failed.attempt, exc)

    def after_failure(self) -> None:
        """Leave the trainer at the restore point, the model holding its weights (a fit failed for good)."""
        try:
            if self.point is not None:
                self.iteration = self.point[0]
                self._gather()
            self._write_manifest(finished=False)
        except StorageError as exc:  # do not hide the failure that got us here
            log.warning("could not load the last checkpoint after the failure: %s", exc)

    def finish(self, iteration: int) -> None:
        """A fit ended before ``iteration``, the restore point: load its weights into the model."""
        self.iteration = iteration
        self._gather()
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
        if Plan.from_dict(manifest.plan) != self.plan or manifest.layers != len(self.model):
            raise ConfigError(
                f"job {manifest.job!r} in storage was trained with plan {Plan.from_dict(manifest.plan)} on a "
                f"model of {manifest.layers} layers, not this trainer's plan {self.plan} and {len(self.model)} "
                "layers; hint: resume with the same model and plan, or start a new job without resume=True"
            )
        self.keys = JobKeys(manifest.job, manifest.attempt + 1)
        self.extra = dict(manifest.extra)
        try:  # workers the dead driver left running (serverless calls) stop
            abort = JobKeys(manifest.job, manifest.attempt).abort
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
        """Delete what the job keeps in storage: model blobs, manifest, abort objects and (``checkpoints``)
        the restore point's checkpoints."""
        keys = [self.keys.model_blob(s) for s in range(self.plan.num_stages)] + [manifest_key(self.keys.job)]
        keys += [JobKeys(self.keys.job, attempt).abort for attempt in range(self.keys.attempt)]
        if checkpoints and self.point is not None:
            keys += self.checkpoint_keys(self.point)
            self.point = None
        self.storage.delete(keys)

    def _take_restore_point(self, manifest: JobManifest) -> int:
        """Adopt the restore point ``manifest`` records, loading its weights; how many iterations of the
        manifest's fit it is past."""
        if manifest.restore_iteration is None or manifest.restore_attempt is None:
            if manifest.fit_first != 0:
                raise IntegrityError(
                    f"job manifest of {manifest.job!r} has no checkpoint but its fit began at iteration "
                    f"{manifest.fit_first}; cannot resume it"
                )
            self.point, self.iteration = None, 0
            return 0
        self.point = (manifest.restore_iteration, manifest.restore_attempt)
        self.iteration = manifest.restore_iteration
        self._gather()  # also proves every stage's checkpoint is there
        return manifest.restore_iteration - manifest.fit_first

    def _in_storage(self, point: Point) -> bool:
        return all(self.storage.exists(key) for key in self.checkpoint_keys(point))

    def _gather(self) -> None:
        """Load the restore point's checkpoints (before the trainer's current iteration) into the model."""
        assert self.point is not None and self.point[0] == self.iteration
        merged: dict[str, torch.Tensor] = {}
        for key in self.checkpoint_keys(self.point):
            state, _ = checkpoint.decode_state(self.storage.get(key), key=key)
            merged.update(state)
        with torch.no_grad():
            self.model.load_state_dict(merged)

    def _write_manifest(self, *, finished: bool) -> None:
        fit_first, fit_total = self.fit_span
        restore_iteration, restore_attempt = self.point if self.point is not None else (None, None)
        JobManifest(
            job=self.keys.job,
            attempt=self.keys.attempt,
            plan=self.plan.to_dict(),
            layers=len(self.model),
            fit_first=fit_first,
            fit_total=fit_total,
            restore_iteration=restore_iteration,
            restore_attempt=restore_attempt,
            finished=finished,
            extra=self.extra,
        ).put(self.storage)
