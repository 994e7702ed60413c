"""collectives: Comm point-to-point and the two scatter-reduce all-reduce algorithms."""

from __future__ import annotations

import builtins
import collections
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from funcpipe import codec
from funcpipe.collectives import Comm, all_reduce
from funcpipe.errors import ConfigError, ForeignObject, IntegrityError
from funcpipe.protocol import SYNC_ALGORITHMS as ALGORITHMS
from funcpipe.protocol import JobKeys, piece_count
from funcpipe.storage import MemoryStorage, Storage, WaitCancelled

WORLDS = [1, 2, 3, 4, 5]
SIZES = [1, 7, 13, 101, 10_007]
STAGE = 2
ITERATION = 3
COMM_TIMEOUT_S = 10.0  # a lost object fails the test with ObjectNotFound instead of hanging
THREAD_TIMEOUT_S = 60.0
GATE_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- fixtures and fakes


@pytest.fixture
def memory() -> Iterator[MemoryStorage]:
    storage = MemoryStorage(f"test-collectives-{uuid.uuid4().hex}")
    yield storage
    storage.clear()


@pytest.fixture
def keys() -> JobKeys:
    return JobKeys(f"job-{uuid.uuid4().hex[:8]}", attempt=1)


class Wrapper(Storage):
    """Delegates every primitive to ``inner``; subclasses observe or gate requests."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.url = inner.url
        self.poll_initial_s = inner.poll_initial_s
        self.poll_max_s = inner.poll_max_s

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_if_exists(self, key: str) -> bytes | None:
        return self.inner.get_if_exists(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, keys: Iterable[str]) -> None:
        self.inner.delete(keys)

    def list(self, prefix: str) -> builtins.list[str]:
        return self.inner.list(prefix)


class CountingStorage(Wrapper):
    """Records every upload and every download that returned an object (polls that miss are not downloads)."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.lock = threading.Lock()
        self.uploads: builtins.list[tuple[str, bytes]] = []
        self.downloads: builtins.list[tuple[str, bytes]] = []

    def put(self, key: str, data: bytes) -> None:
        super().put(key, data)
        with self.lock:
            self.uploads.append((key, bytes(data)))

    def get(self, key: str) -> bytes:
        data = super().get(key)
        with self.lock:
            self.downloads.append((key, data))
        return data

    def get_if_exists(self, key: str) -> bytes | None:
        data = super().get_if_exists(key)
        if data is not None:
            with self.lock:
                self.downloads.append((key, data))
        return data


class UntouchableStorage(Storage):
    """Fails on any request at all."""

    url = "untouchable://"

    def put(self, key: str, data: bytes) -> None:
        raise AssertionError(f"put({key!r}) on storage that must not be touched")

    def get(self, key: str) -> bytes:
        raise AssertionError(f"get({key!r}) on storage that must not be touched")

    def get_if_exists(self, key: str) -> bytes | None:
        raise AssertionError(f"get_if_exists({key!r}) on storage that must not be touched")

    def exists(self, key: str) -> bool:
        raise AssertionError(f"exists({key!r}) on storage that must not be touched")

    def delete(self, keys: Iterable[str]) -> None:
        raise AssertionError("delete() on storage that must not be touched")

    def list(self, prefix: str) -> builtins.list[str]:
        raise AssertionError("list() on storage that must not be touched")


Event = tuple[str, str, int, str]  # (op "put"/"get", phase "start"/"end", replica, key)


