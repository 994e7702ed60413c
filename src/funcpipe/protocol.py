"""The job's storage protocol: every object a job writes, under which key, who writes it, who reads it.

Every object has exactly one key computed from what it is
(``job/run/attempt/iteration/kind.stage.replica.micro-batch``), so a retried
iteration overwrites rather than duplicates, and a reader waits for one known
key (a GET by key, never a bucket listing). Below the iteration the key is
flat (dots, not slashes): on a file system an iteration is one directory,
made once and removed at once. Each object also carries the key it was
written for, and readers refuse any other (:mod:`funcpipe.binding`): a key
alone cannot tell a copied or left-over object from the one it names.

==========================  =====================================  ==================  ==================
object                      key (:class:`JobKeys`)                 written by          read by
==========================  =====================================  ==================  ==================
stage definition (signed)   ``model_blob(s)``                      trainer             worker
input / target micro-batch  ``message_for(plan, i, kind, s, m)``   trainer (feed)      worker, stage 0 / L
activation / gradient       ``message_for(plan, i, kind, s, m)``   worker s∓1          worker s
all-reduce share            ``chunk(i, s, owner, sender, piece)``  worker (collectives) worker ``owner``
all-reduce merged piece     ``merged(i, s, owner, piece)``         worker ``owner``    every peer of s
metrics (the loss)          ``metrics(i, L, r)``                   worker, last stage  trainer
checkpoint                  ``checkpoint(s, i)``                   worker, replica 0   worker, trainer
stop (end a run at N)       ``stop(first)``                        trainer             worker
abort (attempt abandoned)   ``abort``                              trainer             worker
call status                 ``STATUS_PREFIX + id``                 function            serverless executor
call cancel                 status key + ``CANCEL_SUFFIX``         serverless executor function
job manifest                :func:`funcpipe.manifest.manifest_key`  trainer            trainer (resume)
job lease (one live run)    :func:`funcpipe.lease.lease_key`       trainer            trainer
==========================  =====================================  ==================  ==================

Every object but the manifest and the lease carries a MAC over its key and
bytes under the job's key (:mod:`funcpipe.storage.authenticated`); the
manifest carries its own (:mod:`funcpipe.manifest`).

The JSON control objects' encoders and decoders are here, next to their keys;
tensors are :func:`funcpipe.collectives.put_tensor`'s, checkpoints
:mod:`funcpipe.checkpoint`'s, the definition :mod:`funcpipe.signed`'s.

Routing: micro-batch ``m`` of stage ``s`` runs on replica ``m mod d_s``
(:func:`replica_of`); a replica runs :func:`owned`. The all-reduce of a stage
with ``d`` replicas exchanges chunks in :func:`piece_count` pieces with the
peers :func:`ring_peers` orders, over :data:`FETCH_CONNECTIONS` /
:data:`PUSH_CONNECTIONS` connections; the planner, simulator and cost model
count the same pieces and connections from here.

Nothing here imports torch: the planner and the function side both use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from funcpipe import binding
from funcpipe.errors import ConfigError, IntegrityError

if TYPE_CHECKING:
    from funcpipe.plans import Plan
    from funcpipe.storage.base import Buffer

__all__ = [
    "ABORT_CHECK_S",
    "CANCEL_SUFFIX",
    "FETCH_CONNECTIONS",
    "MAX_PIECES",
    "PAYLOAD_FORMAT",
    "PIECE_BYTES",
    "PUSH_CONNECTIONS",
    "REPORT_BYTES",
    "STATUS_PREFIX",
    "SYNC_ALGORITHMS",
    "SYNC_IN_FLIGHT_BYTES",
    "JobKeys",
    "decode_abort",
    "decode_metrics",
    "decode_norm",
    "decode_status",
    "decode_stop",
    "encode_abort",
    "encode_metrics",
    "encode_norm",
    "encode_status",
    "encode_stop",
    "gradient_bytes",
    "owned",
    "piece_count",
    "replica_of",
    "ring_peers",
    "trainable",
    "versions",
]

# -- routing: which replica runs a micro-batch ---------------------------------------------


def replica_of(micro_batch: int, replicas: int) -> int:
    """The replica of a stage with ``replicas`` replicas that runs ``micro_batch``: ``m mod d``."""
    return micro_batch % replicas


def owned(replica: int, replicas: int, num_micro_batches: int) -> range:
    """The micro-batches of an iteration that ``replica`` runs: those with :func:`replica_of` ``== replica``."""
    return range(replica, num_micro_batches, replicas)


# -- the gradient all-reduce: what is synced, in how many pieces, over how many connections -------

#: The gradient all-reduce algorithms a stage may use (:mod:`funcpipe.collectives`).
SYNC_ALGORITHMS = ("pipelined", "four_phase")

#: Target size of one piece of a chunk in the pipelined algorithm, and the most pieces per chunk.
PIECE_BYTES = 4 * 2**20
MAX_PIECES = 16

#: How often a waiting worker reads the driver's abort and stop objects, seconds (the simulator
#: counts those reads as requests).
ABORT_CHECK_S = 1.0

#: Parallel download connections of a worker's all-reduce (overlapping request latencies).
FETCH_CONNECTIONS = 4
#: Parallel upload connections of a worker's all-reduce (overlapping request latencies,
#: and the encoding of one piece with the transfer of another).
PUSH_CONNECTIONS = 2
#: What an all-reduce holds in flight beside the gradient it sums in place, at most, where
#: pieces are at most :data:`PIECE_BYTES`: one encoded piece per upload connection and one
#: downloaded piece per download connection. (Larger pieces come only from chunks over
#: ``MAX_PIECES * PIECE_BYTES``, and then the same connections hold at most 6/16 of a
#: chunk; the four-phase algorithm holds one chunk.) The memory model charges this and
#: one chunk (:func:`funcpipe.costmodel.memory_terms`); measured in
#: ``benchmarks/allreduce_memory.py``.
SYNC_IN_FLIGHT_BYTES = (FETCH_CONNECTIONS + PUSH_CONNECTIONS) * PIECE_BYTES


def piece_count(size_bytes: int, world: int, piece_bytes: int = PIECE_BYTES) -> int:
    """Pieces per chunk in the pipelined algorithm: about ``piece_bytes`` each, at most :data:`MAX_PIECES`.

    Every replica computes the same count from the same sizes.
    """
    largest_chunk = -(-size_bytes // world)
    return max(1, min(MAX_PIECES, -(-largest_chunk // max(1, piece_bytes))))


def ring_peers(rank: int, world: int) -> tuple[list[int], list[int]]:
    """The peers ``rank`` sends its shares to, and those it reads shares from, in the order it does.

    Replica r sends to r+1, r+2, ... and reads from r-1, r-2, ...: at every step
    each replica reads what some peer wrote at the same step, so nobody waits
    on a share that is still queued behind others.
    """
    return [(rank + k) % world for k in range(1, world)], [(rank - k) % world for k in range(1, world)]


def trainable(parameters: Iterable[Any]) -> list[Any]:
    """The parameters a stage syncs and updates, in order: those that require a gradient."""
    return [p for p in parameters if p.requires_grad]


def gradient_bytes(parameters: Iterable[Any]) -> int:
    """Bytes of a stage's flat gradient, as its replicas all-reduce it (0: nothing to sync)."""
    return sum(p.numel() * p.element_size() for p in trainable(parameters))


