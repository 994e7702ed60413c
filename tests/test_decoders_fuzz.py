"""Every decoder of bytes read from storage, fuzzed: a value or IntegrityError, fast, in bounded memory.

The decoders: tensors (codec, and collectives' bound readers, with what a
receiver then does: copy and add), checkpoints, the signed model blob, and the
JSON objects (binding, the stop object, the metrics report, a serverless
call's status as the driver's watcher handles it). Each gets random bytes,
valid objects with flipped, cut or appended bytes, a valid tensor's
safetensors whose header lies (dtype, shape, offsets, names, metadata,
declared length), checkpoints with any optimizer header, and JSON of every
shape. Whatever it gets, it returns a value or raises IntegrityError (a named
funcpipe error): never another exception, never slowly (the deadline), and
never more Python memory (tracemalloc) than a small multiple of its input. The
tensor memory torch allocates is bounded by the checks these tests make: the
fast reader accepts and reads exactly what the safetensors reference does.
"""

from __future__ import annotations

import json
import math
import time
import tracemalloc
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from funcpipe import binding, checkpoint, codec, collectives, protocol, signed
from funcpipe.errors import IntegrityError
from funcpipe.executors.serverless import Timing, _Call, _Watcher
from funcpipe.storage import MemoryStorage

KEY = "job-b/a1/i00000002/act.s1.r0.m3"
OTHER = "job-a/a0/i00000002/act.s1.r0.m3"
SIGNING_KEY = signed.new_key()
STATUS = MemoryStorage(f"test-decoders-fuzz-{uuid.uuid4().hex}")  # where watch_status puts a status object
#: Python memory a decoder may allocate: a small multiple of its input, plus a constant.
MEMORY_FACTOR, MEMORY_SLACK = 8, 4 * 2**20  # the slack: other threads (Ray's) may allocate meanwhile

FUZZ = settings(
    max_examples=120,  # all seven properties in ~10 s on an idle 2-core machine
    deadline=timedelta(seconds=2),  # generous for a shared machine; a hang still fails
    database=None,  # no .hypothesis directory in the checkout
    # The same examples on every run: CI must not pass or fail by the draw. (Run with
    # --hypothesis-seed=N, or edit this, to explore further; a find becomes an @example.)
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def use_tensor(received: codec.TensorBytes) -> None:
    """What a receiver does with what read_tensor returns: copy it into a tensor of its dtype and shape,
    and add it there if it is floating point (gradient shares are)."""
    if math.prod(received.shape) > 2**20:
        raise AssertionError(f"read_tensor accepted a shape {received.shape} its bytes cannot hold")
    if any(size >= 2**63 for size in received.shape):  # no tensor has this shape: no receiver expects it
        return
    out = torch.zeros(received.shape, dtype=received.dtype)
    received.copy_to(out)
    if received.dtype.is_floating_point:
        received.add_to(out)
    if received.dtype != torch.float64:  # a receiver expecting another tensor is refused, too
        try:
            received.copy_to(torch.zeros(received.shape, dtype=torch.float64))
        except IntegrityError:
            pass
        else:
            raise AssertionError(f"a {received.dtype} tensor was copied into a float64 one")


def watch_status(data: bytes) -> None:
    """What the serverless driver's watcher does with a call's status object (_Watcher._check)."""
    STATUS.put(KEY, data)
    call = _Call("stage 0 replica 0", KEY, Future(), invoked=time.monotonic())
    _Watcher(poll_s=1.0)._check(call, STATUS, Timing())


def read_and_use(data: bytes) -> None:
    use_tensor(codec.read_tensor(data))


def bound_read_and_use(data: bytes) -> None:
    use_tensor(collectives.read_tensor(data, KEY))


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "codec.decode": codec.decode,
    "codec.decode_tensor": codec.decode_tensor,
    "codec.read_tensor": read_and_use,
    "collectives.decode_tensor": lambda data: collectives.decode_tensor(data, KEY),
    "collectives.read_tensor": bound_read_and_use,
    "checkpoint.decode_state": lambda data: checkpoint.decode_state(data, key=KEY),
    "checkpoint.decode_scheduler": lambda data: checkpoint.decode_scheduler(data, key=KEY),
    "collectives.decode_values": lambda data: collectives.decode_values(data, KEY, 3),
    "signed.unseal": lambda data: signed.unseal(data, SIGNING_KEY, name=KEY),
    "binding.decode_json": lambda data: binding.decode_json(data, KEY),
    "protocol.decode_stop": lambda data: protocol.decode_stop(data, KEY),
    "protocol.decode_metrics": lambda data: protocol.decode_metrics(data, KEY),
    "protocol.decode_norm": lambda data: protocol.decode_norm(data, KEY),
    "protocol.decode_abort": lambda data: protocol.decode_abort(data, KEY),
    "protocol.decode_status": lambda data: protocol.decode_status(data, KEY),
    "serverless status": lambda data: watch_status(data),
}


