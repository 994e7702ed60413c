"""codec: safetensors round trips, metadata, and refusal of anything else (pickle above all)."""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from funcpipe import codec
from funcpipe.codec import decode, decode_tensor, encode, encode_tensor, read_tensor
from funcpipe.errors import ConfigError, IntegrityError


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.int64,
        torch.bool,
        torch.bfloat16,
        torch.float16,
        torch.int8,
        torch.uint8,
    ],
)
def test_roundtrip_dtypes(dtype: torch.dtype) -> None:
    tensor = (torch.arange(12) % 3).reshape(3, 4).to(dtype)
    out, _ = decode_tensor(encode_tensor(tensor))
    assert out.dtype == dtype
    assert torch.equal(out, tensor)


def test_roundtrip_many() -> None:
    tensors = {"w": torch.randn(5, 3), "b": torch.randn(3), "step": torch.tensor(7)}
    out, metadata = decode(encode(tensors))
    assert out.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(out[name], tensor)
    assert metadata == {}


def test_bytes_match_the_safetensors_reference() -> None:
    tensors = {
        "b": torch.ones(3, dtype=torch.bfloat16),
        "a": torch.arange(2.0),
        "z": torch.ones(1, dtype=torch.float64),
        "c": torch.tensor([True]),
        "aa": torch.ones(2),
        "scalar": torch.tensor(1.5),
    }
    metadata = {"k": "v"}  # one key: safetensors writes metadata in hash-map order
    assert encode(tensors, metadata) == safetensors.torch.save(tensors, metadata)
    assert encode(tensors) == safetensors.torch.save(tensors)


def test_same_inputs_give_the_same_bytes() -> None:
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    first = encode(tensors, {"x": "1", "a": "2", "m": "3"})
    assert encode(dict(reversed(tensors.items())), {"m": "3", "a": "2", "x": "1"}) == first


def test_the_reference_reader_reads_our_files(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(4, 3), "steps": torch.arange(5), "µ": torch.ones(2, dtype=torch.bfloat16)}
    path = tmp_path / "x.safetensors"
    path.write_bytes(encode(tensors, {"job": "j"}))
    loaded = safetensors.torch.load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_header_and_tensors_are_aligned() -> None:
    tensors = {
        "a": torch.ones(3, dtype=torch.bool),
        "b": torch.ones(3),
        "c": torch.ones(1, dtype=torch.float64),
    }
    data = encode(tensors, {"k": "v"})
    length = int.from_bytes(data[:8], "little")
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    for name, tensor in tensors.items():
        assert header[name]["data_offsets"][0] % tensor.element_size() == 0


def test_other_dtypes_go_through_safetensors() -> None:
    base = torch.randn(4, dtype=torch.complex64)
    tensors = {"all": base, "head": base[:2], "conj": base.conj()}
    out, metadata = decode(encode(tensors, {"k": "v"}))
    assert metadata == {"k": "v"}
    for name, tensor in tensors.items():
        assert torch.equal(out[name], tensor.resolve_conj())


def test_zero_dim() -> None:
    out, _ = decode_tensor(encode_tensor(torch.tensor(3.5)))
    assert out.shape == ()
    assert out.item() == 3.5


def test_empty_tensor() -> None:
    out, _ = decode_tensor(encode_tensor(torch.zeros(0, 4)))
    assert out.shape == (0, 4)


def test_non_contiguous_input() -> None:
    tensor = torch.arange(6.0).reshape(2, 3).t()
    assert not tensor.is_contiguous()
    out, _ = decode_tensor(encode_tensor(tensor))
    assert torch.equal(out, tensor)
    assert out.is_contiguous()


def test_views_sharing_storage() -> None:
    base = torch.arange(10.0)
    tensors = {"all": base, "head": base[:4], "same": base.view(2, 5), "tail": base[6:]}
    out, _ = decode(encode(tensors))
    for name, tensor in tensors.items():
        assert torch.equal(out[name], tensor)
    out["all"][0] = 100.0  # decoded tensors do not share memory
    assert out["head"][0] == 0.0


def test_disjoint_slices_of_one_storage_are_not_copied_twice() -> None:
    grad = torch.arange(8.0)
    chunks = dict(zip("abcd", grad.chunk(4), strict=True))
    out, _ = decode(encode(chunks))
    assert torch.equal(torch.cat([out[k] for k in "abcd"]), grad)


def test_requires_grad() -> None:
    weight = torch.randn(3, 3, requires_grad=True)
    activation = weight * 2  # non-leaf, has a grad_fn
    out, _ = decode(encode({"weight": weight, "act": activation}))
    assert not out["weight"].requires_grad
    assert torch.equal(out["weight"], weight.detach())
    assert torch.equal(out["act"], activation.detach())
    parameter = torch.nn.Parameter(torch.ones(2))
    assert torch.equal(decode_tensor(encode_tensor(parameter))[0], torch.ones(2))


