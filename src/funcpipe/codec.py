"""Tensors to bytes and back as safetensors; nothing read from storage is unpickled."""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from funcpipe.errors import ConfigError, IntegrityError
from funcpipe.storage.base import Buffer  # bytes, or a read-only view of them: the readers here take either

__all__ = [
    "TensorBytes", "decode", "decode_tensor", "decode_values", "dtype_name", "dtype_of", "encode", "encode_parts",
    "encode_tensor",
    "encode_tensor_parts", "encode_values_parts", "read_metadata", "read_tensor",
]

#: The name :func:`encode_tensor` stores its single tensor under.
TENSOR_NAME = "t"

_METADATA_KEY = "__metadata__"
# safetensors refuses headers above 100 MB; checking first keeps a hostile
# length from making us slice a huge buffer.
_MAX_HEADER_BYTES = 100_000_000

# The dtypes encode() lays out itself, by safetensors name; others go through safetensors.
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (``"F32"``, ``"I64"``, ...).

    Raises:
        ConfigError: a dtype funcpipe does not store (complex, float8, unsigned beyond uint8).
    """
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise ConfigError(f"tensors of {dtype} cannot be stored; hint: one of "
                          f"{', '.join(str(d) for d in _DTYPE_NAMES)}")
    return name


def dtype_of(name: str) -> torch.dtype:
    """The dtype of a safetensors name :func:`dtype_name` gave.

    Raises:
        IntegrityError: not one of them (what storage held was not written by funcpipe).
    """
    dtype = _DTYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise IntegrityError(f"unknown tensor dtype {name!r}")
    return dtype


# safetensors stores little-endian; on a big-endian host let safetensors byte-swap.
_LITTLE_ENDIAN = sys.byteorder == "little"

# torch warns once per process, on the first tensor made over read-only memory, that
# writing to it would be undefined. TensorBytes reads through such tensors (views of
# bytes from storage) and never writes or hands them out; take that one warning here,
# at import, rather than in some worker thread (where a filter turning warnings into
# errors would fail the transfer).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(bytes(1), dtype=torch.uint8)


def encode(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialize named tensors, plus string metadata, into safetensors bytes: :func:`encode_parts`, joined."""
    parts = encode_parts(tensors, metadata)
    return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)


def encode_parts(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> list[Buffer]:
    """Serialize named tensors, plus string metadata, into the pieces of safetensors bytes.

    The pieces, one after another, are the bytes (:func:`encode` joins them). The
    tensors' pieces are views of their memory, read when the pieces are joined
    (:meth:`funcpipe.storage.base.Storage.put_parts`, in the object's one copy):
    the tensors must not change until then.

    Tensors are detached, moved to the CPU and made contiguous. Tensors may
    be views of one another. The tensor data is copied once, straight into
    the result: the layout (8-byte little-endian header length, JSON header
    padded to 8 bytes, tensor data sorted by element size then name so every
    tensor is aligned) is written here, because safetensors' own serializer
    is ~40x slower on megabyte tensors. Dtypes outside the common set go
    through ``safetensors.torch.save``.

    Args:
        tensors: name -> tensor; names are any strings but ``"__metadata__"``.
        metadata: string -> string, returned by :func:`decode`.

    Raises:
        ConfigError: a name, tensor or metadata entry cannot be encoded.
    """
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise ConfigError(
                f"cannot encode a tensor named {name!r}: names are strings other than {_METADATA_KEY!r}"
            )
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"cannot encode {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise ConfigError(
                f"cannot encode {name!r}: {tensor.layout} tensors are not supported; call .to_dense() first"
            )
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        prepared[name] = t.resolve_conj().resolve_neg().contiguous()  # each a no-op if already so

    meta: dict[str, str] = {}
    if metadata:
        meta = dict(metadata)
        for key, value in meta.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError(
                    f"metadata must map str to str, got {key!r}: {value!r} "
                    f"({type(key).__name__}: {type(value).__name__})"
                )
    if _LITTLE_ENDIAN and all(t.dtype in _DTYPE_NAMES for t in prepared.values()):
        return _serialize(prepared, meta)
    return [_serialize_with_safetensors(prepared, meta)]


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[Buffer]:
    # Sorted metadata keys: the same inputs always give the same bytes.
    header: dict[str, object] = {_METADATA_KEY: dict(sorted(metadata.items()))} if metadata else {}
    chunks: list[Buffer] = []
    offset = 0
    # Larger elements first: every tensor then starts at a multiple of its element size.
    for name, t in sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0])):
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        if nbytes:
            # A zero-copy uint8 view of the tensor's memory, for the buffer protocol.
            chunks.append(t.reshape(-1).view(torch.uint8).numpy().data)
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"cannot encode a tensor name or metadata as UTF-8: {exc}") from exc
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data is 8-aligned
    return [len(text).to_bytes(8, "little"), text, *chunks]


