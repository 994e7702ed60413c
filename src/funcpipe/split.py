"""Turning any ``nn.Module`` into a chain of units a plan can cut between.

A pipeline cuts a model between *units* and runs each run of consecutive
units as one stage. An ``nn.Sequential`` is already such a chain (one unit per
layer, one tensor across each cut) and is taken as it is, without tracing.
Any other module is traced into one graph of operations and its nodes are
grouped into units:

* by default, one unit per block: the module's children in call order, where a
  child holding a list of blocks (an ``nn.ModuleList`` or ``nn.Sequential``
  with a module of submodules of its own among its items, such as
  ``encoder.layer`` of BERT or ``encoder.stages.N.layers`` of ConvNext) is
  opened, and so is any child holding such a list, down to the blocks of at
  most two nested lists (a ConvNext or ResNet stage's blocks: a block is
  never opened further); so a Hugging Face model splits into its embeddings,
  each encoder layer / block, and its head;
* or at the cut points the user names: ``cuts=["encoder.layer.6"]`` starts a
  new unit where that module is first called, and :func:`mark_cut` in a
  ``forward`` starts one there.

Parameter-free glue between two units (a reshape, the extended attention
mask, a residual ``+`` in the parent's ``forward``) goes with the **next**
unit: glue prepares the next call's inputs, so it runs where they are used,
and what crosses the cut is what the previous module returned. Glue after the
last unit goes with the last unit.

Across each boundary travel all values produced at or before the unit before
it and used after it (a skip connection spanning several units is forwarded
by the units in between), each with its name, and whether it carries a
gradient: a floating-point tensor that depends on a parameter or an input
requiring grad does; integer and bool tensors (ids, masks) and Python ints (a
symbolic size such as the batch size) never do.

How a model is traced: ``torch.fx.symbolic_trace`` first (shape-generic, its
graph calls the user's own leaf modules); a model it cannot trace (a Hugging
Face ``PreTrainedModel``: transformers 5 no longer ships
``transformers.utils.fx``, and its forwards unpack shapes, which fx proxies
refuse) is exported with ``torch.export.export(strict=False)``, with the
batch dimension of every input marked ``Dim.AUTO`` (dynamic where the model
allows, else specialised to the example's size). Either way each stage is a
``torch.fx.GraphModule`` whose parameters and buffers are the user's own
objects under the user's own names, so training the stages trains the user's
model in place and a stage's ``state_dict`` keys are keys of the user's
``state_dict`` (:meth:`Units.state_dict_keys`).

Limits of a graph made by ``torch.export``: it is specialised to the mode the
model was in (``model.train()`` or ``eval()``: dropout and BatchNorm behave as
they did at :func:`split`, whatever the stage's own ``training`` flag says;
split again after switching) and to the example's sizes except the batch
dimension (a text model takes sequences of the example's length). Its
boundaries may carry Python ints (a symbolic size computed in one unit and used
in another). ``split`` runs the model once on the example inputs to measure
the boundaries, and puts back its buffers and the random generator after.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import io
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from funcpipe.errors import ConfigError

__all__ = ["Boundary", "SequentialStage", "Stage", "Unit", "Units", "Value", "mark_cut", "split"]

#: What the hint of every tracing error says.
_HINT = ("hint: name cut points that avoid the construct (cuts=[...] or funcpipe.split.mark_cut(x) in forward), "
         "make the branch independent of tensor values, or pass an nn.Sequential of the layers")


# --------------------------------------------------------------------------- the marker function

@torch.library.custom_op("funcpipe::cut", mutates_args=())
def _cut_op(x: torch.Tensor) -> torch.Tensor:
    """The marker as an operator ``torch.export`` keeps in its graph (removed again by :func:`split`)."""
    return x.clone()


@_cut_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_cut_op.register_autograd(lambda ctx, grad: grad)


def mark_cut(x: Any) -> Any:
    """Mark a cut point in a ``forward``: a new unit starts with the first operation after this call.

    Returns ``x`` itself when the module runs normally (it costs nothing); under
    tracing it leaves a marker in the graph, which :func:`split` removes. Call
    it on a tensor the code goes on with: ``h = mark_cut(self.block1(h))``.
    """
    if isinstance(x, torch.fx.Proxy):
        return x.tracer.create_proxy("call_function", mark_cut, (x,), {})
    if isinstance(x, torch.Tensor) and torch.compiler.is_exporting():
        return _cut_op(x)
    return x


_MARKERS = (mark_cut, torch.ops.funcpipe.cut.default)

#: The last stage's attribute holding the shape of the model's output: the output itself (a tuple, a
#: ``ModelOutput``...) with the index of each flat value in place of the value. Not a pytree spec, which
#: does not pickle back to a ``ModelOutput``.
_OUT_SHAPE = "_funcpipe_output"


def _structure(spec: pytree.TreeSpec) -> str:
    """A tree's structure on one line: ``dict(input_ids=*, attention_mask=*)``, ``tuple(*, *)``."""
    if spec.is_leaf():
        return "*"
    kind = spec.type.__name__ if spec.type is not None else "?"
    keys = spec.context if isinstance(spec.context, list) and spec.type is dict else None
    children = [_structure(c) for c in spec.children()]
    inner = ", ".join(f"{k}={c}" for k, c in zip(keys, children, strict=True)) if keys else ", ".join(children)
    return f"{kind}({inner})"


