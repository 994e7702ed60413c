"""Storage.wait: the backoff between looks, the deadline, cancellation and early wake-ups, on an injected clock."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from funcpipe.errors import ObjectNotFound
from funcpipe.storage.base import SLEEP, Pause, Storage, WaitCancelled
from tests.storage import NoPrimitives


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ScriptedStorage(NoPrimitives):
    """A dict store on a fake clock whose pauses advance the clock and are recorded.

    ``arrivals`` maps a key to the clock time it is written at; ``woken`` is how many
    of the next pauses end at once, as a ring would end them.
    """

    poll_initial_s = 0.001
    poll_max_s = 0.004

    def __init__(self, arrivals: dict[str, float] | None = None, woken: int = 0) -> None:
        self.fake = FakeClock()
        self.clock = self.fake  # type: ignore[assignment]  # the instance's clock, not the class's
        self.arrivals = dict(arrivals or {})
        self.pauses: list[float] = []
        self.events: list[str] = []  # "arm", "look", "pause" in the order the wait did them
        self.woken = woken
        storage = self

        class Recorder(Pause):
            def arm(self) -> None:
                storage.events.append("arm")

            def pause(self, seconds: float) -> bool:
                storage.events.append("pause")
                storage.pauses.append(seconds)
                if storage.woken:
                    storage.woken -= 1
                    return True
                storage.fake.now += seconds
                return False

        self.recorder = Recorder()

    def pause_for_wait(self) -> Pause:
        return self.recorder

    def get_if_exists(self, key: str) -> bytes | None:
        self.events.append("look")
        arrival = self.arrivals.get(key)
        return b"data" if arrival is not None and self.fake.now >= arrival else None


def test_pauses_double_from_the_first_interval_to_the_largest_and_the_last_ends_at_the_deadline() -> None:
    storage = ScriptedStorage()
    with pytest.raises(ObjectNotFound, match=r"did not appear within 0\.02 s"):
        storage.wait("never", timeout=0.02)
    assert storage.pauses == pytest.approx([0.001, 0.002, 0.004, 0.004, 0.004, 0.004, 0.001])
    assert storage.fake.now == pytest.approx(100.02)


def test_every_look_comes_right_after_an_arm() -> None:
    storage = ScriptedStorage({"k": 100.0035})
    assert storage.wait("k", timeout=1) == b"data"
    assert storage.events == ["arm", "look", "pause", "arm", "look", "pause", "arm", "look", "pause", "arm", "look"]


def test_an_object_written_during_a_pause_is_returned_at_the_next_look() -> None:
    storage = ScriptedStorage({"k": 100.0025})
    assert storage.wait("k", timeout=1) == b"data"
    assert storage.pauses == pytest.approx([0.001, 0.002])  # looks at 100.000, .001, .003


def test_a_present_object_is_returned_without_a_pause() -> None:
    storage = ScriptedStorage({"k": 0.0})
    assert storage.wait("k", timeout=1) == b"data"
    assert storage.pauses == []


def test_a_cancelled_wait_stops_after_its_first_miss_without_pausing() -> None:
    storage = ScriptedStorage()
    with pytest.raises(WaitCancelled):
        storage.wait("never", timeout=60, cancelled=lambda: True)
    assert storage.events == ["arm", "look"]


def test_a_woken_pause_looks_again_at_once_and_the_backoff_goes_on() -> None:
    storage = ScriptedStorage({"k": 100.001}, woken=2)
    assert storage.wait("k", timeout=1) == b"data"
    # Two wake-ups (another key written) cost no time; the third pause sleeps its full interval.
    assert storage.pauses == pytest.approx([0.001, 0.002, 0.004])
    assert storage.fake.now == pytest.approx(100.004)


def test_the_plain_pause_sleeps_and_is_never_woken() -> None:
    SLEEP.arm()
    assert SLEEP.pause(0.0) is False


class _Plugin(Storage):
    """A third-party backend that lets its library's exceptions out."""

    url = "plugin://bucket"

    def __init__(self, failure: BaseException | None) -> None:
        self.failure = failure
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> None:
        if self.failure is not None:
            raise self.failure
        self.objects[key] = data

    def get(self, key: str) -> bytes:
        if key not in self.objects:
            raise ObjectNotFound(key)
        return self.objects[key]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def delete(self, keys: Iterable[str]) -> None:
        raise RuntimeError("the plugin's delete is broken")

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))


@pytest.mark.parametrize("failure", [OSError(104, "Connection reset by peer"), RuntimeError("SDK bug"),
                                     ValueError("bad response")])
def test_a_plugins_own_exception_becomes_a_storage_failure_naming_the_storage_and_key(failure: Exception) -> None:
    from funcpipe.errors import StorageFailure

    with pytest.raises(StorageFailure) as info:
        _Plugin(failure).put("job/a0/k", b"x")
    assert info.value.__cause__ is failure
    message = str(info.value)
    assert "plugin://bucket" in message and "put of 'job/a0/k'" in message
    assert f"{type(failure).__name__}: {failure}" in message
    with pytest.raises(StorageFailure, match=r"delete.*RuntimeError: the plugin's delete is broken"):
        _Plugin(None).delete(["k"])


def test_funcpipe_errors_and_interrupts_pass_the_boundary_unchanged() -> None:
    storage = _Plugin(None)
    with pytest.raises(ObjectNotFound):
        storage.get("missing")
    for failure in (KeyboardInterrupt(), MemoryError(), WaitCancelled("k")):
        with pytest.raises(type(failure)):
            _Plugin(failure).put("k", b"x")
    assert _Plugin.put.__name__ == "put" and "put" in (_Plugin.put.__qualname__ or "")
