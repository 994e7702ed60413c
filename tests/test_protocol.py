"""keys: one distinct, valid storage key per object; iteration prefixes that do not overlap."""

from __future__ import annotations

import itertools

import pytest

from funcpipe.protocol import JobKeys
from funcpipe.storage.file import check_key

KINDS = ("input", "target", "act", "grad")


def iteration_keys(keys: JobKeys, iteration: int) -> list[str]:
    """Every per-iteration key of a small job (2 stages, 2 replicas, 2 micro-batches)."""
    out: list[str] = []
    for kind, stage, replica, micro_batch in itertools.product(KINDS, range(2), range(2), range(2)):
        out.append(keys.message(iteration, kind, stage, replica, micro_batch))
    for stage, owner, sender in itertools.product(range(2), range(3), range(3)):
        if owner != sender:
            out.append(keys.chunk(iteration, stage, owner, sender))
    for stage, replica in itertools.product(range(2), range(3)):
        out.append(keys.merged(iteration, stage, replica))
        out.append(keys.metrics(iteration, stage, replica))
    return out


def job_keys(keys: JobKeys) -> list[str]:
    """Keys of a job that are not tied to an iteration."""
    return [keys.model_blob(0), keys.model_blob(1), keys.checkpoint(0, 5), keys.checkpoint(1, 5), keys.abort]


def test_every_key_is_distinct() -> None:
    everything: list[str] = []
    for job, attempt in [("job", 0), ("job", 1), ("other", 0)]:
        keys = JobKeys(job, attempt)
        for iteration in (0, 1, 10, 100):
            everything += iteration_keys(keys, iteration)
        everything.append(keys.abort)
    # model keys belong to the job, not the attempt
    for job in ("job", "other"):
        everything.append(JobKeys(job).model_blob(0))
        everything += [JobKeys(job, attempt).checkpoint(stage, 5) for attempt in (0, 1) for stage in (0, 1)]
    assert len(everything) == len(set(everything))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (JobKeys("job").message(1, "act", 1, 0, 0), JobKeys("other").message(1, "act", 1, 0, 0)),
        (JobKeys("job", 0).message(1, "act", 1, 0, 0), JobKeys("job", 1).message(1, "act", 1, 0, 0)),
        (JobKeys("job").message(1, "act", 1, 0, 0), JobKeys("job").message(2, "act", 1, 0, 0)),
        (JobKeys("job").message(1, "act", 1, 0, 0), JobKeys("job").message(1, "grad", 1, 0, 0)),
        (JobKeys("job").message(1, "act", 1, 0, 0), JobKeys("job").message(1, "act", 2, 0, 0)),
        (JobKeys("job").message(1, "act", 1, 0, 0), JobKeys("job").message(1, "act", 1, 1, 0)),
        (JobKeys("job").message(1, "act", 1, 0, 0), JobKeys("job").message(1, "act", 1, 0, 1)),
        (JobKeys("job").chunk(1, 0, 1, 2), JobKeys("job").chunk(1, 0, 2, 1)),  # owner vs sender
        (JobKeys("job").chunk(1, 0, 1, 2), JobKeys("job").chunk(1, 1, 1, 2)),
        (JobKeys("job").merged(1, 0, 1), JobKeys("job").merged(1, 0, 2)),
        (JobKeys("job").merged(1, 0, 1), JobKeys("job").metrics(1, 0, 1)),
        (JobKeys("job", 0).abort, JobKeys("job", 1).abort),
        (JobKeys("job").model_blob(0), JobKeys("job").checkpoint(0, 5)),
        (JobKeys("job").model_blob(0), JobKeys("other").model_blob(0)),
    ],
)
def test_keys_differ_in_each_component(a: str, b: str) -> None:
    assert a != b


def test_model_key_survives_a_retry_and_checkpoint_keys_do_not() -> None:
    # A retried attempt reads the same model blob as the first one; a worker of a failed
    # attempt still running cannot overwrite the checkpoint a later attempt restores from.
    assert JobKeys("job", 0).model_blob(1) == JobKeys("job", 3).model_blob(1)
    assert JobKeys("job", 0).checkpoint(1, 5) != JobKeys("job", 3).checkpoint(1, 5)


@pytest.mark.parametrize("iteration", [0, 1, 10, 100, 12345678])
def test_iteration_prefix_covers_its_iteration_only(iteration: int) -> None:
    keys = JobKeys("job", 2)
    prefix = keys.iteration_prefix(iteration)
    for key in iteration_keys(keys, iteration):
        assert key.startswith(prefix), key
    for other in {0, 1, 10, 100, 1000, 12345678} - {iteration}:
        for key in iteration_keys(keys, other):
            assert not key.startswith(prefix), (prefix, key)
    for key in job_keys(keys) + iteration_keys(JobKeys("job", 1), iteration):
        assert not key.startswith(prefix), (prefix, key)


def test_prefixes_of_iterations_1_10_100_are_not_prefixes_of_each_other() -> None:
    keys = JobKeys("job")
    prefixes = [keys.iteration_prefix(i) for i in (1, 10, 100)]
    for a, b in itertools.permutations(prefixes, 2):
        assert not b.startswith(a), (a, b)


def test_prefix_of_job_does_not_cover_a_job_with_a_longer_name() -> None:
    short, long = JobKeys("job"), JobKeys("job2")
    assert not long.message(1, "act", 0, 0, 0).startswith(short.iteration_prefix(1))
    assert not long.abort.startswith(short.root + "/")


@pytest.mark.parametrize("attempt", [0, 7])
def test_every_key_is_a_valid_storage_key(attempt: int) -> None:
    keys = JobKeys("my-job_2024.01", attempt)
    for key in iteration_keys(keys, 0) + iteration_keys(keys, 99) + job_keys(keys):
        check_key(key)  # raises ConfigError on a malformed key
