"""Communication through object storage: point-to-point and gradient all-reduce.

Point-to-point messages go to one deterministic key (see :mod:`funcpipe.protocol`)
as safetensors bytes whose header names the key they were written for, so a
reader can tell a misplaced object from the one it waits for, and waits on
past it (:mod:`funcpipe.binding`); so do the all-reduce's shares and merged chunks.

All-reduce among the ``n`` replicas of a stage is a scatter-reduce through
storage. The gradient, flattened, is cut into ``n`` chunks of balanced sizes
(``torch.tensor_split``: sizes differ by at most one element); replica ``k``
owns chunk ``k``. Two algorithms:

* ``pipelined`` (funcpipe, paper §4.3): the uploads send my shares of the
  peers' chunks while the downloads fetch the peers' shares of my chunk and
  the compute thread adds each into my chunk as it arrives (my own share
  *is* the starting value); each reduced piece goes up as soon as it is
  summed while the peers' reduced pieces come down. Chunks travel in pieces
  of about ``piece_bytes`` so a piece can be forwarded before the whole chunk
  has arrived, and uploads and downloads run on several connections
  (``Comm.push``, ``Comm.fetch``) so the per-request latencies overlap (and
  one piece is encoded while another is on the wire). Uplink, downlink and
  sums overlap.
* ``four_phase`` (LambdaML's scatter-reduce, the baseline): upload all
  shares; then download and sum; then upload the merged chunk; then download
  the merged chunks. Each phase waits for the one before, and each moves
  its objects one after another on the upload or the download thread.

Both move the same bytes: each replica uploads ``size`` and downloads
``2 (n-1)/n * size``, so ``2 (n-1)/n * size / bandwidth`` bounds the time.
Received tensors are added or copied straight from the downloaded bytes into
the gradient itself, reduced in place (:class:`funcpipe.codec.TensorBytes`), with
no tensor allocated per object and no second buffer of the gradient's size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from funcpipe import binding, codec
from funcpipe.errors import ConfigError, IntegrityError
from funcpipe.protocol import PIECE_BYTES, SYNC_ALGORITHMS, JobKeys, piece_count, ring_peers
from funcpipe.storage.base import Buffer, Storage

__all__ = ["Comm", "all_reduce", "decode_tensor", "put_tensor", "read_tensor"]


@dataclasses.dataclass
class Comm:
    """One worker's link to storage: its upload thread and its download thread.

    Both executors must have exactly one thread each, so transfers in one
    direction happen in the order they were posted (the link is one pipe).
    """

    storage: Storage
    upload: ThreadPoolExecutor
    download: ThreadPoolExecutor
    timeout_s: float
    cancelled: Callable[[], bool] | None = None
    #: Connections for the all-reduce's downloads (several, so request latencies
    #: overlap; they share the one downlink); ``None``: the download thread.
    fetch: ThreadPoolExecutor | None = None
    #: Connections for the all-reduce's uploads (several, so request latencies and
    #: the encoding of one piece overlap another's transfer; they share the one
    #: uplink, and start in the order posted); ``None``: the upload thread.
    push: ThreadPoolExecutor | None = None
    #: Called with the exception of an upload that failed (a worker then stops at once: a peer
    #: waiting for what it did not write would otherwise wait out its timeout).
    on_failure: Callable[[BaseException], None] | None = None

    def send(self, key: str, tensor: torch.Tensor) -> Future[None]:
        """Post ``tensor`` to the upload thread; it is written to ``key``."""
        return self._watched(self.upload.submit(self.put_now, key, tensor))

    def push_send(self, key: str, tensor: torch.Tensor) -> Future[None]:
        """Like :meth:`send`, on the all-reduce's upload connections."""
        return self._watched((self.push or self.upload).submit(self.put_now, key, tensor))

    def _watched(self, upload: Future[None]) -> Future[None]:
        if self.on_failure is not None:
            report = self.on_failure

            def done(future: Future[None]) -> None:
                if not future.cancelled() and future.exception() is not None:
                    report(future.exception())  # type: ignore[arg-type]

            upload.add_done_callback(done)
        return upload

    def send_values(self, key: str, values: Sequence[Any]) -> Future[None]:
        """Post several values (:func:`put_values`) to the upload thread; they are written to ``key``."""
        return self._watched(self.upload.submit(put_values, self.storage, key, values))

    def recv_values(self, key: str, count: int) -> Future[tuple[Any, ...]]:
        """Post a download of the ``count`` values written for ``key`` (:func:`decode_values`)."""
        return self.download.submit(
            binding.wait, self.storage, key, self.timeout_s, lambda data: decode_values(data, key, count),
            cancelled=self.cancelled)

    def recv(self, key: str) -> Future[torch.Tensor]:
        """Post a download of ``key`` (waiting for it to appear) to the download thread."""
        return self.download.submit(self.get_now, key)

    def recv_bytes(self, key: str) -> Future[codec.TensorBytes]:
        """Like :meth:`recv`, the tensor left in the downloaded bytes (to add or copy from)."""
        return self.download.submit(self.read_now, key)

    def fetch_bytes(self, key: str) -> Future[codec.TensorBytes]:
        """Like :meth:`recv_bytes`, on the all-reduce's download connections."""
        return (self.fetch or self.download).submit(self.read_now, key)

    def fetch_into(self, key: str, out: torch.Tensor) -> Future[None]:
        """Download ``key`` on the all-reduce's download connections and copy its tensor into ``out``."""
        return (self.fetch or self.download).submit(lambda: self.read_now(key).copy_to(out))

    def put_now(self, key: str, tensor: torch.Tensor) -> None:
        put_tensor(self.storage, key, tensor)

    def get_now(self, key: str) -> torch.Tensor:
        """Wait for the tensor written for ``key`` and decode it into a fresh tensor.

        A foreign object under ``key`` is not consumed (:func:`funcpipe.binding.wait`).
        """
        return binding.wait(self.storage, key, self.timeout_s, lambda data: decode_tensor(data, key),
                            cancelled=self.cancelled)

    def read_now(self, key: str) -> codec.TensorBytes:
        """Wait for the tensor written for ``key``; checked, still in the downloaded bytes (no copy yet)."""
        return binding.wait(self.storage, key, self.timeout_s, lambda data: read_tensor(data, key),
                            cancelled=self.cancelled)