def _serialize_with_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    # safetensors refuses tensors whose memory overlaps another's: clone those.
    unshared: dict[str, torch.Tensor] = {}
    taken: dict[int, list[tuple[int, int]]] = {}  # storage address -> byte ranges already used
    for name, t in tensors.items():
        if t.numel():
            start = t.data_ptr()
            end = start + t.numel() * t.element_size()
            ranges = taken.setdefault(t.untyped_storage().data_ptr(), [])
            if any(s < end and start < e for s, e in ranges):
                t = t.clone()
            else:
                ranges.append((start, end))
        unshared[name] = t
    try:
        return _st_save(unshared, metadata=metadata or None)
    except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        summary = {name: f"{t.dtype} {tuple(t.shape)}" for name, t in tensors.items()}
        raise ConfigError(f"safetensors cannot encode {summary}: {exc}") from exc


def decode(data: Buffer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata from :func:`encode`'s bytes (safetensors' own parser; a view is copied first).

    The tensors are fresh, writable CPU tensors that do not share memory
    with ``data``.

    Returns:
        ``(tensors, metadata)``; metadata is ``{}`` when none was written.

    Raises:
        IntegrityError: ``data`` is not well-formed safetensors (truncated,
            corrupted, or something else entirely, such as a pickle).
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, bytes):
        raise IntegrityError(f"cannot decode a {type(data).__name__}: expected bytes from storage")
    metadata = _read_metadata(data)
    try:
        tensors = _st_load(data)
    except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError, AssertionError) as exc:
        raise IntegrityError(f"corrupt safetensors payload ({len(data)} bytes): {exc}") from exc
    return tensors, metadata


def encode_tensor(tensor: torch.Tensor, metadata: Mapping[str, str] | None = None) -> bytes:
    """:func:`encode` one tensor (stored under the name ``"t"``)."""
    return encode({TENSOR_NAME: tensor}, metadata)


def encode_tensor_parts(tensor: torch.Tensor, metadata: Mapping[str, str] | None = None) -> list[Buffer]:
    """:func:`encode_parts` of one tensor (stored under the name ``"t"``)."""
    return encode_parts({TENSOR_NAME: tensor}, metadata)


def decode_tensor(data: Buffer) -> tuple[torch.Tensor, dict[str, str]]:
    """Bytes written by :func:`encode_tensor`: a fresh, writable tensor and the metadata.

    :func:`read_tensor`'s checks, then one copy of the elements out of ``data``.

    Raises:
        IntegrityError: ``data`` is malformed or does not hold exactly one
            tensor named ``"t"``.
    """
    received = read_tensor(data)
    return received.to_tensor(), received.metadata


#: The metadata entry of :func:`encode_values_parts`: what each value is, in order (JSON).
VALUES_FIELD = "values"
#: Its entry for a value that is a tensor (stored under the value's index, ``"0"``, ``"1"``...).
_TENSOR_ENTRY = "tensor"
#: What a value that is not a tensor may be: what JSON holds exactly (a symbolic size is an int).
_PLAIN = (bool, int, float, type(None))


