"""funcpipe: train PyTorch models as pipelines of serverless functions."""

from __future__ import annotations

from funcpipe.errors import (
    BackendError,
    ConfigError,
    FuncpipeError,
    IntegrityError,
    ObjectNotFound,
    PlanInfeasible,
    StorageError,
    WorkerFailed,
)
from funcpipe.plan import Plan
from funcpipe.trainer import History, Trainer

__all__ = [
    "BackendError",
    "ConfigError",
    "FuncpipeError",
    "History",
    "IntegrityError",
    "ObjectNotFound",
    "Plan",
    "PlanInfeasible",
    "StorageError",
    "Trainer",
    "WorkerFailed",
    "__version__",
]

__version__ = "0.1.0"