def check_every_decoder(data: bytes) -> None:
    for name, decode in DECODERS.items():
        tracemalloc.start()
        try:
            decode(data)
        except IntegrityError:
            pass  # ForeignObject included
        except Exception as exc:
            raise AssertionError(f"{name} raised {type(exc).__name__}: {exc} on {data[:200]!r}") from exc
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak <= MEMORY_FACTOR * len(data) + MEMORY_SLACK, f"{name} allocated {peak} bytes for {len(data)}"


# --------------------------------------------------------------------------- valid objects, and their mutations

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8,
          torch.bool, torch.complex64, torch.uint16]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    return torch.zeros(shape, dtype=torch.float64).uniform_(-3, 3).to(dtype)


def a_checkpoint(with_optimizer: bool, key: str) -> bytes:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1) if with_optimizer else None
    scheduler = None
    if optimizer is not None:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=5)
        module(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    return checkpoint.encode_state(module, optimizer, key=key, scheduler=scheduler)


# Made once: building them is slower than decoding them.
CHECKPOINTS = {(optimizer, key): a_checkpoint(optimizer, key) for optimizer in (False, True) for key in (KEY, OTHER)}
BLOBS = {key: signed.seal({"lr": 0.1, "layers": [1, 2]}, SIGNING_KEY, name=key) for key in (KEY, OTHER)}

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
#: Values the JSON decoders must not trip on: beyond float, beyond int64, bool for int, NaN...
ODD_VALUES = [10**400, -(10**400), 2**63, 2**64, -1, 0, True, None, "1", "", 0.5, math.nan, math.inf, [], {}]
#: What each JSON object funcpipe writes holds besides its key (metrics, stop, status).
JSON_FIELDS = ["loss", "squared", "iteration", "state", "beat", "cause", "traceback", "result"]


@st.composite
def json_objects(draw: st.DrawFn) -> bytes:
    """JSON objects with the fields the JSON decoders read, each of an odd or any value, bound to any key."""
    fields: dict[str, Any] = {}
    for name in JSON_FIELDS:
        if draw(st.integers(0, 3)):  # most objects have most fields
            if name == "state" and draw(st.booleans()):
                fields[name] = draw(st.sampled_from(["started", "running", "done", "failed", "stopped"]))
            else:
                fields[name] = draw(st.sampled_from(ODD_VALUES) if draw(st.booleans()) else JSON_VALUES)
    key = draw(st.sampled_from([KEY, KEY, KEY, OTHER, None, 3, ["k"]]))
    if key is not None:
        fields["key"] = key
    shape = draw(st.integers(0, 9))
    text = json.dumps(fields if shape > 1 else draw(JSON_VALUES))
    if shape == 0:  # nested deeper than the parser recurses
        depth = draw(st.sampled_from([10, 1_000, 100_000]))
        text = '{"loss": ' * depth + text + "}" * depth if draw(st.booleans()) else "[" * depth + text + "]" * depth
    return text.encode()


@st.composite
def valid_objects(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["tensor", "values", "checkpoint", "signed", "json"]))
    key = draw(st.sampled_from([KEY, OTHER]))
    if kind == "tensor":
        return codec.encode_tensor(draw(tensors()), {binding.FIELD: key})
    if kind == "values":  # what crosses a cut of several values: tensors, a size, no gradient
        values = [draw(tensors()), draw(st.sampled_from([3, None, 0.5, True])), draw(tensors())]
        return b"".join(codec.encode_values_parts(values, {binding.FIELD: key}))
    if kind == "checkpoint":
        return CHECKPOINTS[draw(st.booleans()), key]
    if kind == "signed":
        return BLOBS[key]
    return draw(json_objects())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid object of any kind with a few bytes flipped, cut or added."""
    data = bytearray(draw(valid_objects()))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["flip", "cut-tail", "append", "truncate", "length"]))
        if how == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut-tail":  # the header intact, the data short
            del data[len(data) - draw(st.integers(1, min(16, max(1, len(data))))):]
        elif how == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif how == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif how == "length" and len(data) >= 8:  # the safetensors header length, or JSON's first bytes
            data[:8] = draw(st.sampled_from([0, 1, 7, len(data), 2**31, 2**63 - 1, 2**64 - 1])).to_bytes(8, "little")
    return bytes(data)


# --------------------------------------------------------------------------- safetensors headers that lie

DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
               "C64", "F8_E4M3", "F8_E5M2", "F4", "X9", "", "f32"]
HUGE = [2**31, 2**32 + 1, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -1, -(2**63)]


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    """A valid tensor's safetensors whose header then lies in a field or two (dtype, shape, offsets,
    names, metadata, declared length) and whose data may be cut short or run long."""
    data = codec.encode_tensor(draw(tensors()), {binding.FIELD: draw(st.sampled_from([KEY, OTHER]))})
    start = 8 + int.from_bytes(data[:8], "little")
    header: dict[str, Any] = json.loads(data[8:start])
    body = data[start:]
    entry: dict[str, Any] = header["t"]
    for _ in range(draw(st.integers(0, 3))):
        lie = draw(st.sampled_from(["dtype", "shape", "offsets", "name", "extra", "metadata", "entry"]))
        if lie == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPE_NAMES) | JSON_VALUES)
        elif lie == "shape":
            entry["shape"] = draw(
                st.lists(st.integers(0, 8) | st.sampled_from(HUGE), max_size=4)
                | st.permutations(entry["shape"]) if isinstance(entry.get("shape"), list) else JSON_VALUES
            )
        elif lie == "offsets":
            bound = st.integers(0, len(body) + 8) | st.sampled_from(HUGE)
            entry["data_offsets"] = draw(st.lists(bound, min_size=2, max_size=2) | st.lists(bound, max_size=3)
                                         | JSON_VALUES)
        elif lie == "name":
            header[draw(st.sampled_from(["x", "T", "", "__metadata__"]))] = header.pop("t", entry)
        elif lie == "extra":
            header[draw(st.sampled_from(["u", "model.w"]))] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
        elif lie == "metadata":
            header["__metadata__"] = draw(
                st.dictionaries(st.sampled_from(["key", "optimizer", "k"]), st.sampled_from([KEY, OTHER]) | JSON_VALUES,
                                max_size=3)
                | JSON_VALUES
            )
        elif lie == "entry":
            header["t"] = draw(JSON_VALUES)
    text = json.dumps(header).encode()
    text += b" " * draw(st.sampled_from([-len(text) % 8, 0, 1]))  # aligned, or not
    length = draw(st.sampled_from([len(text)] * 3 + [len(text) - 1, len(text) + 1, 2**63 - 1, 2**64 - 1]))
    cut = draw(st.sampled_from([0, 0, 0, 1, 4, len(body)]))
    body = body[: len(body) - cut] + draw(st.sampled_from([b"", b"", b"", b"\0", bytes(8)]))
    return max(length, 0).to_bytes(8, "little") + text + body


@st.composite
def checkpoints(draw: st.DrawFn) -> bytes:
    """Well-formed safetensors holding a checkpoint whose optimizer header and tensor names are anything."""
    names = draw(st.lists(
        st.sampled_from(["model.0.weight", "optim.0.exp_avg", "optim.1.step", "optim.x.step", "optim.0", "optim."])
        | st.text(max_size=12),
        max_size=4, unique=True,
    ).filter(lambda names: "__metadata__" not in names))
    header = {
        "param_groups": draw(JSON_VALUES | st.lists(st.dictionaries(st.sampled_from(["params", "lr"]), JSON_VALUES))),
        "plain": draw(JSON_VALUES | st.dictionaries(st.sampled_from(["0", "1", "x", "-1", " 2"]), JSON_VALUES)),
    }
    if draw(st.booleans()):
        del header[draw(st.sampled_from(sorted(header)))]
    optimizer = json.dumps(header) if draw(st.integers(0, 9)) else json.dumps(draw(JSON_VALUES))
    return codec.encode({name: torch.ones(2) for name in names}, {binding.FIELD: KEY, "optimizer": optimizer})


# --------------------------------------------------------------------------- the properties


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    check_every_decoder(data)


def layout(header: dict[str, Any], body: bytes = b"") -> bytes:
    """Safetensors bytes of ``header`` (padded to 8 bytes) and ``body``."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