# -- the JSON control objects: encoders (writers) and decoders (readers) --------------------

#: Bytes of the per-iteration metrics report the last stage writes (the cost model's figure).
REPORT_BYTES = 64


def encode_stop(key: str, iteration: int) -> bytes:
    """The stop object (:meth:`JobKeys.stop`): every worker of the run stops before ``iteration``."""
    return binding.encode_json(key, {"iteration": iteration})


def decode_stop(data: bytes, key: str) -> int:
    """The iteration the stop object read from ``key`` names.

    Raises:
        IntegrityError: ``data`` is not ``{"iteration": N, "key": key}``.
        ForeignObject: it was written for another key.
    """
    fields = binding.decode_json(data, key)
    iteration = fields.get("iteration")
    if not isinstance(iteration, int) or isinstance(iteration, bool):
        raise IntegrityError(
            f"stop object {key!r} names iteration {iteration!r:.80}, not an integer; expected "
            f'{{"iteration": N, "key": {key!r}}}'
        )
    return iteration


def encode_abort(key: str) -> bytes:
    """The abort object (:attr:`JobKeys.abort`): the attempt was abandoned; its workers stop."""
    return binding.encode_json(key, {})


def decode_abort(data: bytes, key: str) -> None:
    """Check that ``data`` is the abort object written for ``key``.

    Raises:
        IntegrityError: ``data`` is not a JSON object bound to a key.
        ForeignObject: it was written for another key (another attempt's).
    """
    binding.decode_json(data, key)


