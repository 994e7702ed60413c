"""The job manifest: what a driver that died left for the next one to resume from.

One small JSON object per job, at ``jobs/<job>.json`` in the job's storage,
written only by the driver: when a fit starts, whenever a checkpoint of every
stage is complete, and when the fit ends. It holds no secret (the signing key
never leaves the driver and the invocation payloads); a resuming driver signs
the model definition anew with its own key.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

from funcpipe.errors import ConfigError, IntegrityError, StorageError
from funcpipe.storage import Storage

__all__ = ["FORMAT", "JobManifest", "check_job_name", "find_job", "manifest_key"]

FORMAT = "funcpipe-job-v1"
_PREFIX = "jobs/"
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_job_name(job: str) -> str:
    """``job`` if it is a valid job name (it becomes a storage key prefix).

    Raises:
        ConfigError: not 1-64 letters, digits, ``.``, ``_`` or ``-`` starting with a letter or digit,
            or ``jobs`` (the manifests' prefix).
    """
    if not isinstance(job, str) or not _JOB_NAME.fullmatch(job) or job == "jobs":
        raise ConfigError(
            f"job name {job!r} is not usable as a storage prefix; hint: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (and not 'jobs')"
        )
    return job


def manifest_key(job: str) -> str:
    return f"{_PREFIX}{job}.json"


@dataclasses.dataclass(frozen=True)
class JobManifest:
    """The state of one job, as its driver last recorded it.

    Attributes:
        job: the job's name (its key prefix).
        attempt: the attempt the driver ran last; a resuming driver starts the next one.
        plan: the plan, as :meth:`funcpipe.Plan.to_dict`.
        layers: the model's number of layers.
        fit_first: the iteration the interrupted (or last) ``fit`` call began at.
        fit_total: the iterations that call was asked for.
        restore_iteration: the latest iteration every stage has a checkpoint of
            (the state before it), or ``None``: nothing checkpointed yet, a
            resume starts from the model's initial weights at ``fit_first == 0``.
        restore_attempt: the attempt that wrote that checkpoint.
        finished: the ``fit`` call ran all its iterations.
        updated: when the driver wrote this (Unix time).
        extra: JSON data the caller attached (e.g. how the CLI started the job).
    """

    job: str
    attempt: int
    plan: dict[str, Any]
    layers: int
    fit_first: int
    fit_total: int
    restore_iteration: int | None
    restore_attempt: int | None
    finished: bool = False
    updated: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def encode(self) -> bytes:
        data = {"format": FORMAT, **dataclasses.asdict(self), "updated": time.time()}
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, key: str) -> JobManifest:
        """Parse a manifest read from ``key``.

        Raises:
            IntegrityError: not a funcpipe job manifest, or one for another key.
        """
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"job manifest {key!r} is not JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise IntegrityError(f"object {key!r} is not a funcpipe job manifest ({FORMAT})")
        raw = dict(raw)
        del raw["format"]
        names = {f.name for f in dataclasses.fields(cls)}
        if set(raw) != names:
            raise IntegrityError(
                f"job manifest {key!r} has fields {sorted(raw)}, expected {sorted(names)}"
            )
        ints = ("attempt", "layers", "fit_first", "fit_total")
        optional_ints = ("restore_iteration", "restore_attempt")
        valid = (
            all(_is_int(raw[name]) and raw[name] >= 0 for name in ints)
            and all(raw[name] is None or (_is_int(raw[name]) and raw[name] >= 0) for name in optional_ints)
            and (raw["restore_iteration"] is None) == (raw["restore_attempt"] is None)
            and isinstance(raw["plan"], dict)
            and isinstance(raw["extra"], dict)
            and isinstance(raw["finished"], bool)
            and isinstance(raw["updated"], (int, float))
            and isinstance(raw["job"], str)
        )
        if not valid:
            raise IntegrityError(f"job manifest {key!r} has malformed fields: {data[:200]!r}")
        manifest = cls(**raw)
        if manifest_key(manifest.job) != key:
            raise IntegrityError(f"job manifest {key!r} names job {manifest.job!r}, which belongs at "
                                 f"{manifest_key(manifest.job)!r}; refusing it")
        return manifest

    def put(self, storage: Storage) -> None:
        storage.put(manifest_key(self.job), self.encode())


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def find_job(storage: Storage, job: str | None) -> JobManifest:
    """The manifest of ``job``, or else of the most recently updated unfinished job in ``storage``.

    Raises:
        ConfigError: there is no such job (the message lists the jobs there are).
        IntegrityError: the manifest is malformed.
    """
    if job is not None:
        key = manifest_key(check_job_name(job))
        data = storage.get_if_exists(key)
        if data is None:
            raise ConfigError(
                f"no job {job!r} to resume in {storage.url or storage!r} (no {key!r}); hint: "
                f"{_known_jobs(storage)}"
            )
        return JobManifest.decode(data, key)
    manifests = []
    for key in storage.list(_PREFIX):
        if key.endswith(".json"):
            data = storage.get_if_exists(key)
            if data is not None:
                manifests.append(JobManifest.decode(data, key))
    unfinished = [m for m in manifests if not m.finished]
    if not unfinished:
        raise ConfigError(
            f"no unfinished job to resume in {storage.url or storage!r}; hint: {_known_jobs(storage)}"
        )
    return max(unfinished, key=lambda m: m.updated)


def _known_jobs(storage: Storage) -> str:
    try:
        names = [key[len(_PREFIX) : -len(".json")] for key in storage.list(_PREFIX) if key.endswith(".json")]
    except StorageError:
        return "name the job with Trainer(job=...)"
    if not names:
        return "this storage holds no funcpipe job; was it started with another storage URL?"
    return f"jobs here: {', '.join(sorted(names))}; name one with Trainer(job=...)"