class EventLog:
    """The global order of request starts and ends across all replicas."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[Event] = []

    def record(self, op: str, phase: str, replica: int, key: str) -> None:
        with self.lock:
            self.events.append((op, phase, replica, key))

    def index(self, predicate: Callable[[Event], bool], *, last: bool = False) -> int:
        matches = [i for i, event in enumerate(self.events) if predicate(event)]
        assert matches, "no recorded event matches"
        return matches[-1] if last else matches[0]


class RecordingStorage(Wrapper):
    """Logs the start and end of every put and every poll of one replica.

    With ``gate`` set, a put of a gradient share (a ``chunk`` key) does not
    start until this replica has started polling for a chunk; if that never
    happens within ``GATE_TIMEOUT_S`` the put fails (and so the test),
    rather than hang.
    """

    def __init__(self, inner: Storage, log: EventLog, replica: int, *, gate: bool) -> None:
        super().__init__(inner)
        self.log = log
        self.replica = replica
        self.gate = gate
        self.first_chunk_get = threading.Event()

    def put(self, key: str, data: bytes) -> None:
        if self.gate and is_chunk(key) and not self.first_chunk_get.wait(GATE_TIMEOUT_S):
            raise AssertionError(
                f"replica {self.replica}: put({key!r}) waited {GATE_TIMEOUT_S} s for a chunk "
                "download to start; uploads and downloads are not overlapped"
            )
        self.log.record("put", "start", self.replica, key)
        super().put(key, data)
        self.log.record("put", "end", self.replica, key)

    def get_if_exists(self, key: str) -> bytes | None:
        self.log.record("get", "start", self.replica, key)
        if is_chunk(key):
            self.first_chunk_get.set()
        data = super().get_if_exists(key)
        self.log.record("get", "end" if data is not None else "miss", self.replica, key)
        return data


def is_chunk(key: str) -> bool:
    return "/chunk." in key


def is_merged(key: str) -> bool:
    return "/merged." in key


# --------------------------------------------------------------------------- running replicas


def make_comm(
    storage: Storage, cancelled: Callable[[], bool] | None = None, *, timeout_s: float = COMM_TIMEOUT_S
) -> Comm:
    return Comm(
        storage,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-upload"),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-download"),
        timeout_s,
        cancelled,
    )


def close_comm(comm: Comm) -> None:
    comm.upload.shutdown(wait=True)
    comm.download.shutdown(wait=True)


def run_replicas(
    storages: Sequence[Storage],
    inputs: Sequence[torch.Tensor],
    keys: JobKeys,
    algorithm: str,
    iteration: int = ITERATION,
) -> list[torch.Tensor]:
    """Run one all_reduce per replica, each in its own thread with its own Comm."""
    world = len(inputs)

    def replica(rank: int) -> torch.Tensor:
        comm = make_comm(storages[rank])
        try:
            return all_reduce(  # in place: a copy, so the inputs stay the reference
                comm, inputs[rank].clone(), keys=keys, iteration=iteration, stage=STAGE,
                rank=rank, world=world, algorithm=algorithm,
            )
        finally:
            close_comm(comm)

    with ThreadPoolExecutor(max_workers=world, thread_name_prefix="test-replica") as pool:
        futures = [pool.submit(replica, rank) for rank in range(world)]
        return [future.result(timeout=THREAD_TIMEOUT_S) for future in futures]


def integer_inputs(world: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """Integer-valued float64: every summation order gives the exact same sum."""
    generator = torch.Generator().manual_seed(seed + 1000 * world + size)
    return [torch.randint(-1000, 1000, (size,), generator=generator).double() for _ in range(world)]


def own_chunk_size(size: int, world: int, rank: int) -> int:
    """Balanced split, the first ``size % world`` chunks one element longer (tensor_split)."""
    return size // world + (1 if rank < size % world else 0)


def assert_bitwise_equal(results: Sequence[torch.Tensor]) -> None:
    first = results[0]
    for rank, result in enumerate(results[1:], start=1):
        assert result.dtype == first.dtype and result.shape == first.shape
        assert torch.equal(result.view(torch.uint8), first.view(torch.uint8)), f"replica {rank} differs"


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("world", WORLDS)
def test_every_replica_gets_the_exact_sum(
    memory: MemoryStorage, keys: JobKeys, world: int, size: int, algorithm: str
) -> None:
    inputs = integer_inputs(world, size)
    expected = torch.stack(inputs).sum(0)
    results = run_replicas([memory] * world, inputs, keys, algorithm)
    for rank, result in enumerate(results):
        assert result.dtype == torch.float64
        assert torch.equal(result, expected), f"replica {rank}"
    assert_bitwise_equal(results)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_float32_sum_is_close_to_the_reference_and_identical_everywhere(
    memory: MemoryStorage, keys: JobKeys, algorithm: str
) -> None:
    generator = torch.Generator().manual_seed(7)
    inputs = [torch.randn(1009, generator=generator) for _ in range(4)]
    results = run_replicas([memory] * 4, inputs, keys, algorithm)
    expected = torch.stack(inputs).sum(0)
    for result in results:
        assert result.dtype == torch.float32
        torch.testing.assert_close(result, expected)
    assert_bitwise_equal(results)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("world", [2, 3, 5])
def test_each_replicas_own_chunk_is_included(
    memory: MemoryStorage, keys: JobKeys, world: int, algorithm: str
) -> None:
    size = 11
    for hot in range(world):
        inputs = [torch.zeros(size, dtype=torch.float64) for _ in range(world)]
        inputs[hot] = torch.arange(1.0, size + 1, dtype=torch.float64)
        results = run_replicas([memory] * world, inputs, keys, algorithm, iteration=hot)
        for rank, result in enumerate(results):
            assert torch.equal(result, torch.arange(1.0, size + 1, dtype=torch.float64)), (
                f"hot replica {hot}, result of replica {rank}"
            )


def test_replicas_do_not_modify_their_input(memory: MemoryStorage, keys: JobKeys) -> None:
    inputs = integer_inputs(3, 13)
    copies = [tensor.clone() for tensor in inputs]
    run_replicas([memory] * 3, inputs, keys, "pipelined")
    for tensor, copy in zip(inputs, copies, strict=True):
        assert torch.equal(tensor, copy)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(("world", "size"), [(3, 13), (4, 7), (5, 10_007), (5, 3)])
def test_chunks_are_balanced(
    memory: MemoryStorage, keys: JobKeys, world: int, size: int, algorithm: str
) -> None:
    run_replicas([memory] * world, integer_inputs(world, size), keys, algorithm)
    chunk_prefix = keys.iteration_prefix(ITERATION) + "chunk."
    expected_keys = sorted(
        keys.chunk(ITERATION, STAGE, owner, sender)
        for owner in range(world)
        for sender in range(world)
        if owner != sender
    )
    assert memory.list(chunk_prefix) == expected_keys
    sizes_by_owner: dict[int, set[int]] = collections.defaultdict(set)
    for owner in range(world):
        for sender in range(world):
            if sender != owner:
                tensor, _ = codec.decode_tensor(memory.get(keys.chunk(ITERATION, STAGE, owner, sender)))
                sizes_by_owner[owner].add(tensor.numel())
        merged, _ = codec.decode_tensor(memory.get(keys.merged(ITERATION, STAGE, owner)))
        sizes_by_owner[owner].add(merged.numel())
    # Every share of one owner's chunk, and its merged chunk, have one size...
    assert all(len(sizes) == 1 for sizes in sizes_by_owner.values()), dict(sizes_by_owner)
    sizes = [next(iter(sizes_by_owner[owner])) for owner in range(world)]
    # ...the chunks cover the gradient and differ by at most one element.
    assert sum(sizes) == size
    assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------- bytes moved


def traffic(storage: CountingStorage) -> tuple[collections.Counter[str], int, collections.Counter[str], int]:
    """(upload keys, elements uploaded, download keys, elements downloaded) of one replica."""
    up_elements = sum(codec.decode_tensor(data)[0].numel() for _, data in storage.uploads)
    down_elements = sum(codec.decode_tensor(data)[0].numel() for _, data in storage.downloads)
    return (
        collections.Counter(key for key, _ in storage.uploads),
        up_elements,
        collections.Counter(key for key, _ in storage.downloads),
        down_elements,
    )


@pytest.mark.parametrize(("world", "size"), [(2, 7), (3, 101), (4, 13), (5, 10_007)])
def test_both_algorithms_move_the_same_objects_and_elements(
    keys: JobKeys, world: int, size: int
) -> None:
    seen: dict[str, list[tuple[collections.Counter[str], int, collections.Counter[str], int]]] = {}
    for algorithm in ALGORITHMS:
        inner = MemoryStorage(f"test-collectives-{uuid.uuid4().hex}")
        try:
            storages = [CountingStorage(inner) for _ in range(world)]
            run_replicas(storages, integer_inputs(world, size), keys, algorithm)
            seen[algorithm] = [traffic(storage) for storage in storages]
        finally:
            inner.clear()

    for algorithm, per_replica in seen.items():
        for rank, (up_keys, up_elements, down_keys, down_elements) in enumerate(per_replica):
            peers = [peer for peer in range(world) if peer != rank]
            mine = own_chunk_size(size, world, rank)
            where = f"{algorithm}, replica {rank}"
            # world - 1 shares and one merged chunk up, each exactly once...
            assert up_keys == collections.Counter(
                [keys.chunk(ITERATION, STAGE, peer, rank) for peer in peers]
                + [keys.merged(ITERATION, STAGE, rank)]
            ), where
            assert sum(up_keys.values()) == world, where
            # ...which is the whole gradient once: my shares of the others' chunks + my merged chunk.
            assert up_elements == size, where
            # world - 1 shares of my chunk and world - 1 merged chunks down, each exactly once.
            assert down_keys == collections.Counter(
                [keys.chunk(ITERATION, STAGE, rank, peer) for peer in peers]
                + [keys.merged(ITERATION, STAGE, peer) for peer in peers]
            ), where
            assert sum(down_keys.values()) == 2 * (world - 1), where
            assert down_elements == (world - 1) * mine + (size - mine), where
    assert seen["pipelined"] == seen["four_phase"]


def test_uploads_carry_only_the_chunk_bytes_plus_a_header(keys: JobKeys) -> None:
    world, size = 4, 10_007
    inner = MemoryStorage(f"test-collectives-{uuid.uuid4().hex}")
    try:
        storages = [CountingStorage(inner) for _ in range(world)]
        run_replicas(storages, integer_inputs(world, size), keys, "pipelined")
    finally:
        inner.clear()
    for rank, storage in enumerate(storages):
        body = 0
        for key, data in storage.uploads:
            header_length = int.from_bytes(data[:8], "little")
            payload = len(data) - 8 - header_length
            tensor, metadata = codec.decode_tensor(data)
            assert metadata == {"key": key}
            assert payload == tensor.numel() * 8
            body += payload
        assert body == size * 8, f"replica {rank}"


# --------------------------------------------------------------------------- overlap


def test_pipelined_downloads_while_it_uploads(memory: MemoryStorage, keys: JobKeys) -> None:
    world, size = 4, 101
    log = EventLog()
    storages = [RecordingStorage(memory, log, rank, gate=True) for rank in range(world)]
    inputs = integer_inputs(world, size)
    # The gate makes every share-upload wait for a chunk download to start: an
    # algorithm that finishes its uploads before downloading fails here.
    results = run_replicas(storages, inputs, keys, "pipelined")
    assert all(torch.equal(result, torch.stack(inputs).sum(0)) for result in results)
    for rank in range(world):
        first_chunk_get = log.index(lambda e: e[:3] == ("get", "start", rank) and is_chunk(e[3]))
        last_share_put_end = log.index(
            lambda e: e[:3] == ("put", "end", rank) and is_chunk(e[3]), last=True
        )
        assert first_chunk_get < last_share_put_end, f"replica {rank}"


def test_four_phase_finishes_each_phase_before_the_next(memory: MemoryStorage, keys: JobKeys) -> None:
    world, size = 4, 101
    log = EventLog()
    storages = [RecordingStorage(memory, log, rank, gate=False) for rank in range(world)]
    run_replicas(storages, integer_inputs(world, size), keys, "four_phase")
    for rank in range(world):
        last_share_put_end = log.index(
            lambda e: e[:3] == ("put", "end", rank) and is_chunk(e[3]), last=True
        )
        first_chunk_get = log.index(lambda e: e[:3] == ("get", "start", rank) and is_chunk(e[3]))
        last_chunk_get_end = log.index(
            lambda e: e[:3] == ("get", "end", rank) and is_chunk(e[3]), last=True
        )
        merged_put_start = log.index(lambda e: e[:3] == ("put", "start", rank) and is_merged(e[3]))
        merged_put_end = log.index(lambda e: e[:3] == ("put", "end", rank) and is_merged(e[3]))
        first_merged_get = log.index(lambda e: e[:3] == ("get", "start", rank) and is_merged(e[3]))
        assert last_share_put_end < first_chunk_get, f"replica {rank}"
        assert last_chunk_get_end < merged_put_start, f"replica {rank}"
        assert merged_put_end < first_merged_get, f"replica {rank}"


# --------------------------------------------------------------------------- edge cases and refusals


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_world_of_one_returns_the_input_without_touching_storage(algorithm: str) -> None:
    comm = make_comm(UntouchableStorage())
    try:
        flat = torch.arange(5.0)
        out = all_reduce(
            comm, flat, keys=JobKeys("j"), iteration=0, stage=0, rank=0, world=1, algorithm=algorithm
        )
    finally:
        close_comm(comm)
    assert torch.equal(out, torch.arange(5.0))


def test_unknown_algorithm_is_a_config_error() -> None:
    comm = make_comm(UntouchableStorage())
    try:
        with pytest.raises(ConfigError, match="ring"):
            all_reduce(
                comm, torch.zeros(3), keys=JobKeys("j"), iteration=0, stage=0, rank=0, world=2,
                algorithm="ring",
            )
    finally:
        close_comm(comm)


def test_non_flat_gradient_is_refused() -> None:
    comm = make_comm(UntouchableStorage())
    try:
        with pytest.raises(ValueError, match=r"\(2, 3\)"):
            all_reduce(comm, torch.zeros(2, 3), keys=JobKeys("j"), iteration=0, stage=0, rank=0, world=2)
    finally:
        close_comm(comm)


def test_send_then_recv_roundtrip(memory: MemoryStorage, keys: JobKeys) -> None:
    comm = make_comm(memory)
    try:
        key = keys.message(0, "act", 1, 0, 0)
        comm.send(key, torch.arange(6.0).reshape(2, 3)).result(timeout=THREAD_TIMEOUT_S)
        received = comm.recv(key).result(timeout=THREAD_TIMEOUT_S)
    finally:
        close_comm(comm)
    assert torch.equal(received, torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]))


SHORT_TIMEOUT_S = 0.3  # how long a reader waits for a foreign object to be replaced, where nothing will


def test_misplaced_object_is_refused(memory: MemoryStorage, keys: JobKeys) -> None:
    wanted = keys.chunk(ITERATION, STAGE, 0, 1)
    stale = keys.chunk(ITERATION - 1, STAGE, 0, 1)  # the same share, one iteration earlier
    memory.put(wanted, codec.encode_tensor(torch.ones(3), {"key": stale}))
    comm = make_comm(memory, timeout_s=SHORT_TIMEOUT_S)
    try:
        for receive in (comm.get_now, comm.read_now):
            with pytest.raises(ForeignObject) as info:
                receive(wanted)
            assert (info.value.key, info.value.written_for) == (wanted, stale)
            assert repr(wanted) in str(info.value)
            assert repr(stale) in str(info.value)
            assert f"within {SHORT_TIMEOUT_S:g} s" in str(info.value)
    finally:
        close_comm(comm)


def test_object_without_a_key_header_is_refused(memory: MemoryStorage, keys: JobKeys) -> None:
    wanted = keys.merged(ITERATION, STAGE, 1)
    memory.put(wanted, codec.encode_tensor(torch.ones(3)))
    comm = make_comm(memory, timeout_s=SHORT_TIMEOUT_S)
    try:
        with pytest.raises(ForeignObject, match=r"written for no key.*stale or misplaced"):
            comm.get_now(wanted)
    finally:
        close_comm(comm)


def test_a_malformed_object_is_refused_at_once(memory: MemoryStorage, keys: JobKeys) -> None:
    wanted = keys.message(ITERATION, "act", 1, 0, 0)
    memory.put(wanted, b"not safetensors at all")
    comm = make_comm(memory)  # COMM_TIMEOUT_S: a reader that waited would make this slow, not fail it
    try:
        with pytest.raises(IntegrityError) as info:
            comm.recv(wanted).result(timeout=COMM_TIMEOUT_S / 2)
    finally:
        close_comm(comm)
    assert not isinstance(info.value, ForeignObject)


class Succession(Wrapper):
    """Serves ``objects`` one per read of ``key``, the last one for good: writers overwriting it, without sleeps."""

    def __init__(self, inner: Storage, key: str, objects: Sequence[bytes]) -> None:
        super().__init__(inner)
        self.key = key
        self.objects = list(objects)
        self.reads = 0

    def get_if_exists(self, key: str) -> bytes | None:
        if key != self.key:
            return super().get_if_exists(key)
        self.reads += 1
        return self.objects[min(self.reads, len(self.objects)) - 1]


@pytest.mark.parametrize("how", ["recv", "recv_bytes"])
def test_a_waiting_reader_skips_foreign_objects_until_the_genuine_one_replaces_them(
    memory: MemoryStorage, keys: JobKeys, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    wanted = keys.message(ITERATION, "act", 1, 0, 2)
    other_job = JobKeys("job-other", keys.attempt).message(ITERATION, "act", 1, 0, 2)
    earlier_attempt = JobKeys(keys.job, keys.attempt - 1).message(ITERATION, "act", 1, 0, 2)
    genuine = torch.arange(6.0).reshape(2, 3)
    storage = Succession(memory, wanted, [
        codec.encode_tensor(torch.full((2, 3), 7.0), {"key": other_job}),
        codec.encode_tensor(torch.full((2, 3), 7.0), {"key": other_job}),
        codec.encode_tensor(torch.full((2, 3), -1.0), {"key": earlier_attempt}),
        codec.encode_tensor(genuine, {"key": wanted}),
    ])
    comm = make_comm(storage)
    try:
        with caplog.at_level("WARNING", logger="funcpipe.binding"):
            if how == "recv":
                received = comm.recv(wanted).result(timeout=THREAD_TIMEOUT_S)
            else:
                received = torch.empty(2, 3)
                comm.recv_bytes(wanted).result(timeout=THREAD_TIMEOUT_S).copy_to(received)
    finally:
        close_comm(comm)
    assert torch.equal(received, genuine)
    assert storage.reads == 4
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2, warnings  # one per foreign binding, not one per poll
    assert repr(wanted) in warnings[0] and repr(other_job) in warnings[0]
    assert repr(wanted) in warnings[1] and repr(earlier_attempt) in warnings[1]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_reduce_refuses_a_misplaced_share(memory: MemoryStorage, keys: JobKeys, algorithm: str) -> None:
    # Replica 0 of 2 reads replica 1's share of chunk 0; a share from another stage sits there.
    wanted = keys.chunk(ITERATION, STAGE, 0, 1)
    foreign = keys.chunk(ITERATION, STAGE + 1, 0, 1)
    memory.put(wanted, codec.encode_tensor(torch.ones(2), {"key": foreign}))
    comm = make_comm(memory, timeout_s=SHORT_TIMEOUT_S)
    try:
        with pytest.raises(ForeignObject, match="misplaced") as info:
            all_reduce(
                comm, torch.zeros(4), keys=keys, iteration=ITERATION, stage=STAGE, rank=0, world=2,
                algorithm=algorithm,
            )
    finally:
        close_comm(comm)
    assert (info.value.key, info.value.written_for) == (wanted, foreign)


@pytest.mark.parametrize("source", ["other-job", "earlier-attempt", "earlier-iteration"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_reduce_sums_exactly_past_foreign_shares_and_merged_chunks(
    memory: MemoryStorage, keys: JobKeys, algorithm: str, source: str
) -> None:
    """Every share and merged chunk another all-reduce (of other values, same shapes) wrote is copied
    under the key this one's replicas read before they start: each is skipped until its writer replaces it."""
    world, size = 3, 10
    old_keys, old_iteration = {
        "other-job": (JobKeys("job-other", keys.attempt), ITERATION),
        "earlier-attempt": (JobKeys(keys.job, keys.attempt - 1), ITERATION),
        "earlier-iteration": (keys, ITERATION - 1),
    }[source]
    old = MemoryStorage(f"test-collectives-{uuid.uuid4().hex}")
    try:
        run_replicas([old] * world, integer_inputs(world, size, seed=7), old_keys, algorithm, old_iteration)
        old_prefix, prefix = old_keys.iteration_prefix(old_iteration), keys.iteration_prefix(ITERATION)
        copied = old.list(old_prefix)
        assert len(copied) == world * world  # world * (world - 1) shares and world merged chunks
        for key in copied:
            memory.put(prefix + key[len(old_prefix):], old.get(key))
    finally:
        old.clear()
    inputs = integer_inputs(world, size)
    results = run_replicas([memory] * world, inputs, keys, algorithm)
    expected = torch.stack(inputs).sum(0)
    for result in results:
        assert torch.equal(result, expected)


