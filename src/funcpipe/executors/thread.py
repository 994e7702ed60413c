"""Actors as threads of the driver process: the in-process executor for tests and debugging.

Every actor gets one thread, so its calls run one at a time, as on Ray.
``memory://`` storage works here (it lives in this process). A thread cannot
be killed, so :meth:`ThreadActor.kill` asks the actor to stop
(:meth:`Actor.cancel`) and stops accepting calls.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from funcpipe.executors.base import Actor, ActorHandle, Executor, Resources

__all__ = ["ThreadActor", "ThreadExecutor"]


class ThreadActor(ActorHandle):
    def __init__(self, instance: Actor, name: str) -> None:
        self.name = name
        self.instance = instance
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"funcpipe-{name}")

    def call(self, method: str, *args: Any) -> Future[Any]:
        return self._pool.submit(getattr(self.instance, method), *args)

    def started(self) -> bool:
        return True  # built by launch(), in the driver's thread

    def kill(self) -> None:
        # Refuse queued calls first: cancelling the running one frees the thread,
        # which must not then start the next call.
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.instance.cancel()

    def join(self) -> None:
        """Wait until the actor's thread has exited (after :meth:`kill`)."""
        self._pool.shutdown(wait=True)


class ThreadExecutor(Executor):
    """Runs every actor in a thread of this process."""

    name = "thread"

    def __init__(self) -> None:
        self.actors: list[ThreadActor] = []

    def launch(self, actor_cls: type[Actor], *args: Any, name: str, resources: Resources) -> ThreadActor:
        actor = ThreadActor(actor_cls(*args), name)
        self.actors.append(actor)
        return actor

    def shutdown(self) -> None:
        for actor in self.actors:
            actor.kill()
        for actor in self.actors:
            actor.join()
        self.actors.clear()
