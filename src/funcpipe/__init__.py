"""funcpipe: train PyTorch models as pipelines of serverless functions.

The names below load on first use (PEP 562): ``import funcpipe`` imports
neither torch nor ortools nor ray, so the CLI's ``--help`` and a deployed
function (:mod:`funcpipe.function`) pay only for what they use.
``funcpipe.plan`` is the planner's function; the :class:`Plan` class lives in
:mod:`funcpipe.plans`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from funcpipe.errors import (
    BackendError,
    BucketNotFound,
    CheckpointCorrupt,
    ConfigError,
    FitInProgress,
    ForeignObject,
    FuncpipeError,
    FunctionNotDeployed,
    IntegrityError,
    JobBusy,
    JobUnfinished,
    LeaseLost,
    NonFiniteTraining,
    ObjectNotFound,
    PayloadTooLarge,
    PlanInfeasible,
    PlanTimeout,
    StorageAccessDenied,
    StorageError,
    StorageFailure,
    StorageTimeout,
    UserCodeError,
    VersionMismatch,
    WorkerFailed,
    WorkerNotStarted,
    WorkerSilent,
    WorkerTimeout,
)

if TYPE_CHECKING:
    from funcpipe import platforms
    from funcpipe.planner import pareto, plan
    from funcpipe.plans import Plan
    from funcpipe.profiler import LayerProfile, ModelProfile, profile
    from funcpipe.simulator import Simulation, simulate
    from funcpipe.trainer import History, Trainer

__all__ = [
    "BackendError",
    "BucketNotFound",
    "CheckpointCorrupt",
    "ConfigError",
    "FitInProgress",
    "ForeignObject",
    "FuncpipeError",
    "FunctionNotDeployed",
    "History",
    "IntegrityError",
    "JobBusy",
    "JobUnfinished",
    "LayerProfile",
    "LeaseLost",
    "ModelProfile",
    "NonFiniteTraining",
    "ObjectNotFound",
    "PayloadTooLarge",
    "Plan",
    "PlanInfeasible",
    "PlanTimeout",
    "Simulation",
    "StorageAccessDenied",
    "StorageError",
    "StorageFailure",
    "StorageTimeout",
    "Trainer",
    "UserCodeError",
    "VersionMismatch",
    "WorkerFailed",
    "WorkerNotStarted",
    "WorkerSilent",
    "WorkerTimeout",
    "__version__",
    "data",
    "mark_cut",
    "pareto",
    "plan",
    "platforms",
    "profile",
    "simulate",
]

__version__ = "0.1.0"

#: Where each lazily loaded name lives: ``name -> (module, attribute)``; attribute ``None``: the module itself.
_LAZY: dict[str, tuple[str, str | None]] = {
    "History": ("funcpipe.trainer", "History"),
    "LayerProfile": ("funcpipe.profiler", "LayerProfile"),
    "ModelProfile": ("funcpipe.profiler", "ModelProfile"),
    "Plan": ("funcpipe.plans", "Plan"),
    "Simulation": ("funcpipe.simulator", "Simulation"),
    "Trainer": ("funcpipe.trainer", "Trainer"),
    "data": ("funcpipe.data", None),
    "mark_cut": ("funcpipe.split", "mark_cut"),
    "pareto": ("funcpipe.planner", "pareto"),
    "plan": ("funcpipe.planner", "plan"),
    "platforms": ("funcpipe.platforms", None),
    "profile": ("funcpipe.profiler", "profile"),
    "simulate": ("funcpipe.simulator", "simulate"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'funcpipe' has no attribute {name!r}") from None
    loaded = importlib.import_module(module)
    value = loaded if attribute is None else getattr(loaded, attribute)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
