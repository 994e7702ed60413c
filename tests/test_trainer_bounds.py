"""The driver's waits are bounded (StorageTimeout, retried), and user errors are not retried (issue 16, item 4).

tests/test_one_run_per_job.py has the hung upload of the stage definitions, an int32 target and a stage that
returns a tuple; here: a hung feed mid-fit (failed, then retried), float targets, and running out of memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from funcpipe import ConfigError, Plan, Trainer
from funcpipe.errors import StorageTimeout
from funcpipe.executors.thread import ThreadExecutor
from funcpipe.storage import MemoryStorage, register
from funcpipe.storage.bounded import BoundedStorage
from tests.helpers import assert_same_parameters, mlp7, plain_training, regression_batches, sgd_momentum

PLAN = Plan.manual([2, 3, 2], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
#: A storage request that should time out must have raised well within this (a loaded machine).
WITHIN_S = 60.0


@dataclass
class Block:
    """The first PUT whose key holds ``fragment`` blocks until ``release`` is set."""

    fragment: str
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    blocked_key: str | None = None


class BlockingStorage(MemoryStorage):
    """Memory storage whose PUTs block as a hung store's would, by the rule of its name in ``blocks``."""

    blocks: ClassVar[dict[str, Block]] = {}
    lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> BlockingStorage:
        storage = cls(url.removeprefix("blocking://"))
        storage.url = url
        return storage

    def put(self, key: str, data: bytes) -> None:
        block = self.blocks.get(self.name)
        if block is not None and block.fragment in key:
            with self.lock:
                first = block.blocked_key is None
                if first:
                    block.blocked_key = key
            if first:
                block.entered.set()
                block.release.wait(WITHIN_S * 4)
        super().put(key, data)


@pytest.fixture
def blocking() -> Iterator[tuple[str, Block]]:
    """A ``blocking://`` URL and its rule (released at the end, so the stuck request ends)."""
    register("blocking", BlockingStorage, clobber=True)
    name = f"blocks-{uuid.uuid4().hex[:12]}"
    block = Block(fragment="")
    BlockingStorage.blocks[name] = block
    yield f"blocking://{name}", block
    block.release.set()
    del BlockingStorage.blocks[name]
    MemoryStorage(name).clear()


def reference(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    return plain_training(mlp7(), nn.functional.mse_loss, sgd_momentum, batches)


# -- every wait of the driver bounded ------------------------------------------------------------


def test_the_trainer_bounds_its_storage_by_timeout_s() -> None:
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread",
                      storage=f"memory://bounded-{uuid.uuid4().hex[:8]}", timeout_s=42)
    bounded = trainer.storage.inner  # type: ignore[attr-defined]
    assert isinstance(bounded, BoundedStorage) and bounded.timeout_s == 42
    assert bounded.url == trainer.storage_url  # workers re-open the store itself


def test_a_hung_feed_upload_fails_the_run_naming_its_key(blocking: tuple[str, Block]) -> None:
    url, block = blocking
    block.fragment = "/a0/i00000002/input."  # the driver's upload of iteration 2's inputs, first attempt
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread", storage=url,
                      timeout_s=3)
    begun = time.monotonic()
    with pytest.raises(StorageTimeout) as info:
        trainer.fit(regression_batches(5, 8), progress=False)
    assert time.monotonic() - begun < WITHIN_S
    assert block.blocked_key is not None and f"put of {block.blocked_key!r}" in str(info.value)


def test_a_hung_feed_upload_is_retried_and_the_retry_equals_plain_pytorch(
    blocking: tuple[str, Block], caplog: pytest.LogCaptureFixture,
) -> None:
    url, block = blocking
    block.fragment = "/a0/i00000002/input."  # only the first attempt's: the retry's keys are a1's
    batches = regression_batches(5, 8)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, PLAN, backend="thread", storage=url,
                      timeout_s=3)
    with caplog.at_level(logging.WARNING, logger="funcpipe.trainer"):
        history = trainer.fit(batches, progress=False, max_retries=1, checkpoint_every=2)
    assert block.blocked_key is not None
    (rollback,) = [r.getMessage() for r in caplog.records if "rolling back" in r.getMessage()]
    assert "attempt 1 of 2 failed" in rollback and f"put of {block.blocked_key!r}" in rollback
    assert "did not finish within 3 s" in rollback and "rolling back to iteration 2" in rollback
    assert trainer.keys.attempt == 1
    assert len(history) == 5
    assert_same_parameters(trainer.model, reference(batches))


# -- user errors not retried ---------------------------------------------------------------------


class Counting(ThreadExecutor):
    """A thread executor that counts the workers it launches (one attempt of PLAN launches four)."""

    def __init__(self) -> None:
        super().__init__()
        self.launched = 0

    def launch(self, *args: Any, **kwargs: Any) -> Any:
        self.launched += 1
        return super().launch(*args, **kwargs)


def classification_batches(count: int, target_dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator).to(target_dtype))
            for _ in range(count)]


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.int32])
def test_a_loss_given_targets_of_the_wrong_dtype_is_named_before_launch(target_dtype: torch.dtype) -> None:
    executor = Counting()
    trainer = Trainer(mlp7(), nn.functional.cross_entropy, sgd_momentum, PLAN, backend=executor,
                      storage=f"memory://wrong-dtype-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConfigError) as info:
        trainer.fit(classification_batches(3, target_dtype), progress=False, max_retries=3)
    assert executor.launched == 0  # the driver called the loss on the first micro-batch: nothing launched
    message = str(info.value)
    assert message.startswith("loss_fn cannot take the model's output: it raised RuntimeError: ")
    assert f"({target_dtype})" in message and "hint:" in message and "targets.long()" in message


class RunsOutOfMemoryOnce(nn.Module):
    """Identity, but the first forward call of any worker (once per marker file) fails as an allocator would."""

    def __init__(self, marker: Path, error: str) -> None:
        super().__init__()
        self.marker = str(marker)
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # the driver's check before launch: not a worker
            return x
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return x
        os.close(fd)
        if self.error == "MemoryError":
            raise MemoryError()
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes")


@pytest.mark.parametrize("error", ["MemoryError", "RuntimeError"])
def test_running_out_of_memory_stays_retryable(tmp_path: Path, error: str) -> None:
    executor = Counting()
    batches = regression_batches(3, 8)
    model = nn.Sequential(*mlp7(), RunsOutOfMemoryOnce(tmp_path / "failed", error))
    plan = Plan.manual([2, 3, 3], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(model, nn.functional.mse_loss, sgd_momentum, plan, backend=executor,
                      storage=f"memory://oom-{uuid.uuid4().hex[:8]}")
    history = trainer.fit(batches, progress=False, max_retries=1)
    assert (tmp_path / "failed").exists()  # the fault was injected
    assert executor.launched == 8  # two attempts
    assert len(history) == 3
    assert_same_parameters(nn.Sequential(*trainer.model[:-1]), reference(batches))
