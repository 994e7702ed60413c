"""signed: HMAC-signed cloudpickle blobs; nothing unsigned or altered is ever unpickled."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from funcpipe.errors import IntegrityError
from funcpipe.signed import new_key, seal, unseal
from tests.helpers import CreatesFile

NAME = "job-x/model/s0"
MAGIC = b"funcpipe-signed-v1\n"


def test_closure_roundtrip() -> None:
    key = new_key()
    scale = 3.0

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (x * scale).sum()

    restored = unseal(seal(loss, key, name=NAME), key, name=NAME)
    assert callable(restored)
    assert restored(torch.tensor([1.0, 2.0])).item() == 9.0


def test_module_roundtrip() -> None:
    key = new_key()
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    restored = unseal(seal(module, key, name=NAME), key, name=NAME)
    assert isinstance(restored, nn.Sequential)
    assert [type(layer) for layer in restored] == [nn.Linear, nn.ReLU]
    for name, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    x = torch.randn(4, 3)
    assert torch.equal(restored(x), module(x))


def test_refuses_unsigned_bytes() -> None:
    with pytest.raises(IntegrityError, match="not a signed funcpipe blob") as info:
        unseal(b"hello", new_key(), name=NAME)
    assert repr(NAME) in str(info.value)


def test_refuses_a_blob_shorter_than_its_signature() -> None:
    with pytest.raises(IntegrityError, match="not a signed funcpipe blob"):
        unseal(MAGIC + b"\x00" * 31, new_key(), name=NAME)


@pytest.mark.parametrize("with_magic", [False, True])
def test_refuses_a_plain_pickle_without_running_it(tmp_path: Path, with_magic: bool) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(CreatesFile(str(marker)))
    # Control: this payload does run code when unpickled.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(CreatesFile(str(control))))
    assert control.exists()

    # With the magic prefix it even looks like a blob; the digest bytes are then the pickle's head.
    data = MAGIC + b"\x00" * 32 + payload if with_magic else payload
    with pytest.raises(IntegrityError) as info:
        unseal(data, new_key(), name=NAME)
    assert repr(NAME) in str(info.value)
    assert not marker.exists()


def test_refuses_a_flipped_byte_in_the_body() -> None:
    key = new_key()
    blob = bytearray(seal({"lr": 0.1}, key, name=NAME))
    blob[-5] ^= 0x01
    with pytest.raises(IntegrityError, match="bad signature") as info:
        unseal(bytes(blob), key, name=NAME)
    assert repr(NAME) in str(info.value)


def test_refuses_a_flipped_byte_in_the_signature() -> None:
    key = new_key()
    blob = bytearray(seal({"lr": 0.1}, key, name=NAME))
    blob[len(MAGIC)] ^= 0x80
    with pytest.raises(IntegrityError, match="bad signature"):
        unseal(bytes(blob), key, name=NAME)


def test_refuses_a_blob_signed_with_another_key() -> None:
    blob = seal({"lr": 0.1}, new_key(), name=NAME)
    with pytest.raises(IntegrityError, match="bad signature"):
        unseal(blob, new_key(), name=NAME)


def test_refuses_a_blob_moved_to_another_name() -> None:
    key = new_key()
    blob = seal({"lr": 0.1}, key, name="job-x/model/s0")
    with pytest.raises(IntegrityError, match="bad signature") as info:
        unseal(blob, key, name="job-x/model/s1")
    assert "'job-x/model/s1'" in str(info.value)


def test_new_key_gives_distinct_64_hex_keys() -> None:
    keys = [new_key() for _ in range(50)]
    assert len(set(keys)) == 50
    for key in keys:
        assert re.fullmatch(r"[0-9a-f]{64}", key), key
