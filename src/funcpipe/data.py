"""A data set written to storage once, which the workers read their micro-batches from.

:func:`upload` writes the samples as safetensors shards of ``shard_samples``
samples each, the inputs and the targets apart (stage 0 reads only the
inputs, the last stage only the targets), under deterministic keys::

    data/{name}/manifest                  JSON: samples, shapes, dtypes, shards, the upload's id
    data/{name}/{upload}/inputs/{k:06d}   samples k*S .. (k+1)*S - 1, one tensor per input leaf
    data/{name}/{upload}/targets/{k:06d}  the same samples' targets

Every object is authenticated (:mod:`funcpipe.storage.authenticated`) under
the data set's key, derived from the driver's master secret and its name
(:func:`funcpipe.secret.data_key`), and the payloads carry it to the
workers; a re-upload under the same name gets a fresh upload id, so no
reader ever mixes the shards of two uploads.

``Trainer.fit(stored, epochs=..., shuffle=True, seed=...)`` trains on it:
the driver writes no data, and each worker of stage 0 (the last stage)
computes the epoch's order (:meth:`StoredDataset.order`) and reads the inputs
(targets) of the micro-batches it runs. A worker keeps the shards it read in
memory for the rest of its call (:class:`Reader`), so a data set is read about
once per call, in the order the batches need it; its part must fit the
function's memory beside the stage (checked before launch).

Nothing read is unpickled: shards are safetensors, the manifest JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import secrets as _secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from funcpipe import binding, codec
from funcpipe.errors import ConfigError, IntegrityError, ObjectNotFound
from funcpipe.manifest import check_job_name
from funcpipe.storage import Storage, open_storage
from funcpipe.storage.authenticated import AuthenticatedStorage

__all__ = ["DEFAULT_SHARD_BYTES", "Leaf", "Reader", "StoredDataset", "open_stored", "order", "upload"]

#: About how many bytes of samples one shard holds (inputs and targets together).
DEFAULT_SHARD_BYTES = 4 * 2**20
#: The manifest's format version.
FORMAT = 1
#: The key prefix of every data set.
PREFIX = "data/"


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One tensor of every sample: its name (``inputs``, ``inputs[0]``, ``inputs['ids']``, ``targets``),
    dtype and shape without the sample dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.shape) * codec.dtype_of(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class StoredDataset:
    """A data set in storage (:func:`upload`, :func:`open_stored`); pass it to ``Trainer.fit``.

    Attributes:
        url: the storage it is in (the workers open it).
        name: its name, the key prefix ``data/{name}/``.
        upload: the id of the upload its shards belong to.
        samples: how many samples it holds.
        global_batch_size: the batch it was written for (a plan of another one is refused).
        shard_samples: samples per shard (the last shard may hold fewer).
        inputs: the input tensors of a sample, as :func:`torch.utils._pytree.tree_flatten` orders them.
        targets: the target tensor of a sample.
        structure: how the inputs are rebuilt from their leaves: ``{"kind": "tensor"}``,
            ``{"kind": "tuple", "n": n}`` or ``{"kind": "dict", "keys": [...]}``.
    """

    url: str
    name: str
    upload: str
    samples: int
    global_batch_size: int
    shard_samples: int
    inputs: tuple[Leaf, ...]
    targets: Leaf
    structure: dict[str, Any]

    @property
    def shards(self) -> int:
        return math.ceil(self.samples / self.shard_samples)

    @property
    def iterations_per_epoch(self) -> int:
        """Full global batches per epoch (the samples after the last full one are left out of that epoch)."""
        return self.samples // self.global_batch_size

    @property
    def input_bytes(self) -> int:
        """Bytes of every sample's inputs: what a worker of stage 0 holds once it read them all."""
        return self.samples * sum(leaf.sample_bytes for leaf in self.inputs)

    @property
    def target_bytes(self) -> int:
        """Bytes of every sample's targets: what a worker of the last stage holds once it read them all."""
        return self.samples * self.targets.sample_bytes

    def order(self, epoch: int, *, shuffle: bool = True, seed: int = 0) -> torch.Tensor:
        """The samples of ``epoch`` in the order training takes them (:func:`order`)."""
        return order(self.samples, epoch, shuffle=shuffle, seed=seed)

    def batches(self, *, epochs: int = 1, shuffle: bool = True, seed: int = 0) -> Iterator[tuple[Any, torch.Tensor]]:
        """The global batches ``fit(self, epochs=..., shuffle=..., seed=...)`` trains on, read from storage.

        For comparing with a plain PyTorch loop, or evaluating; the driver's master secret must be
        the uploader's (it checks every shard).
        """
        reader = Reader(self._storage(), self.to_spec(), parts=("inputs", "targets"))
        try:
            for k in range(epochs * self.iterations_per_epoch):
                indices = reader.batch_indices(k, shuffle, seed)
                yield reader.inputs(indices), reader.targets(indices)
        finally:
            reader.storage.close()

    def delete(self) -> None:
        """Delete the data set's shards and manifest."""
        storage = self._storage()
        try:
            storage.delete([*_shard_keys(self.name, self.upload, self.shards), manifest_key(self.name)])
        finally:
            storage.close()

    def to_spec(self) -> dict[str, Any]:
        """The data set as JSON-able fields (what a worker's payload carries)."""
        spec = dataclasses.asdict(self)
        spec["inputs"] = [dataclasses.asdict(leaf) for leaf in self.inputs]
        spec["targets"] = dataclasses.asdict(self.targets)
        return spec

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> StoredDataset:
        def leaf(raw: Mapping[str, Any]) -> Leaf:
            return Leaf(str(raw["name"]), str(raw["dtype"]), tuple(int(n) for n in raw["shape"]))

        return cls(
            url=str(spec["url"]), name=str(spec["name"]), upload=str(spec["upload"]), samples=int(spec["samples"]),
            global_batch_size=int(spec["global_batch_size"]), shard_samples=int(spec["shard_samples"]),
            inputs=tuple(leaf(raw) for raw in spec["inputs"]), targets=leaf(spec["targets"]),
            structure=dict(spec["structure"]),
        )

    def _storage(self) -> Storage:
        return data_storage(self.url, self.name)

    def __repr__(self) -> str:
        return (f"StoredDataset({self.name!r} in {self.url!r}: {self.samples} samples, global batch "
                f"{self.global_batch_size}, {self.shards} shards)")


