"""The job manifest: what a driver that died left for the next one to resume from.

One small JSON object per job, at ``jobs/<job>.json`` in the job's storage,
written only by the driver: when a fit starts, whenever a checkpoint of every
stage is complete, when the job moves to another attempt, and when the fit
ends. It holds no secret; it carries a MAC under the job's key
(:func:`funcpipe.secret.job_key`, derived from the driver's master secret), so
a resuming driver on a machine with the same secret refuses a forged or altered
manifest, and one with another secret is told so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import re
import time
from typing import Any

from funcpipe import secret
from funcpipe.errors import ConfigError, IntegrityError, StorageError
from funcpipe.storage import Storage

__all__ = ["FORMAT", "JobManifest", "check_job_name", "find_job", "manifest_key", "read_manifest"]

FORMAT = "funcpipe-job-v2"

log = logging.getLogger(__name__)
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
        run: the run id in the job's keys (:class:`funcpipe.protocol.JobKeys`); a resuming
            driver continues that run.
        plan: the plan, as :meth:`funcpipe.Plan.to_dict`.
        layers: the model's number of layers.
        fit_first: the iteration the interrupted (or last) ``fit`` call began at.
        fit_total: the iterations that call was asked for.
        restore_iteration: the latest iteration every stage has a checkpoint of
            (the state before it), or ``None``: nothing checkpointed yet, a
            resume starts from the model's initial weights at ``fit_first == 0``.
        restore_attempt: the attempt that wrote that checkpoint.
        previous_iteration, previous_attempt: the complete checkpoint before it,
            kept to fall back to when the restore point's fails its check (``None``: none).
        finished: the ``fit`` call ran all its iterations.
        updated: when the driver wrote this (Unix time).
        extra: JSON data the caller attached (e.g. how the CLI started the job).
    """

    job: str
    attempt: int
    run: str
    plan: dict[str, Any]
    layers: int
    fit_first: int
    fit_total: int
    restore_iteration: int | None
    restore_attempt: int | None
    previous_iteration: int | None = None
    previous_attempt: int | None = None
    finished: bool = False
    updated: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def encode(self) -> bytes:
        data = {"format": FORMAT, **dataclasses.asdict(self), "updated": time.time()}
        data["mac"] = _mac(self.job, data)
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
            found = raw.get("format") if isinstance(raw, dict) else None
            raise IntegrityError(
                f"object {key!r} is not a funcpipe job manifest ({FORMAT}; found {found!r:.40}); a job an older "
                "funcpipe wrote cannot be resumed by this one"
            )
        raw = dict(raw)
        mac = raw.pop("mac", None)
        signed = dict(raw)
        del raw["format"]
        names = {f.name for f in dataclasses.fields(cls)}
        if set(raw) != names:
            raise IntegrityError(
                f"job manifest {key!r} has fields {sorted(raw)}, expected {sorted(names)}"
            )
        ints = ("attempt", "layers", "fit_first", "fit_total")
        optional_ints = ("restore_iteration", "restore_attempt", "previous_iteration", "previous_attempt")
        valid = (
            all(_is_int(raw[name]) and raw[name] >= 0 for name in ints)
            and all(raw[name] is None or (_is_int(raw[name]) and raw[name] >= 0) for name in optional_ints)
            and (raw["restore_iteration"] is None) == (raw["restore_attempt"] is None)
            and (raw["previous_iteration"] is None) == (raw["previous_attempt"] is None)
            and isinstance(raw["plan"], dict)
            and isinstance(raw["extra"], dict)
            and isinstance(raw["finished"], bool)
            and isinstance(raw["updated"], (int, float))
            and isinstance(raw["job"], str)
            and isinstance(raw["run"], str)
        )
        if not valid:
            raise IntegrityError(f"job manifest {key!r} has malformed fields: {data[:200]!r}")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(raw["job"], signed)):
            raise IntegrityError(
                f"job manifest {key!r} failed its authentication: altered in storage, or written by a driver "
                f"with another secret; hint: resume on the machine that started the job, or give both the same "
                f"{secret.ENV} (see funcpipe.secret)"
            )
        manifest = cls(**raw)
        if manifest_key(manifest.job) != key:
            raise IntegrityError(f"job manifest {key!r} names job {manifest.job!r}, which belongs at "
                                 f"{manifest_key(manifest.job)!r}; refusing it")
        return manifest

    def put(self, storage: Storage) -> None:
        storage.put(manifest_key(self.job), self.encode())


def _mac(job: str, fields: dict[str, Any]) -> str:
    """The manifest's MAC: HMAC-SHA256 under the job's key of its fields (``"mac"`` left out) as sorted JSON."""
    body = json.dumps({k: v for k, v in fields.items() if k != "mac"}, sort_keys=True).encode()
    return hmac.new(bytes.fromhex(secret.job_key(job)), b"funcpipe-manifest\0" + body, hashlib.sha256).hexdigest()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_manifest(storage: Storage, job: str) -> JobManifest | None:
    """The manifest of ``job`` in ``storage``, or ``None`` when it has none.

    Raises:
        IntegrityError: it is malformed, or fails its authentication.
    """
    key = manifest_key(job)
    data = storage.get_if_exists(key)
    return None if data is None else JobManifest.decode(data, key)


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
            if data is None:
                continue
            try:
                manifests.append(JobManifest.decode(data, key))
            except IntegrityError as exc:  # another driver's job, or damaged: not the one to take over
                log.warning("skipping %s: %s", key, exc)
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
