"""funcpipe.stages: any module cut into a plan's stages; bad input named before anything is launched.

Every case here fails in ``fit`` (the model is split on the first micro-batch)
or in ``Trainer`` itself, and the spy executor shows that no worker was
launched. The last tests train on the thread backend: a dict input, a model
whose only cut carries one integer tensor, cuts by module name, a second fit
continuing from the first's checkpoint, and a job resumed from its manifest,
each against plain PyTorch.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from funcpipe import Plan, Trainer
from funcpipe.errors import ConfigError
from funcpipe.executors.thread import ThreadExecutor
from tests.helpers import SkipNet, SpyExecutor, sgd_momentum, skip_net
from tests.test_trainer_traced import assert_trained_like_plain, call, plain, sgd

BATCH = 4


def loss_on_first(out: Any, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out[0], y)


class Branchy(nn.Module):
    """A branch on a tensor value computed by the unit before it (data-dependent control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.mean() > 0:
            return self.b(h)
        return self.c(h)


class Tied(nn.Module):
    """The same Linear called by the first and the last unit."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.middle = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.middle(self.shared(x)))))


def batches(inputs: Any, count: int = 2) -> list[Any]:
    g = torch.Generator().manual_seed(3)
    return [(inputs, torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(count)]


def fit_refused(model: nn.Module, balance: list[int], data: list[Any], loss_fn: Callable[..., Any],
                match: str, **kwargs: Any) -> None:
    executor = SpyExecutor(ThreadExecutor())
    plan = Plan.manual(balance, micro_batch_size=2, global_batch_size=data[0][1].shape[0])
    trainer = Trainer(model, loss_fn, sgd, plan, backend=executor, **kwargs)
    with pytest.raises(ConfigError, match=match):
        trainer.fit(data, progress=False)
    assert executor.launched == []


class TestBadInput:
    def test_a_model_with_a_branch_on_a_tensor_value_is_named_with_the_tracer_message_and_a_hint(self) -> None:
        fit_refused(Branchy(), [1, 2], batches(torch.randn(BATCH, 4)), nn.functional.cross_entropy,
                    r"Branchy has control flow that depends on tensor values: .*test_stages.py:\d+ "
                    r"\(if h.mean\(\) > 0:\).*hint: name cut points")

    def test_a_balance_that_does_not_count_the_units(self) -> None:
        model, data, loss = skip_net()
        fit_refused(model, [2, 3], data, loss, r"balance \[2, 3\] cuts 5 units, but SkipNet splits into 4 units "
                                               r"\(l0, l1, l2, l3\); hint: plan with funcpipe.profile")

    def test_a_loss_fn_that_cannot_take_the_output(self) -> None:
        model, data, _ = skip_net()
        fit_refused(model, [2, 2], data, nn.functional.cross_entropy,
                    r"loss_fn cannot take the model's output: .* on tuple\(\[0\] \(2, 3\), \[1\] \(2,\)\) "
                    r"and targets of shape \(2,\)")

    def test_a_loss_fn_that_returns_no_scalar(self) -> None:
        model, data, _ = skip_net()
        fit_refused(model, [2, 2], data, lambda out, y: out[0], r"loss_fn returned \(2, 3\), not a scalar")

    def test_a_parameter_used_by_units_in_two_stages(self) -> None:
        fit_refused(Tied(), [1, 2], batches(torch.randn(BATCH, 4)), nn.functional.cross_entropy,
                    r"parameter 'shared.weight' is used by units \[0, 1\] \(shared, middle\).* stages \[0, 1\]")

    def test_a_later_batch_of_another_structure_than_the_first(self) -> None:
        model, data, loss = skip_net()
        (x, scale), y = data[0]
        trainer = Trainer(model, loss, sgd, Plan.manual([2, 2], micro_batch_size=2, global_batch_size=8),
                          backend="thread")
        with pytest.raises(ConfigError, match=r"inputs of structure dict\(x=\*, scale=\*\) do not match the "
                                              r"example's tuple\(\*, \*\)"):
            trainer.fit([data[0], ({"x": x, "scale": scale}, y)], progress=False)

    def test_cuts_naming_no_module(self) -> None:
        model, data, loss = skip_net()
        fit_refused(model, [1, 1], data, loss, r"l9", cuts=["l9"])

    def test_cuts_for_a_sequential(self) -> None:
        with pytest.raises(ConfigError, match=r"cuts are for traced models"):
            Trainer(nn.Sequential(nn.Linear(2, 2)), nn.functional.mse_loss, sgd,
                    Plan.manual([1], micro_batch_size=2, global_batch_size=4), backend="thread", cuts=["0"])


# --------------------------------------------------------------------------- training on the thread backend

class Tokens(nn.Module):
    """Token ids in a dict; the only thing crossing the cut after the ``ids`` unit is an integer tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.ids = nn.Identity()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ids = self.ids(input_ids)
        return self.head((self.embed(ids) * weights.unsqueeze(-1)).mean(1))


def test_dict_inputs_and_an_integer_tensor_across_a_cut_train_like_plain_pytorch() -> None:
    torch.manual_seed(0)
    model = Tokens()
    g = torch.Generator().manual_seed(1)
    data = [({"input_ids": torch.randint(0, 10, (BATCH, 5), generator=g), "weights": torch.rand(BATCH, 5, generator=g)},
             torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(3)]
    loss = nn.functional.cross_entropy
    expected = plain(copy.deepcopy(model), data, loss, sgd)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, loss, sgd, Plan.manual([1, 1, 1], micro_batch_size=2, global_batch_size=BATCH),
                      backend="thread", cuts=["embed", "head"])
    trainer.fit(data, progress=False)
    assert_trained_like_plain(model, expected, initial)


def test_a_second_fit_continues_from_the_first_fits_checkpoint() -> None:
    model, data, loss = skip_net()
    expected = plain(copy.deepcopy(model), data + data, loss, sgd)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, loss, sgd, Plan.manual([2, 1, 1], micro_batch_size=2, global_batch_size=8),
                      backend="thread")
    trainer.fit(data, progress=False, checkpoint_every=2)
    trainer.fit(data, progress=False, checkpoint_every=2)
    assert_trained_like_plain(model, expected, initial)