def test_recv_stops_waiting_when_cancelled(memory: MemoryStorage, keys: JobKeys) -> None:
    asked = threading.Event()

    def cancelled() -> bool:
        asked.set()
        return True

    comm = make_comm(memory, cancelled)
    try:
        future = comm.recv(keys.message(0, "grad", 0, 0, 0))  # never written
        with pytest.raises(WaitCancelled):
            future.result(timeout=THREAD_TIMEOUT_S)
    finally:
        close_comm(comm)
    assert asked.is_set()


# --------------------------------------------------------------------------- pieces and connections


@pytest.mark.parametrize("connections", [None, 3], ids=["one-thread-each-way", "3-connections"])
@pytest.mark.parametrize(("world", "size"), [(2, 101), (3, 1000), (5, 777)])
def test_pipelined_in_pieces_sums_exactly(
    memory: MemoryStorage, keys: JobKeys, world: int, size: int, connections: int | None
) -> None:
    inputs = integer_inputs(world, size)
    piece_bytes = 8 * 16  # 16 float64 elements a piece: several pieces per chunk
    pieces = piece_count(size * 8, world, piece_bytes)
    assert pieces > 1

    def replica(rank: int) -> torch.Tensor:
        comm = make_comm(memory)
        if connections is not None:  # download and upload connections, as a StageWorker has
            comm.fetch = ThreadPoolExecutor(connections, thread_name_prefix="test-fetch")
            comm.push = ThreadPoolExecutor(connections, thread_name_prefix="test-push")
        try:
            return all_reduce(comm, inputs[rank].clone(), keys=keys, iteration=ITERATION, stage=STAGE, rank=rank,
                              world=world, algorithm="pipelined", piece_bytes=piece_bytes)
        finally:
            close_comm(comm)
            for pool in (comm.fetch, comm.push):
                if pool is not None:
                    pool.shutdown(wait=True)

    with ThreadPoolExecutor(max_workers=world, thread_name_prefix="test-replica") as pool:
        results = [f.result(timeout=THREAD_TIMEOUT_S) for f in [pool.submit(replica, r) for r in range(world)]]
    expected = torch.stack(inputs).sum(0)
    for result in results:
        assert torch.equal(result, expected)
    assert_bitwise_equal(results)
    # Every (owner, sender, piece) share and every (owner, piece) reduced piece was written once.
    chunk_keys = memory.list(keys.iteration_prefix(ITERATION) + "chunk.")
    assert len(chunk_keys) == world * (world - 1) * pieces
    assert len(memory.list(keys.iteration_prefix(ITERATION) + "merged.")) == world * pieces