# Every @example below is a case a decoder once got wrong (or would, without the check it tests).
TENSOR = codec.encode_tensor(torch.arange(4.0), {binding.FIELD: KEY})


@FUZZ
@given(mutated())
@example(TENSOR[:-1])  # data cut short: read_tensor must not view past the end
def test_valid_objects_with_flipped_truncated_or_appended_bytes(data: bytes) -> None:
    check_every_decoder(data)


@FUZZ
@given(safetensors_bytes())
def test_safetensors_headers_that_lie(data: bytes) -> None:
    check_every_decoder(data)


@FUZZ
@given(checkpoints())
@example(codec.encode({"model.w": torch.ones(2)}, {binding.FIELD: KEY, "optimizer": '{"param_groups":[],"plain":[]}'}))
def test_checkpoints_with_any_optimizer_header(data: bytes) -> None:
    check_every_decoder(data)


@FUZZ
@given(json_objects())
@example(b"[" * 100_000)  # RecursionError, not ValueError
@example(binding.encode_json(KEY, {"loss": 10**400}))  # OverflowError in float()
@example(binding.encode_json(KEY, {"state": "started"}))  # a status without its beat
def test_json_of_every_shape(data: bytes) -> None:
    check_every_decoder(data)


def outcome(decode: Callable[[bytes], Any], data: bytes) -> Any:
    """``decode``'s tensor as (dtype, shape, bytes), or ``"refused"``."""
    try:
        tensor = decode(data)
    except IntegrityError:
        return "refused"
    if isinstance(tensor, codec.TensorBytes):
        if any(size >= 2**63 for size in tensor.shape):
            return (tensor.dtype, tensor.shape, "no tensor can hold it")
        out = torch.zeros(tensor.shape, dtype=tensor.dtype)
        tensor.copy_to(out)
        tensor = out
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:  # any non-zero byte is True: safetensors keeps the byte, a copy makes it 1
        flat = flat.view(torch.uint8).ne(0)
    return (tensor.dtype, tuple(tensor.shape), flat.view(torch.uint8).tolist())