def manifest_key(name: str) -> str:
    return f"{PREFIX}{name}/manifest"


def shard_key(name: str, upload: str, part: str, shard: int) -> str:
    return f"{PREFIX}{name}/{upload}/{part}/{shard:06d}"


def _shard_keys(name: str, upload: str, shards: int) -> list[str]:
    return [shard_key(name, upload, part, k) for part in ("inputs", "targets") for k in range(shards)]


def data_storage(url: str, name: str) -> Storage:
    """``url``'s storage, every object authenticated under the data set's key."""
    from funcpipe.secret import data_key

    return AuthenticatedStorage(open_storage(url), data_key(name))


def order(samples: int, epoch: int, *, shuffle: bool = True, seed: int = 0) -> torch.Tensor:
    """The sample indices of ``epoch``: ``torch.randperm(samples)`` under a generator seeded with the
    first 8 bytes (little-endian, top bit cleared) of ``sha256(f"funcpipe-data:{seed}:{epoch}")``;
    ``arange`` without ``shuffle``. Global batch ``j`` of the epoch is ``order[j*B:(j+1)*B]``."""
    if not shuffle:
        return torch.arange(samples)
    digest = hashlib.sha256(f"funcpipe-data:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(samples, generator=generator)


# -- upload ---------------------------------------------------------------------


def upload(
    samples: Any,
    storage: str,
    *,
    global_batch_size: int,
    name: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> StoredDataset:
    """Write a data set to ``storage`` once, for ``Trainer.fit`` to train on without feeding it.

    Args:
        samples: a map-style ``Dataset`` (``len()`` and ``ds[i] -> (inputs, target)``); an
            ``(inputs, targets)`` pair of tensors with the samples on dim 0 (inputs may be a tuple or
            dict of tensors, as the model is called with them); or an iterable of such batches (a
            ``DataLoader``, which may end with a short batch).
        storage: the storage URL the workers read (the trainer's, or any they can reach).
        global_batch_size: the plan's global batch: ``fit`` refuses a plan of another.
        name: the data set's name (default: a fresh one); uploading under a name that exists
            replaces that data set.
        shard_bytes: about how many bytes of samples one shard holds.

    Raises:
        ConfigError: no samples, fewer than one global batch, samples of different shapes or dtypes,
            or inputs that are not a tensor, a tuple or a dict of tensors.
    """
    if not isinstance(global_batch_size, int) or isinstance(global_batch_size, bool) or global_batch_size < 1:
        raise ConfigError(f"global_batch_size must be a positive int, got {global_batch_size!r}; hint: "
                          "the plan's, plan.global_batch_size")
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ConfigError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
    name = check_job_name(name) if name is not None else f"data-{_secrets.token_hex(6)}"
    if not isinstance(storage, str):
        raise ConfigError(f"storage must be a storage URL (the workers open it), got {type(storage).__name__}; "
                          "hint: trainer.storage_url, or 's3://bucket/prefix'")
    store = data_storage(storage, name)
    writer = _Writer(store, name, _secrets.token_hex(6), shard_bytes)
    try:
        for batch_index, batch in enumerate(_batches(samples)):
            writer.add(batch, batch_index)
        return writer.finish(storage, global_batch_size)
    except BaseException:
        writer.discard()
        raise
    finally:
        store.close()


def open_stored(storage: str, name: str) -> StoredDataset:
    """The data set :func:`upload` wrote under ``name`` in ``storage``.

    Raises:
        ConfigError: there is none.
        IntegrityError: its manifest fails its check (another master secret wrote it, or it was altered).
    """
    store = data_storage(storage, check_job_name(name))
    key = manifest_key(name)
    try:
        raw = store.get_if_exists(key)
        if raw is None:
            raise ConfigError(f"no data set named {name!r} in {storage!r}; hint: funcpipe.data.upload(samples, "
                              f"{storage!r}, global_batch_size=..., name={name!r}) writes it")
        fields = binding.decode_json(raw, key)
    finally:
        store.close()
    if fields.get("format") != FORMAT:
        raise IntegrityError(f"data set manifest {key!r} has format {fields.get('format')!r}, not {FORMAT}")
    try:
        return StoredDataset.from_spec({**fields, "url": storage})
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"data set manifest {key!r} is malformed: {exc!r}") from exc


def _batches(samples: Any) -> Iterator[tuple[Any, torch.Tensor]]:
    """``samples`` as batches of ``(inputs, targets)`` (see :func:`upload`)."""
    if _is_pair_of_tensors(samples):
        yield samples[0], samples[1]
        return
    if hasattr(samples, "__getitem__") and hasattr(samples, "__len__") and not isinstance(samples, (list, tuple)):
        count = len(samples)
        step = 256
        for start in range(0, count, step):
            items = [samples[i] for i in range(start, min(count, start + step))]
            yield _collate(items, start)
        return
    if not isinstance(samples, Iterable):
        raise ConfigError(f"samples of type {type(samples).__name__} are neither a Dataset, an (inputs, targets) "
                          "pair of tensors nor an iterable of batches; hint: upload((x, y), ...) or a DataLoader")
    for batch in samples:
        if not _is_pair_of_tensors(batch):
            raise ConfigError(f"a batch of samples is a {type(batch).__name__}, not an (inputs, targets) pair "
                              "with a tensor of targets; hint: a DataLoader yielding (x, y)")
        yield batch[0], batch[1]


def _is_pair_of_tensors(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], torch.Tensor)


