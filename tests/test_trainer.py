from __future__ import annotations

import collections
import copy
import dataclasses
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from funcpipe import ConfigError, Plan, StorageAccessDenied, Trainer
from funcpipe.executors.thread import ThreadActor, ThreadExecutor
from funcpipe.run import Run
from funcpipe.worker import StageWorker
from tests.helpers import (
    SpyExecutor,
    assert_same_parameters,
    mlp7,
    plain_training,
    regression_batches,
    sgd_momentum,
)

SGD_MOMENTUM = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
ADAM = lambda p: torch.optim.Adam(p, lr=0.01)

PlanArgs = tuple[list[int], list[int], int, int, str]

# (balance, replicas, micro-batch, global batch, schedule): the cases the issues name.
PLANS: dict[str, PlanArgs] = {
    "one-stage": ([7], [1], 4, 16, "gpipe"),
    "three-stages-2-1-3": ([2, 3, 2], [2, 1, 3], 4, 24, "gpipe"),  # 6 micro-batches
    "not-a-multiple": ([2, 3, 2], [2, 1, 3], 4, 20, "gpipe"),  # 5 micro-batches over 2 and 3 replicas
    # Issue 13: 7 micro-batches over 2, 1 and 3 replicas, in 1F1B windows of 3, 4 and 1.
    "1f1b-2-1-3-seven": ([2, 3, 2], [2, 1, 3], 4, 28, "1f1b"),
}