def _rebuild(flat: Sequence[Any], shape: Any) -> Any:
    """The model's output from the last stage's flat values and the output's shape (see ``_OUT_SHAPE``)."""
    return pytree.tree_map(lambda i: flat[i], shape)


# --------------------------------------------------------------------------- what split returns

@dataclasses.dataclass(frozen=True)
class Value:
    """One value crossing a boundary, as measured on the example inputs.

    Attributes:
        name: its node's name in the traced graph (``"attention_mask"``,
            ``"layer_norm_3"``), or the layer's name for an ``nn.Sequential``.
        produced_by: the unit that computes it (``-1``: a model input).
        is_tensor: ``False`` for a Python int (a symbolic size, e.g. the batch size).
        shape, dtype: the tensor's, for the example inputs (``()`` and ``None`` for an int).
        nbytes: its bytes for the example inputs (8 for an int).
        requires_grad: whether its gradient flows back across the boundary.
    """

    name: str
    produced_by: int
    is_tensor: bool
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    nbytes: int
    requires_grad: bool


@dataclasses.dataclass(frozen=True)
class Boundary:
    """The values crossing the cut after unit ``after`` (``-1``: the model's inputs), in stage order.

    The order is the graph's execution order of their producers, the model's
    inputs first in their flattened order (:meth:`Units.flatten_inputs`).
    """

    after: int
    values: tuple[Value, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of all values for the example inputs (what crosses the cut per example batch)."""
        return sum(v.nbytes for v in self.values)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.values)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit: the smallest piece a plan may put in a stage.

    Attributes:
        index: its place in the chain.
        name: the module path it is named after (``"bert.encoder.layer.0"``;
            the layer's name for an ``nn.Sequential``).
        modules: the module paths whose calls it holds, in call order.
        parameters: names (the user's ``state_dict`` keys) of the parameters it uses.
    """

    index: int
    name: str
    modules: tuple[str, ...]
    parameters: tuple[str, ...]


class Units(Sequence[Unit]):
    """A model split into a chain of units; build stages of consecutive units with :meth:`stage`.

    ``len(units)`` is the number of units, ``units[i]`` a :class:`Unit`;
    ``units.boundaries[k]`` the values crossing the cut after unit ``k``
    (``k`` in ``0 .. len-2``); ``units.boundary(k)`` is the same and also
    takes ``k=-1``, the model's inputs (:meth:`inputs_boundary`).
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit], inputs: Boundary, boundaries: Sequence[Boundary],
                 in_spec: pytree.TreeSpec, tracer: str, builder: Callable[[int, int], nn.Module]) -> None:
        self.model = model
        self._units = tuple(units)
        self._inputs = inputs
        self.boundaries: tuple[Boundary, ...] = tuple(boundaries)
        self.in_spec = in_spec
        #: How the model was taken apart: ``"sequential"``, ``"torch.fx"`` or ``"torch.export"``.
        self.tracer = tracer
        self._builder = builder

    def __len__(self) -> int:
        return len(self._units)

    def __getitem__(self, index: Any) -> Any:
        return self._units[index]

    def __repr__(self) -> str:
        return f"Units({len(self)} units of {type(self.model).__name__} by {self.tracer}: {[u.name for u in self]})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self._units)

    def inputs_boundary(self) -> Boundary:
        """The model's inputs, flattened: what the first stage takes."""
        return self._inputs

    def boundary(self, after: int) -> Boundary:
        """The values crossing the cut after unit ``after``; ``after=-1``: the model's inputs."""
        if after == -1:
            return self._inputs
        if not 0 <= after < len(self) - 1:
            raise ConfigError(f"no boundary after unit {after}; the {len(self)} units have boundaries after "
                              f"units 0..{len(self) - 2} (and -1, the inputs)")
        return self.boundaries[after]

    def flatten_inputs(self, inputs: Any) -> tuple[Any, ...]:
        """The model's inputs (a tensor, tuple or dict like the example's) as the first stage takes them."""
        flat, spec = pytree.tree_flatten(inputs)
        if spec != self.in_spec:
            raise ConfigError(f"inputs of structure {_structure(spec)} do not match the example's "
                              f"{_structure(self.in_spec)}; hint: pass inputs of the same kind (tensor, tuple or dict "
                              "with the same keys) as the model was split with (the first batch's)")
        return tuple(flat)

    def stage(self, first: int, last: int) -> nn.Module:
        """A module running units ``first..last``, holding the user's own parameter objects.

        It takes ``*boundary(first - 1).values`` (positional, in the boundary's
        order; for ``first=0`` the flattened inputs) and returns the tuple of
        ``boundary(last).values``, or, when ``last`` is the last unit, what the
        model returns (a tensor, tuple, ``ModelOutput``...). Of an
        ``nn.Sequential`` it is a :class:`SequentialStage` (an ``nn.Sequential`` of
        the layers under their names), called the same way. A new module on
        every call; modules of overlapping ranges share the user's parameters.
        """
        if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last < len(self)):
            raise ConfigError(f"stage({first}, {last}) is not a range of units; hint: 0 <= first <= last <= "
                              f"{len(self) - 1} (the model has {len(self)} units)")
        return self._builder(first, last)

    def stages(self, balance: Sequence[int]) -> list[nn.Module]:
        """One module per stage for a balance (units per stage, adding up to ``len(self)``)."""
        if sum(balance) != len(self) or any(b < 1 for b in balance):
            raise ConfigError(f"balance {list(balance)} does not split {len(self)} units; hint: each stage "
                              f"takes >= 1 unit and the balance adds up to {len(self)}")
        out, start = [], 0
        for b in balance:
            out.append(self.stage(start, start + b - 1))
            start += b
        return out

    @property
    def shared(self) -> dict[str, tuple[int, ...]]:
        """Parameters used by more than one unit (a module called twice, tied weights): name -> the units.

        Stages of such units hold the same parameter object; run apart, their
        gradients must be summed and their updates kept equal (as for
        ``ModelProfile.tied``).
        """
        users: dict[str, list[int]] = collections.defaultdict(list)
        for unit in self._units:
            for name in unit.parameters:
                users[name].append(unit.index)
        return {name: tuple(us) for name, us in users.items() if len(us) > 1}

    def state_dict_keys(self, stage: nn.Module) -> dict[str, str]:
        """Each key of ``stage.state_dict()`` mapped to the key of the user's model it is (the same name today)."""
        model_keys = set(self.model.state_dict(keep_vars=True))
        mapping = {key: key for key in stage.state_dict(keep_vars=True)}
        foreign = sorted(k for k in mapping if k not in model_keys)
        assert not foreign, f"stage keys {foreign} are not the model's"  # split keeps the user's names
        return mapping