DRIVER = textwrap.dedent("""
    import os, signal, sys
    from funcpipe import Plan, Trainer
    from tests.helpers import sgd_momentum, skip_net

    model, batches, loss = skip_net(6)

    def dies_at_batch_5():
        for i, batch in enumerate(batches):
            if i == 5:  # the driver asks for batch 5 once iteration 2 has finished
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    plan = Plan.manual([1, 3], micro_batch_size=2, global_batch_size=8)
    trainer = Trainer(model, loss, sgd_momentum, plan, backend="thread", storage=sys.argv[1], job="killed")
    trainer.fit(dies_at_batch_5(), iterations=len(batches), progress=False, checkpoint_every=1)
""")


def test_a_job_whose_driver_was_killed_is_resumed_and_ends_like_plain_pytorch(tmp_path: Path) -> None:
    url = tmp_path.as_uri()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", DRIVER, url], env=env, capture_output=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    model, data, loss = skip_net(6)
    expected = plain(copy.deepcopy(model), data, loss, sgd_momentum)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = Plan.manual([1, 3], micro_batch_size=2, global_batch_size=8)
    resumed = Trainer(model, loss, sgd_momentum, plan, backend="thread", storage=url, job="killed")
    history = resumed.fit(data, progress=False, resume=True)
    assert 1 <= len(history) < len(data)  # from a checkpoint, not from scratch
    assert_trained_like_plain(model, expected, initial)


def test_trainer_model_is_the_users_module_and_runs_as_it_did() -> None:
    model, data, loss = skip_net()
    trainer = Trainer(model, loss, sgd, Plan.manual([2, 2], micro_batch_size=2, global_batch_size=8),
                      backend="thread")
    trainer.fit(data[:1], progress=False)
    assert trainer.model is model and type(model) is SkipNet
    (x, scale), _ = data[0]
    out = call(model, (x, scale))
    assert isinstance(out, tuple) and out[0].shape == (8, 3)


def test_a_later_batch_of_another_sequence_length_than_an_exported_graph_takes_is_named() -> None:
    pytest.importorskip("transformers")
    from tests.test_trainer_traced import bert

    model, data, loss = bert()
    (inputs, y) = data[1]
    shorter = {k: v[:, :10] for k, v in inputs.items()}
    trainer = Trainer(model, loss, sgd, Plan.manual([3, 3], micro_batch_size=2, global_batch_size=8),
                      backend="thread")
    with pytest.raises(ConfigError, match=r"input 'input_ids' has shape \(2, 10\), but the model was split "
                                          r"\(torch.export\) on inputs of shape \(batch, 12\).*max_length=12"):
        trainer.fit([data[0], (shorter, y)], progress=False)