def put_tensor(storage: Storage, key: str, tensor: torch.Tensor) -> None:
    """Write ``tensor`` to ``key``, its header naming the key (:func:`read_tensor` checks it)."""
    storage.put_parts(key, codec.encode_tensor_parts(tensor, {binding.FIELD: key}))


def put_values(storage: Storage, key: str, values: Sequence[Any]) -> None:
    """Write several values (tensors, plain numbers, ``None``) to ``key``, the header naming the key."""
    storage.put_parts(key, codec.encode_values_parts(values, {binding.FIELD: key}))


def decode_values(data: Buffer, key: str, count: int) -> tuple[Any, ...]:
    """The ``count`` values :func:`put_values` wrote for ``key``, tensors fresh.

    Raises:
        IntegrityError: ``data`` is not ``count`` values in safetensors bytes.
        ForeignObject: it was written for another key.
    """
    try:
        values, metadata = codec.decode_values(data, count)
    except IntegrityError as exc:
        raise IntegrityError(f"object {key!r} is not a message of {count} values: {exc}") from exc
    binding.check(key, metadata.get(binding.FIELD))
    return values


def decode_tensor(data: Buffer, key: str) -> torch.Tensor:
    """The tensor :func:`put_tensor` wrote for ``key``, decoded into a fresh tensor.

    Raises:
        IntegrityError: ``data`` is not one tensor in safetensors bytes.
        ForeignObject: it was written for another key.
    """
    try:
        tensor, metadata = codec.decode_tensor(data)
    except IntegrityError as exc:
        raise IntegrityError(f"object {key!r} is not a tensor message: {exc}") from exc
    binding.check(key, metadata.get(binding.FIELD))
    return tensor