def encode_metrics(key: str, loss: float) -> bytes:
    """A last-stage worker's per-iteration report (:meth:`JobKeys.metrics`): its share of the loss."""
    return binding.encode_json(key, {"loss": loss})


def decode_metrics(data: Buffer, key: str) -> float:
    """The loss in the metrics report read from ``key``.

    Raises:
        IntegrityError: ``data`` is not ``{"loss": <number>, "key": key}``.
        ForeignObject: it was written for another key.
    """
    return _decode_number(data, key, "loss", "metrics report")


def encode_norm(key: str, squared: float) -> bytes:
    """A stage's squared gradient norm (:meth:`JobKeys.norm`)."""
    return binding.encode_json(key, {"squared": squared})


def decode_norm(data: Buffer, key: str) -> float:
    """The squared gradient norm read from ``key``.

    Raises:
        IntegrityError: ``data`` is not ``{"squared": <number>, "key": key}``.
        ForeignObject: it was written for another key.
    """
    return _decode_number(data, key, "squared", "gradient norm")


def _decode_number(data: Buffer, key: str, field: str, what: str) -> float:
    value = binding.decode_json(data, key).get(field)
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float's range
            pass
    raise IntegrityError(
        f"{what} {key!r} has {field} {value!r:.80}, not a float; expected "
        f'{{"{field}": <number>, "key": {key!r}}}'
    )


# -- serverless calls: the invocation payload's format, status and cancel objects -------------

#: Version of the invocation payload; a function refuses any other.
PAYLOAD_FORMAT = 3


def versions() -> dict[str, str]:
    """What the payload's ``versions`` carries: the driver's funcpipe and torch, which a function must run too.

    Torch's local build tag (``+cpu``, ``+cu121``) is left out: a CPU build in the
    function loads what a CUDA build on the driver pickled.
    """
    import torch  # the caller (driver or function) has it loaded already

    from funcpipe import __version__

    return {"funcpipe": __version__, "torch": str(torch.__version__).partition("+")[0]}

#: Where status objects live in the job's storage, one per call.
STATUS_PREFIX = "funcpipe-calls/"

#: Suffix of the object that asks a running call to stop (written by the driver, polled by the function).
CANCEL_SUFFIX = ".cancel"

#: The fields each state of a status object has besides its state, and their types.
_STATUS_FIELDS: dict[str, dict[str, type]] = {
    "started": {"beat": int}, "running": {"beat": int}, "done": {}, "failed": {"cause": str, "traceback": str},
}


def encode_status(key: str, status: dict[str, Any]) -> bytes:
    """A call's status object, as the function writes it (:func:`decode_status` lists the states)."""
    if status.get("state") not in _STATUS_FIELDS:
        raise ConfigError(f"status {status!r:.80} has no state among {sorted(_STATUS_FIELDS)}")
    return binding.encode_json(key, status)


