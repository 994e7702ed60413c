"""AuthenticatedStorage: every object tagged on write, checked on read, and read without a copy where it can be."""

from __future__ import annotations

import hashlib
import hmac
import uuid

import pytest
import torch

from funcpipe import codec
from funcpipe.collectives import decode_tensor, put_tensor, read_tensor
from funcpipe.errors import IntegrityError
from funcpipe.storage import MemoryStorage
from funcpipe.storage.authenticated import TAG_BYTES, AuthenticatedStorage

KEY = "a1" * 32
OTHER_KEY = "b2" * 32
OBJECT = "job/r0123456789ab/a0/i00000001/act.s0.r0.m0"


def expected_tag(hexkey: str, key: str, data: bytes) -> bytes:
    """The documented tag: HMAC-SHA256 under the job's key of a domain string, the key's length, the key,
    then the bytes."""
    name = key.encode()
    message = b"funcpipe-object-v1\0" + len(name).to_bytes(4, "big") + name + data
    return hmac.new(bytes.fromhex(hexkey), message, hashlib.sha256).digest()


@pytest.fixture
def inner() -> MemoryStorage:
    return MemoryStorage(f"test-authenticated-{uuid.uuid4().hex}")


def test_an_object_is_stored_as_its_bytes_and_their_tag(inner: MemoryStorage) -> None:
    storage = AuthenticatedStorage(inner, KEY)
    storage.put(OBJECT, b"payload")
    assert inner.get(OBJECT) == b"payload" + expected_tag(KEY, OBJECT, b"payload")
    assert storage.get(OBJECT) == b"payload"
    assert storage.get_if_exists(OBJECT) == b"payload"
    assert storage.wait(OBJECT, 1.0) == b"payload"
    assert bytes(storage.wait_view(OBJECT, 1.0)) == b"payload"
    assert storage.get_if_exists(OBJECT + ".absent") is None


def test_parts_are_stored_as_their_join_and_its_tag(inner: MemoryStorage) -> None:
    storage = AuthenticatedStorage(inner, KEY)
    parts = [b"head", memoryview(b"--body--")[2:6], b"tail"]
    storage.put_parts(OBJECT, parts)
    assert inner.get(OBJECT) == b"headbodytail" + expected_tag(KEY, OBJECT, b"headbodytail")
    assert storage.get(OBJECT) == b"headbodytail"


def test_a_view_is_of_the_stored_bytes_not_a_copy(inner: MemoryStorage) -> None:
    storage = AuthenticatedStorage(inner, KEY)
    storage.put(OBJECT, b"x" * 1000)
    view = storage.wait_view(OBJECT, 1.0)
    assert isinstance(view, memoryview)
    assert view.obj is inner.get(OBJECT)  # the memory store's own object: nothing was copied
    assert len(view) == 1000


def test_a_tensor_travels_in_one_copy_and_is_read_from_the_view(inner: MemoryStorage) -> None:
    storage = AuthenticatedStorage(inner, KEY)
    tensor = torch.arange(12.0).reshape(3, 4)
    put_tensor(storage, OBJECT, tensor)
    stored = inner.get(OBJECT)
    plain = codec.encode_tensor(tensor, {"key": OBJECT})
    assert stored == plain + expected_tag(KEY, OBJECT, plain)
    view = storage.wait_view(OBJECT, 1.0)
    assert torch.equal(decode_tensor(view, OBJECT), tensor)
    out = torch.zeros(3, 4)
    read_tensor(view, OBJECT).add_to(out)
    assert torch.equal(out, tensor)


@pytest.mark.parametrize("where", [0, 7, -TAG_BYTES - 1, -1])
def test_a_changed_byte_is_refused_naming_the_key(inner: MemoryStorage, where: int) -> None:
    storage = AuthenticatedStorage(inner, KEY)
    put_tensor(storage, OBJECT, torch.ones(4))
    stored = bytearray(inner.get(OBJECT))
    stored[where] ^= 0x01
    inner.put(OBJECT, bytes(stored))
    for read in (storage.get, storage.get_if_exists, lambda key: storage.wait(key, 1.0),
                 lambda key: storage.wait_view(key, 1.0)):
        with pytest.raises(IntegrityError, match=f"object '{OBJECT}' failed its authentication"):
            read(OBJECT)


def test_an_object_moved_to_another_key_is_refused(inner: MemoryStorage) -> None:
    storage = AuthenticatedStorage(inner, KEY)
    storage.put(OBJECT, b"loss 0.5")
    moved = OBJECT.replace("m0", "m1")
    inner.put(moved, inner.get(OBJECT))
    with pytest.raises(IntegrityError, match="m1"):
        storage.get(moved)


def test_another_jobs_object_is_refused(inner: MemoryStorage) -> None:
    AuthenticatedStorage(inner, OTHER_KEY).put(OBJECT, b"theirs")
    with pytest.raises(IntegrityError, match="failed its authentication"):
        AuthenticatedStorage(inner, KEY).get(OBJECT)


@pytest.mark.parametrize("data", [b"", b"short", b"x" * (TAG_BYTES - 1), b"y" * TAG_BYTES])
def test_an_object_without_a_whole_tag_is_refused(inner: MemoryStorage, data: bytes) -> None:
    inner.put(OBJECT, data)
    with pytest.raises(IntegrityError, match=f"{len(data)} bytes"):
        AuthenticatedStorage(inner, KEY).wait_view(OBJECT, 1.0)


def test_exempt_keys_pass_through_as_they_are(inner: MemoryStorage) -> None:
    storage = AuthenticatedStorage(inner, KEY)
    storage.put("jobs/j.lease.0", b"{}")
    storage.put_parts("jobs/j.json", [b"{", b"}"])
    assert inner.get("jobs/j.lease.0") == b"{}"
    assert inner.get("jobs/j.json") == b"{}"
    assert storage.wait_view("jobs/j.json", 1.0) == b"{}"
    assert storage.create("jobs/j.lease.1", b"1") and inner.get("jobs/j.lease.1") == b"1"


def test_create_tags_and_refuses_an_existing_key(inner: MemoryStorage) -> None:
    storage = AuthenticatedStorage(inner, KEY)
    assert storage.create(OBJECT, b"first")
    assert not storage.create(OBJECT, b"second")
    assert storage.get(OBJECT) == b"first"


def test_a_wrapped_wrapper_tags_once_under_the_outer_key(inner: MemoryStorage) -> None:
    storage = AuthenticatedStorage(AuthenticatedStorage(inner, OTHER_KEY), KEY)
    storage.put(OBJECT, b"once")
    assert inner.get(OBJECT) == b"once" + expected_tag(KEY, OBJECT, b"once")