# --------------------------------------------------------------------------- nn.Sequential: no tracing

class SequentialStage(nn.Sequential):
    """Consecutive layers of an ``nn.Sequential`` under their names in the model, as a stage.

    Called like every stage: with the boundary's one value, returning a
    1-tuple unless it holds the model's last layer (then the tensor itself).
    """

    def __init__(self, layers: collections.OrderedDict[str, nn.Module], last: bool) -> None:
        super().__init__(layers)
        self.last = last

    def forward(self, x: Any) -> Any:
        for layer in self:
            x = layer(x)
        return x if self.last else (x,)


def _value(name: str, produced_by: int, v: Any) -> Value:
    if isinstance(v, torch.Tensor):
        return Value(name, produced_by, True, tuple(v.shape), v.dtype, v.numel() * v.element_size(),
                     bool(v.requires_grad and v.is_floating_point()))
    return Value(name, produced_by, False, (), None, 8, False)


def _split_sequential(model: nn.Sequential, example: Any) -> Units:
    names = [name for name, _ in model.named_children()]
    if not names:
        raise ConfigError("the nn.Sequential has no layers; hint: nothing to split")
    if not isinstance(example, torch.Tensor):
        raise ConfigError(f"an nn.Sequential takes one tensor, got example inputs of type {type(example).__name__}; "
                          "hint: pass the first layer's input tensor")
    values, x = [], example
    with torch.enable_grad(), untouched(model):
        for i, layer in enumerate(model):
            try:
                x = layer(x)
            except Exception as exc:
                raise ConfigError(f"layer {names[i]!r} of the nn.Sequential raised {type(exc).__name__}: {exc} on the "
                                  "example input; hint: pass an input the model takes") from exc
            if i < len(model) - 1:
                if not isinstance(x, torch.Tensor):
                    raise ConfigError(f"layer {names[i]!r} returns a {type(x).__name__}, but one tensor crosses "
                                      "each cut of an nn.Sequential; hint: pass the module unwrapped (any "
                                      "nn.Module is traced) or make the layer return a tensor")
                values.append(Boundary(i, (_value(names[i], i, x),)))
    units = [Unit(i, n, (n,), tuple(f"{n}.{p}" for p, _ in model[i].named_parameters())) for i, n in enumerate(names)]

    def build(first: int, last: int) -> nn.Module:
        layers = collections.OrderedDict((names[i], model[i]) for i in range(first, last + 1))
        return SequentialStage(layers, last == len(names) - 1)

    _, spec = pytree.tree_flatten(example)
    return Units(model, units, Boundary(-1, (_value("input", -1, example),)), values, spec, "sequential", build)


