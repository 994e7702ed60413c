"""manifest: the job record a resuming driver reads; malformed or misplaced ones are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest

from funcpipe import ConfigError, IntegrityError, Plan
from funcpipe.manifest import FORMAT, JobManifest, find_job, manifest_key
from funcpipe.storage import MemoryStorage

PLAN = json.loads(json.dumps(Plan.manual([2, 3], micro_batch_size=2, global_batch_size=4).to_dict()))


def manifest(job: str = "job-a", **changes: object) -> JobManifest:
    fields: dict[str, object] = dict(job=job, attempt=1, run="r1", plan=PLAN, layers=5, fit_first=0,
                                     fit_total=10, restore_iteration=4, restore_attempt=0)
    fields.update(changes)
    return JobManifest(**fields)  # type: ignore[arg-type]


def test_round_trip() -> None:
    original = manifest(extra={"cli": {"command": "demo", "epochs": 2}})
    decoded = JobManifest.decode(original.encode(), manifest_key("job-a"))
    assert dataclasses.replace(decoded, updated=0.0) == original
    assert decoded.updated > 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80not json", "is not JSON"),
        (b"[1, 2]", "is not a funcpipe job manifest"),
        (json.dumps({"format": "other"}).encode(), "is not a funcpipe job manifest"),
        (json.dumps({"format": FORMAT, "job": "job-a"}).encode(), "has fields"),
    ],
)
def test_malformed_manifests_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        JobManifest.decode(data, manifest_key("job-a"))


@pytest.mark.parametrize(
    "changes",
    [{"attempt": -1}, {"layers": "5"}, {"restore_iteration": None}, {"finished": 1}, {"plan": []},
     {"fit_total": True}],
)
def test_manifests_with_malformed_fields_are_refused(changes: dict[str, object]) -> None:
    data = json.loads(manifest().encode())
    data.update(changes)
    with pytest.raises(IntegrityError, match="has malformed fields"):
        JobManifest.decode(json.dumps(data).encode(), manifest_key("job-a"))


@pytest.mark.parametrize(("field", "value"), [("restore_iteration", 2), ("run", "r2"), ("finished", True)])
def test_an_altered_manifest_fails_its_authentication(field: str, value: object) -> None:
    data = json.loads(manifest().encode())
    data[field] = value  # well-formed, but not what the driver wrote
    with pytest.raises(IntegrityError, match="failed its authentication"):
        JobManifest.decode(json.dumps(data).encode(), manifest_key("job-a"))


def test_a_manifest_written_with_another_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = manifest().encode()
    monkeypatch.setenv("FUNCPIPE_SECRET", "another machine's secret")
    with pytest.raises(IntegrityError, match="another secret"):
        JobManifest.decode(data, manifest_key("job-a"))


def test_a_manifest_copied_under_another_jobs_key_is_refused() -> None:
    with pytest.raises(IntegrityError, match="names job 'job-a'"):
        JobManifest.decode(manifest("job-a").encode(), manifest_key("job-b"))


def test_find_job_takes_the_most_recently_updated_unfinished_job() -> None:
    storage = MemoryStorage("manifests-latest")
    for job, finished in (("old", False), ("new", False), ("done", True)):
        manifest(job, finished=finished).put(storage)  # written in this order: "updated" grows
    assert find_job(storage, None).job == "new"
    assert find_job(storage, "old").job == "old"


def test_find_job_names_the_jobs_there_are() -> None:
    storage = MemoryStorage("manifests-missing")
    manifest("only-one", finished=True).put(storage)
    with pytest.raises(ConfigError, match=r"no job 'other' to resume .*jobs here: only-one"):
        find_job(storage, "other")
    with pytest.raises(ConfigError, match=r"no unfinished job to resume .*jobs here: only-one"):
        find_job(storage, None)
