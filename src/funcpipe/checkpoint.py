"""A stage's weights and optimizer state as safetensors bytes (never pickle), bound to their key."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from funcpipe import binding, codec
from funcpipe.errors import IntegrityError
from funcpipe.storage.base import Buffer

__all__ = ["decode_scheduler", "decode_state", "encode_state", "encode_state_parts"]

_MODEL = "model."
_OPTIM = "optim."


def encode_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, key: str,
                 scheduler: Any = None) -> bytes:
    """:func:`encode_state_parts`, joined."""
    return b"".join(encode_state_parts(module, optimizer, key=key, scheduler=scheduler))


def encode_state_parts(
    module: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, key: str, scheduler: Any = None
) -> list[Buffer]:
    """Serialize ``module.state_dict()`` and, if given, the optimizer's state, for storage key ``key``.

    In pieces (:func:`funcpipe.codec.encode_parts`; the tensors' are views of their memory), for
    :meth:`funcpipe.storage.base.Storage.put_parts` to join in the object's one copy.

    Tensors go into the safetensors body; the optimizer's non-tensor state and
    its ``param_groups`` go into the header as JSON, and so do a learning-rate
    scheduler's ``state_dict()`` (if given) and ``key`` (:func:`decode_state`
    refuses the bytes under any other key).
    """
    tensors = {_MODEL + name: value for name, value in module.state_dict().items()}
    metadata: dict[str, str] = {binding.FIELD: key}
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
    if scheduler is not None:
        metadata["scheduler"] = scheduler_json(scheduler)
    return codec.encode_parts(tensors, metadata)


def scheduler_json(scheduler: Any) -> str:
    """A learning-rate scheduler's ``state_dict()`` as JSON.

    Raises:
        TypeError: it holds something JSON does not (a function: give ``LambdaLR`` a callable object).
    """
    try:
        return json.dumps(scheduler.state_dict())
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"scheduler {type(scheduler).__name__} has state that is not JSON ({exc}); funcpipe checkpoints "
            "only numbers, strings and lists; hint: a scheduler of torch.optim.lr_scheduler other than LambdaLR "
            "with a lambda (whose function is not state)"
        ) from exc


def decode_scheduler(data: Buffer, *, key: str) -> dict[str, Any] | None:
    """The scheduler's state dict in checkpoint bytes read from ``key`` (``None``: it holds none).

    Raises:
        IntegrityError: ``data`` is not a checkpoint, or its scheduler header is malformed.
        ForeignObject: it was written for another key.
    """
    metadata = codec.read_metadata(data)
    binding.check(key, metadata.get(binding.FIELD))
    if "scheduler" not in metadata:
        return None
    try:
        state = json.loads(metadata["scheduler"])
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"checkpoint {key!r} has a malformed scheduler header: {exc}") from exc
    if not isinstance(state, dict):
        raise IntegrityError(f"checkpoint {key!r} has a scheduler header of a {type(state).__name__}, not a dict")
    return state


def decode_state(data: bytes, *, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Split checkpoint bytes read from ``key`` into a module state dict and an optimizer state dict (or None).

    Raises:
        IntegrityError: ``data`` is not a checkpoint (not safetensors, or a malformed optimizer header).
        ForeignObject: it was written for another key (another job's or stage's, another iteration's).
    """
    try:
        tensors, metadata = codec.decode(data)
    except IntegrityError as exc:
        raise IntegrityError(f"checkpoint {key!r} is not a funcpipe checkpoint: {exc}") from exc
    binding.check(key, metadata.get(binding.FIELD))
    model = {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    if "optimizer" not in metadata:
        return model, None
    try:
        header = json.loads(metadata["optimizer"])
        groups, plain = header["param_groups"], header["plain"]
        if not isinstance(plain, dict) or not (
            isinstance(groups, list)
            and all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups)
        ):
            raise TypeError(f"param_groups {groups!r:.80} and plain {plain!r:.80} are not a list of groups and a dict")
        state: dict[int, dict[str, Any]] = {int(index): dict(fields) for index, fields in plain.items()}
        for name, value in tensors.items():
            if name.startswith(_OPTIM):
                index, field = name[len(_OPTIM):].split(".", 1)
                state.setdefault(int(index), {})[field] = value
        return model, {"state": state, "param_groups": groups}
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise IntegrityError(f"checkpoint {key!r} has a malformed optimizer header: {exc}") from exc
