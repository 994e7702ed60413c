"""Small actors the fake functions run, importable by name in their processes."""

from __future__ import annotations

import threading

from funcpipe.executors.base import Actor


class Sleeper(Actor):
    """Sleeps until cancelled or ``seconds`` pass; returns what it was built with."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._cancelled = threading.Event()

    def sleep(self, seconds: float) -> dict[str, object]:
        cancelled = self._cancelled.wait(seconds)
        return {"label": self.label, "cancelled": cancelled}

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def cancel(self) -> None:
        self._cancelled.set()


class Counted(Sleeper):
    """A :class:`Sleeper` that counts how many were built in this process."""

    built = 0

    def __init__(self, label: str) -> None:
        super().__init__(label)
        type(self).built += 1


class NoCancel:
    """Built from plain data, but not an actor: no ``cancel()``."""

    def __init__(self, label: str) -> None:
        self.label = label

    def sleep(self, seconds: float) -> None:
        return None
