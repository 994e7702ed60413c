"""protocol: one distinct, valid key per object; routing, pieces and peers; the control objects' encodings."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from funcpipe import Plan, binding, protocol
from funcpipe.errors import ConfigError, ForeignObject, IntegrityError
from funcpipe.protocol import JobKeys, piece_count
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
    out += [keys.norm(iteration, stage) for stage in range(2)]
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


# --------------------------------------------------------------------------- routing, pieces, peers


@pytest.mark.parametrize(("replicas", "micro_batches"), [(1, 4), (2, 7), (3, 3), (4, 2)])
def test_each_micro_batch_runs_on_exactly_one_replica(replicas: int, micro_batches: int) -> None:
    runs = [m for r in range(replicas) for m in protocol.owned(r, replicas, micro_batches)]
    assert sorted(runs) == list(range(micro_batches))
    for r in range(replicas):
        assert all(protocol.replica_of(m, replicas) == r for m in protocol.owned(r, replicas, micro_batches))


def test_a_message_goes_to_the_replica_that_runs_its_micro_batch() -> None:
    plan = Plan.manual(balance=[1, 1], global_batch_size=6, micro_batch_size=1, replicas=[1, 3])
    keys = JobKeys("job")
    assert keys.message_for(plan, 2, "act", 1, 4) == keys.message(2, "act", 1, 1, 4)
    assert keys.message_for(plan, 2, "grad", 0, 4) == keys.message(2, "grad", 0, 0, 4)


@pytest.mark.parametrize(
    ("size_bytes", "world", "piece_bytes", "expected"),
    [(100, 2, 1000, 1), (8_000, 2, 1000, 4), (8_000, 4, 1000, 2), (10**9, 2, 1000, 16), (7, 3, 1, 3)],
)
def test_piece_count(size_bytes: int, world: int, piece_bytes: int, expected: int) -> None:
    assert piece_count(size_bytes, world, piece_bytes) == expected


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_at_every_step_a_replica_reads_what_a_peer_writes_at_that_step(world: int) -> None:
    peers = [protocol.ring_peers(r, world) for r in range(world)]
    for r, (to_peers, from_peers) in enumerate(peers):
        assert sorted(to_peers) == sorted(from_peers) == [p for p in range(world) if p != r]
        for step, source in enumerate(from_peers):
            assert peers[source][0][step] == r


class _Param:
    def __init__(self, numel: int, element_size: int, requires_grad: bool) -> None:
        self._numel, self._size, self.requires_grad = numel, element_size, requires_grad

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return self._size


def test_the_gradient_synced_is_that_of_the_trainable_parameters() -> None:
    params = [_Param(10, 4, True), _Param(5, 4, False), _Param(3, 2, True)]
    assert protocol.trainable(params) == [params[0], params[2]]
    assert protocol.gradient_bytes(params) == 10 * 4 + 3 * 2


# --------------------------------------------------------------------------- the control objects


KEY = "job/a0/stop.from00000004"


def test_control_objects_read_back_what_was_written() -> None:
    assert protocol.decode_stop(protocol.encode_stop(KEY, 7), KEY) == 7
    assert protocol.decode_metrics(protocol.encode_metrics(KEY, 0.25), KEY) == 0.25
    protocol.decode_abort(protocol.encode_abort(KEY), KEY)
    status = {"state": "running", "beat": 3}
    assert protocol.decode_status(protocol.encode_status(KEY, status), KEY) == status


@pytest.mark.parametrize(
    "read",
    [protocol.decode_stop, protocol.decode_metrics, protocol.decode_abort, protocol.decode_status],
    ids=["stop", "metrics", "abort", "status"],
)
def test_control_objects_of_another_key_are_foreign(read: Callable[[bytes, str], object]) -> None:
    other = "job/a1/stop.from00000004"
    data = {
        protocol.decode_stop: protocol.encode_stop(other, 7),
        protocol.decode_metrics: protocol.encode_metrics(other, 0.5),
        protocol.decode_abort: protocol.encode_abort(other),
        protocol.decode_status: protocol.encode_status(other, {"state": "done", "result": 1}),
    }[read]
    with pytest.raises(ForeignObject):
        read(data, KEY)


@pytest.mark.parametrize(
    ("read", "fields", "message"),
    [
        (protocol.decode_stop, {"iteration": "7"}, "names iteration '7', not an integer"),
        (protocol.decode_stop, {"iteration": True}, "not an integer"),
        (protocol.decode_metrics, {"loss": None}, "has loss None, not a float"),
        (protocol.decode_metrics, {"loss": 10**400}, "not a float"),
        (protocol.decode_status, {"state": "sleeping"}, "has state 'sleeping'"),
        (protocol.decode_status, {"state": "done"}, "holds no result"),
        (protocol.decode_status, {"state": "failed", "cause": 3, "traceback": ""}, "has cause 3, not a str"),
    ],
)
def test_malformed_control_objects_are_integrity_errors(
    read: Callable[[bytes, str], object], fields: dict[str, object], message: str
) -> None:
    with pytest.raises(IntegrityError, match=message):
        read(binding.encode_json(KEY, fields), KEY)


def test_a_status_without_a_state_is_not_written() -> None:
    with pytest.raises(ConfigError, match="no state"):
        protocol.encode_status(KEY, {"beat": 1})


def test_the_iteration_keys_of_a_clipped_plan_hold_every_stage_norm() -> None:
    plan = Plan.manual([1, 1, 1], micro_batch_size=2, global_batch_size=4)
    keys = JobKeys("job")
    plain, clipped = keys.iteration_keys(3, plan, [8, 0, 8]), keys.iteration_keys(3, plan, [8, 0, 8], clipped=True)
    assert sorted(set(clipped) - set(plain)) == sorted(keys.norm(3, s) for s in range(3))
    assert protocol.decode_norm(protocol.encode_norm(keys.norm(3, 1), 2.5), keys.norm(3, 1)) == 2.5
    with pytest.raises(ForeignObject):
        protocol.decode_norm(protocol.encode_norm(keys.norm(3, 1), 2.5), keys.norm(3, 2))
    with pytest.raises(IntegrityError, match=r"gradient norm .* has squared 'x', not a float"):
        protocol.decode_norm(binding.encode_json(keys.norm(3, 1), {"squared": "x"}), keys.norm(3, 1))
