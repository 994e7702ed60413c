"""The job's restore point: complete checkpoints, abandoned attempts, resume from the manifest, the gathered model."""

from __future__ import annotations

import collections
import logging
import uuid

import pytest
from torch import nn

from funcpipe import CheckpointCorrupt, ConfigError, IntegrityError, Plan, checkpoint, protocol
from funcpipe.errors import StorageError
from funcpipe.manifest import JobManifest, find_job, manifest_key
from funcpipe.protocol import JobKeys
from funcpipe.restore import JobState
from funcpipe.storage import MemoryStorage
from tests.helpers import assert_same_parameters, mlp7

PLAN = Plan.manual([3, 4], micro_batch_size=4, global_batch_size=8)
JOB = "restore-test"


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage(f"restore-{uuid.uuid4().hex}")


def job_state(storage: MemoryStorage, *, attempt: int = 0, named: bool = False) -> JobState:
    return JobState(storage, PLAN, mlp7(), JobKeys(JOB, attempt), named=named)


def write_checkpoints(storage: MemoryStorage, iteration: int, attempt: int, model: nn.Sequential,
                      stages: range = range(PLAN.num_stages)) -> None:
    """What the workers of ``attempt`` write before ``iteration``: each stage's layers of ``model``."""
    for s in stages:
        layers = nn.Sequential(collections.OrderedDict((str(i), model[i]) for i in PLAN.layer_range(s)))
        key = JobKeys(JOB, attempt).checkpoint(s, iteration)
        storage.put(key, checkpoint.encode_state(layers, key=key))


def write_manifest(storage: MemoryStorage, **fields: object) -> None:
    defaults: dict[str, object] = {
        "job": JOB, "attempt": 0, "run": "", "plan": PLAN.to_dict(), "layers": 7, "fit_first": 0, "fit_total": 6,
        "restore_iteration": None, "restore_attempt": None, "finished": False,
    }
    JobManifest(**{**defaults, **fields}).put(storage)  # type: ignore[arg-type]


def test_a_complete_checkpoint_becomes_the_restore_point_the_one_before_is_kept_older_ones_deleted(
    storage: MemoryStorage
) -> None:
    job = job_state(storage)
    job.begin_fit(0, 6)
    for iteration in (2, 4, 6):
        write_checkpoints(storage, iteration, 0, mlp7())
        job.complete((iteration, 0))
    assert (job.point, job.restore_iteration, job.restore_attempt, job.points) == ((6, 0), 6, 0, [(4, 0), (6, 0)])
    assert [storage.exists(key) for i in (2, 4, 6) for key in job.checkpoint_keys((i, 0))] == [
        False, False, True, True, True, True
    ]
    manifest = find_job(storage, JOB)
    assert (manifest.restore_iteration, manifest.restore_attempt, manifest.previous_iteration,
            manifest.previous_attempt, manifest.fit_total, manifest.finished) == (6, 0, 4, 0, 6, False)


def test_a_corrupt_restore_point_falls_back_to_the_checkpoint_before(storage: MemoryStorage) -> None:
    job, older, newer = job_state(storage), mlp7(seed=3), mlp7(seed=4)
    write_checkpoints(storage, 2, 0, older)
    job.complete((2, 0))
    write_checkpoints(storage, 4, 0, newer)
    job.complete((4, 0))
    bad = job.checkpoint_keys((4, 0))[1]
    data = bytearray(storage.get(bad))
    data[8:10] = b"{{"  # its header no longer parses
    storage.put(bad, bytes(data))
    job.after_failure()  # gathers the restore point: it fails its check, so the one before is loaded
    assert (job.point, job.iteration, job.points) == ((2, 0), 2, [(2, 0)])
    assert_same_parameters(job.model, older)
    assert not any(storage.exists(key) for key in job.checkpoint_keys((4, 0)))
    assert find_job(storage, JOB).restore_iteration == 2


def test_with_nothing_to_fall_back_to_a_corrupt_checkpoint_is_named(storage: MemoryStorage) -> None:
    job = job_state(storage)
    write_checkpoints(storage, 4, 0, mlp7())
    job.points = [(4, 0)]  # as a resume without a previous checkpoint leaves it
    job.iteration = 4
    storage.put(job.checkpoint_keys((4, 0))[0], b"not a checkpoint")
    with pytest.raises(CheckpointCorrupt, match=r"checkpoint 'restore-test/a0/checkpoint/i00000004/s0'"):
        job.finish(4)


@pytest.mark.parametrize(("complete", "expected"), [((4, 6), (6, 0)), ((4,), (4, 0)), ((), (2, 0))],
                         ids=["newest", "an older one", "none: the old point stays"])