def test_decoded_tensors_are_writable() -> None:
    out, _ = decode_tensor(encode_tensor(torch.zeros(3)))
    out += 1
    assert torch.equal(out, torch.ones(3))


def test_metadata_roundtrip() -> None:
    metadata = {"job": "j1", "iteration": "3", "kind": "act", "unicode": "µ–✓"}
    _, got = decode_tensor(encode_tensor(torch.ones(2), metadata))
    assert got == metadata
    _, got = decode(encode({"a": torch.ones(1)}, metadata))
    assert got == metadata


@pytest.mark.parametrize("metadata", [{"k": 1}, {1: "v"}])
def test_bad_metadata(metadata: dict[object, object]) -> None:
    with pytest.raises(ConfigError, match="metadata"):
        encode({"a": torch.ones(1)}, metadata)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="__metadata__"):
        encode({"__metadata__": torch.ones(1)})
    with pytest.raises(ConfigError, match="list"):
        encode({"a": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="to_dense"):
        encode({"a": torch.eye(2).to_sparse()})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"short",
        b"\xff" * 64,
        b"garbage that is long enough to have a length field",
        struct.pack("<Q", 4) + b"nope",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 2) + b"\xff\xfe",
    ],
)
def test_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode(data)


def test_truncated_payloads_are_rejected() -> None:
    data = encode({"a": torch.ones(100), "b": torch.zeros(3)}, {"k": "v"})
    for cut in (1, 7, 8, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(IntegrityError):
            decode(data[:cut])


def test_corrupt_headers_are_rejected() -> None:
    def payload(header: bytes) -> bytes:
        return struct.pack("<Q", len(header)) + header + b"\0" * 8

    for header in (
        b'{"__metadata__": {"k": 1}}',
        b'{"__metadata__": ["x"]}',
        b'{"a": {"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}}',
        b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}',
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}',
    ):
        with pytest.raises(IntegrityError):
            decode(payload(header))


def test_decode_requires_bytes() -> None:
    data = encode_tensor(torch.ones(1))
    with pytest.raises(IntegrityError, match="bytearray"):
        decode(bytearray(data))  # type: ignore[arg-type]


def test_decode_tensor_wants_exactly_one_t() -> None:
    with pytest.raises(IntegrityError, match="'t'"):
        decode_tensor(encode({"a": torch.ones(1), "b": torch.ones(1)}))
    with pytest.raises(IntegrityError, match="'t'"):
        decode_tensor(encode({}))