# --------------------------------------------------------------------------- tracing

@dataclasses.dataclass
class _Traced:
    """A model's graph normalised: flat input placeholders, state as ``get_attr``, flat outputs."""

    graph: torch.fx.Graph
    attrs: dict[str, Any]  # get_attr target -> the object (the user's own parameters, buffers, modules)
    non_persistent: set[str]  # buffer targets that are not in the user's state_dict
    out_spec: pytree.TreeSpec
    tracer: str


def _call_kwargs(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, tuple):
        return example, {}
    if isinstance(example, Mapping):
        return (), dict(example)
    raise ConfigError(f"example_inputs must be a tensor, a tuple or a dict of tensors, got {type(example).__name__}; "
                      "hint: split(model, x), split(model, (x, y)) or split(model, {'input_ids': ids, ...})")


def _trace_fx(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Traced:
    import inspect

    params = list(inspect.signature(model.forward).parameters.values())
    given = {p.name for p in params[:len(args)]} | set(kwargs)
    unknown = set(kwargs) - {p.name for p in params}
    if unknown:
        raise ConfigError(f"example input keys {sorted(unknown)} are not arguments of {type(model).__name__}.forward "
                          f"({[p.name for p in params]}); hint: name the dict's keys after forward's arguments")
    concrete = {}
    for p in params:
        if p.name not in given:
            if p.default is inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                raise ConfigError(f"{type(model).__name__}.forward needs argument {p.name!r}, not in the example "
                                  "inputs; hint: give every argument without a default")
            concrete[p.name] = p.default
    gm = torch.fx.symbolic_trace(model, concrete_args=concrete or None)
    graph = gm.graph
    order = [p.name for p in params[:len(args)]] + list(kwargs)
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    for name, node in list(placeholders.items()):
        if name not in given:
            for user in list(node.users):
                if user.op == "call_function" and getattr(user.target, "__name__", "") == "_assert_is_none":
                    graph.erase_node(user)
            if node.users:
                raise ConfigError(f"argument {name!r} of {type(model).__name__}.forward is used but not given; "
                                  "hint: pass it in the example inputs")
            graph.erase_node(node)
    # Placeholders in the order of the flattened example (positional, then the dict's order).
    ordered = [placeholders[n] for n in order]
    first_real = next(n for n in graph.nodes if n.op != "placeholder")  # there is always the output
    for node in ordered:
        first_real.prepend(node)
    attrs: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            attrs[node.target] = _resolve(model, node.target)
        elif node.op == "call_module":
            attrs[node.target] = model.get_submodule(node.target)
    out = next(n for n in graph.nodes if n.op == "output")
    flat, out_spec = pytree.tree_flatten(out.args[0])
    out.args = (tuple(flat),)
    return _Traced(graph, attrs, _non_persistent(model, attrs), out_spec, "torch.fx")


def _trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Traced:
    from torch.export import Dim
    from torch.export.graph_signature import InputKind, OutputKind

    def batch(t: torch.Tensor) -> dict[int, Any] | None:
        return {0: Dim.AUTO} if t.dim() > 0 else None

    dynamic: Any = {k: pytree.tree_map(batch, v) for k, v in kwargs.items()} if kwargs else \
        tuple(pytree.tree_map(batch, a) for a in args)
    # On failure torch.export prints the partial graph to stderr; the ConfigError says what failed and where.
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
    sys.stderr.write(printed.getvalue())
    gm = ep.graph_module
    graph = gm.graph
    sig = ep.graph_signature
    attrs: dict[str, Any] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_real = next(n for n in graph.nodes if n.op != "placeholder")
    for spec, node in zip(sig.input_specs, placeholders, strict=True):
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            target = spec.target
            attrs[target] = _resolve(model, target)
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            target = f"_funcpipe_constants.{spec.target}"  # not the user's: kept out of the state_dict
            attrs[target] = ep.constants[spec.target]
        else:
            raise ConfigError(f"torch.export gave an input of kind {spec.kind} ({spec.target}), which split does not "
                              f"handle; {_HINT}")
        with graph.inserting_before(first_real):
            ref = graph.create_node("get_attr", target)
        ref.meta = dict(node.meta)
        node.replace_all_uses_with(ref)
        graph.erase_node(node)
    out = next(n for n in graph.nodes if n.op == "output")
    flat = list(out.args[0])
    user_outputs = []
    for spec, value in zip(sig.output_specs, flat, strict=True):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(value)
        elif spec.kind == OutputKind.BUFFER_MUTATION and isinstance(value, torch.fx.Node):
            # A buffer the forward updates (a BatchNorm's running stats): write it back where it is computed.
            with graph.inserting_after(value):
                ref = graph.create_node("get_attr", spec.target)
            with graph.inserting_after(ref):
                copy = graph.call_function(torch.ops.aten.copy_.default, (ref, value))
            copy.meta = dict(value.meta)
            attrs.setdefault(spec.target, _resolve(model, spec.target))
        else:
            raise ConfigError(f"torch.export gave an output of kind {spec.kind} ({spec.target}), which split does not "
                              f"handle (a forward that mutates its input?); {_HINT}")
    out.args = (tuple(user_outputs),)
    out_spec = ep.call_spec.out_spec
    assert out_spec is not None
    return _Traced(graph, attrs, _non_persistent(model, attrs), out_spec, "torch.export")


def _resolve(model: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, name)


def _non_persistent(model: nn.Module, attrs: Mapping[str, Any]) -> set[str]:
    out = set()
    for target in attrs:
        owner, _, name = target.rpartition(".")
        try:
            module = model.get_submodule(owner) if owner else model
        except AttributeError:
            out.add(target)  # a lifted constant: not the user's
            continue
        if name in module._non_persistent_buffers_set or (
                isinstance(attrs[target], torch.Tensor) and name not in module._parameters
                and name not in module._buffers):
            out.add(target)
    return out


def _where(exc: BaseException) -> str:
    """The user's frame an exception was raised in (skipping torch's and funcpipe's), as ``file:line``."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if "/torch/" not in f.filename and "/funcpipe/split" not in f.filename
            and "/transformers/utils/" not in f.filename]
    if not mine:
        return ""
    f = mine[-1]
    return f" at {f.filename}:{f.lineno} ({f.line})"


def _trace(model: nn.Module, example: Any) -> _Traced:
    args, kwargs = _call_kwargs(example)
    for leaf in pytree.tree_leaves((args, kwargs)):
        if not isinstance(leaf, torch.Tensor):
            raise ConfigError(f"example inputs hold a {type(leaf).__name__} ({leaf!r:.40}); every input is a tensor; "
                              "hint: bind other arguments with functools.partial or as module attributes")
    errors = []
    is_hf = any(c.__module__.startswith("transformers.") for c in type(model).__mro__)
    if not is_hf:
        try:
            return _trace_fx(model, args, kwargs)
        except ConfigError:
            raise
        except Exception as exc:  # the tracer's own error, reported below with export's
            errors.append(f"torch.fx.symbolic_trace: {type(exc).__name__}: {_first_line(exc)}{_where(exc)}")
    try:
        return _trace_export(model, args, kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        errors.append(f"torch.export: {type(exc).__name__}: {_first_line(exc)}{_where(exc)}")
    data_dependent = any(re.search(r"data.dependent|control flow|GuardOnDataDependent", e, re.I) for e in errors)
    what = "has control flow that depends on tensor values" if data_dependent else "cannot be traced"
    raise ConfigError(f"{type(model).__name__} {what}: " + "; ".join(errors) + f"; {_HINT}")


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


# --------------------------------------------------------------------------- grouping

def _path(node: torch.fx.Node) -> list[str]:
    """The module paths a node was called in, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        path = re.sub(r"@\d+$", "", path)
        if path.startswith("L['self']") or path.startswith("_empty_nn_module_stack"):
            continue
        paths.append(path)
    return [p for p in paths if p]


def _is_block_list(module: nn.Module) -> bool:
    children = list(module.children())
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and any(any(True for _ in c.children()) for c in children)


def _holds_block_list(module: nn.Module) -> bool:
    return any(_is_block_list(m) for m in module.modules())


def _default_anchors(model: nn.Module, called: Sequence[str]) -> list[str]:
    """The module paths that each make a unit, from the modules called (in call order)."""
    anchors: list[str] = []

    def expand(prefix: str, module: nn.Module, lists: int) -> None:
        # ``lists``: the block lists opened on the way here; blocks of the second are units, never opened.
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if not any(c == path or c.startswith(path + ".") for c in called):
                continue
            if _is_block_list(module):  # child is a block
                if lists < 2 and _holds_block_list(child):
                    expand(path + ".", child, lists)  # a stage of blocks (ConvNext, ResNet)
                else:
                    anchors.append(path)
            elif _is_block_list(child):
                expand(path + ".", child, lists + 1)
            elif _holds_block_list(child):
                expand(path + ".", child, lists)
            else:
                anchors.append(path)

    expand("", model, int(_is_block_list(model)))
    first = {p: i for i, p in reversed(list(enumerate(called)))}

    def first_call(anchor: str) -> float:
        return min((i for p, i in first.items() if p == anchor or p.startswith(anchor + ".")), default=math.inf)

    return sorted(anchors, key=first_call)


def _group(traced: _Traced, model: nn.Module,
           cuts: Sequence[str] | None) -> tuple[dict[torch.fx.Node, int], list[Unit]]:
    """Each compute node's unit, and the units (see the module's docstring for the rules)."""
    graph = traced.graph
    compute = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    paths = {n: _path(n) for n in compute}
    for n in compute:  # fx's call_module nodes name their module in the stack too; make sure
        if n.op == "call_module" and (not paths[n] or paths[n][-1] != n.target):
            paths[n] = paths[n] + [str(n.target)]
    called: list[str] = []
    for n in compute:
        for p in paths[n]:
            if p not in called:
                called.append(p)
    markers = [n for n in compute if n.target in _MARKERS]
    if cuts is not None:
        modules = dict(model.named_modules())
        for cut in cuts:
            if cut not in modules:
                near = [m for m in modules if m and cut.split(".")[-1] in m.split(".")][:5]
                raise ConfigError(f"cut {cut!r} names no module of {type(model).__name__}; hint: cuts are module "
                                  f"names as in model.named_modules(), e.g. {near or list(modules)[1:6]}")
            if not any(c == cut or c.startswith(cut + ".") for c in called):
                raise ConfigError(f"cut {cut!r} names a module the forward never calls on the example inputs; hint: "
                                  "name a module that runs")
    label: dict[torch.fx.Node, int | None] = {}
    if cuts is None and not markers:
        # A parameter-free module (a dropout, an activation) is glue like an operator: no unit of its own.
        anchors = [a for a in _default_anchors(model, called)
                   if any(True for _ in model.get_submodule(a).parameters())]
        for n in compute:
            label[n] = next((i for i, a in enumerate(anchors)
                             if any(p == a or p.startswith(a + ".") for p in paths[n])), None)
    else:
        starts: dict[torch.fx.Node, str] = {}  # the first node of a unit -> what the unit is named after
        for cut in cuts or ():
            start = next(n for n in compute if any(p == cut or p.startswith(cut + ".") for p in paths[n]))
            # Glue just before the cut module (ops of its parents' scopes, no other module) goes with it.
            i = compute.index(start)
            while i > 0 and all(cut.startswith(p + ".") for p in paths[compute[i - 1]]) and \
                    compute[i - 1].target not in _MARKERS:
                i -= 1
            starts.setdefault(compute[i], cut)
        for m in markers:
            i = compute.index(m) + 1
            if i < len(compute):
                starts.setdefault(compute[i], "")
        order = {n: i for i, n in enumerate(compute)}
        firsts = sorted((order[n], name) for n, name in starts.items() if order[n] > 0)
        for n in compute:
            label[n] = sum(1 for b, _ in firsts if order[n] >= b)
        anchors = ["", *(name for _, name in firsts)]
    # Glue goes with the next unit; a node never goes back before a unit that already started.
    resolved: dict[torch.fx.Node, int] = {}
    pending: list[torch.fx.Node] = []
    current = 0
    for n in compute:
        lab = label[n]
        if lab is None:
            pending.append(n)
            continue
        current = max(current, lab)
        for glue in pending:
            resolved[glue] = current
        pending = []
        resolved[n] = current
    for glue in pending:
        resolved[glue] = current
    used = sorted(set(resolved.values()))
    renumber = {u: i for i, u in enumerate(used)}
    resolved = {n: renumber[u] for n, u in resolved.items()}
    for m in markers:  # the marker itself disappears: its users read its input
        m.replace_all_uses_with(m.args[0])
        graph.erase_node(m)
        resolved.pop(m, None)
    # The modules of a unit: the outermost ones all of whose operations it runs.
    homes: dict[str, set[int]] = collections.defaultdict(set)
    for n, u in resolved.items():
        for p in paths.get(n, []):
            homes[p].add(u)
    units = []
    for u in range(len(used)):
        nodes = [n for n in resolved if resolved[n] == u]
        mods: list[str] = []
        for n in nodes:
            for p in paths.get(n, []):
                if p not in mods and homes[p] == {u}:
                    mods.append(p)
        params = []
        for n in nodes:
            for a in [n, *n.all_input_nodes]:
                if (a is n and a.op == "call_module") or a.op == "get_attr":
                    params.extend(_parameter_names(traced.attrs[str(a.target)], str(a.target)))
        top = [m for m in mods if not any(m.startswith(o + ".") for o in mods)]
        anchor = anchors[used[u]] if used[u] < len(anchors) else ""  # no anchors: one unit of glue
        name = anchor or (top[0] if top else f"unit{u}")
        units.append(Unit(u, name, tuple(top), tuple(dict.fromkeys(params))))
    return resolved, units


def _parameter_names(obj: Any, target: str) -> list[str]:
    if isinstance(obj, nn.Module):
        return [f"{target}.{k}" for k, _ in obj.named_parameters()]
    return [target] if isinstance(obj, nn.Parameter) else []


# --------------------------------------------------------------------------- measuring and building

class _Recorder(torch.fx.Interpreter):
    """Runs the graph once on the example inputs, keeping each value's :class:`Value` description."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[torch.fx.Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.wanted:
            self.seen[n] = result
        return result


def _build_stage(traced: _Traced, unit_of: Mapping[torch.fx.Node, int], before: Sequence[torch.fx.Node],
                 after: Sequence[torch.fx.Node] | None, first: int, last: int) -> torch.fx.GraphModule:
    """A GraphModule running units ``first..last``: takes ``before``, returns ``after`` (None: the model's output)."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in before:
        env[node] = g.placeholder(node.name)
        env[node].meta = dict(node.meta)
    attrs: dict[str, Any] = {}

    def lookup(n: torch.fx.Node) -> torch.fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise AssertionError(f"{n.name} is not available in stage {first}..{last}")
            env[n] = g.get_attr(n.target)  # type: ignore[arg-type]
            attrs[n.target] = traced.attrs[n.target]  # type: ignore[index]
        return env[n]

    for node in traced.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and first <= unit_of[node] <= last:
            for a in node.all_input_nodes:
                lookup(a)
            if node.op == "call_module":
                attrs[node.target] = traced.attrs[node.target]
            env[node] = g.node_copy(node, lookup)
    out_node = next(n for n in traced.graph.nodes if n.op == "output")
    if after is None:  # the model's own output, rebuilt from the flat values as the model returns it
        flat = [lookup(a) if isinstance(a, torch.fx.Node) else a for a in out_node.args[0]]
        shape = g.get_attr(_OUT_SHAPE)
        attrs[_OUT_SHAPE] = pytree.tree_unflatten(list(range(len(flat))), traced.out_spec)
        g.output(g.call_function(_rebuild, (flat, shape)))
    else:
        g.output(tuple(lookup(n) for n in after))
    g.lint()
    for node in g.nodes:  # the tracer's notes (fake tensors, stacks) are not needed to run, nor picklable
        node.meta = {}
    return Stage(attrs, g, traced.non_persistent & set(attrs), f"Stage_{first}_{last}")


class Stage(torch.fx.GraphModule):
    """A stage of a traced model: a ``GraphModule`` over the user's own parameters, buffers and modules.

    It pickles as its nodes (operators by name) and its state, and unpickles
    to the same stage: a ``GraphModule``'s own pickling traces its code again,
    which turns a ``ModelOutput`` into a dict and non-persistent buffers into
    persistent constants (new ``state_dict`` keys).
    """

    def __init__(self, attrs: Mapping[str, Any], graph: torch.fx.Graph, non_persistent: set[str],
                 class_name: str) -> None:
        super().__init__(dict(attrs), graph, class_name=class_name)
        self._funcpipe_non_persistent = frozenset(non_persistent)
        for target in non_persistent:
            owner, _, name = target.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            if name in module._buffers:
                module._non_persistent_buffers_set.add(name)

    def __reduce__(self) -> Any:
        attrs = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                attrs[node.target] = _resolve(self, node.target) if node.op == "get_attr" else \
                    self.get_submodule(node.target)
        return (_load_stage, (_describe(self.graph), attrs, set(self._funcpipe_non_persistent), type(self).__name__))

    def __deepcopy__(self, memo: dict[int, Any]) -> Stage:
        loader, args = self.__reduce__()
        described, attrs, non_persistent, name = args
        return loader(described, copy.deepcopy(attrs, memo), non_persistent, name)  # type: ignore[no-any-return]


def _op_ref(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        return _Op(target._schema.name, target._overloadname)
    return target


@dataclasses.dataclass(frozen=True)
class _Op:
    """An operator overload by name (``aten::add``, ``Tensor``): ``OpOverload`` objects do not pickle."""

    name: str
    overload: str

    def resolve(self) -> Any:
        namespace, _, op = self.name.partition("::")
        return getattr(getattr(getattr(torch.ops, namespace), op), self.overload or "default")


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A node's argument that is another node, by name."""

    name: str


def _describe(graph: torch.fx.Graph) -> list[tuple[str, str, Any, Any, Any]]:
    def arg(a: Any) -> Any:
        ref: Callable[[torch.fx.Node], Any] = lambda n: _Ref(n.name)
        return pytree.tree_map(_op_ref, torch.fx.node.map_arg(a, ref))

    return [(n.op, n.name, _op_ref(n.target), arg(n.args), arg(n.kwargs)) for n in graph.nodes]


def _load_stage(described: list[tuple[str, str, Any, Any, Any]], attrs: dict[str, Any], non_persistent: set[str],
                class_name: str) -> Stage:
    g = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}

    def value(a: Any) -> Any:
        if isinstance(a, _Ref):
            return env[a.name]
        if isinstance(a, _Op):
            return a.resolve()
        return a

    def arg(a: Any) -> Any:
        return pytree.tree_map(value, a, is_leaf=lambda x: isinstance(x, (_Ref, _Op)))

    for op, name, target, args, kwargs in described:
        node = g.create_node(op, value(target), arg(args), arg(kwargs), name=name)
        env[name] = node
    return Stage(attrs, g, non_persistent, class_name)


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run the example without leaving a trace in the model: its buffers (a BatchNorm's running stats) and
    the random generator (a dropout's draws) are put back as they were."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(rng)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def split(model: nn.Module, example_inputs: Any, *, cuts: Sequence[str] | None = None) -> Units:
    """Split ``model`` into a chain of units (see the module's docstring for how).

    Args:
        model: any ``nn.Module``; an ``nn.Sequential`` is split per layer without tracing.
        example_inputs: what the model is called with: a tensor (``model(x)``),
            a tuple (``model(*xs)``) or a dict (``model(**inputs)``, e.g. a Hugging
            Face ``input_ids`` and ``attention_mask``). Their sizes give the
            boundaries' bytes; give a batch of at least 2 samples so that the batch
            dimension stays symbolic under ``torch.export``.
        cuts: module names (as in ``model.named_modules()``) at whose first call
            a new unit starts, instead of the default one unit per block.

    Raises:
        ConfigError: the model cannot be traced, or has control flow on tensor
            values, or a cut names no module it calls (before anything runs
            further than the tracing).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if cuts is not None and (isinstance(cuts, str) or not all(isinstance(c, str) for c in cuts)):
        raise ConfigError(f"cuts must be a list of module names, got {cuts!r}; hint: cuts=['encoder.layer.6']")
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        if cuts is not None:
            raise ConfigError("cuts are for traced models; an nn.Sequential is cut between its layers; hint: leave "
                              "cuts out (the plan's balance chooses the cuts)")
        return _split_sequential(model, example_inputs)
    traced = _trace(model, example_inputs)
    unit_of, units = _group(traced, model, cuts)
    graph = traced.graph
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    inputs = [n for n in nodes if n.op == "placeholder"]
    out_node = nodes[-1]
    n_units = len(units)

    def producer(n: torch.fx.Node) -> int:
        return -1 if n.op == "placeholder" else unit_of[n]

    last_use: dict[torch.fx.Node, int] = {}
    for n in nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                last_use[a] = max(last_use.get(a, -1), unit_of[n])
    for a in out_node.all_input_nodes:
        if a.op != "get_attr":
            last_use[a] = n_units  # the model's output: carried to the last stage
    crossing: list[list[torch.fx.Node]] = []
    for k in range(n_units - 1):
        crossing.append(sorted((n for n in last_use if producer(n) <= k < last_use[n]), key=order.__getitem__))
    # Measure each crossing value on the example inputs, with grad as a training step has it.
    gm = torch.fx.GraphModule(traced.attrs, graph)
    recorder = _Recorder(gm, {n for c in crossing for n in c} | set(inputs))
    flat_in, in_spec = pytree.tree_flatten(example_inputs)
    try:
        with torch.enable_grad(), untouched(model):
            recorder.run(*flat_in)
    except Exception as exc:
        raise ConfigError(f"the traced {type(model).__name__} raised {type(exc).__name__}: {_first_line(exc)} on the "
                          f"example inputs{_where(exc)}; {_HINT}") from exc

    def describe(n: torch.fx.Node) -> Value:
        return _value(n.name, producer(n), recorder.seen[n])

    boundaries = [Boundary(k, tuple(describe(n) for n in c)) for k, c in enumerate(crossing)]
    inputs_boundary = Boundary(-1, tuple(describe(n) for n in inputs))

    def build(first: int, last: int) -> nn.Module:
        before = inputs if first == 0 else crossing[first - 1]
        return _build_stage(traced, unit_of, before, None if last == n_units - 1 else crossing[last], first, last)

    return Units(model, units, inputs_boundary, boundaries, in_spec, traced.tracer, build)