def encode_values_parts(values: Sequence[Any], metadata: Mapping[str, str] | None = None) -> list[Buffer]:
    """:func:`encode_parts` of several values: tensors, Python numbers, bools and ``None``s, in order.

    A tensor is stored under its index (``"0"``, ``"1"``...); the metadata entry
    :data:`VALUES_FIELD` lists every value, ``"tensor"`` for a tensor and the value
    itself otherwise, so :func:`decode_values` gives back the same sequence
    (``None`` also stands for a value that has nothing to send, such as a missing gradient).

    Raises:
        ConfigError: a value is neither a tensor nor a plain number, bool or ``None``.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries: list[Any] = []
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            tensors[str(i)] = value
            entries.append(_TENSOR_ENTRY)
        elif isinstance(value, _PLAIN) and not (isinstance(value, float) and not math.isfinite(value)):
            entries.append(value)
        else:
            raise ConfigError(
                f"value {i} is a {type(value).__name__} ({value!r:.80}); what crosses a stage boundary must be "
                "tensors or plain ints, floats, bools or None; hint: move the cut so that the object stays "
                "inside one stage (cuts=[...] or funcpipe.split.mark_cut)"
            )
    meta = dict(metadata or {})
    meta[VALUES_FIELD] = json.dumps(entries, separators=(",", ":"))
    return encode_parts(tensors, meta)


def decode_values(data: Buffer, count: int) -> tuple[tuple[Any, ...], dict[str, str]]:
    """The ``count`` values :func:`encode_values_parts` wrote, tensors fresh and writable; and the metadata.

    Raises:
        IntegrityError: ``data`` is malformed, or does not hold ``count`` values as
            :func:`encode_values_parts` lays them out.
    """
    tensors, metadata = decode(data)
    try:
        entries = json.loads(metadata.get(VALUES_FIELD, "null"))
    except ValueError as exc:
        raise IntegrityError(f"the {VALUES_FIELD!r} entry is not JSON: {exc}") from exc
    if not isinstance(entries, list) or len(entries) != count:
        raise IntegrityError(f"expected {count} values, the {VALUES_FIELD!r} entry is {entries!r:.200}")
    wanted = {str(i) for i, e in enumerate(entries) if e == _TENSOR_ENTRY}
    if set(tensors) != wanted or any(not isinstance(e, _PLAIN) and e != _TENSOR_ENTRY for e in entries):
        raise IntegrityError(f"values {entries!r:.200} do not match the tensors {sorted(tensors)!r:.200}")
    return tuple(tensors[str(i)] if e == _TENSOR_ENTRY else e for i, e in enumerate(entries)), metadata


def _decode_one(data: Buffer) -> tuple[torch.Tensor, dict[str, str]]:
    """:func:`decode` (safetensors' parser) of bytes that must hold exactly one tensor named ``"t"``."""
    tensors, metadata = decode(data)
    if tensors.keys() != {TENSOR_NAME}:
        raise IntegrityError(f"expected a single tensor named {TENSOR_NAME!r}, found {sorted(tensors)}")
    return tensors[TENSOR_NAME], metadata


class TensorBytes:
    """The tensor in :func:`encode_tensor`'s bytes, checked but not copied out of them.

    :meth:`copy_to` and :meth:`add_to` read the elements straight from the
    bytes into a tensor the caller owns: receiving this way allocates no
    tensor (:func:`decode_tensor` allocates one, which the caller would then
    copy or add from). Made by :func:`read_tensor`.
    """

    __slots__ = ("_data", "_offset", "_tensor", "dtype", "metadata", "shape")

    def __init__(
        self,
        metadata: dict[str, str],
        dtype: torch.dtype,
        shape: tuple[int, ...],
        *,
        data: Buffer = b"",
        offset: int = 0,
        tensor: torch.Tensor | None = None,
    ) -> None:
        self.metadata = metadata
        self.dtype = dtype
        self.shape = shape
        self._data = data
        self._offset = offset
        self._tensor = tensor  # set when the tensor had to be decoded (a dtype laid out by safetensors)

    def copy_to(self, out: torch.Tensor) -> None:
        """``out.copy_(tensor)``.

        Raises:
            IntegrityError: ``out`` has another dtype or shape than the stored tensor.
        """
        out.copy_(self._source(out))

    def add_to(self, out: torch.Tensor) -> None:
        """``out.add_(tensor)``: the same operation, so the same bits, as adding the decoded tensor.

        Raises:
            IntegrityError: ``out`` has another dtype or shape than the stored tensor.
        """
        out.add_(self._source(out))

    def to_tensor(self) -> torch.Tensor:
        """The tensor, as a fresh writable one of its own (one copy out of the bytes)."""
        if self._tensor is not None:
            return self._tensor
        if any(size >= 2**63 for size in self.shape):  # no elements, but a size torch cannot hold
            raise IntegrityError(f"no tensor can have the shape {self.shape} (a size beyond 2**63 - 1)")
        out = torch.empty(self.shape, dtype=self.dtype)
        self.copy_to(out)
        return out

    def _source(self, out: torch.Tensor) -> torch.Tensor:
        if out.dtype != self.dtype or tuple(out.shape) != self.shape:
            raise IntegrityError(
                f"received a {self.dtype} tensor of shape {self.shape} where a {out.dtype} "
                f"tensor of shape {tuple(out.shape)} was expected"
            )
        if self._tensor is not None:
            return self._tensor
        numel = math.prod(self.shape)
        if not numel:
            return torch.empty(self.shape, dtype=self.dtype)
        # A read-only view of the bytes: only ever read, and it never leaves this object.
        view = torch.frombuffer(self._data, dtype=self.dtype, count=numel, offset=self._offset)
        return view.view(self.shape)


def read_tensor(data: Buffer) -> TensorBytes:
    """Check bytes written by :func:`encode_tensor` and return the tensor in them, uncopied.

    The header is checked as strictly as safetensors checks it (one tensor
    named ``"t"``, a known dtype, a shape whose size is exactly the bytes
    after the header); nothing is unpickled. Dtypes that :func:`encode`
    leaves to safetensors, and any host that is not little-endian, are
    decoded by safetensors instead (one copy).

    Raises:
        IntegrityError: ``data`` is malformed or does not hold exactly one
            tensor named ``"t"``.
    """
    if not isinstance(data, (bytes, memoryview)):
        raise IntegrityError(f"cannot decode a {type(data).__name__}: expected bytes from storage")
    header, start = _read_header(data)
    metadata = _metadata_of(header)
    names = sorted(name for name in header if name != _METADATA_KEY)
    if names != [TENSOR_NAME]:
        raise IntegrityError(f"expected a single tensor named {TENSOR_NAME!r}, found {names}")
    entry = header[TENSOR_NAME]
    name = entry.get("dtype") if isinstance(entry, dict) else None
    dtype = _DTYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None or not _LITTLE_ENDIAN:
        tensor, metadata = _decode_one(data)
        return TensorBytes(metadata, tensor.dtype, tuple(tensor.shape), tensor=tensor)
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    # Sizes are u64 in safetensors: it refuses larger ones (only a shape with a zero has them and no bytes).
    if not isinstance(shape, list) or not all(type(size) is int and 0 <= size < 2**64 for size in shape):
        raise IntegrityError(f"corrupt safetensors header: tensor {TENSOR_NAME!r} has shape {shape!r:.200}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(offset) is int for offset in offsets)
        or offsets != [0, nbytes]
        or start + nbytes != len(data)
    ):
        raise IntegrityError(
            f"corrupt safetensors payload ({len(data)} bytes): tensor {TENSOR_NAME!r} of shape {shape} "
            f"and dtype {name} needs {nbytes} data bytes after the {start}-byte header, "
            f"data_offsets are {offsets!r:.200}"
        )
    if start % itemsize:  # unaligned (not our writer's layout): let safetensors copy it out
        tensor, metadata = _decode_one(data)
        return TensorBytes(metadata, tensor.dtype, tuple(tensor.shape), tensor=tensor)
    return TensorBytes(metadata, dtype, tuple(shape), data=data, offset=start)


def read_metadata(data: Buffer) -> dict[str, str]:
    """The metadata of safetensors bytes, from their header alone (nothing else is decoded).

    Raises:
        IntegrityError: the header is malformed.
    """
    return _read_metadata(data)


def _read_metadata(data: Buffer) -> dict[str, str]:
    """Parse the header (8-byte little-endian length + JSON) and return its metadata."""
    return _metadata_of(_read_header(data)[0])


def _read_header(data: Buffer) -> tuple[dict[str, Any], int]:
    """Parse the header (8-byte little-endian length + JSON); return it and where the data starts."""
    if len(data) < 8:
        raise IntegrityError(
            f"truncated safetensors payload: {len(data)} bytes, need at least 8 for the header length"
        )
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8 or length > _MAX_HEADER_BYTES:
        raise IntegrityError(
            f"not a safetensors payload: header length {length} exceeds the "
            f"{len(data) - 8} bytes that follow (truncated, or not safetensors)"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + length]))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise IntegrityError(f"not a safetensors payload: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise IntegrityError(
            f"not a safetensors payload: header is a JSON {type(header).__name__}, not an object"
        )
    return header, 8 + length


def _metadata_of(header: dict[str, Any]) -> dict[str, str]:
    metadata = header.get(_METADATA_KEY)
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise IntegrityError(
            f"corrupt safetensors header: {_METADATA_KEY!r} must map str to str, got {metadata!r:.200}"
        )
    return metadata