def _collate(items: Sequence[Any], start: int) -> tuple[Any, torch.Tensor]:
    """Dataset items ``(inputs, target)`` stacked into a batch (a number target becomes a tensor)."""
    for offset, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(f"dataset item {start + offset} is a {type(item).__name__}, not an (inputs, target) "
                              "pair; hint: __getitem__ returns (x, y)")
    inputs = [item[0] for item in items]
    targets = [torch.as_tensor(item[1]) for item in items]
    leaves = [pytree.tree_flatten(x) for x in inputs]
    spec = leaves[0][1]
    for offset, (_, other) in enumerate(leaves):
        if other != spec:
            raise ConfigError(f"dataset item {start + offset}'s inputs are structured as {other}, item {start}'s "
                              f"as {spec}; hint: every item's inputs have one structure")
    try:
        stacked = [torch.stack([torch.as_tensor(flat[i]) for flat, _ in leaves]) for i in range(len(leaves[0][0]))]
        return pytree.tree_unflatten(stacked, spec), torch.stack(targets)
    except RuntimeError as exc:
        raise ConfigError(f"dataset items {start}..{start + len(items) - 1} cannot be stacked: {exc}; hint: "
                          "every sample's tensors have one shape (pad them)") from exc


def _structure(inputs: Any) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """How ``inputs`` is structured, and its leaves by name (a tensor, a tuple or a dict of tensors)."""
    if isinstance(inputs, torch.Tensor):
        return {"kind": "tensor"}, [("inputs", inputs)]
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(v, torch.Tensor) for v in inputs):
        return {"kind": "tuple", "n": len(inputs)}, [(f"inputs[{i}]", v) for i, v in enumerate(inputs)]
    if (isinstance(inputs, dict) and inputs and all(isinstance(k, str) for k in inputs)
            and all(isinstance(v, torch.Tensor) for v in inputs.values())):
        return {"kind": "dict", "keys": list(inputs)}, [(f"inputs[{k!r}]", v) for k, v in inputs.items()]
    raise ConfigError(f"inputs are a {type(inputs).__name__}, not a tensor, a tuple or a dict of tensors; hint: "
                      "a stored data set holds inputs as the model is called with them (a dict for model(**x))")


