"""A stage's weights and optimizer state as safetensors bytes (never pickle)."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from funcpipe import codec
from funcpipe.errors import IntegrityError

__all__ = ["decode_state", "encode_state"]

_MODEL = "model."
_OPTIM = "optim."


def encode_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bytes:
    """Serialize ``module.state_dict()`` and, if given, the optimizer's state.

    Tensors go into the safetensors body; the optimizer's non-tensor state and
    its ``param_groups`` go into the header as JSON.
    """
    tensors = {_MODEL + name: value for name, value in module.state_dict().items()}
    metadata: dict[str, str] = {}
    if optimizer is not None:
        state = optimizer.state_dict()
        plain: dict[str, dict[str, Any]] = {}
        for index, entries in state["state"].items():
            for field, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{_OPTIM}{index}.{field}"] = value
                else:
                    plain.setdefault(str(index), {})[field] = value
        try:
            metadata["optimizer"] = json.dumps(
                {"param_groups": state["param_groups"], "plain": plain}
            )
        except TypeError as exc:
            raise TypeError(
                f"optimizer {type(optimizer).__name__} has state that is not JSON ({exc}); "
                "funcpipe checkpoints only tensors, numbers, strings and lists"
            ) from exc
    return codec.encode(tensors, metadata)


def decode_state(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Split checkpoint bytes into a module state dict and an optimizer state dict (or None)."""
    tensors, metadata = codec.decode(data)
    model = {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    if "optimizer" not in metadata:
        return model, None
    try:
        header = json.loads(metadata["optimizer"])
        state: dict[int, dict[str, Any]] = {
            int(index): dict(fields) for index, fields in header["plain"].items()
        }
        for name, value in tensors.items():
            if name.startswith(_OPTIM):
                index, field = name[len(_OPTIM):].split(".", 1)
                state.setdefault(int(index), {})[field] = value
        return model, {"state": state, "param_groups": header["param_groups"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"checkpoint has a malformed optimizer header: {exc}") from exc