@FUZZ
@given(mutated() | safetensors_bytes())
@example(TENSOR + b"\0")  # trailing bytes: safetensors refuses them
@example(layout({"t": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}))  # no tensor, beyond u64
@example(layout({"t": {"dtype": "BOOL", "shape": [], "data_offsets": [0, 1]}}, b"\xfe"))  # a bool byte not 0 or 1
def test_read_tensor_accepts_and_reads_what_safetensors_does(data: bytes) -> None:
    """read_tensor (and decode_tensor, built on it) parse the header themselves (no copy): they must
    agree with the reference parser, safetensors' own (codec.decode)."""
    assert outcome(codec.read_tensor, data) == outcome(safetensors_single_tensor, data)
    assert outcome(lambda data: codec.decode_tensor(data)[0], data) == outcome(safetensors_single_tensor, data)


def safetensors_single_tensor(data: bytes) -> torch.Tensor:
    """The reference: safetensors' parser, and exactly one tensor named "t"."""
    tensors, _ = codec.decode(data)
    if tensors.keys() != {codec.TENSOR_NAME}:
        raise IntegrityError(f"not one tensor named {codec.TENSOR_NAME!r}: {sorted(tensors)}")
    return tensors[codec.TENSOR_NAME]


@FUZZ
@given(mutated() | safetensors_bytes(), st.binary(min_size=1, max_size=64))
@example(TENSOR[:-1], TENSOR[-1:])  # the tensor's last byte lies just past the view's end
def test_a_view_reads_as_its_bytes_and_never_past_its_end(data: bytes, beyond: bytes) -> None:
    """Authenticated storage hands readers a view of the stored bytes without their tag (wait_view):
    a view of ``data`` inside a larger buffer must read exactly as ``data`` itself, never the bytes beyond it."""
    view = memoryview(b"<" + data + beyond)[1 : 1 + len(data)]
    assert outcome(codec.read_tensor, view) == outcome(codec.read_tensor, data)
    assert outcome(lambda data: codec.decode_tensor(data)[0], view) == outcome(safetensors_single_tensor, data)
    assert outcome(lambda data: collectives.decode_tensor(data, KEY), view) == outcome(
        lambda data: collectives.decode_tensor(data, KEY), data)


def test_a_declared_length_is_never_allocated() -> None:
    """Headers declaring up to 2**64-1 header bytes, or a tensor of 2**62 elements, over a few real bytes."""
    for length in (2**31, 2**63 - 1, 2**64 - 1):
        check_every_decoder(length.to_bytes(8, "little") + b'{"t":{}}')
    for shape, size in (([2**62], 4), ([2**31, 2**31], 4), ([0, 2**62], 4), ([0, 2**62], 0), ([0, 2**64 - 1], 0)):
        check_every_decoder(layout({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, size]}}, bytes(size)))
