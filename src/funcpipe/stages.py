"""The user's model cut into a plan's stages: what each stage's worker holds, and what crosses each cut.

An ``nn.Sequential`` is cut between its layers as it is (one tensor crosses
each cut). Any other module is split into units by :func:`funcpipe.split.split`
on the first micro-batch the trainer is given (before anything is launched),
and the plan's balance counts those units; each stage is then a module over the
user's own parameters, and each cut carries the values
:meth:`funcpipe.split.Units.boundary` names (several tensors, masks, ints).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from funcpipe import protocol
from funcpipe.checkpoint import scheduler_json
from funcpipe.errors import ConfigError, UserCodeError
from funcpipe.plans import Plan
from funcpipe.profiler import describe_value, tied_parameters
from funcpipe.worker import ONE_TENSOR, Port, StageDefinition, deterministic

__all__ = ["ModelStages"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
#: A learning-rate scheduler factory: ``optimizer -> torch.optim.lr_scheduler.LRScheduler``.
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class ModelStages:
    """The stages of ``model`` under ``plan``: their modules, the ports of each cut, their parameters.

    For an ``nn.Sequential`` it is ready at once; for any other module :meth:`build`
    splits it on an example micro-batch first (:attr:`ready` says whether it did).
    """

    def __init__(self, model: nn.Module, plan: Plan, cuts: Sequence[str] | None = None) -> None:
        self.model = model
        self.plan = plan
        self.cuts = cuts
        self.sequential = isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward
        self.modules: list[nn.Module] = []
        self.ports: list[tuple[Port, ...]] = []  # ports[k]: what stage k takes (k = num_stages: nothing)
        self._flatten: Callable[[Any], tuple[Any, ...]] = lambda x: (x,)
        self.unit_names: tuple[str, ...] = ()
        self._sizes: list[tuple[str, tuple[int, ...]] | None] = []  # per input: its sizes but the batch's
        if isinstance(model, nn.Sequential) and self.sequential:
            self._cut_sequential(model, plan, cuts)

    def _cut_sequential(self, model: nn.Sequential, plan: Plan, cuts: Sequence[str] | None) -> None:
        if cuts is not None:
            raise ConfigError("cuts are for traced models; an nn.Sequential is cut between its layers; hint: "
                              "leave cuts out (the plan's balance chooses the cuts)")
        if sum(plan.balance) != len(model):
            raise ConfigError(
                f"model and sum of balance have different length (model: {len(model)} layers, "
                f"sum of balance {list(plan.balance)}: {sum(plan.balance)}); hint: the balance gives the "
                f"layers of each stage and must add up to len(model) = {len(model)}"
            )
        named = [(name, layer) for name, layer in model._modules.items() if layer is not None]  # a layer used twice too
        self.unit_names = tuple(name for name, _ in named)
        self.modules = [nn.Sequential(collections.OrderedDict(named[i] for i in plan.layer_range(s)))
                        for s in range(plan.num_stages)]
        self.ports = [ONE_TENSOR] * plan.num_stages
        owner = plan.layer_stages()
        for i, j, nbytes in tied_parameters(model):
            if owner[i] != owner[j]:
                raise ConfigError(
                    f"layers {i} and {j} share trainable parameters ({nbytes} bytes, e.g. a decoder tied to an "
                    f"embedding) but the plan puts them in stages {owner[i]} and {owner[j]} (balance "
                    f"{list(plan.balance)}), and the stages would train two copies apart; hint: put both layers "
                    "in one stage, or untie them (give the later layer its own copy of the weights)"
                )

    @property
    def ready(self) -> bool:
        return bool(self.modules)

    def build(self, example_inputs: Any, example_targets: torch.Tensor, loss_fn: Callable[..., Any]) -> None:
        """Split a traced model on one micro-batch (``example_inputs``, ``example_targets``) into the stages,
        and run them on it once, as the workers will, with ``loss_fn`` on what the last one returns.

        Raises:
            ConfigError: the model cannot be split (the tracer's message, where, and a hint), the plan's
                balance does not count its units, two stages would share a parameter, a stage fails on the
                example, or ``loss_fn`` cannot take the model's output.
        """
        if self.ready:
            return
        from funcpipe.split import split

        units = split(self.model, example_inputs, cuts=self.cuts)
        plan = self.plan
        self.unit_names = units.names
        if sum(plan.balance) != len(units):
            raise ConfigError(
                f"the plan's balance {list(plan.balance)} cuts {sum(plan.balance)} units, but "
                f"{type(self.model).__name__} splits into {len(units)} units ({_some(units.names)}); hint: plan "
                f"with funcpipe.profile(model, ...) of this model (its layers are these units), or a balance "
                f"adding up to {len(units)}"
            )
        owner = plan.layer_stages()
        for name, users in units.shared.items():
            stages = sorted({owner[u] for u in users})
            if len(stages) > 1:
                raise ConfigError(
                    f"parameter {name!r} is used by units {list(users)} "
                    f"({', '.join(units.names[u] for u in users)}), which the plan puts in stages {stages} (balance "
                    f"{list(plan.balance)}); the stages would train copies of it apart; hint: a balance that keeps "
                    "those units in one stage, or untie the weights"
                )
        self.modules = units.stages(plan.balance)
        self.ports = []
        for s in range(plan.num_stages):
            start = plan.layer_range(s).start
            boundary = units.boundary(start - 1)
            self.ports.append(tuple(Port(v.name, v.is_tensor, v.requires_grad) for v in boundary.values))
        self._flatten = units.flatten_inputs
        if units.tracer == "torch.export":  # its graph takes the example's sizes but the batch's
            self._sizes = [(v.name, v.shape[1:]) if v.is_tensor else None for v in units.inputs_boundary().values]
        try:
            self._dry_run(example_inputs, example_targets, loss_fn)
        except BaseException:
            self.modules = []
            raise

    def _dry_run(self, example_inputs: Any, example_targets: torch.Tensor, loss_fn: Callable[..., Any]) -> None:
        from funcpipe.split import untouched

        values: Any = self.flatten_inputs(example_inputs)
        with torch.no_grad(), untouched(self.model):
            for s, module in enumerate(self.modules):
                try:
                    values = module(*values)
                except Exception as exc:
                    raise ConfigError(
                        f"stage {s} (units {list(self.plan.layer_range(s))}: {_some(self.unit_names_of(s))}) raised "
                        f"{type(exc).__name__}: {exc} on the first micro-batch; hint: a model whose code depends on "
                        "tensor values or sizes other than the batch's cannot be cut there: name other cut points "
                        "(cuts=[...] or funcpipe.split.mark_cut), or check the model on the batch in plain PyTorch"
                    ) from exc
            _check_loss(loss_fn, values, example_targets)

    def check(self, example_inputs: Any, example_targets: torch.Tensor, loss_fn: Callable[..., Any]) -> None:
        """Run an ``nn.Sequential``'s stages layer by layer on one micro-batch in-process (no gradients, the
        model left as it was), then ``loss_fn`` on the output, so a mistake in the data is named before
        anything is launched (a traced model was run so by :meth:`build`).

        Raises:
            ConfigError: a layer raised on it (naming the stage, the layer, the shape it got) or
                ``loss_fn`` did (naming the output's and the targets' shapes and dtypes).
        """
        if not self.sequential:
            return
        from funcpipe.split import untouched

        value = example_inputs
        with torch.no_grad(), untouched(self.model):
            for s, module in enumerate(self.modules):
                for index, layer in zip(self.plan.layer_range(s), _layers(module), strict=True):
                    try:
                        out = layer(value)
                    except Exception as exc:
                        if not deterministic(exc):  # out of memory here, or a fault: the workers may not meet it
                            log.info("the check of the first micro-batch stopped at stage %d, layer %d: %s: %s",
                                     s, index, type(exc).__name__, exc)
                            return
                        raise ConfigError(
                            f"stage {s}, layer {index} ({type(layer).__name__}) raised {type(exc).__name__}: {exc}, "
                            f"given {describe_value(value)} from the first micro-batch (of "
                            f"{self.plan.micro_batch_size} samples); hint: the data does not fit the model there "
                            f"(a feature size or dtype): model[:{index + 1}](x) in plain PyTorch fails the same way"
                        ) from exc
                    value = out
                if s < len(self.modules) - 1 and not isinstance(value, torch.Tensor):
                    raise ConfigError(
                        f"stage {s}'s layers returned {describe_value(value)} on the first micro-batch, but one "
                        "tensor crosses each cut of an nn.Sequential; hint: move the cut so that a tuple or dict "
                        "stays inside one stage, or pass the model itself (any nn.Module is split by tracing)"
                    )
            _check_loss(loss_fn, value, example_targets, only_deterministic=True)

    def unit_names_of(self, stage: int) -> list[str]:
        return [self.unit_names[i] for i in self.plan.layer_range(stage)]

    def flatten_inputs(self, inputs: Any) -> tuple[Any, ...]:
        """The model's inputs (a tensor, tuple or dict) as the first stage takes them.

        Raises:
            ConfigError: they are of another structure than the model was split with, or (a graph of
                ``torch.export``) a tensor has other sizes than the split's but on the batch dimension.
        """
        flat = self._flatten(inputs)
        for value, expected in zip(flat, self._sizes, strict=False):
            if expected is not None and isinstance(value, torch.Tensor) and tuple(value.shape[1:]) != expected[1]:
                name, sizes = expected
                raise ConfigError(
                    f"input {name!r} has shape {tuple(value.shape)}, but the model was split (torch.export) on "
                    f"inputs of shape (batch, {', '.join(map(str, sizes))}): its graph takes those sizes only; "
                    f"hint: pad or crop every batch to them (e.g. a tokenizer's padding=\"max_length\", "
                    f"max_length={sizes[0] if sizes else '...'})"
                )
        return flat

    def definition(self, stage: int, optimizer: OptimizerFactory, loss_fn: Any,
                   scheduler: SchedulerFactory | None = None) -> StageDefinition:
        last = stage == self.plan.num_stages - 1
        outputs = ONE_TENSOR if last else self.ports[stage + 1]
        return StageDefinition(self.modules[stage], optimizer, loss_fn if last else None, self.ports[stage], outputs,
                               scheduler)

    def parameters(self, stage: int) -> list[nn.Parameter]:
        return list(self.modules[stage].parameters())

    def gradient_bytes(self) -> list[int]:
        """Bytes of each stage's flat gradient (its trainable parameters), as the workers sync it."""
        return [protocol.gradient_bytes(self.parameters(s)) for s in range(self.plan.num_stages)]

    def check_optimizer(self, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None) -> None:
        """Call the optimizer factory on each stage's parameters, as its workers will, and refuse what it
        returns unless it is a ``torch.optim.Optimizer``; and the scheduler factory on that optimizer, refusing
        what is not a learning-rate scheduler a worker can step and checkpoint (what is made here is dropped)."""
        hint = "hint: optimizer=lambda params: torch.optim.SGD(params, lr=0.1)"
        for stage in range(self.plan.num_stages):
            params = self.parameters(stage)
            if not params:  # nothing to optimize: its worker makes no optimizer
                continue
            try:
                made = optimizer(iter(params))
            except Exception as exc:
                raise UserCodeError(
                    f"the optimizer factory raised {type(exc).__name__}: {exc} when called on the parameters of "
                    f"stage {stage} (layers {list(self.plan.layer_range(stage))}); {hint}"
                ) from exc
            if not isinstance(made, torch.optim.Optimizer):
                raise ConfigError(
                    f"the optimizer factory returned {made!r:.80} (a {type(made).__name__}), not a "
                    f"torch.optim.Optimizer, for the parameters of stage {stage}; a lambda must return the "
                    f"optimizer it makes; {hint}"
                )
            if scheduler is not None:
                _check_scheduler(scheduler, made, stage)