class _Detach(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


def test_a_stage_whose_output_does_not_depend_on_its_input_sends_back_no_gradient_as_plain_pytorch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _Detach(), nn.Linear(4, 3))
    data = batches(torch.randn(BATCH, 4), count=3)
    expected = plain(copy.deepcopy(model), data, nn.functional.cross_entropy, sgd)
    first = model[0].weight.detach().clone()
    Trainer(model, nn.functional.cross_entropy, sgd, Plan.manual([1, 2], micro_batch_size=2, global_batch_size=BATCH),
            backend="thread").fit(data, progress=False)
    torch.testing.assert_close(model[0].weight.detach(), first)  # no gradient reached it, as in plain PyTorch
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6)


# -- an nn.Sequential's first micro-batch, run on the driver before launch (issue 19) -------------------


def spied_sequential(model: nn.Sequential, balance: list[int]) -> tuple[Trainer, SpyExecutor]:
    spy = SpyExecutor(ThreadExecutor())
    plan = Plan.manual(balance, micro_batch_size=BATCH, global_batch_size=2 * BATCH)
    return Trainer(model, nn.functional.cross_entropy, sgd_momentum, plan, backend=spy,
                   storage="memory://sequential-checks"), spy


def digits_like() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def test_inputs_of_the_wrong_feature_size_name_the_stage_the_layer_and_the_shape() -> None:
    trainer, spy = spied_sequential(digits_like(), [2, 3])
    batch = (torch.randn(2 * BATCH, 9), torch.randint(0, 3, (2 * BATCH,)))
    with pytest.raises(ConfigError, match=r"stage 0, layer 0 \(Linear\) raised RuntimeError: mat1 and mat2 shapes "
                                          r".*given a tensor of shape \(4, 9\).*hint: .*model\[:1\]\(x\)"):
        trainer.fit([batch], progress=False)
    assert spy.launched == []


def test_a_layer_of_a_later_stage_that_does_not_fit_is_named() -> None:
    model = digits_like()
    model[4] = nn.Linear(15, 3)  # the layer before gives 16 features
    trainer, spy = spied_sequential(model, [2, 3])
    batch = (torch.randn(2 * BATCH, 8), torch.randint(0, 3, (2 * BATCH,)))
    with pytest.raises(ConfigError, match=r"stage 1, layer 4 \(Linear\).*shape \(4, 16\)"):
        trainer.fit([batch], progress=False)
    assert spy.launched == []


def test_float_targets_for_cross_entropy_are_named_with_their_dtype() -> None:
    trainer, spy = spied_sequential(digits_like(), [2, 3])
    batch = (torch.randn(2 * BATCH, 8), torch.rand(2 * BATCH))
    with pytest.raises(ConfigError, match=r"loss_fn cannot take .*targets of shape \(4,\) \(torch\.float32\).*"
                                          r"targets\.long\(\)"):
        trainer.fit([batch], progress=False)
    assert spy.launched == []


def test_a_data_loader_with_a_short_last_batch_is_named_before_launch() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    trainer, spy = spied_sequential(digits_like(), [2, 3])
    data = TensorDataset(torch.randn(20, 8), torch.randint(0, 3, (20,)))
    with pytest.raises(ConfigError, match=r"20 samples, which batches of 8 do not divide: its last batch would "
                                          r"hold 4.*drop_last=True"):
        trainer.fit(DataLoader(data, batch_size=8), progress=False)
    assert spy.launched == []
    history = trainer.fit(DataLoader(data, batch_size=8, drop_last=True), progress=False)
    assert len(history) == 2


class CountsCalls(nn.Module):
    """Identity that counts its calls (state of its own, which the driver's check must not upload)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_the_check_runs_after_the_upload_so_state_a_layer_keeps_is_uploaded_as_it_was() -> None:
    from funcpipe import signed

    model = nn.Sequential(*digits_like(), CountsCalls())
    trainer, _ = spied_sequential(model, [2, 4])
    trainer.fit([(torch.randn(2 * BATCH, 8), torch.randint(0, 3, (2 * BATCH,)))], progress=False)
    assert model[5].calls == 1  # the driver's check called it once
    key = trainer.keys.model_blob(1)
    definition = signed.unseal(trainer.storage.get(key), trainer._signing_key, name=key)
    assert definition.layers[-1].calls == 0


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory"),
                                   RuntimeError("a fault that may not come again")])
def test_a_failure_the_workers_may_not_meet_does_not_stop_the_launch(error: Exception) -> None:
    class FailsOnTheDriver(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():  # only the driver's check runs without gradients
                raise error
            return x

    trainer, spy = spied_sequential(nn.Sequential(*digits_like(), FailsOnTheDriver()), [2, 4])
    history = trainer.fit([(torch.randn(2 * BATCH, 8), torch.randint(0, 3, (2 * BATCH,)))], progress=False)
    assert len(history) == 1 and len(spy.launched) == 2  # out of memory on the driver is not the data's fault