class _WritesMarker:
    """Unpickling this opens (creates) the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_decode_never_unpickles(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_WritesMarker(marker), protocol=protocol)
    with pytest.raises(IntegrityError):
        decode(payload)
    with pytest.raises(IntegrityError):
        decode_tensor(payload)
    with pytest.raises(IntegrityError):
        read_tensor(payload)
    assert not marker.exists()


def test_decode_refuses_torch_save(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"t": torch.ones(2)}, buffer)
    with pytest.raises(IntegrityError):
        decode_tensor(buffer.getvalue())
    with pytest.raises(IntegrityError):
        read_tensor(buffer.getvalue())


# --------------------------------------------------------------------------- read_tensor: into the caller's tensor

READ_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
    torch.uint8, torch.bool, torch.complex64,  # complex64: laid out by safetensors, decoded
]


@pytest.mark.parametrize("dtype", READ_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4)])
def test_read_tensor_copies_and_adds_like_the_decoded_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(len(shape))
    tensor = (torch.randn(shape, generator=generator) * 50).to(dtype)
    base = (torch.randn(shape, generator=generator) * 50).to(dtype)
    data = encode_tensor(tensor, {"key": "k"})
    received = read_tensor(data)
    assert received.metadata == {"key": "k"}
    assert (received.dtype, received.shape) == (dtype, shape)
    out = torch.empty(shape, dtype=dtype)
    received.copy_to(out)
    assert torch.equal(out, tensor)
    if dtype != torch.bool:
        summed = base.clone()
        received.add_to(summed)
        expected = base.clone().add_(decode_tensor(data)[0])
        assert torch.equal(summed.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))  # same bits
    assert data == encode_tensor(tensor, {"key": "k"})  # the bytes were only read


def test_read_tensor_reads_into_views() -> None:
    result = torch.zeros(10)
    read_tensor(encode_tensor(torch.arange(3.0))).copy_to(result[4:7])
    read_tensor(encode_tensor(torch.ones(2))).add_to(result[5:7])
    assert result.tolist() == [0, 0, 0, 0, 0, 2, 3, 0, 0, 0]


def test_read_tensor_reads_the_reference_writer() -> None:
    tensor = torch.arange(6.0).reshape(2, 3)
    out = torch.empty(2, 3)
    read_tensor(safetensors.torch.save({"t": tensor}, {"key": "k"})).copy_to(out)
    assert torch.equal(out, tensor)


@pytest.mark.parametrize(
    ("dtype", "shape"), [(torch.float64, (3,)), (torch.float32, (4,)), (torch.float32, (1, 3)), (torch.float32, ())]
)
def test_read_tensor_refuses_a_destination_of_another_dtype_or_shape(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    received = read_tensor(encode_tensor(torch.ones(3)))
    with pytest.raises(IntegrityError, match="expected"):
        received.copy_to(torch.zeros(shape, dtype=dtype))
    with pytest.raises(IntegrityError, match="expected"):
        received.add_to(torch.zeros(shape, dtype=dtype))


def test_read_tensor_wants_exactly_one_t() -> None:
    for data in (encode({"a": torch.ones(1), "b": torch.ones(1)}), encode({}), encode({"a": torch.ones(1)})):
        with pytest.raises(IntegrityError, match="'t'"):
            read_tensor(data)


def test_read_tensor_requires_bytes() -> None:
    with pytest.raises(IntegrityError, match="bytearray"):
        read_tensor(bytearray(encode_tensor(torch.ones(1))))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b"", b"short", b"\xff" * 64, struct.pack("<Q", 4) + b"nope", struct.pack("<Q", 2) + b"[]"],
)
def test_read_tensor_rejects_garbage(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        read_tensor(data)


def test_read_tensor_rejects_truncated_or_padded_payloads() -> None:
    data = encode_tensor(torch.ones(100), {"key": "k"})
    for cut in (1, 7, 8, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(IntegrityError):
            read_tensor(data[:cut])
    with pytest.raises(IntegrityError):
        read_tensor(data + b"\0" * 4)


def test_read_tensor_rejects_corrupt_headers() -> None:
    def payload(entry: bytes, data: bytes = b"\0" * 8) -> bytes:
        header = b'{"t": ' + entry + b"}"
        header += b" " * (-len(header) % 8)
        return struct.pack("<Q", len(header)) + header + data

    for entry in (
        b'{"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}',  # shape needs 12 bytes
        b'{"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}',  # past the end
        b'{"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}',
        b'{"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}',
        b'{"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}',
        b'{"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}',
        b'{"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}',
        b'{"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}',
        b'{"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}',
        b'{"dtype": "F32", "shape": [2]}',
        b'{"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}',
        b'{"shape": [2], "data_offsets": [0, 8]}',
        b'"F32"',
    ):
        with pytest.raises(IntegrityError):
            read_tensor(payload(entry))
    ok = payload(b'{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}')
    out = torch.ones(2)
    read_tensor(ok).copy_to(out)
    assert out.tolist() == [0.0, 0.0]


# -- several values (what crosses a cut of a traced model) -----------------------------------------------------

def test_several_values_round_trip_in_order_with_their_dtypes() -> None:
    hidden, mask = torch.randn(2, 3, 4), torch.tensor([[1, 1, 0]], dtype=torch.int64)
    values = [hidden, 7, mask, None, torch.zeros(0, dtype=torch.bool), 0.25, True]
    decoded, _ = codec.decode_values(b"".join(codec.encode_values_parts(values, {"key": "k"})), len(values))
    assert len(decoded) == len(values)
    for got, sent in zip(decoded, values, strict=True):
        if isinstance(sent, torch.Tensor):
            assert isinstance(got, torch.Tensor) and got.dtype == sent.dtype and torch.equal(got, sent)
        else:
            assert got == sent and type(got) is type(sent)


def test_a_value_that_is_no_tensor_nor_number_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"value 1 is a dict .*tensors or plain ints, floats, bools or None"):
        codec.encode_values_parts([torch.zeros(1), {"a": 1}])
    with pytest.raises(ConfigError, match=r"value 0 is a float \(nan\)"):
        codec.encode_values_parts([float("nan")])


@pytest.mark.parametrize(("entries", "tensors", "count"), [
    ('["tensor", 3]', {"0": torch.zeros(1)}, 3),  # another count
    ('["tensor", 3]', {"1": torch.zeros(1)}, 2),  # the tensor under another index
    ('["tensor", "text"]', {"0": torch.zeros(1)}, 2),  # a string is no value
    ('{"0": "tensor"}', {"0": torch.zeros(1)}, 1),  # not a list
    ('[', {}, 1),  # not JSON
], ids=["count", "index", "string", "not a list", "not json"])
def test_a_values_header_that_does_not_match_its_tensors_is_refused(entries: str, tensors: dict[str, torch.Tensor],
                                                                    count: int) -> None:
    data = codec.encode(tensors, {codec.VALUES_FIELD: entries})
    with pytest.raises(IntegrityError):
        codec.decode_values(data, count)