def _check_scheduler(scheduler: SchedulerFactory, optimizer: torch.optim.Optimizer, stage: int) -> None:
    hint = ("hint: scheduler=lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, "
            "total_steps=iterations)")
    try:
        made = scheduler(optimizer)
    except Exception as exc:
        raise UserCodeError(f"the scheduler factory raised {type(exc).__name__}: {exc} when called on the optimizer "
                            f"of stage {stage}; {hint}") from exc
    if isinstance(made, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError("ReduceLROnPlateau steps on a metric the workers do not have; funcpipe steps the scheduler "
                          f"once per iteration, without arguments; {hint}")
    if not isinstance(made, torch.optim.lr_scheduler.LRScheduler):
        raise ConfigError(f"the scheduler factory returned a {type(made).__name__}, not a "
                          f"torch.optim.lr_scheduler.LRScheduler, for the optimizer of stage {stage}; {hint}")
    try:
        scheduler_json(made)
    except TypeError as exc:
        raise ConfigError(f"{exc} (stage {stage})") from None


def _layers(module: nn.Module) -> list[nn.Module]:
    """A stage's layers as its ``nn.Sequential`` holds them (a layer used twice is there twice)."""
    return [layer for layer in module._modules.values() if layer is not None]


def _check_loss(loss_fn: Callable[..., Any], output: Any, targets: torch.Tensor, *,
                only_deterministic: bool = False) -> None:
    """``loss_fn(output, targets)`` as a worker calls it, on the driver.

    Raises:
        ConfigError: it raised (``only_deterministic``: an error the same batch would raise again,
            :func:`funcpipe.worker.deterministic`), or did not return a scalar tensor.
    """
    try:
        loss = loss_fn(output, targets)
    except Exception as exc:
        if only_deterministic and not deterministic(exc):
            log.info("the check of the first micro-batch's loss stopped: %s: %s", type(exc).__name__, exc)
            return
        raise ConfigError(
            f"loss_fn cannot take the model's output: it raised {type(exc).__name__}: {exc} on "
            f"{describe_value(output)} and targets of shape {tuple(targets.shape)} ({targets.dtype}); hint: loss_fn "
            "gets what the model returns (a Hugging Face model returns a ModelOutput: use out.logits), and the "
            "targets as the data holds them (class indices for cross-entropy are int64: targets.long())"
        ) from exc
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(f"loss_fn returned {shape}, not a scalar tensor; hint: reduce it with a mean over "
                          "the micro-batch")


def _some(names: Sequence[str], count: int = 4) -> str:
    shown = ", ".join(names[:count])
    return shown + (", ..." if len(names) > count else "")
