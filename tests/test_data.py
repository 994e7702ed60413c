"""funcpipe.data: a data set written to storage once, read back by the workers' reader.

What a read gives is compared with the original tensors indexed by an order
computed here from the documented rule (sha256 of the seed and epoch seeding
``torch.randperm``), not by the module's own ``order``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from funcpipe import data
from funcpipe.errors import ConfigError, IntegrityError
from funcpipe.storage import open_storage

N, FEATURES = 50, 3


def samples() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, FEATURES, generator=g), torch.randint(0, 4, (N,), generator=g)


def documented_order(samples: int, epoch: int, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"funcpipe-data:{seed}:{epoch}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(samples, generator=g)


def url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


def test_batches_of_a_pair_are_the_samples_in_the_documented_order_over_epochs(tmp_path: Path) -> None:
    x, y = samples()
    stored = data.upload((x, y), url(tmp_path), global_batch_size=8, shard_bytes=100)
    assert stored.samples == N and stored.iterations_per_epoch == 6 and stored.shards > 5
    batches = list(stored.batches(epochs=2, seed=7))
    assert len(batches) == 12
    for k, (bx, by) in enumerate(batches):
        epoch, j = divmod(k, 6)
        idx = documented_order(N, epoch, 7)[j * 8:(j + 1) * 8]
        assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])
    assert not torch.equal(batches[0][0], batches[6][0])  # each epoch its own order


def test_without_shuffle_the_batches_are_the_samples_in_turn(tmp_path: Path) -> None:
    x, y = samples()
    stored = data.upload(TensorDataset(x, y), url(tmp_path), global_batch_size=10)
    got = list(stored.batches(shuffle=False))
    assert torch.equal(torch.cat([b for b, _ in got]), x) and torch.equal(torch.cat([t for _, t in got]), y)


def test_a_data_loader_with_a_short_last_batch_and_dict_inputs_round_trip(tmp_path: Path) -> None:
    x, y = samples()
    ids = torch.arange(N)
    loader = DataLoader(list(zip([{"x": a, "ids": i} for a, i in zip(x, ids, strict=True)], y, strict=True)),
                        batch_size=7)
    stored = data.upload(loader, url(tmp_path), global_batch_size=5, shard_bytes=64)
    assert [leaf.name for leaf in stored.inputs] == ["inputs['x']", "inputs['ids']"]
    everything = list(stored.batches(shuffle=False))
    assert torch.equal(torch.cat([b["x"] for b, _ in everything]), x)
    assert torch.equal(torch.cat([b["ids"] for b, _ in everything]), ids)
    assert torch.equal(torch.cat([t for _, t in everything]), y)
    assert all(set(inputs) == {"x", "ids"} for inputs, _ in everything)


def test_a_reopened_data_set_is_the_same(tmp_path: Path) -> None:
    x, y = samples()
    stored = data.upload(((x, x * 2), y), url(tmp_path), global_batch_size=8, name="pairs")
    again = data.open_stored(url(tmp_path), "pairs")
    assert again == stored
    (a, b), _ = next(again.batches(shuffle=False))
    assert torch.equal(a, x[:8]) and torch.equal(b, 2 * x[:8])


def shard_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "store").rglob("*") if p.is_file() and "/inputs/" in str(p))


def test_a_flipped_byte_in_a_shard_is_refused(tmp_path: Path) -> None:
    x, y = samples()
    stored = data.upload((x, y), url(tmp_path), global_batch_size=8, shard_bytes=100)
    victim = shard_files(tmp_path)[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        list(stored.batches(shuffle=False))


def test_a_shard_moved_to_another_index_is_refused(tmp_path: Path) -> None:
    x, y = samples()
    stored = data.upload((x, y), url(tmp_path), global_batch_size=8, shard_bytes=100)
    first, second = shard_files(tmp_path)[:2]
    second.write_bytes(first.read_bytes())
    with pytest.raises(IntegrityError):
        list(stored.batches(shuffle=False))


def test_another_master_secret_cannot_read_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = samples()
    data.upload((x, y), url(tmp_path), global_batch_size=8, name="mine")
    monkeypatch.setenv("FUNCPIPE_SECRET", "someone else")
    with pytest.raises(IntegrityError):
        data.open_stored(url(tmp_path), "mine")


def test_a_new_upload_under_a_name_replaces_the_old_one_and_its_shards(tmp_path: Path) -> None:
    x, y = samples()
    old = data.upload((x, y), url(tmp_path), global_batch_size=8, name="d")
    new = data.upload((x[:20] + 1, y[:20]), url(tmp_path), global_batch_size=8, name="d")
    assert new.upload != old.upload and data.open_stored(url(tmp_path), "d") == new
    keys = open_storage(url(tmp_path)).list("data/d/")
    assert not [k for k in keys if old.upload in k]
    with pytest.raises(ConfigError, match="no shard"):
        list(old.batches())
    bx, _ = next(new.batches(shuffle=False))
    assert torch.equal(bx, x[:8] + 1)


def test_delete_removes_every_object(tmp_path: Path) -> None:
    x, y = samples()
    stored = data.upload((x, y), url(tmp_path), global_batch_size=8, shard_bytes=100)
    stored.delete()
    assert open_storage(url(tmp_path)).list("data/") == []
    with pytest.raises(ConfigError, match="no data set named"):
        data.open_stored(url(tmp_path), stored.name)


@pytest.mark.parametrize(("samples_of", "match"), [
    (lambda x, y: (x[:5], y[:5]), "fewer than one global batch"),
    (lambda x, y: [(x[:10], y[:10]), (x[:10, :2], y[:10])], "the first held"),
    (lambda x, y: ([1, 2], y), "not a tensor, a tuple or a dict of tensors"),
    (lambda x, y: (x, y[:10]), "the same samples on dim 0"),
    (lambda x, y: 42, "neither a Dataset"),
    (lambda x, y: [], "no sample"),
])
def test_bad_samples_are_named(tmp_path: Path, samples_of: object, match: str) -> None:
    x, y = samples()
    with pytest.raises(ConfigError, match=match):
        data.upload(samples_of(x, y), url(tmp_path), global_batch_size=8)  # type: ignore[operator]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing left of a failed upload


@pytest.mark.parametrize(("option", "value"), [("global_batch_size", 0), ("global_batch_size", 2.0),
                                                ("shard_bytes", 0), ("name", "a/b")])
def test_bad_options_are_named(tmp_path: Path, option: str, value: object) -> None:
    x, y = samples()
    kwargs: dict[str, object] = {"global_batch_size": 8, option: value}
    with pytest.raises(ConfigError, match=option.split("_")[0] if option != "name" else "storage prefix"):
        data.upload((x, y), url(tmp_path), **kwargs)  # type: ignore[arg-type]


def test_the_reader_loads_each_shard_once(tmp_path: Path) -> None:
    x, y = samples()
    stored = data.upload((x, y), "counted+" + url(tmp_path) + "?counter=data-reader", global_batch_size=8,
                         shard_bytes=100)
    from funcpipe.storage.counting import counter

    count = counter("data-reader")
    count.reset()
    list(stored.batches(epochs=3, seed=1))
    assert count.counts()["GET"] == 2 * stored.shards  # inputs and targets, each shard once
    assert os.environ.get("FUNCPIPE_SECRET") is None
