"""platforms: built-in figures, get/load/dump/resolve, overrides and validation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

import funcpipe.platforms as platforms
from funcpipe.errors import ConfigError
from funcpipe.platforms import Platform, Tier, dump, get, load, names, resolve

LAMBDA_TIERS = [1024, 2048, 3072, 4096, 5120, 6144, 8192, 10240]
FC_TIERS = [512, 1024, 2048, 3072, 4096, 8192, 16384, 32768]
LOCAL_TIERS = [1024, 2048, 4096, 8192, 16384]


def small_platform(**changes: Any) -> Platform:
    fields: dict[str, Any] = dict(
        name="mine",
        tiers=[Tier(1024, 1.0, 1.0, 10.0, 20.0), Tier(2048, 2.0, 1.5, 10.0, 20.0)],
        latency_s=0.01,
        price_per_gb_s=1e-5,
        price_per_vcpu_s=0.0,
        price_per_invocation=0.0,
        price_per_put=1e-6,
        price_per_get=1e-7,
        lifetime_s=600.0,
        runtime_overhead_mb=200,
        async_payload_bytes=1000,
        storage="file",
    )
    fields.update(changes)
    return Platform(**fields)


# --- the package's surface ----------------------------------------------------------------------------------------


def test_exports_are_sorted_and_complete() -> None:
    assert platforms.__all__ == ["Platform", "Tier", "dump", "get", "load", "names", "resolve"]
    assert platforms.__all__ == sorted(platforms.__all__)


def test_names_lists_the_builtins() -> None:
    assert names() == ["alibaba_fc", "aws_lambda", "local"]
    for name in names():
        assert get(name).name == name


@pytest.mark.parametrize(
    ("name", "storage", "tiers"),
    [("aws_lambda", "s3", LAMBDA_TIERS), ("alibaba_fc", "oss", FC_TIERS), ("local", "file", LOCAL_TIERS)],
)
def test_builtin_storage_and_tiers(name: str, storage: str, tiers: list[int]) -> None:
    platform = get(name)
    assert platform.storage == storage
    assert [t.memory_mb for t in platform.tiers] == tiers
    assert isinstance(platform.tiers, tuple)
    assert platform.runtime_overhead_mb % 10 == 0


# --- AWS Lambda figures ---------------------------------------------------------------------------------------------


def test_lambda_vcpus_follow_1769_mb_per_vcpu_with_6_at_the_top() -> None:
    lam = get("aws_lambda")
    assert lam.tier(1024).vcpus == 1024 / 1769
    assert lam.tier(8192).vcpus == 8192 / 1769
    assert lam.tier(10240).vcpus == 6.0


def test_lambda_speed_counts_extra_vcpus_at_half() -> None:
    lam = get("aws_lambda")
    assert lam.tier(1024).speed == pytest.approx(1024 / 1769, rel=1e-12)
    assert lam.tier(2048).speed == pytest.approx(1 + 0.5 * (2048 / 1769 - 1), rel=1e-12)
    assert lam.tier(10240).speed == pytest.approx(1 + 0.5 * 5, rel=1e-12)


def test_lambda_link_prices_and_limits() -> None:
    lam = get("aws_lambda")
    assert {(t.uplink_mb_s, t.downlink_mb_s) for t in lam.tiers} == {(70.0, 70.0)}
    assert lam.latency_s == 0.03
    assert lam.price_per_vcpu_s == 0
    assert lam.price_per_invocation == pytest.approx(0.2e-6, rel=1e-12)
    assert lam.price_per_put == pytest.approx(5e-6, rel=1e-12)
    assert lam.price_per_get == pytest.approx(4e-7, rel=1e-12)
    assert lam.lifetime_s == 900
    assert lam.async_payload_bytes == 1024 * 1024


def test_lambda_price_per_s_of_2048_mb() -> None:
    lam = get("aws_lambda")
    assert lam.price_per_s(lam.tier(2048)) == pytest.approx(2 * 0.0000166667, rel=1e-12)


# --- Alibaba Function Compute figures -------------------------------------------------------------------------------


def test_fc_vcpus_are_one_per_2_gb_within_the_allowed_ratio() -> None:
    fc = get("alibaba_fc")
    assert fc.tier(2048).vcpus == 1.0
    assert fc.tier(512).vcpus == 0.25
    assert fc.tier(32768).vcpus == 16.0
    for tier in fc.tiers:
        assert 0.05 <= tier.vcpus <= 16
        assert 1 <= (tier.memory_mb / 1024) / tier.vcpus <= 4


def test_fc_price_per_s_of_2048_mb_in_compute_units() -> None:
    fc = get("alibaba_fc")
    # 1 vCPU at 1 CU per vCPU-s plus 2 GB at 0.15 CU per GB-s, USD 0.000020 per CU.
    assert fc.price_per_s(fc.tier(2048)) == pytest.approx((1 * 1 + 2 * 0.15) * 0.000020, rel=1e-12)
    assert fc.price_per_invocation == pytest.approx(75 * 0.000020 / 10_000, rel=1e-12)


def test_fc_link_and_limits() -> None:
    fc = get("alibaba_fc")
    assert {(t.uplink_mb_s, t.downlink_mb_s) for t in fc.tiers} == {(50.0, 50.0)}
    assert fc.latency_s == 0.05
    assert fc.lifetime_s == 86_400
    assert fc.async_payload_bytes == 128 * 1024


# --- local figures --------------------------------------------------------------------------------------------------


def test_local_is_one_thread_per_worker_with_nominal_prices() -> None:
    loc = get("local")
    assert {(t.vcpus, t.speed, t.uplink_mb_s, t.downlink_mb_s) for t in loc.tiers} == {(1.0, 1.0, 1000.0, 1000.0)}
    assert loc.price_per_gb_s == get("aws_lambda").price_per_gb_s
    assert loc.price_per_vcpu_s == 0
    # Nominal, so that larger tiers still cost more.
    assert loc.price_per_s(loc.tier(4096)) == pytest.approx(2 * loc.price_per_s(loc.tier(2048)), rel=1e-12)
    assert loc.lifetime_s == 1e9
    assert isinstance(loc.async_payload_bytes, int)


# --- get / resolve --------------------------------------------------------------------------------------------------


def test_get_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        get("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in names():
        assert name in message
    assert ".json/.yaml" in message


def test_get_overrides_a_field_and_leaves_the_builtin_alone() -> None:
    fast = get("aws_lambda", latency_s=0.01)
    assert fast.latency_s == 0.01
    assert fast.tiers == get("aws_lambda").tiers
    assert fast.price_per_gb_s == get("aws_lambda").price_per_gb_s
    assert get("aws_lambda").latency_s == 0.03


def test_get_platform_level_bandwidth_sets_every_tier() -> None:
    measured = get("aws_lambda", uplink_mb_s=55, downlink_mb_s=90)
    assert {(t.uplink_mb_s, t.downlink_mb_s) for t in measured.tiers} == {(55.0, 90.0)}
    assert [t.speed for t in measured.tiers] == [t.speed for t in get("aws_lambda").tiers]


def test_get_tiers_from_mappings_take_missing_fields_from_the_base() -> None:
    lam = get("aws_lambda")
    picked = get("aws_lambda", tiers=[{"memory_mb": 2048, "speed": 1.0}, {"memory_mb": 8192}])
    assert [t.memory_mb for t in picked.tiers] == [2048, 8192]
    # A speed the user gives holds at every micro-batch size; a tier taken whole keeps the estimate's curve.
    assert picked.tier(2048) == dataclasses.replace(lam.tier(2048), speed=1.0, speed_half_batch=0.0)
    assert picked.tier(8192) == lam.tier(8192)


def test_speed_at_grows_with_the_micro_batch_toward_speed() -> None:
    tier = Tier(8192, 4.6, 2.8, 70.0, 70.0, speed_half_batch=4.0)
    speeds = [tier.speed_at(b) for b in (1, 2, 4, 16, 64, 10**6)]
    assert speeds == sorted(speeds)
    assert speeds[2] == pytest.approx(1 + 1.8 / 2)  # at b = h, half of what the further vCPUs add
    assert speeds[-1] == pytest.approx(2.8, rel=1e-5)
    assert tier.at_batch(4) == Tier(8192, 4.6, 1.9, 70.0, 70.0)
    assert Tier(1024, 0.58, 0.58, 70.0, 70.0, speed_half_batch=4.0).speed_at(1) == 0.58  # no parallelism to lose
    assert Tier(8192, 4.6, 2.8, 70.0, 70.0).speed_at(1) == 2.8  # 0: the same speed at every size
    with pytest.raises(ConfigError, match="speed_half_batch"):
        Tier(8192, 4.6, 2.8, 70.0, 70.0, speed_half_batch=-1.0)


def test_get_unknown_override_names_it() -> None:
    with pytest.raises(ConfigError, match="latncy_s"):
        get("local", latncy_s=0.1)


def test_get_invalid_override_names_field_and_value() -> None:
    with pytest.raises(ConfigError, match=r"latency_s.*-0\.5"):
        get("local", latency_s=-0.5)


def test_resolve_passes_a_platform_through_and_looks_up_names() -> None:
    mine = small_platform()
    assert resolve(mine) is mine
    assert resolve("local") is get("local")
    with pytest.raises(ConfigError, match="42"):
        resolve(42)  # type: ignore[arg-type]


# --- Platform methods -----------------------------------------------------------------------------------------------


def test_tier_lookup_and_missing_tier() -> None:
    lam = get("aws_lambda")
    assert lam.tier(3072).memory_mb == 3072
    with pytest.raises(ConfigError) as info:
        lam.tier(3000)
    message = str(info.value)
    assert "3000" in message
    assert str(LAMBDA_TIERS) in message


def test_with_link_sets_every_tier() -> None:
    lam = get("aws_lambda")
    both = lam.with_link(uplink_mb_s=40, downlink_mb_s=80)
    assert {(t.uplink_mb_s, t.downlink_mb_s) for t in both.tiers} == {(40.0, 80.0)}
    down = lam.with_link(downlink_mb_s=95.5)
    assert {(t.uplink_mb_s, t.downlink_mb_s) for t in down.tiers} == {(70.0, 95.5)}
    assert [t.vcpus for t in down.tiers] == [t.vcpus for t in lam.tiers]
    assert lam.with_link() == lam


def test_with_link_rejects_a_bad_bandwidth() -> None:
    with pytest.raises(ConfigError, match=r"uplink_mb_s.*-1"):
        get("local").with_link(uplink_mb_s=-1)


def test_replace_validates_and_rejects_unknown_fields() -> None:
    mine = small_platform()
    assert mine.replace(lifetime_s=60).lifetime_s == 60
    with pytest.raises(ConfigError) as info:
        mine.replace(bandwidth=5)
    message = str(info.value)
    assert "bandwidth" in message
    assert "latency_s" in message and "storage" in message
    with pytest.raises(ConfigError, match=r"price_per_put.*-1e-06"):
        mine.replace(price_per_put=-1e-6)


# --- validation -----------------------------------------------------------------------------------------------------


def test_tiers_list_becomes_a_tuple() -> None:
    mine = small_platform()
    assert isinstance(mine.tiers, tuple)
    assert hash(mine) == hash(small_platform())


def test_empty_tiers_rejected() -> None:
    with pytest.raises(ConfigError, match="tiers"):
        small_platform(tiers=[])


def test_non_ascending_tiers_rejected() -> None:
    with pytest.raises(ConfigError, match=r"\[2048, 1024\]"):
        small_platform(tiers=[Tier(2048, 1.0, 1.0, 10.0, 10.0), Tier(1024, 1.0, 1.0, 10.0, 10.0)])
    with pytest.raises(ConfigError, match=r"\[1024, 1024\]"):
        small_platform(tiers=[Tier(1024, 1.0, 1.0, 10.0, 10.0), Tier(1024, 2.0, 1.0, 10.0, 10.0)])


@pytest.mark.parametrize(
    ("field", "value"),
    [("vcpus", 0), ("speed", -2.0), ("uplink_mb_s", -5.0), ("downlink_mb_s", math.nan), ("memory_mb", 0)],
)
def test_bad_tier_figures_rejected(field: str, value: float) -> None:
    fields: dict[str, Any] = dict(memory_mb=1024, vcpus=1.0, speed=1.0, uplink_mb_s=10.0, downlink_mb_s=10.0)
    fields[field] = value
    with pytest.raises(ConfigError) as info:
        Tier(**fields)
    assert field in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("latency_s", -0.1),
        ("price_per_gb_s", -1.0),
        ("price_per_get", math.inf),
        ("lifetime_s", 0),
        ("runtime_overhead_mb", 1.5),
        ("async_payload_bytes", 0),
        ("storage", ""),
        ("price_per_invocation", True),
        ("price_per_put", "5e-6"),
    ],
)
def test_bad_platform_figures_rejected(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        small_platform(**{field: value})
    message = str(info.value)
    assert field in message
    assert repr(value) in message
    assert "hint:" in message


def test_zero_prices_and_latency_allowed() -> None:
    free = small_platform(price_per_gb_s=0, price_per_put=0, price_per_get=0, latency_s=0)
    assert free.price_per_s(free.tiers[0]) == 0


# --- spec files -----------------------------------------------------------------------------------------------------


def test_json_file_with_base_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "lambda.json"
    path.write_text(
        json.dumps(
            {
                "base": "aws_lambda",
                "latency_s": 0.02,
                "uplink_mb_s": 120,
                "tiers": [{"memory_mb": 2048, "speed": 1.5}, {"memory_mb": 4096}],
            }
        )
    )
    lam = get("aws_lambda")
    spec = load(path)
    assert spec.name == "aws_lambda"
    assert spec.latency_s == 0.02
    assert [t.memory_mb for t in spec.tiers] == [2048, 4096]
    assert spec.tier(2048) == Tier(2048, lam.tier(2048).vcpus, 1.5, 120.0, 70.0)
    assert spec.tier(4096) == Tier(4096, lam.tier(4096).vcpus, lam.tier(4096).speed, 120.0, 70.0,
                                   lam.tier(4096).speed_half_batch)
    assert lam.tier(4096).speed_half_batch > 0  # the estimate's, kept where the spec gives no speed
    assert spec.price_per_gb_s == lam.price_per_gb_s


def test_yaml_file_with_base_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "fc.yaml"
    path.write_text(
        "base: alibaba_fc\n"
        "name: fc_measured\n"
        "downlink_mb_s: 65.5\n"
        "price_per_put: 1.0e-6\n"
        "tiers:\n"
        "  - memory_mb: 1024\n"
        "  - {memory_mb: 6144, vcpus: 3, speed: 2.0, uplink_mb_s: 45}\n"
    )
    fc = get("alibaba_fc")
    spec = load(path)
    assert spec.name == "fc_measured"
    assert spec.price_per_put == 1e-6
    assert spec.tiers == (
        dataclasses.replace(fc.tier(1024), downlink_mb_s=65.5),
        Tier(6144, 3.0, 2.0, 45.0, 65.5),
    )
    assert get(str(path)) == spec
    assert get(str(path), latency_s=0.2) == spec.replace(latency_s=0.2)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
@pytest.mark.parametrize("name", ["aws_lambda", "alibaba_fc", "local"])
def test_dump_round_trips_through_a_file(tmp_path: Path, name: str, suffix: str) -> None:
    platform = get(name)
    data = dump(platform)
    json.dumps(data, allow_nan=False)  # JSON-able, no inf/nan
    path = tmp_path / f"spec{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    assert load(path) == platform


def test_dump_round_trips_a_users_platform(tmp_path: Path) -> None:
    mine = small_platform(price_per_gb_s=0.15 * 0.000020, name="my_cluster")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(dump(mine)))
    assert load(path) == mine
    assert dump("local") == dump(get("local"))


def test_full_spec_may_give_bandwidth_for_the_platform(tmp_path: Path) -> None:
    data = dump(small_platform())
    for tier in data["tiers"]:
        del tier["uplink_mb_s"], tier["downlink_mb_s"]
    data["uplink_mb_s"] = 33
    data["downlink_mb_s"] = 44
    path = tmp_path / "full.json"
    path.write_text(json.dumps(data))
    assert {(t.uplink_mb_s, t.downlink_mb_s) for t in load(path).tiers} == {(33.0, 44.0)}


def test_full_spec_missing_fields_named(tmp_path: Path) -> None:
    data = dump(small_platform())
    del data["lifetime_s"], data["storage"]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"\['lifetime_s', 'storage'\]"):
        load(path)


def test_unknown_keys_in_a_file_named(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("base: local\nlatncy_s: 0.1\nbandwith: 5\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "['bandwith', 'latncy_s']" in str(info.value)


def test_unknown_key_in_a_tier_named(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("base: local\ntiers:\n  - {memory_mb: 1024, cpus: 2}\n")
    with pytest.raises(ConfigError, match=r"tiers\[0\].*'cpus'"):
        load(path)


def test_tier_not_in_base_needs_every_field(tmp_path: Path) -> None:
    path = tmp_path / "new_tier.yaml"
    path.write_text("base: aws_lambda\ntiers:\n  - memory_mb: 3000\n    speed: 1.2\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "3000" in message
    assert "vcpus" in message and "uplink_mb_s" in message
    assert "speed'" not in message  # the given field is not reported missing


def test_tier_not_in_base_with_every_field_loads(tmp_path: Path) -> None:
    path = tmp_path / "new_tier.yaml"
    path.write_text("base: aws_lambda\ntiers:\n  - {memory_mb: 3000, vcpus: 1.7, speed: 1.3, uplink_mb_s: 60, "
                    "downlink_mb_s: 80}\n")
    assert load(path).tiers == (Tier(3000, 1.7, 1.3, 60.0, 80.0),)


def test_non_ascending_tiers_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "order.json"
    path.write_text(json.dumps({"base": "aws_lambda", "tiers": [{"memory_mb": 4096}, {"memory_mb": 2048}]}))
    with pytest.raises(ConfigError, match=r"\[4096, 2048\]"):
        load(path)


def test_negative_bandwidth_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "neg.yaml"
    path.write_text("base: local\ndownlink_mb_s: -5\n")
    with pytest.raises(ConfigError, match=r"downlink_mb_s.*-5"):
        load(path)
    path.write_text("base: local\ntiers:\n  - {memory_mb: 2048, uplink_mb_s: -7.5}\n")
    with pytest.raises(ConfigError, match=r"uplink_mb_s.*-7\.5"):
        load(path)


def test_bandwidth_per_tier_and_for_the_platform_conflict(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("base: local\nuplink_mb_s: 10\ntiers:\n  - {memory_mb: 2048, uplink_mb_s: 20}\n")
    with pytest.raises(ConfigError, match="uplink_mb_s"):
        load(path)


def test_unknown_base_named(tmp_path: Path) -> None:
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"base": "gcp_functions"}))
    with pytest.raises(ConfigError, match=r"gcp_functions.*aws_lambda"):
        load(path)


def test_yaml_exponent_without_dot_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("base: local\nprice_per_put: 5e-6\n")
    with pytest.raises(ConfigError, match=r"price_per_put.*'5e-6'.*5\.0e-6"):
        load(path)


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.json"):
        load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"\.toml"):
        load(tmp_path / "spec.toml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(listed)
