"""binding: objects carry the key they were written for; waiting readers skip foreign ones, others refuse them."""

from __future__ import annotations

import builtins
import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence

import pytest

from funcpipe import binding
from funcpipe.errors import ForeignObject, IntegrityError, ObjectNotFound
from funcpipe.storage import MemoryStorage, Storage, WaitCancelled

KEY = "job-b/a1/i00000002/metrics.s1.r0"
OTHER_JOB = "job-a/a0/i00000002/metrics.s1.r0"
EARLIER_ATTEMPT = "job-b/a0/i00000002/metrics.s1.r0"
LONG_TIMEOUT_S = 60.0  # a wait that should end at once; a reader that waited would fail the test on time only
SHORT_TIMEOUT_S = 0.2


class Succession(Storage):
    """Serves ``objects`` one per read of any key, the last one for good (``None``: absent)."""

    url = "succession://"
    poll_initial_s = poll_max_s = 0.0005

    def __init__(self, objects: Sequence[bytes | None]) -> None:
        self.objects = list(objects)
        self.reads = 0

    def get_if_exists(self, key: str) -> bytes | None:
        self.reads += 1
        return self.objects[min(self.reads, len(self.objects)) - 1]

    def get(self, key: str) -> bytes:
        data = self.get_if_exists(key)
        if data is None:
            raise ObjectNotFound(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        raise AssertionError("a reader must not write")

    def exists(self, key: str) -> bool:
        raise AssertionError("a reader polls with get_if_exists")

    def delete(self, keys: Iterable[str]) -> None:
        raise AssertionError("a reader must not delete")

    def list(self, prefix: str) -> builtins.list[str]:
        raise AssertionError("a reader must not list")


def loss_of(data: bytes) -> float:
    return float(binding.decode_json(data, KEY)["loss"])


@pytest.fixture
def memory() -> Iterator[MemoryStorage]:
    storage = MemoryStorage(f"test-binding-{uuid.uuid4().hex}")
    yield storage
    storage.clear()


def test_json_roundtrip() -> None:
    data = binding.encode_json(KEY, {"loss": 0.25, "iteration": 3})
    assert json.loads(data) == {"loss": 0.25, "iteration": 3, "key": KEY}
    assert binding.decode_json(data, KEY) == {"loss": 0.25, "iteration": 3}


@pytest.mark.parametrize("written_for", [OTHER_JOB, EARLIER_ATTEMPT])
def test_a_json_object_written_for_another_key_is_refused_naming_both(written_for: str) -> None:
    with pytest.raises(ForeignObject) as info:
        binding.decode_json(binding.encode_json(written_for, {"loss": 1.0}), KEY)
    assert (info.value.key, info.value.written_for) == (KEY, written_for)
    assert f"object {KEY!r} was written for {written_for!r}" in str(info.value)


@pytest.mark.parametrize("data", [b'{"loss": 1.0}', b'{"loss": 1.0, "key": 7}', b'{"loss": 1.0, "key": null}'])
def test_a_json_object_bound_to_no_key_is_refused(data: bytes) -> None:
    with pytest.raises(ForeignObject, match="written for no key") as info:
        binding.decode_json(data, KEY)
    assert info.value.written_for is None


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe\x00", b"[1, 2]", b'"key"', b"1" * 5000, b"[" * 100_000])
def test_what_is_not_a_json_object_is_an_integrity_error(data: bytes) -> None:
    with pytest.raises(IntegrityError) as info:
        binding.decode_json(data, KEY)
    assert not isinstance(info.value, ForeignObject)
    assert repr(KEY) in str(info.value)


def test_wait_returns_the_object_written_for_the_key(memory: MemoryStorage) -> None:
    memory.put(KEY, binding.encode_json(KEY, {"loss": 0.5}))
    assert binding.wait(memory, KEY, LONG_TIMEOUT_S, loss_of) == 0.5


def test_wait_skips_foreign_objects_until_the_genuine_one_replaces_them(caplog: pytest.LogCaptureFixture) -> None:
    storage = Succession([
        None,
        binding.encode_json(OTHER_JOB, {"loss": 9.0}),
        binding.encode_json(OTHER_JOB, {"loss": 9.0}),
        binding.encode_json(EARLIER_ATTEMPT, {"loss": 8.0}),
        None,  # deleted, then written by the writer of KEY
        binding.encode_json(KEY, {"loss": 0.5}),
    ])
    with caplog.at_level(logging.WARNING, logger="funcpipe.binding"):
        assert binding.wait(storage, KEY, LONG_TIMEOUT_S, loss_of) == 0.5
    assert storage.reads == 6
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2, warnings  # once per foreign binding, not per poll
    assert repr(KEY) in warnings[0] and repr(OTHER_JOB) in warnings[0]
    assert repr(KEY) in warnings[1] and repr(EARLIER_ATTEMPT) in warnings[1]


def test_wait_for_a_key_holding_only_a_foreign_object_times_out_naming_both_keys(memory: MemoryStorage) -> None:
    memory.put(KEY, binding.encode_json(OTHER_JOB, {"loss": 9.0}))
    with pytest.raises(ForeignObject) as info:
        binding.wait(memory, KEY, SHORT_TIMEOUT_S, loss_of)
    assert (info.value.key, info.value.written_for) == (KEY, OTHER_JOB)
    message = str(info.value)
    assert repr(KEY) in message and repr(OTHER_JOB) in message
    assert f"within {SHORT_TIMEOUT_S:g} s" in message


def test_wait_that_saw_a_foreign_object_then_nothing_names_the_foreign_one() -> None:
    storage = Succession([binding.encode_json(EARLIER_ATTEMPT, {"loss": 9.0}), None])
    with pytest.raises(ForeignObject) as info:
        binding.wait(storage, KEY, SHORT_TIMEOUT_S, loss_of)
    assert info.value.written_for == EARLIER_ATTEMPT


def test_wait_for_nothing_is_object_not_found(memory: MemoryStorage) -> None:
    with pytest.raises(ObjectNotFound) as info:
        binding.wait(memory, KEY, SHORT_TIMEOUT_S, loss_of)
    assert not isinstance(info.value, IntegrityError)


def test_wait_gives_up_on_a_foreign_object_when_cancelled() -> None:
    storage = Succession([binding.encode_json(OTHER_JOB, {"loss": 9.0})])
    with pytest.raises(WaitCancelled):
        binding.wait(storage, KEY, LONG_TIMEOUT_S, loss_of, cancelled=lambda: storage.reads >= 3)
    assert storage.reads == 3


def test_wait_refuses_a_malformed_object_at_once() -> None:
    storage = Succession([b"\x80\x04not json", binding.encode_json(KEY, {"loss": 0.5})])
    with pytest.raises(IntegrityError) as info:
        binding.wait(storage, KEY, LONG_TIMEOUT_S, loss_of)
    assert not isinstance(info.value, ForeignObject)
    assert storage.reads == 1