def rebuild(structure: Mapping[str, Any], leaves: Sequence[torch.Tensor]) -> Any:
    """The inputs :func:`_structure` describes, from their leaves."""
    kind = structure["kind"]
    if kind == "tensor":
        return leaves[0]
    if kind == "tuple":
        return tuple(leaves)
    return dict(zip(structure["keys"], leaves, strict=True))


class _Writer:
    """Cuts the batches it is given into shards and writes each as it fills."""

    def __init__(self, storage: Storage, name: str, upload_id: str, shard_bytes: int) -> None:
        self.storage, self.name, self.upload, self.shard_bytes = storage, name, upload_id, shard_bytes
        self.structure: dict[str, Any] | None = None
        self.leaves: tuple[Leaf, ...] = ()
        self.target: Leaf | None = None
        self.shard_samples = 0
        self.pending: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self.pending_count = 0
        self.samples = 0
        self.written = 0  # shards

    def add(self, batch: tuple[Any, torch.Tensor], index: int) -> None:
        inputs, targets = batch
        structure, named = _structure(inputs)
        size = len(targets)
        for leaf_name, tensor in named:
            if tensor.dim() == 0 or len(tensor) != size:
                raise ConfigError(f"batch {index} of samples: {leaf_name} has shape {tuple(tensor.shape)}, its "
                                  f"targets {size} samples; hint: inputs and targets hold the same samples on dim 0")
        leaves = tuple(Leaf(n, codec.dtype_name(t.dtype), tuple(t.shape[1:])) for n, t in named)
        target = Leaf("targets", codec.dtype_name(targets.dtype), tuple(targets.shape[1:]))
        if self.structure is None:
            self.structure, self.leaves, self.target = structure, leaves, target
            per_sample = sum(leaf.sample_bytes for leaf in leaves) + target.sample_bytes
            self.shard_samples = max(1, self.shard_bytes // max(1, per_sample))
        elif (structure, leaves, target) != (self.structure, self.leaves, self.target):
            assert self.target is not None
            raise ConfigError(f"batch {index} of samples holds {_describe(leaves, target)}, the first held "
                              f"{_describe(self.leaves, self.target)}; hint: every sample has the same tensors")
        self.pending.append(([t for _, t in named], targets))
        self.pending_count += size
        self.samples += size
        while self.pending_count >= self.shard_samples:
            self._flush(self.shard_samples)

    def finish(self, url: str, global_batch_size: int) -> StoredDataset:
        if self.pending_count:
            self._flush(self.pending_count)
        if self.target is None or self.structure is None:
            raise ConfigError("samples held no sample; hint: pass a non-empty Dataset, pair of tensors or DataLoader")
        if self.samples < global_batch_size:
            raise ConfigError(f"samples hold {self.samples} samples, fewer than one global batch of "
                              f"{global_batch_size}; hint: a smaller global batch, or more samples")
        stored = StoredDataset(url, self.name, self.upload, self.samples, global_batch_size, self.shard_samples,
                               self.leaves, self.target, self.structure)
        spec = stored.to_spec()
        del spec["url"]  # the manifest holds where its shards are, not where the storage is
        key = manifest_key(self.name)
        previous = self.storage.get_if_exists(key)
        self.storage.put(key, binding.encode_json(key, {"format": FORMAT, **spec}))
        if previous is not None:  # a replaced upload: its shards go once the manifest names the new ones
            try:
                old = StoredDataset.from_spec({**binding.decode_json(previous, key), "url": url})
                self.storage.delete(_shard_keys(self.name, old.upload, old.shards))
            except (IntegrityError, KeyError, TypeError, ValueError):
                pass  # not ours to read (another secret wrote it): leave its shards
        return stored

    def discard(self) -> None:
        """Delete the shards of an upload that failed (its manifest was never written)."""
        keys = [shard_key(self.name, self.upload, part, k) for part in ("inputs", "targets")
                for k in range(self.written)]
        with contextlib.suppress(Exception):  # the upload's own failure is the one to report
            self.storage.delete(keys)

    def _flush(self, count: int) -> None:
        """Write the next shard: the first ``count`` pending samples."""
        inputs: list[list[torch.Tensor]] = [[] for _ in self.leaves]
        targets: list[torch.Tensor] = []
        need = count
        while need:
            leaves, target = self.pending[0]
            take = min(need, len(target))
            for i, tensor in enumerate(leaves):
                inputs[i].append(tensor[:take])
            targets.append(target[:take])
            if take == len(target):
                self.pending.pop(0)
            else:
                self.pending[0] = ([t[take:] for t in leaves], target[take:])
            need -= take
        self.pending_count -= count
        k = self.written
        named = {leaf.name: torch.cat(parts).contiguous() for leaf, parts in zip(self.leaves, inputs, strict=True)}
        for part, tensors in (("inputs", named), ("targets", {"targets": torch.cat(targets).contiguous()})):
            key = shard_key(self.name, self.upload, part, k)
            self.storage.put_parts(key, codec.encode_parts(tensors, {binding.FIELD: key}))
        self.written += 1


def _describe(leaves: Sequence[Leaf], target: Leaf) -> str:
    return ", ".join(f"{leaf.name} {leaf.dtype}{list(leaf.shape)}" for leaf in (*leaves, target))


# -- reading (the workers' side) ------------------------------------------------


class Reader:
    """The micro-batches of a stored data set, read from its shards as they are first needed.

    A shard read is kept for the reader's life (a worker's call), into one
    tensor per leaf of every sample, so each shard is read once.

    Args:
        storage: the data set's storage, authenticated under its key (:func:`data_storage`).
        spec: :meth:`StoredDataset.to_spec`, plus for :meth:`batch_indices` in a fit the
            ``first`` iteration of the fit's data (its batch 0).
        parts: which of ``"inputs"`` and ``"targets"`` this reader reads.
    """

    def __init__(self, storage: Storage, spec: Mapping[str, Any], parts: Sequence[str]) -> None:
        self.storage = storage
        self.data = StoredDataset.from_spec(spec)
        self.first = int(spec.get("first", 0))
        self._lock = threading.Lock()
        self._orders: dict[tuple[int, bool, int], torch.Tensor] = {}
        self._held: dict[str, dict[str, torch.Tensor]] = {}
        self._loaded: dict[str, set[int]] = {}
        for part in parts:
            leaves = self.data.inputs if part == "inputs" else (self.data.targets,)
            self._held[part] = {leaf.name: torch.empty((self.data.samples, *leaf.shape),
                                                       dtype=codec.dtype_of(leaf.dtype)) for leaf in leaves}
            self._loaded[part] = set()

    def batch_indices(self, k: int, shuffle: bool, seed: int) -> torch.Tensor:
        """The sample indices of global batch ``k`` of a fit (its epoch ``k // iterations_per_epoch``)."""
        per_epoch = self.data.iterations_per_epoch
        epoch, j = divmod(k, per_epoch)
        with self._lock:
            cached = self._orders.get((epoch, shuffle, seed))
            if cached is None:
                self._orders.clear()  # one epoch at a time (two around an epoch's end)
                cached = self._orders[(epoch, shuffle, seed)] = self.data.order(epoch, shuffle=shuffle, seed=seed)
        size = self.data.global_batch_size
        return cached[j * size:(j + 1) * size]

    def micro_batch_indices(self, iteration: int, m: int, micro: int, shuffle: bool, seed: int) -> torch.Tensor:
        """The sample indices of micro-batch ``m`` (of ``micro`` samples) of ``iteration`` of the fit."""
        return self.batch_indices(iteration - self.first, shuffle, seed)[m * micro:(m + 1) * micro]

    def inputs(self, indices: torch.Tensor) -> Any:
        """The inputs of ``indices`` as the model takes them (a tensor, a tuple, a dict)."""
        tensors = self._gather("inputs", indices)
        return rebuild(self.data.structure, [tensors[leaf.name] for leaf in self.data.inputs])

    def input_leaves(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The input tensors of ``indices`` by leaf name."""
        return self._gather("inputs", indices)

    def targets(self, indices: torch.Tensor) -> torch.Tensor:
        return self._gather("targets", indices)["targets"]

    def _gather(self, part: str, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        held = self._held[part]
        size = self.data.shard_samples
        needed = sorted({int(i) // size for i in indices.tolist()} - self._loaded[part])
        for shard in needed:
            self._load(part, shard)
        return {name: tensor.index_select(0, indices) for name, tensor in held.items()}

    def _load(self, part: str, shard: int) -> None:
        data = self.data
        key = shard_key(data.name, data.upload, part, shard)
        try:
            raw = self.storage.get(key)
        except ObjectNotFound:
            raise ConfigError(f"data set {data.name!r} has no shard {key!r} (deleted, or replaced by another "
                              f"upload); hint: upload it again, or funcpipe.data.open_stored(url, {data.name!r}) "
                              "for the current upload") from None
        tensors, metadata = codec.decode(raw)
        binding.check(key, metadata.get(binding.FIELD))
        start = shard * data.shard_samples
        rows = min(data.shard_samples, data.samples - start)
        held = self._held[part]
        if set(tensors) != set(held):
            raise IntegrityError(f"shard {key!r} holds {sorted(tensors)}, not {sorted(held)}")
        for name, tensor in tensors.items():
            target = held[name]
            if tensor.dtype != target.dtype or tuple(tensor.shape) != (rows, *target.shape[1:]):
                raise IntegrityError(f"shard {key!r}: {name} is {tensor.dtype}{list(tensor.shape)}, not "
                                     f"{target.dtype}{[rows, *target.shape[1:]]}")
            target[start:start + rows] = tensor
        self._loaded[part].add(shard)


def fit_iterations(stored: StoredDataset, epochs: int | None, iterations: int | None) -> int:
    """The iterations a fit on ``stored`` makes: ``iterations``, else ``epochs`` (default 1) full epochs."""
    if iterations is not None:
        return iterations
    return (epochs or 1) * stored.iterations_per_epoch


def check_fits(stored: StoredDataset, plan_batch: int, memory_mb: Sequence[int] | None,
               reachable: Callable[[str], None]) -> None:
    """Refuse a stored data set the plan cannot train on (before anything is launched).

    Raises:
        ConfigError: its global batch is not the plan's, its part does not fit half of stage 0's or the
            last stage's function memory, or the backend cannot reach its storage (``reachable``).
    """
    if stored.global_batch_size != plan_batch:
        raise ConfigError(
            f"the stored data set {stored.name!r} was written for a global batch of {stored.global_batch_size}, "
            f"the plan's is {plan_batch}; hint: upload it again with global_batch_size={plan_batch}, or plan "
            f"with global_batch_size={stored.global_batch_size}"
        )
    if memory_mb:
        for stage, part, nbytes in ((0, "inputs", stored.input_bytes),
                                    (len(memory_mb) - 1, "targets", stored.target_bytes)):
            if nbytes > memory_mb[stage] * 2**20 / 2:
                raise ConfigError(
                    f"the stored data set's {part} are {nbytes / 2**20:.1f} MB, more than half of stage {stage}'s "
                    f"function memory ({memory_mb[stage]} MB): each of its workers holds them; hint: a larger "
                    "memory tier for that stage, or feed the data from the driver (fit(data_loader))"
                )
    reachable(stored.url)
