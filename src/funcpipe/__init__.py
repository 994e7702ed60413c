"""funcpipe: train PyTorch models as pipelines of serverless functions."""

from __future__ import annotations

from funcpipe import platforms
from funcpipe.errors import (
    BackendError,
    BucketNotFound,
    ConfigError,
    ForeignObject,
    FuncpipeError,
    FunctionNotDeployed,
    IntegrityError,
    ObjectNotFound,
    PayloadTooLarge,
    PlanInfeasible,
    PlanTimeout,
    StorageAccessDenied,
    StorageError,
    WorkerFailed,
    WorkerNotStarted,
    WorkerSilent,
    WorkerTimeout,
)
from funcpipe.plan import Plan
from funcpipe.planner import pareto, plan
from funcpipe.profiler import LayerProfile, ModelProfile, profile
from funcpipe.simulator import Simulation, simulate
from funcpipe.trainer import History, Trainer

__all__ = [
    "BackendError",
    "BucketNotFound",
    "ConfigError",
    "ForeignObject",
    "FuncpipeError",
    "FunctionNotDeployed",
    "History",
    "IntegrityError",
    "LayerProfile",
    "ModelProfile",
    "ObjectNotFound",
    "PayloadTooLarge",
    "Plan",
    "PlanInfeasible",
    "PlanTimeout",
    "Simulation",
    "StorageAccessDenied",
    "StorageError",
    "Trainer",
    "WorkerFailed",
    "WorkerNotStarted",
    "WorkerSilent",
    "WorkerTimeout",
    "__version__",
    "pareto",
    "plan",
    "platforms",
    "profile",
    "simulate",
]

__version__ = "0.1.0"