def train(plan_args: PlanArgs, optimizer: Callable[..., torch.optim.Optimizer],
          backend: str, *, sync: str = "pipelined", iterations: int = 3) -> tuple[nn.Module, nn.Module]:
    balance, replicas, micro, global_batch, schedule = plan_args
    model = mlp7()
    batches = regression_batches(iterations, global_batch)
    expected = plain_training(model, nn.functional.mse_loss, optimizer, batches)
    plan = Plan.manual(balance, replicas=replicas, micro_batch_size=micro, global_batch_size=global_batch,
                       sync=sync, schedule=schedule)
    trainer = Trainer(model, nn.functional.mse_loss, optimizer, plan, backend=backend,
                      storage=None if backend == "ray" else f"memory://{id(model)}")
    history = trainer.fit(batches, progress=False)
    assert len(history) == iterations
    return trainer.model, expected


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("optimizer", [SGD_MOMENTUM, ADAM], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_ray_training_equals_plain_pytorch(plan_name: str, optimizer: Callable[..., torch.optim.Optimizer]) -> None:
    actual, expected = train(PLANS[plan_name], optimizer, "ray")
    assert_same_parameters(actual, expected)


@pytest.mark.parametrize("optimizer", [SGD_MOMENTUM, ADAM], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_thread_training_equals_plain_pytorch(plan_name: str, optimizer: Callable[..., torch.optim.Optimizer]) -> None:
    actual, expected = train(PLANS[plan_name], optimizer, "thread")
    assert_same_parameters(actual, expected)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("sync", ["pipelined", "four_phase"])
@pytest.mark.parametrize(
    "plan_args",
    [([1, 6], [1, 4], 2, 8), ([3, 4], [3, 2], 1, 7), ([1, 1, 1, 1, 1, 1, 1], [1, 2, 1, 3, 1, 5, 2], 2, 10)],
    ids=["1-6", "3-4", "seven-stages"],
)
def test_thread_backend_equals_plain_pytorch(
    plan_args: tuple[list[int], list[int], int, int], sync: str, schedule: str
) -> None:
    actual, expected = train((*plan_args, schedule), SGD_MOMENTUM, "thread", sync=sync)
    assert_same_parameters(actual, expected)


def test_one_stage_under_1f1b_is_gradient_accumulation() -> None:
    # One micro-batch in flight at a time (issue 13): the worker's window, and its result, are plain
    # gradient accumulation over the global batch.
    plan = Plan.manual([7], micro_batch_size=2, global_batch_size=10, schedule="1f1b")
    assert plan.in_flight(0) == 1
    actual, expected = train(([7], [1], 2, 10, "1f1b"), ADAM, "thread")
    assert_same_parameters(actual, expected)


def test_history_reports_the_global_mean_loss() -> None:
    model = mlp7()
    batches = regression_batches(2, 12)
    plan = Plan.manual([2, 5], replicas=[1, 3], micro_batch_size=4, global_batch_size=12)
    trainer = Trainer(model, nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.0), plan,
                      backend="thread", storage="memory://history-loss")
    history = trainer.fit(batches, progress=False)
    with torch.no_grad():
        expected = [float(nn.functional.mse_loss(model(x), y)) for x, y in batches]
    assert history.losses == pytest.approx(expected, rel=1e-5)
    assert len(history.seconds) == 2 and all(s > 0 for s in history.seconds)
    assert sorted((w["stage"], w["replica"]) for w in history.workers) == [(0, 0), (1, 0), (1, 1), (1, 2)]


def test_second_fit_continues_where_the_first_stopped() -> None:
    model = mlp7()
    batches = regression_batches(4, 8)
    expected = plain_training(model, nn.functional.mse_loss, ADAM, batches)
    plan = Plan.manual([3, 4], replicas=[2, 1], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(model, nn.functional.mse_loss, ADAM, plan, backend="thread", storage="memory://two-fits")
    trainer.fit(batches[:2], progress=False)
    trainer.fit(batches[2:], progress=False)  # Adam's moments must carry over
    assert_same_parameters(trainer.model, expected)


def test_iterations_cycle_over_the_data() -> None:
    model = mlp7()
    batches = regression_batches(2, 4)
    expected = plain_training(model, nn.functional.mse_loss, SGD_MOMENTUM, batches * 2 + batches[:1])
    plan = Plan.manual([7], micro_batch_size=2, global_batch_size=4)
    trainer = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, plan, backend="thread",
                      storage="memory://cycle")
    assert len(trainer.fit(batches, iterations=5, progress=False)) == 5
    assert_same_parameters(trainer.model, expected)


@pytest.mark.parametrize(("width", "sync"), [(16, "pipelined"), (16, "four_phase"), (1600, "pipelined")])
def test_storage_is_cleaned_of_messages_after_fit(width: int, sync: str) -> None:
    """The driver deletes each iteration by its known keys (no listing): nothing may be missed.

    Width 1600 makes stage 0's gradient ~10 MB, so its pipelined all-reduce sends several pieces.
    """
    from funcpipe.storage import open_storage

    url = f"memory://cleaned-{width}-{sync}"
    plan = Plan.manual([3, 4], replicas=[2, 2], micro_batch_size=2, global_batch_size=8, sync=sync)
    trainer = Trainer(mlp7(width=width), nn.functional.mse_loss, SGD_MOMENTUM, plan, backend="thread",
                      storage=url)
    trainer.fit(regression_batches(2, 8), progress=False)
    left = open_storage(url).list(trainer.keys.job)
    assert left and all("/model/" in key or "/checkpoint/" in key for key in left), left


class TestTimeout:
    """Issue 6: every wait has a timeout derived from the plan's predicted times, with a floor."""

    def plan(self, predicted_iteration_s: float | None) -> Plan:
        plan = Plan.manual([3, 4], micro_batch_size=2, global_batch_size=8)
        return dataclasses.replace(plan, predicted_iteration_s=predicted_iteration_s)

    @pytest.mark.parametrize(
        ("predicted_s", "timeout_s"),
        [(None, 300.0), (12.5, 125.0), (0.2, 60.0)],
        ids=["no-prediction", "ten-predicted-iterations", "floor"],
    )
    def test_derived_from_the_plan(self, predicted_s: float | None, timeout_s: float) -> None:
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(predicted_s),
                          backend="thread", storage="memory://derived-timeout")
        assert trainer.timeout_s == timeout_s

    def test_a_given_timeout_wins(self) -> None:
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(12.5), backend="thread",
                          storage="memory://given-timeout", timeout_s=7)
        assert trainer.timeout_s == 7

    @pytest.mark.parametrize("timeout_s", [0, -1.0])
    def test_a_timeout_must_be_positive(self, timeout_s: float) -> None:
        with pytest.raises(ConfigError, match=rf"timeout_s must be > 0 .*\(got {timeout_s}, 1\)"):
            Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(None), backend="thread",
                    storage="memory://bad-timeout", timeout_s=timeout_s)

    def test_workers_wait_twice_as_long_as_the_driver(self) -> None:
        # So the driver, which sees every worker, is the one to judge a hang and name who causes it.
        executor = SpyExecutor(ThreadExecutor())
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(12.5), backend=executor,
                          storage="memory://worker-timeout")
        trainer.fit(regression_batches(1, 8), progress=False)
        workers = [handle.instance for handle in executor.launched if isinstance(handle, ThreadActor)]
        assert [w.config.timeout_s for w in workers if isinstance(w, StageWorker)] == [250.0, 250.0]


