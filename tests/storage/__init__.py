"""Tests of funcpipe.storage: a shared conformance suite and per-backend specifics."""

from __future__ import annotations

import builtins
from collections.abc import Iterable

from funcpipe.storage.base import Storage


class NoPrimitives(Storage):
    """A storage whose five primitives raise: the base of test stores that override only what they use."""


    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, keys: Iterable[str]) -> None:
        raise NotImplementedError

    def list(self, prefix: str) -> builtins.list[str]:
        raise NotImplementedError