def decode_status(data: bytes, key: str) -> dict[str, Any]:
    """A call's status object read from ``key``, checked.

    ``{"state": "started" | "running", "beat": n}``, ``{"state": "done", "result": ...}`` or
    ``{"state": "failed", "cause": "...", "traceback": "..."}``, bound to ``key``.

    Raises:
        IntegrityError: ``data`` is none of these.
        ForeignObject: it was written for another key.
    """
    status = binding.decode_json(data, key)
    state = status.get("state")
    required = _STATUS_FIELDS.get(state) if isinstance(state, str) else None
    if required is None:
        raise IntegrityError(
            f"status object {key!r} has state {state!r:.80}, not one of {sorted(_STATUS_FIELDS)}; "
            "hint: driver and function must run the same funcpipe version"
        )
    for name, kind in required.items():
        value = status.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise IntegrityError(
                f"status object {key!r} in state {state!r} has {name} {value!r:.80}, not a {kind.__name__}"
            )
    if state == "done" and "result" not in status:
        raise IntegrityError(f"status object {key!r} says the call is done but holds no result")
    return status


# -- keys -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobKeys:
    """Key builder for one run and attempt of a job.

    ``run`` is the run id a trainer draws when it is made (``""``: none, the
    keys of tools and tests that need no isolation): every key of a run holds
    it, so nothing a crashed, concurrent or earlier run of the same job left in
    storage is ever read as this run's. A resumed job continues its run with
    the next attempt.
    """

    job: str
    attempt: int = 0
    run: str = ""

    @property
    def base(self) -> str:
        """The prefix of every key of the run (its attempts and model blobs)."""
        return f"{self.job}/{self.run}" if self.run else self.job

    @property
    def root(self) -> str:
        return f"{self.base}/a{self.attempt}"

    def with_attempt(self, attempt: int) -> JobKeys:
        """The keys of another attempt of the same run."""
        return dataclasses.replace(self, attempt=attempt)

    def iteration_prefix(self, iteration: int) -> str:
        return f"{self.root}/i{iteration:08d}/"

    def message(self, iteration: int, kind: str, stage: int, replica: int, micro_batch: int) -> str:
        """A point-to-point message for ``replica`` of ``stage``.

        ``kind`` is ``input`` (driver -> stage 0), ``target`` (driver -> last
        stage), ``act`` (stage s-1 -> s) or ``grad`` (stage s+1 -> s); the
        stage and replica are the *receiver's*.
        """
        return f"{self.iteration_prefix(iteration)}{kind}.s{stage}.r{replica}.m{micro_batch}"

    def message_for(self, plan: Plan, iteration: int, kind: str, stage: int, micro_batch: int) -> str:
        """:meth:`message` of ``micro_batch`` for ``stage``, to the replica that runs it (:func:`replica_of`)."""
        return self.message(iteration, kind, stage, replica_of(micro_batch, plan.replicas[stage]), micro_batch)

    def chunk(self, iteration: int, stage: int, owner: int, sender: int, piece: int = 0) -> str:
        """Scatter-reduce: ``sender``'s share of (a piece of) the gradient chunk ``owner`` reduces."""
        return f"{self.iteration_prefix(iteration)}chunk.s{stage}.r{owner}.from{sender}.p{piece}"

    def merged(self, iteration: int, stage: int, owner: int, piece: int = 0) -> str:
        """Scatter-reduce: (a piece of) the reduced chunk that ``owner`` publishes to its peers."""
        return f"{self.iteration_prefix(iteration)}merged.s{stage}.r{owner}.p{piece}"

    def metrics(self, iteration: int, stage: int, replica: int) -> str:
        """Per-iteration report of a last-stage worker (:func:`encode_metrics`, :func:`decode_metrics`)."""
        return f"{self.iteration_prefix(iteration)}metrics.s{stage}.r{replica}"

    def norm(self, iteration: int, stage: int) -> str:
        """The squared norm of stage ``stage``'s summed gradient, for clipping by the global norm
        (:func:`encode_norm`; written by its replica 0, read by every worker that trains)."""
        return f"{self.iteration_prefix(iteration)}norm.s{stage}"

    def iteration_keys(self, iteration: int, plan: Plan, sizes: Sequence[int], *, clipped: bool = False,
                       fed: bool = True, gated: bool = False) -> list[str]:
        """Every key the driver and the workers write for ``iteration`` of ``plan``.

        ``sizes[s]`` is :func:`gradient_bytes` of stage ``s``'s parameters (0: the stage
        has nothing to train, so it does not sync); ``clipped``: the gradients are clipped
        by their global norm (each stage writes :meth:`norm`); ``fed``: the driver wrote the
        inputs and targets (not a stored data set, :mod:`funcpipe.data`); ``gated``: it wrote the
        iteration's :meth:`go` instead. The driver deletes a
        finished iteration by these keys — storage is never listed on the data
        path (some S3-compatible stores' listings are slow or differ).
        """
        last = plan.num_stages - 1
        out = []
        for m in range(plan.num_micro_batches):
            if fed:
                out.append(self.message_for(plan, iteration, "input", 0, m))
                out.append(self.message_for(plan, iteration, "target", last, m))
            for s in range(1, plan.num_stages):
                out.append(self.message_for(plan, iteration, "act", s, m))
                out.append(self.message_for(plan, iteration, "grad", s - 1, m))
        out += [self.metrics(iteration, last, r) for r in range(plan.replicas[last])]
        if gated:
            out.append(self.go(iteration))
        if clipped:
            out += [self.norm(iteration, s) for s in range(plan.num_stages)]
        for s, d in enumerate(plan.replicas):
            if d == 1 or sizes[s] == 0:
                continue
            pieces = piece_count(sizes[s], d) if plan.stage_sync(s) == "pipelined" else 1
            for owner in range(d):
                for q in range(pieces):
                    out += [self.chunk(iteration, s, owner, sender, q) for sender in range(d) if sender != owner]
                    out.append(self.merged(iteration, s, owner, q))
        return out

    def go(self, iteration: int) -> str:
        """Written by the driver, when the workers read a stored data set and the run has a time budget,
        to let stage 0 begin ``iteration``: it stands for the inputs the driver would otherwise feed, so
        the stop object (:meth:`stop`) still ends every worker at one boundary."""
        return f"{self.iteration_prefix(iteration)}go"

    def model_blob(self, stage: int) -> str:
        """The signed definition of one stage (layers, optimizer factory, loss)."""
        return f"{self.base}/model/s{stage}"

    def checkpoint(self, stage: int, iteration: int) -> str:
        """Weights and optimizer state of one stage before ``iteration``, as this attempt wrote them.

        Keyed by iteration, so stages that stopped at different points never
        mix: a run resumes every stage from the same iteration. Keyed by
        attempt, so a worker of a failed attempt that is still running (a
        serverless call cannot be killed) never overwrites the checkpoint a
        later attempt restores from.
        """
        return f"{self.root}/checkpoint/i{iteration:08d}/s{stage}"

    def stop(self, first_iteration: int) -> str:
        """Written by the driver to end the run that began at ``first_iteration`` early.

        It holds the iteration (:func:`encode_stop`) before which every
        worker of that run stops, checkpoints and returns, so a run that would
        outlive the function's lifetime ends at one boundary for all stages and
        replicas. Keyed by the run's first iteration, so the run that continues
        from ``N`` never sees it.
        """
        return f"{self.root}/stop.from{first_iteration:08d}"

    @property
    def abort(self) -> str:
        """Written by the driver to tell workers of this attempt to stop (:func:`encode_abort`)."""
        return f"{self.root}/abort"
