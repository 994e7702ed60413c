"""Communication through object storage: point-to-point and gradient all-reduce.

Point-to-point messages go to one deterministic key (see :mod:`funcpipe.keys`)
as safetensors bytes whose header names the key they were written for, so a
reader can tell a misplaced object from the one it waits for.

All-reduce among the ``n`` replicas of a stage is a scatter-reduce through
storage. The gradient, flattened, is cut into ``n`` chunks of balanced sizes
(``torch.tensor_split``: sizes differ by at most one element); replica ``k``
owns chunk ``k``. Two algorithms:

* ``pipelined`` (funcpipe, paper §4.3): the upload thread sends my shares of
  the peers' chunks while the download thread fetches the peers' shares of
  my chunk and the compute thread adds each into my chunk as it arrives (my
  own share *is* the starting value); the merged chunk goes up while the
  peers' merged chunks come down. Uplink, downlink and the sums overlap.
* ``four_phase`` (LambdaML's scatter-reduce, the baseline): upload all
  shares; then download and sum; then upload the merged chunk; then download
  the merged chunks. Each phase waits for the one before.

Both move the same bytes: each replica uploads ``size`` and downloads
``2 (n-1)/n * size``, so ``2 (n-1)/n * size / bandwidth`` bounds the time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from funcpipe import codec
from funcpipe.errors import ConfigError, IntegrityError
from funcpipe.keys import JobKeys
from funcpipe.storage.base import Storage

__all__ = ["ALGORITHMS", "Comm", "all_reduce"]

ALGORITHMS = ("pipelined", "four_phase")


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

    def send(self, key: str, tensor: torch.Tensor) -> Future[None]:
        """Post ``tensor`` to the upload thread; it is written to ``key``."""
        return self.upload.submit(self.put_now, key, tensor)

    def recv(self, key: str) -> Future[torch.Tensor]:
        """Post a download of ``key`` (waiting for it to appear) to the download thread."""
        return self.download.submit(self.get_now, key)

    def put_now(self, key: str, tensor: torch.Tensor) -> None:
        self.storage.put(key, codec.encode_tensor(tensor, {"key": key}))

    def get_now(self, key: str) -> torch.Tensor:
        data = self.storage.wait(key, self.timeout_s, cancelled=self.cancelled)
        tensor, metadata = codec.decode_tensor(data)
        if metadata.get("key") != key:
            raise IntegrityError(
                f"object at {key!r} was written for key {metadata.get('key')!r}; refusing "
                "a stale or misplaced object"
            )
        return tensor


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
) -> torch.Tensor:
    """Sum a 1-D tensor across the ``world`` replicas of ``stage``; every replica gets the sum.

    The result is bitwise identical on every replica: chunk ``k`` is summed
    once, by replica ``k``, and everybody downloads that one sum.
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown all-reduce algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if flat.dim() != 1:
        raise ValueError(f"all_reduce takes a 1-D tensor, got shape {tuple(flat.shape)}")
    if world == 1:
        return flat
    chunks = torch.tensor_split(flat, world)
    # Replica r sends to r+1, r+2, ... and reads from r-1, r-2, ...: at every step
    # each replica reads what some peer wrote at the same step, so nobody waits
    # on a share that is still queued behind others.
    to_peers = [(rank + step) % world for step in range(1, world)]
    from_peers = [(rank - step) % world for step in range(1, world)]

    def chunk_key(owner: int, sender: int) -> str:
        return keys.chunk(iteration, stage, owner, sender)

    def merged_key(owner: int) -> str:
        return keys.merged(iteration, stage, owner)

    result = torch.empty_like(flat)
    out_chunks = torch.tensor_split(result, world)
    if algorithm == "pipelined":
        sends = [comm.send(chunk_key(peer, rank), chunks[peer]) for peer in to_peers]
        shares = [comm.recv(chunk_key(rank, peer)) for peer in from_peers]
        mine = out_chunks[rank]
        mine.copy_(chunks[rank])
        for share in shares:
            mine.add_(share.result())
        sends.append(comm.send(merged_key(rank), mine))
        merged = [(peer, comm.recv(merged_key(peer))) for peer in from_peers]
        for peer, future in merged:
            out_chunks[peer].copy_(future.result())
        for send in sends:
            send.result()
    else:
        for send in [comm.send(chunk_key(peer, rank), chunks[peer]) for peer in to_peers]:
            send.result()
        mine = out_chunks[rank]
        mine.copy_(chunks[rank])
        for peer in from_peers:
            mine.add_(comm.recv(chunk_key(rank, peer)).result())
        comm.send(merged_key(rank), mine).result()
        for peer in from_peers:
            out_chunks[peer].copy_(comm.recv(merged_key(peer)).result())
    return result