class ConcurrencyStorage(Wrapper):
    """Counts the most puts in flight at once; each put takes a little while."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0

    def put(self, key: str, data: bytes) -> None:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            threading.Event().wait(0.02)
            super().put(key, data)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_pipelined_uploads_overlap_on_the_push_connections(memory: MemoryStorage, keys: JobKeys) -> None:
    world, size, piece_bytes = 3, 600, 8 * 32  # several pieces per chunk
    storages = [ConcurrencyStorage(memory) for _ in range(world)]
    inputs = integer_inputs(world, size)

    def replica(rank: int) -> torch.Tensor:
        comm = make_comm(storages[rank])
        comm.push = ThreadPoolExecutor(2, thread_name_prefix="test-push")
        try:
            return all_reduce(comm, inputs[rank].clone(), keys=keys, iteration=ITERATION, stage=STAGE, rank=rank,
                              world=world, algorithm="pipelined", piece_bytes=piece_bytes)
        finally:
            close_comm(comm)
            comm.push.shutdown(wait=True)

    with ThreadPoolExecutor(max_workers=world, thread_name_prefix="test-replica") as pool:
        results = [f.result(timeout=THREAD_TIMEOUT_S) for f in [pool.submit(replica, r) for r in range(world)]]
    assert all(torch.equal(result, torch.stack(inputs).sum(0)) for result in results)
    assert [storage.most for storage in storages] == [2] * world


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_reduce_sums_in_place_into_the_gradient(memory: MemoryStorage, keys: JobKeys, algorithm: str) -> None:
    """No second gradient-sized buffer: the sum is written into ``flat`` itself (the memory model charges none)."""
    world, size = 3, 10_007
    generator = torch.Generator().manual_seed(11)
    inputs = [torch.randn(size, generator=generator) for _ in range(world)]
    flats = [x.clone() for x in inputs]

    def replica(rank: int) -> torch.Tensor:
        comm = make_comm(memory)
        try:
            return all_reduce(comm, flats[rank], keys=keys, iteration=ITERATION, stage=STAGE, rank=rank,
                              world=world, algorithm=algorithm, piece_bytes=4096)
        finally:
            close_comm(comm)

    with ThreadPoolExecutor(max_workers=world, thread_name_prefix="test-replica") as pool:
        results = [f.result(timeout=THREAD_TIMEOUT_S) for f in [pool.submit(replica, r) for r in range(world)]]
    expected = torch.stack(inputs).sum(0)
    for flat, result in zip(flats, results, strict=True):
        assert result is flat
        assert torch.equal(flat, flats[0])  # bitwise the same sum everywhere
    torch.testing.assert_close(flats[0], expected)