class TestBadInput:
    """Issue 6: bad input is refused with a named error, naming the value, before anything is launched."""

    def plan(self) -> Plan:
        return Plan.manual([3, 4], micro_batch_size=2, global_batch_size=8)

    def test_not_a_module(self) -> None:
        with pytest.raises(ConfigError, match=r"torch.nn.Module, got function; hint: pass the model itself"):
            Trainer(lambda x: x, nn.functional.mse_loss, SGD_MOMENTUM, self.plan())  # type: ignore[arg-type]

    def test_balance_does_not_match_the_model(self) -> None:
        with pytest.raises(ConfigError, match=r"model: 7 layers.*: 6\); hint: .* add up to len\(model\) = 7"):
            Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, Plan.manual([3, 3], micro_batch_size=2,
                                                                             global_batch_size=8))

    def test_unknown_storage_url(self) -> None:
        with pytest.raises(ConfigError, match=r"'ftp://x'.*known schemes"):
            Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), backend="thread", storage="ftp://x")

    @pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
    def test_inputs_of_another_dtype_than_the_model(self, dtype: torch.dtype) -> None:
        executor = SpyExecutor(ThreadExecutor())
        model = nn.Sequential(nn.Flatten(), *mlp7()[:6])  # Flatten keeps the dtype: Linear decides it
        trainer = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), backend=executor,
                          storage="memory://bad-dtype")
        x, y = regression_batches(1, 8)[0]
        with pytest.raises(ConfigError, match=(
            rf"batch 0: inputs are {dtype}, but the model's layer 1 \(Linear\) computes in torch.float32; "
            r"hint: convert them with inputs.to\(torch.float32\)"
        )):
            trainer.fit([(x.to(dtype), y)], progress=False)
        assert executor.launched == []

    def test_integer_inputs_of_an_embedding_are_fine(self) -> None:
        model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(16, 3))
        plan = Plan.manual([1, 2], micro_batch_size=2, global_batch_size=4)
        trainer = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, plan, backend="thread",
                          storage="memory://embedding")
        indices = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
        assert len(trainer.fit([(indices, torch.zeros(4, 3))], progress=False)) == 1

    def test_targets_a_loss_cannot_take_are_named_before_launch(self) -> None:
        # The driver calls the loss on the first micro-batch's output before launching anything.
        executor = SpyExecutor(ThreadExecutor())
        trainer = Trainer(mlp7(), nn.functional.cross_entropy, SGD_MOMENTUM, self.plan(), backend=executor,
                          storage="memory://bad-targets")
        x = regression_batches(1, 8)[0][0]
        pattern = r"loss_fn cannot take the model's output: it raised RuntimeError: .*Long.*\(torch\.float32\)"
        with pytest.raises(ConfigError, match=pattern):
            trainer.fit([(x, torch.zeros(8))], progress=False)  # class indices as floats
        assert executor.launched == []

    @pytest.mark.parametrize("scheme", ["s3", "oss"])
    def test_storage_without_credentials(
        self, scheme: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ALIBABA_CLOUD_ACCESS_KEY_ID",
                     "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
        url = (f"s3://no-credentials/p?endpoint_url={moto_endpoint}" if scheme == "s3"
               else f"oss://no-credentials/p?endpoint={moto_endpoint}")
        executor = SpyExecutor(ThreadExecutor())
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), backend=executor, storage=url)
        hint = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" if scheme == "s3" else "ALIBABA_CLOUD_ACCESS_KEY_ID"
        with pytest.raises(StorageAccessDenied, match=rf"no (usable AWS|OSS) credentials .*{hint}"):
            trainer.fit(regression_batches(1, 8), progress=False)
        assert executor.launched == []

    def test_optimizer_instance_instead_of_factory(self) -> None:
        model = mlp7()
        with pytest.raises(ConfigError, match="factory"):
            Trainer(model, nn.functional.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1),  # type: ignore[arg-type]
                    self.plan(), backend="thread")

    def test_unknown_backend(self) -> None:
        with pytest.raises(ConfigError, match="unknown backend 'lambda'"):
            Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), backend="lambda")

    def test_memory_storage_refused_on_ray(self) -> None:
        with pytest.raises(ConfigError, match="memory://x"):
            Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), storage="memory://x")

    def test_wrong_batch_size_is_named_before_any_worker_is_launched(self) -> None:
        executor = SpyExecutor(ThreadExecutor())
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), backend=executor,
                          storage="memory://bad-batch")
        with pytest.raises(ConfigError, match=r"inputs has shape \(6, 8\).*batch is 8 samples; hint: DataLoader"):
            trainer.fit(regression_batches(1, 6), progress=False)
        assert executor.launched == []

    def test_a_later_batch_of_the_wrong_size_is_named_when_it_is_fed(self) -> None:
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), backend="thread",
                          storage="memory://bad-later-batch")
        with pytest.raises(ConfigError, match=r"batch 1: targets has shape \(6, 3\)"):
            trainer.fit([regression_batches(1, 8)[0], (torch.randn(8, 8), torch.randn(6, 3))], progress=False)

    def test_no_data_is_named_before_any_worker_is_launched(self) -> None:
        executor = SpyExecutor(ThreadExecutor())
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), backend=executor,
                          storage="memory://no-data")
        with pytest.raises(ConfigError, match="data yielded no batch, but 3 iterations were asked for; hint:"):
            trainer.fit(iter([]), iterations=3, progress=False)
        assert executor.launched == []

    def test_generator_without_length_needs_iterations(self) -> None:
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), backend="thread",
                          storage="memory://gen")
        with pytest.raises(ConfigError, match="no len"):
            trainer.fit(iter(regression_batches(1, 8)), progress=False)

    def test_data_running_out(self) -> None:
        trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, self.plan(), backend="thread",
                          storage="memory://runs-out", timeout_s=30)
        with pytest.raises(ConfigError, match="ran out after 1 batches"):
            trainer.fit(iter(regression_batches(1, 8)), iterations=3, progress=False)

    def test_non_scalar_loss(self) -> None:
        executor = SpyExecutor(ThreadExecutor())
        trainer = Trainer(mlp7(), lambda out, y: (out - y) ** 2, SGD_MOMENTUM, self.plan(), backend=executor,
                          storage="memory://non-scalar")
        with pytest.raises(ConfigError, match=r"loss_fn returned \(2, 3\), not a scalar tensor"):
            trainer.fit(regression_batches(1, 8), progress=False)
        assert executor.launched == []


