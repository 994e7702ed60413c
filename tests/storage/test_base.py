"""Storage.wait: the backoff between looks, the deadline, cancellation and early wake-ups, on an injected clock."""

from __future__ import annotations

import pytest

from funcpipe.errors import ObjectNotFound
from funcpipe.storage.base import SLEEP, Pause, WaitCancelled
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