def read_tensor(data: Buffer, key: str) -> codec.TensorBytes:
    """The tensor :func:`put_tensor` wrote for ``key``, checked, still in ``data`` (:func:`codec.read_tensor`).

    Raises:
        IntegrityError: ``data`` is not one tensor in safetensors bytes.
        ForeignObject: it was written for another key.
    """
    try:
        received = codec.read_tensor(data)
    except IntegrityError as exc:
        raise IntegrityError(f"object {key!r} is not a tensor message: {exc}") from exc
    binding.check(key, received.metadata.get(binding.FIELD))
    return received


def all_reduce(
    comm: Comm,
    flat: torch.Tensor,
    *,
    keys: JobKeys,
    iteration: int,
    stage: int,
    rank: int,
    world: int,
    algorithm: str = "pipelined",
    piece_bytes: int = PIECE_BYTES,
) -> torch.Tensor:
    """Sum a 1-D tensor across the ``world`` replicas of ``stage``, in place; every replica gets the sum.

    ``flat`` is overwritten with the sum and returned (no second buffer of its
    size: the memory model charges none, :func:`funcpipe.costmodel.memory_terms`).
    The result is bitwise identical on every replica: chunk ``k`` is summed
    once, by replica ``k``, and everybody downloads that one sum.

    In place is safe: my own chunk is summed where it lies (my share is its
    starting value, the peers' shares are added in a fixed order, the same
    operations as into a copy); a peer's merged piece is copied over my share
    of it, and that merged piece exists only after the peer summed my share,
    which it read from storage, which holds it only after my upload of it
    returned, i.e. after :func:`put_tensor` had encoded the region into bytes
    of its own. (Pipelined: the download waits for the peer's object, checked
    for this key, before it copies; four-phase: every share's upload has
    returned before any merged chunk is read.) Each received share is dropped
    once added, so the downloads in flight are all a replica holds beside
    ``flat``.
    """
    if algorithm not in SYNC_ALGORITHMS:
        raise ConfigError(f"unknown all-reduce algorithm {algorithm!r}; choose one of {SYNC_ALGORITHMS}")
    if flat.dim() != 1:
        raise ValueError(f"all_reduce takes a 1-D tensor, got shape {tuple(flat.shape)}")
    if world == 1:
        return flat
    chunks = torch.tensor_split(flat, world)
    to_peers, from_peers = ring_peers(rank, world)

    def chunk_key(owner: int, sender: int, piece: int = 0) -> str:
        return keys.chunk(iteration, stage, owner, sender, piece)

    def merged_key(owner: int, piece: int = 0) -> str:
        return keys.merged(iteration, stage, owner, piece)

    if algorithm == "pipelined":
        pieces = piece_count(flat.numel() * flat.element_size(), world, piece_bytes)
        parts = [torch.tensor_split(chunk, pieces) for chunk in chunks]
        sends = [
            comm.push_send(chunk_key(peer, rank, q), parts[peer][q]) for q in range(pieces) for peer in to_peers
        ]
        # Every share download is queued before any merged one, so a connection
        # waiting for a peer's reduced piece never holds up a share that piece needs.
        shares = [[comm.fetch_bytes(chunk_key(rank, peer, q)) for peer in from_peers] for q in range(pieces)]
        # Each merged piece lands on my share of it: see the docstring for why that share is encoded by then.
        merged = [
            comm.fetch_into(merged_key(peer, q), parts[peer][q]) for q in range(pieces) for peer in from_peers
        ]
        for q in range(pieces):
            mine = parts[rank][q]  # my share of my chunk: the sum's starting value
            pending, shares[q] = shares[q], []
            pending.reverse()
            while pending:  # always in from_peers' order: the sum's bits do not depend on timing
                pending.pop().result().add_to(mine)  # the share's bytes are freed here, once added
            sends.append(comm.push_send(merged_key(rank, q), mine))
        for future in merged:
            future.result()
        for send in sends:
            send.result()
    else:
        for send in [comm.send(chunk_key(peer, rank), chunks[peer]) for peer in to_peers]:
            send.result()
        mine = chunks[rank]
        for peer in from_peers:
            comm.recv_bytes(chunk_key(rank, peer)).result().add_to(mine)
        comm.send(merged_key(rank), mine).result()
        for peer in from_peers:  # every share of mine is uploaded (encoded): overwriting them is safe
            comm.recv_bytes(merged_key(peer)).result().copy_to(chunks[peer])
    return flat