def test_user_model_is_trained_in_place() -> None:
    model = mlp7()
    before = copy.deepcopy(model.state_dict())
    trainer = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, Plan.manual([7], micro_batch_size=4,
                      global_batch_size=4), backend="thread", storage="memory://in-place")
    trainer.fit(regression_batches(1, 4), progress=False)
    assert trainer.model is model
    assert not torch.equal(model[0].weight, before["0.weight"])


class IterationCensus:
    """Counts, across every storage opened for a URL, the iterations with objects alive at once."""

    alive: ClassVar[dict[str, int]] = {}  # iteration prefix -> objects
    most = 0


def test_storage_holds_only_a_few_iterations_during_a_long_fit() -> None:
    from funcpipe.storage import MemoryStorage, register

    class CensusStorage(MemoryStorage):
        @classmethod
        def from_url(cls, url: str) -> CensusStorage:
            storage = cls(url.split("://", 1)[1])
            storage.url = url
            return storage

        @staticmethod
        def _prefix(key: str) -> str | None:
            parts = key.split("/")  # job/run/attempt/iteration/message
            is_message = len(parts) > 4 and parts[2].startswith("a") and parts[3].startswith("i")
            return "/".join(parts[:4]) if is_message else None

        def put(self, key: str, data: bytes) -> None:
            prefix = self._prefix(key)
            fresh = not self.exists(key)
            super().put(key, data)
            if prefix and fresh:
                IterationCensus.alive[prefix] = IterationCensus.alive.get(prefix, 0) + 1
                IterationCensus.most = max(IterationCensus.most, len(IterationCensus.alive))

        def delete(self, keys: Iterable[str]) -> None:
            for key in list(keys):
                prefix = self._prefix(key)
                if prefix and self.exists(key):
                    IterationCensus.alive[prefix] -= 1
                    if not IterationCensus.alive[prefix]:
                        del IterationCensus.alive[prefix]
                super().delete([key])

    IterationCensus.alive.clear()
    IterationCensus.most = 0
    register("census", CensusStorage, clobber=True)
    plan = Plan.manual([3, 4], replicas=[2, 1], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, SGD_MOMENTUM, plan, backend="thread",
                      storage="census://long-fit")
    trainer.fit(regression_batches(2, 8), iterations=30, progress=False)
    assert IterationCensus.alive == {}
    # The driver feeds LOOKAHEAD iterations ahead; everything older is deleted as the run goes.
    assert 2 <= IterationCensus.most <= 5, IterationCensus.most