def test_an_abandoned_attempt_keeps_its_newest_complete_checkpoint(
    storage: MemoryStorage, complete: tuple[int, ...], expected: tuple[int, int]
) -> None:
    job = job_state(storage)
    write_checkpoints(storage, 2, 0, mlp7())
    job.complete((2, 0))
    for iteration in (4, 6):  # the workers got further than the driver saw
        stages = range(PLAN.num_stages) if iteration in complete else range(1)  # else only stage 0 wrote it
        write_checkpoints(storage, iteration, 0, mlp7(), stages)
    messages = [JobKeys(JOB, 0).message_for(PLAN, 6, "input", 0, m) for m in range(2)]
    for key in messages:
        storage.put(key, b"fed")
    job.abandon([4, 6], messages)
    assert job.keys == JobKeys(JOB, 1)
    abort = JobKeys(JOB, 0).abort
    protocol.decode_abort(storage.get(abort), abort)
    assert job.point == expected
    left = {key for key in storage.list(f"{JOB}/a0/") if key != abort}
    kept = {key for point in job.points if point is not None for key in job.checkpoint_keys(point)}
    assert left == kept  # the other checkpoints and the messages are gone
    assert kept >= set(job.checkpoint_keys(expected)) and len(job.points) == 2
    assert find_job(storage, JOB).attempt == 1  # a resume after the driver died starts a newer attempt still


class FailingPuts(MemoryStorage):
    def put(self, key: str, data: bytes) -> None:
        raise StorageError(f"put {key!r}: 503 Slow Down")


def test_a_storage_failure_while_abandoning_is_logged_and_the_job_still_moves_on(
    caplog: pytest.LogCaptureFixture
) -> None:
    job = JobState(FailingPuts(f"restore-{uuid.uuid4().hex}"), PLAN, mlp7(), JobKeys(JOB), named=False)
    with caplog.at_level(logging.WARNING, logger="funcpipe.restore"):
        job.abandon([2], [])
    assert job.keys.attempt == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"could not clean up after failed attempt 0: put {manifest_key(JOB)!r}: 503 Slow Down"
    ]


def test_finish_gathers_the_restore_points_weights_into_the_model(storage: MemoryStorage) -> None:
    job, trained = job_state(storage), mlp7(seed=3)
    write_checkpoints(storage, 5, 0, trained)
    job.complete((5, 0))
    job.finish(5)
    assert_same_parameters(job.model, trained)
    assert find_job(storage, JOB).finished


def test_clean_deletes_everything_the_job_keeps(storage: MemoryStorage) -> None:
    job = job_state(storage)
    for s in range(PLAN.num_stages):
        storage.put(job.keys.model_blob(s), b"definition")
    write_checkpoints(storage, 2, 0, mlp7())
    job.complete((2, 0))
    job.abandon([], [])  # attempt 0's abort object
    job.clean(checkpoints=True)
    assert job.point is None
    assert storage.list(f"{JOB}/") == [] and not storage.exists(manifest_key(JOB))


class TestResume:
    def test_a_finished_job_loads_its_final_weights_and_has_nothing_to_do(self, storage: MemoryStorage) -> None:
        trained = mlp7(seed=3)
        write_checkpoints(storage, 6, 1, trained)
        write_manifest(storage, attempt=1, restore_iteration=6, restore_attempt=1, finished=True, extra={"a": 1})
        job = job_state(storage, named=True)
        assert job.resume(6) is None
        assert (job.keys, job.point, job.iteration, job.extra) == (JobKeys(JOB, 2), (6, 1), 6, {"a": 1})
        assert_same_parameters(job.model, trained)
        abort = JobKeys(JOB, 1).abort  # for workers the dead driver left running
        protocol.decode_abort(storage.get(abort), abort)

    def test_an_interrupted_job_continues_from_its_restore_point(self, storage: MemoryStorage) -> None:
        write_checkpoints(storage, 4, 0, mlp7(seed=3))
        write_manifest(storage, fit_first=2, fit_total=6, restore_iteration=4, restore_attempt=0)
        job = job_state(storage)  # not named: the most recently updated unfinished job
        assert job.resume(6) == 2  # of the fit's 6 iterations from 2
        assert (job.keys.attempt, job.iteration) == (1, 4)

    def test_a_job_without_a_checkpoint_starts_over(self, storage: MemoryStorage) -> None:
        write_manifest(storage)
        job = job_state(storage, named=True)
        assert job.resume(6) == 0
        assert (job.point, job.iteration) == (None, 0)

    @pytest.mark.parametrize(
        ("fields", "total", "error", "message"),
        [
            ({"layers": 8}, 6, ConfigError, r"(?s)was trained with plan .* on a model of 8 layers, not this trainer's"),
            ({"plan": Plan.manual([7], micro_batch_size=4, global_batch_size=8).to_dict()}, 6, ConfigError,
             "hint: resume with the same model and plan"),
            ({}, 5, ConfigError, "interrupted in a fit of 6 iterations, but this fit asks for 5"),
            ({"fit_first": 3}, 6, IntegrityError, "has no checkpoint but its fit began at iteration 3"),
        ],
        ids=["another model", "another plan", "another fit", "a manifest that contradicts itself"],
    )
    def test_a_job_that_does_not_match_is_refused(
        self, storage: MemoryStorage, fields: dict[str, object], total: int, error: type[Exception], message: str
    ) -> None:
        write_manifest(storage, **fields)
        with pytest.raises(error, match=message):
            job_state(storage, named=True).resume(total)
