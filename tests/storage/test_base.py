"""Storage.wait: the backoff between looks, the deadline, cancellation and early wake-ups, on an injected clock."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from funcpipe.errors import ObjectNotFound, StorageFailure
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


class _Subclass(_Plugin):
    """A plugin built on another, whose put adds to its base's through ``super()``."""

    def put(self, key: str, data: bytes) -> None:
        super().put(key, data + b"!")


def test_a_subclass_calling_super_is_translated_once() -> None:
    from funcpipe.errors import StorageFailure

    failure = OSError(5, "I/O error")
    with pytest.raises(StorageFailure) as info:
        _Subclass(failure).put("k", b"x")
    assert info.value.__cause__ is failure  # not a StorageFailure of a StorageFailure
    assert str(info.value).count("OSError") == 1
    storage = _Subclass(None)
    storage.put("k", b"x")
    assert storage.get("k") == b"x!"
    # Each class's own method is wrapped once; a wrapped method assigned again is not wrapped again.
    assert _Subclass.put.__wrapped__.__name__ == "put"  # type: ignore[attr-defined]
    assert not hasattr(_Subclass.put.__wrapped__, "__wrapped__")  # type: ignore[attr-defined]

    class Alias(_Plugin):
        get = _Plugin.get

    assert Alias.get is _Plugin.get


def test_the_translated_methods_keep_their_signature_and_docstring() -> None:
    import inspect

    from funcpipe.storage import MemoryStorage

    assert str(inspect.signature(MemoryStorage.put)) == "(self, key: 'str', data: 'bytes') -> 'None'"
    assert MemoryStorage.get.__doc__ and "ObjectNotFound" in MemoryStorage.get.__doc__
    assert MemoryStorage.create.__name__ == "create"


def test_the_key_is_named_when_passed_by_keyword_and_funcpipe_errors_pass_unchanged() -> None:
    from funcpipe.errors import ConfigError, StorageError, StorageFailure

    with pytest.raises(StorageFailure, match=r"put of 'job/k': RuntimeError: SDK bug"):
        _Plugin(RuntimeError("SDK bug")).put(key="job/k", data=b"x")
    for failure in (StorageError("the plugin's own named error"), ConfigError("bad")):
        with pytest.raises(type(failure)) as info:
            _Plugin(failure).put("k", b"x")
        assert info.value is failure


class _Unconditional(_Plugin):
    """A plugin written before ``create`` existed."""


def test_the_default_create_looks_then_puts_and_warns_once_naming_the_class(
        caplog: pytest.LogCaptureFixture) -> None:
    storage = _Unconditional(None)
    with caplog.at_level("WARNING", logger="funcpipe.storage.base"):
        assert storage.create("lease", b"first") is True
        assert storage.create("lease", b"second") is False
        assert _Unconditional(None).create("other", b"x") is True
    assert storage.objects["lease"] == b"first"
    warnings = [r.getMessage() for r in caplog.records if "atomic create" in r.getMessage()]
    assert len(warnings) == 1
    assert "test_base._Unconditional has no atomic create()" in warnings[0]


def test_the_default_create_s_failures_are_translated_too() -> None:
    from funcpipe.errors import StorageFailure

    with pytest.raises(StorageFailure, match="put of 'lease': OSError") as info:
        _Unconditional(OSError("disk full")).create("lease", b"x")
    assert isinstance(info.value.__cause__, OSError)


def test_a_plugin_without_put_parts_or_wait_view_gets_them_from_put_and_wait() -> None:
    plugin = _Plugin(None)
    plugin.put_parts("k", [b"ab", memoryview(b"xcdx")[1:3], b""])
    assert plugin.objects["k"] == b"abcd"
    assert plugin.wait_view("k", 1.0) == b"abcd"


def test_put_parts_failures_are_translated_through_put() -> None:
    with pytest.raises(StorageFailure, match="Connection reset"):
        _Plugin(OSError(104, "Connection reset by peer")).put_parts("k", [b"a"])