def train_over_foreign_objects(backend: str, storage: str, source: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every object a finished run wrote is copied, before a new run starts, under the key the new run's
    workers and driver will read for the same object; the new run must read none of them."""
    from funcpipe import binding
    from funcpipe.protocol import JobKeys
    from funcpipe.storage import open_storage

    iterations = 3
    plan = Plan.manual([3, 4], replicas=[2, 2], micro_batch_size=2, global_batch_size=8)
    model, batches = mlp7(), regression_batches(iterations, 8)
    losses: list[float] = []
    expected = plain_training(model, nn.functional.mse_loss, SGD_MOMENTUM, batches, losses=losses)
    # A short timeout: a run that consumed a foreign object fails in a minute rather than hangs for five.
    new = Trainer(model, nn.functional.mse_loss, SGD_MOMENTUM, plan, backend=backend, storage=storage, timeout_s=60)
    # The old run: other weights and data, the same shapes (so nothing but the binding tells its objects apart).
    old = Trainer(mlp7(seed=5), nn.functional.mse_loss, SGD_MOMENTUM, plan, backend=backend, storage=storage)
    if source == "earlier-attempt":  # the same job; fit() moves to the next attempt after a failed one
        old.keys, new.keys = JobKeys(new.keys.job, 0), JobKeys(new.keys.job, 1)
    with pytest.MonkeyPatch.context() as patch:  # its driver never deletes an iteration's objects, as a crashed one
        patch.setattr(Run, "_forget", lambda self, iteration: None)
        old.fit(regression_batches(iterations, 8, seed=9), progress=False)

    objects = open_storage(storage)
    for key in objects.list(old.keys.root + "/"):
        objects.put(new.keys.root + key[len(old.keys.root):], objects.get(key))
    # What the old driver writes on a platform with a lifetime limit, and when a run fails.
    objects.put(new.keys.stop(0), binding.encode_json(old.keys.stop(0), {"iteration": 1}))
    objects.put(new.keys.abort, binding.encode_json(old.keys.abort, {}))
    gradient_bytes = [
        sum(p.numel() * p.element_size() for i in plan.layer_range(s) for p in model[i].parameters())
        for s in range(plan.num_stages)
    ]
    read = {key for i in range(iterations) for key in new.keys.iteration_keys(i, plan, gradient_bytes)}
    planted = set(objects.list(new.keys.root + "/"))
    assert read <= planted
    kinds = {"checkpoint" if "/checkpoint/" in key else key.rsplit("/", 1)[1].split(".")[0] for key in planted}
    assert kinds == {"input", "target", "act", "grad", "chunk", "merged", "metrics", "stop", "abort", "checkpoint"}

    planted_in = new.keys
    with caplog.at_level("WARNING", logger="funcpipe"):
        # A worker refuses the first planted object it reads (its MAC, bound to the key and to the job's
        # key, fails): the attempt fails and is retried with fresh keys, where nothing is planted.
        history = new.fit(batches, progress=False, max_retries=1)
    assert new.keys.attempt == planted_in.attempt + 1
    assert_same_parameters(new.model, expected)
    assert history.losses == pytest.approx(losses, rel=1e-5)
    refused = [r.getMessage() for r in caplog.records if "failed its authentication" in r.getMessage()]
    assert refused and all(planted_in.root in message for message in refused)


@pytest.mark.parametrize("source", ["other-job", "earlier-attempt"])
def test_thread_training_over_foreign_objects_equals_plain_pytorch(
    source: str, caplog: pytest.LogCaptureFixture
) -> None:
    train_over_foreign_objects("thread", f"memory://foreign-{source}", source, caplog)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("source", ["other-job", "earlier-attempt"])
def test_ray_training_over_foreign_objects_equals_plain_pytorch(
    source: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train_over_foreign_objects("ray", tmp_path.as_uri(), source, caplog)


def test_parameters_tied_across_stages_are_refused_before_launch() -> None:
    embedding = nn.Embedding(10, 4)
    decoder = nn.Linear(4, 10)
    decoder.weight = embedding.weight
    model = nn.Sequential(embedding, nn.ReLU(), decoder)
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)
    with pytest.raises(ConfigError, match=r"layers 0 and 2 share .* stages 0 and 1"):
        Trainer(model, nn.functional.mse_loss, sgd, Plan.manual([2, 1], micro_batch_size=2, global_batch_size=4),
                backend=ThreadExecutor())
    # In one stage the tie is one parameter, trained as such.
    Trainer(model, nn.functional.mse_loss, sgd, Plan.manual([3], micro_batch_size=2, global_batch_size=4),
            backend=ThreadExecutor())


def test_a_sequential_with_named_layers_trains_and_keeps_its_names() -> None:
    """nn.Sequential(OrderedDict(enc=..., head=...)): its state dict's keys are the names, not indices;
    the stages' checkpoints load into it, and training equals plain PyTorch."""
    torch.manual_seed(3)
    model = nn.Sequential(collections.OrderedDict(
        enc=nn.Linear(8, 16), act=nn.Tanh(), mid=nn.Linear(16, 16), act2=nn.Tanh(), head=nn.Linear(16, 3)))
    batches = regression_batches(4, 8)
    expected = plain_training(model, nn.functional.mse_loss, sgd_momentum, batches)
    plan = Plan.manual([2, 3], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(model, nn.functional.mse_loss, sgd_momentum, plan, backend="thread",
                      storage=f"memory://named-{uuid.uuid4().hex}")
    trainer.fit(batches, progress=False, checkpoint_every=2)
    assert list(trainer.model.state_dict()) == ["enc.weight", "enc.bias", "mid.weight", "mid.bias", "head.weight",
                                                "head.bias"]
    assert trainer.model is model
    assert_same_parameters(trainer.model, expected)
