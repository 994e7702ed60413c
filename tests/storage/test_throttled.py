"""ThrottledStorage: the conformance suite, link emulation on a fake clock, URLs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from funcpipe.errors import ConfigError, ObjectNotFound
from funcpipe.storage import (
    FileStorage,
    MemoryStorage,
    Storage,
    ThrottledStorage,
    open_storage,
    throttle,
)
from tests.storage.fakes import FakeClock

MB = 10**6


def memory() -> MemoryStorage:
    return MemoryStorage(f"test-{uuid.uuid4().hex}")


def throttled(
    clock: FakeClock,
    inner: Storage | None = None,
    *,
    up: float | None = 10 * MB,
    down: float | None = 10 * MB,
    latency: float = 0.02,
) -> ThrottledStorage:
    return ThrottledStorage(
        memory() if inner is None else inner,
        uplink_bytes_per_s=up,
        downlink_bytes_per_s=down,
        latency_s=latency,
        clock=clock,
        sleep=clock.sleep,
    )


# -- timing ---------------------------------------------------------------------


def test_one_upload_costs_size_over_bandwidth_plus_latency() -> None:
    clock = FakeClock()
    storage = throttled(clock)
    storage.put("k", b"x" * (10 * MB))
    assert clock.now == pytest.approx(1.02)
    assert clock.sleeps == [pytest.approx(1.02)]


def test_one_download_costs_size_over_bandwidth_plus_latency() -> None:
    clock = FakeClock()
    inner = memory()
    inner.put("k", b"x" * (5 * MB))
    assert len(throttled(clock, inner).get("k")) == 5 * MB
    assert clock.sleeps == [pytest.approx(0.52)]


def test_concurrent_uploads_queue_on_the_uplink() -> None:
    clock = FakeClock(advance=False)
    storage = throttled(clock)
    storage.put("a", b"x" * (10 * MB))
    storage.put("b", b"x" * (10 * MB))
    assert clock.sleeps == [pytest.approx(1.02), pytest.approx(2.02)]


def test_concurrent_downloads_queue_on_the_downlink() -> None:
    clock = FakeClock(advance=False)
    inner = memory()
    inner.put("k", b"x" * (10 * MB))
    storage = throttled(clock, inner)
    storage.get("k")
    assert storage.get_if_exists("k") is not None
    assert clock.sleeps == [pytest.approx(1.02), pytest.approx(2.02)]


def test_sequential_uploads_do_not_queue() -> None:
    clock = FakeClock()
    storage = throttled(clock)
    storage.put("a", b"x" * (10 * MB))
    storage.put("b", b"x" * (10 * MB))
    assert clock.sleeps == [pytest.approx(1.02), pytest.approx(1.02)]
    assert clock.now == pytest.approx(2.04)


def test_upload_and_download_are_independent() -> None:
    clock = FakeClock(advance=False)
    inner = memory()
    inner.put("down", b"x" * (10 * MB))
    storage = throttled(clock, inner)
    storage.put("up", b"x" * (10 * MB))
    storage.get("down")
    assert clock.sleeps == [pytest.approx(1.02), pytest.approx(1.02)]


def test_each_instance_is_its_own_client() -> None:
    clock = FakeClock(advance=False)
    inner = memory()
    throttled(clock, inner).put("a", b"x" * (10 * MB))
    throttled(clock, inner).put("b", b"x" * (10 * MB))
    assert clock.sleeps == [pytest.approx(1.02), pytest.approx(1.02)]


def test_small_requests_pay_latency_only() -> None:
    clock = FakeClock(advance=False)
    inner = memory()
    storage = throttled(clock, inner)
    storage.put("big", b"x" * (10 * MB))  # the uplink is busy until 1.0 ...
    clock.sleeps.clear()
    inner.put("k", b"v")
    assert storage.exists("k")
    assert storage.list("") == ["big", "k"]
    storage.delete(["k"])  # ... but requests without a body do not queue behind it
    with pytest.raises(ObjectNotFound):
        storage.get("k")
    assert storage.get_if_exists("k") is None
    storage.put("empty", b"")
    assert clock.sleeps == [pytest.approx(0.02)] * 6


def test_latencies_of_concurrent_requests_overlap() -> None:
    clock = FakeClock(advance=False)
    storage = throttled(clock, up=None, down=None, latency=0.05)
    for i in range(4):
        storage.exists(f"k{i}")
    assert clock.sleeps == [pytest.approx(0.05)] * 4


def test_unlimited_bandwidth() -> None:
    clock = FakeClock()
    storage = throttled(clock, up=None, down=None, latency=0.005)
    storage.put("k", b"x" * (100 * MB))
    storage.get("k")
    assert clock.sleeps == [pytest.approx(0.005)] * 2


def test_no_throttle_never_sleeps() -> None:
    clock = FakeClock()
    storage = throttled(clock, up=None, down=None, latency=0.0)
    storage.put("k", b"x" * MB)
    storage.get("k")
    storage.exists("k")
    assert clock.sleeps == []


def test_writes_reach_the_inner_storage_when_the_call_returns() -> None:
    inner = memory()
    seen: list[bool] = []

    class Clock(FakeClock):
        def sleep(self, seconds: float) -> None:
            seen.append(inner.exists("k"))
            super().sleep(seconds)

    clock = Clock()
    storage = throttled(clock, inner)
    storage.put("k", b"v")
    assert inner.exists("k")
    storage.delete(["k"])
    assert not inner.exists("k")
    assert seen == [False, True]  # not yet stored during the put; not yet deleted during the delete


def test_poll_intervals_respect_latency() -> None:
    inner = memory()
    storage = throttle(inner, latency_ms=40)
    assert storage.poll_initial_s == pytest.approx(0.02)
    assert storage.poll_max_s >= storage.poll_initial_s
    assert throttle(inner).poll_initial_s == inner.poll_initial_s


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uplink_bytes_per_s": 0},
        {"downlink_bytes_per_s": -1.0},
        {"uplink_bytes_per_s": float("inf")},
        {"latency_s": -0.1},
        {"uplink_bytes_per_s": 999.0},  # below 1 kB/s: every transfer would outlast any timeout
        {"downlink_bytes_per_s": float("nan")},
        {"latency_s": 3600.5},  # over an hour
        {"latency_s": float("inf")},
    ],
)
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as info:
        ThrottledStorage(memory(), **kwargs)  # type: ignore[arg-type]
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_close_closes_inner() -> None:
    closed: list[bool] = []

    class Inner(MemoryStorage):
        def close(self) -> None:
            closed.append(True)

    throttle(Inner("close-test")).close()
    assert closed == [True]


# -- URLs -------------------------------------------------------------------------


def test_helper_and_url() -> None:
    inner = MemoryStorage("throttle-url")
    storage = throttle(inner, up_mb_s=70, down_mb_s=35.5, latency_ms=20)
    assert storage.inner is inner
    assert storage.uplink_bytes_per_s == 70 * MB
    assert storage.downlink_bytes_per_s == 35.5 * MB
    assert storage.latency_s == pytest.approx(0.02)
    assert storage.url == "throttled+memory://throttle-url?up_mb_s=70&down_mb_s=35.5&latency_ms=20"


def test_url_roundtrip() -> None:
    url = "throttled+memory://throttle-url?up_mb_s=70&down_mb_s=70&latency_ms=20"
    storage = open_storage(url)
    assert isinstance(storage, ThrottledStorage)
    assert isinstance(storage.inner, MemoryStorage)
    assert storage.inner.url == "memory://throttle-url"
    assert storage.uplink_bytes_per_s == 70 * MB
    assert storage.downlink_bytes_per_s == 70 * MB
    assert storage.latency_s == pytest.approx(0.02)
    assert storage.url == url
    assert ThrottledStorage.from_url(url, open_storage).url == url


def test_url_params_are_optional_and_in_any_order(tmp_path: Path) -> None:
    storage = ThrottledStorage.from_url(f"throttled+file://{tmp_path}?latency_ms=5&up_mb_s=1", open_storage)
    assert isinstance(storage.inner, FileStorage)
    assert storage.inner.root == tmp_path
    assert storage.uplink_bytes_per_s == MB
    assert storage.downlink_bytes_per_s is None
    assert storage.latency_s == pytest.approx(0.005)
    assert storage.url == f"throttled+file://{tmp_path}?up_mb_s=1&latency_ms=5"

    plain = ThrottledStorage.from_url("throttled+memory://x", open_storage)
    assert (plain.uplink_bytes_per_s, plain.downlink_bytes_per_s, plain.latency_s) == (None, None, 0)
    assert plain.url == "throttled+memory://x"


def test_unknown_param() -> None:
    with pytest.raises(ConfigError) as info:
        open_storage("throttled+memory://x?up_mb_s=1&bogus=2")
    message = str(info.value)
    assert "bogus" in message
    for known in ("up_mb_s", "down_mb_s", "latency_ms"):
        assert known in message


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("up_mb_s=fast", "not a number"),
        ("up_mb_s=0", r">= 0.001 \(1 kB/s\)"),
        ("down_mb_s=-3", r">= 0.001"),
        ("up_mb_s=inf", r">= 0.001"),
        ("up_mb_s=1e-15", r"up_mb_s='1e-15' .* must be a number >= 0.001"),
        ("down_mb_s=nan", r">= 0.001"),
        ("latency_ms=-1", "from 0 to 3600000"),
        ("latency_ms=1e12", r"latency_ms='1e12' .* from 0 to 3600000 \(1 hour\)"),
        ("latency_ms=nan", "from 0 to 3600000"),
        ("latency_ms=1&latency_ms=2", "twice"),
    ],
)
def test_bad_params(query: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        open_storage(f"throttled+memory://x?{query}")


def test_the_range_s_ends_are_accepted() -> None:
    storage = open_storage("throttled+memory://x?up_mb_s=0.001&down_mb_s=0.001&latency_ms=3600000")
    assert isinstance(storage, ThrottledStorage)
    assert (storage.uplink_bytes_per_s, storage.latency_s) == (1000.0, 3600.0)


def test_inner_url_errors_pass_through() -> None:
    with pytest.raises(ConfigError, match="unknown storage URL 'ftp://x'"):
        open_storage("throttled+ftp://x?up_mb_s=1")


def test_a_create_pays_for_its_upload_like_a_put_whether_it_creates_or_not() -> None:
    clock = FakeClock()
    inner = memory()
    storage = throttled(clock, inner)
    assert storage.create("lease", b"x" * (10 * MB)) is True
    assert clock.now == pytest.approx(1.02)
    assert storage.create("lease", b"y" * (5 * MB)) is False  # the request went up the link all the same
    assert clock.now == pytest.approx(1.54)
    assert inner.get("lease") == b"x" * (10 * MB)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latency_ms": 1e12}, r"throttle\(\) parameter latency_ms=1000000000000.0 must be from 0 to 3600000"),
        ({"latency_ms": -1.0}, r"latency_ms=-1.0 must be from 0 to 3600000 \(1 hour\)"),
        ({"latency_ms": float("nan")}, r"latency_ms=nan must be from 0 to 3600000"),
        ({"latency_ms": float("inf")}, r"latency_ms=inf must be from 0 to 3600000"),
        ({"up_mb_s": 1e-15}, r"throttle\(\) parameter up_mb_s=1e-15 must be a number >= 0.001 \(1 kB/s\)"),
        ({"down_mb_s": 0.0}, r"down_mb_s=0.0 must be a number >= 0.001"),
        ({"down_mb_s": float("nan")}, r"down_mb_s=nan must be a number >= 0.001"),
        ({"up_mb_s": float("inf")}, r"up_mb_s=inf must be a number >= 0.001"),
    ],
)
def test_throttle_refuses_parameters_out_of_range_by_their_names(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        throttle(memory(), **kwargs)


def test_throttle_accepts_the_range_s_ends() -> None:
    storage = throttle(memory(), up_mb_s=0.001, down_mb_s=0.001, latency_ms=3_600_000)
    assert (storage.uplink_bytes_per_s, storage.downlink_bytes_per_s, storage.latency_s) == (1000.0, 1000.0, 3600.0)
    assert throttle(memory(), latency_ms=0.0).latency_s == 0.0


@pytest.mark.parametrize("query", ["latency_ms=3600000.001", "up_mb_s=0.000999", "down_mb_s=-inf",
                                   "latency_ms=inf", "up_mb_s=nan"])
def test_a_url_just_out_of_range_is_refused_naming_it(query: str) -> None:
    url = f"throttled+memory://x?{query}"
    with pytest.raises(ConfigError) as info:
        open_storage(url)
    name, value = query.split("=")
    assert f"parameter {name}={value!r} in {url!r}" in str(info.value)
