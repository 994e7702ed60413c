"""plan: validation, layer ranges, micro-batch assignment and (de)serialization."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from funcpipe.errors import ConfigError
from funcpipe.plans import Plan, StageReport


def test_manual_defaults() -> None:
    plan = Plan.manual([2, 3, 2], micro_batch_size=4, global_batch_size=16)
    assert plan.balance == (2, 3, 2)
    assert plan.replicas == (1, 1, 1)
    assert plan.memory_mb is None
    assert plan.sync == "pipelined"
    assert plan.num_stages == 3
    assert plan.num_workers == 3
    assert plan.num_micro_batches == 4


def test_manual_memory_for_all_stages_or_per_stage() -> None:
    assert Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, memory_mb=512).memory_mb == (512, 512)
    per_stage = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, memory_mb=[256, 1024])
    assert per_stage.memory_mb == (256, 1024)


def test_manual_accepts_tuples_and_lists_alike() -> None:
    from_lists = Plan.manual([2, 1], replicas=[2, 1], micro_batch_size=2, global_batch_size=8)
    from_tuples = Plan.manual((2, 1), replicas=(2, 1), micro_batch_size=2, global_batch_size=8)
    assert from_lists == from_tuples
    assert from_lists.replicas == (2, 1)
    assert from_lists.num_workers == 3


@pytest.mark.parametrize("value", ["23", b"23", 3])
def test_manual_refuses_non_lists(value: object) -> None:
    with pytest.raises(ConfigError, match=re.escape(repr(value))):
        Plan.manual(value, micro_batch_size=1, global_batch_size=1)  # type: ignore[arg-type]


def test_layer_range() -> None:
    plan = Plan.manual([2, 3, 2], micro_batch_size=1, global_batch_size=1)
    assert plan.layer_range(0) == range(0, 2)
    assert plan.layer_range(1) == range(2, 5)
    assert plan.layer_range(2) == range(5, 7)


def test_micro_batches_round_robin() -> None:
    plan = Plan.manual([1, 1], replicas=[3, 1], micro_batch_size=2, global_batch_size=14)
    assert plan.num_micro_batches == 7
    assert plan.micro_batches(0, 0) == [0, 3, 6]
    assert plan.micro_batches(0, 1) == [1, 4]
    assert plan.micro_batches(0, 2) == [2, 5]
    assert plan.micro_batches(1, 0) == [0, 1, 2, 3, 4, 5, 6]


def test_to_dict_from_dict_roundtrip() -> None:
    plan = Plan.manual(
        [2, 3], replicas=[2, 1], micro_batch_size=3, global_batch_size=12, memory_mb=[512, 1024],
        sync="four_phase",
    )
    assert plan.to_dict() == {
        "balance": (2, 3),
        "replicas": (2, 1),
        "micro_batch_size": 3,
        "global_batch_size": 12,
        "memory_mb": (512, 1024),
        "sync": "four_phase",
        "schedule": "gpipe",
    }
    assert Plan.from_dict(plan.to_dict()) == plan


def test_schedule_and_per_stage_sync_roundtrip_through_json() -> None:
    plan = Plan.manual([2, 3], replicas=[2, 3], micro_batch_size=2, global_batch_size=12,
                       sync=["four_phase", "pipelined"], schedule="1f1b")
    assert plan.schedule == "1f1b"
    assert [plan.stage_sync(s) for s in range(2)] == ["four_phase", "pipelined"]
    back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and back.sync == ("four_phase", "pipelined")
    assert back != dataclasses.replace(plan, schedule="gpipe")


def test_a_plan_from_before_schedules_is_gpipe() -> None:
    data = {"balance": [2], "replicas": [1], "micro_batch_size": 1, "global_batch_size": 2, "sync": "pipelined"}
    assert Plan.from_dict(data).schedule == "gpipe"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"schedule": "pipedream"}, "unknown schedule 'pipedream'; choose one of \\['gpipe', '1f1b'\\]"),
    ({"sync": "ring"}, "unknown gradient sync 'ring'"),
    ({"sync": ["pipelined"]}, "one algorithm for every stage or one per stage \\(stages: 2"),
])
def test_bad_schedule_or_sync_is_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("memory_mb", [None, [128, 256]])
def test_from_dict_accepts_json_lists(memory_mb: list[int] | None) -> None:
    text = json.dumps(
        {"balance": [2, 3], "replicas": [2, 1], "micro_batch_size": 3, "global_batch_size": 12,
         "memory_mb": memory_mb}
    )
    plan = Plan.from_dict(json.loads(text))
    assert plan.balance == (2, 3)
    assert plan.replicas == (2, 1)
    assert plan.memory_mb == (None if memory_mb is None else (128, 256))
    assert plan.sync == "pipelined"
    # Tuples compare equal to what manual() builds; lists would not.
    assert plan == Plan.manual([2, 3], replicas=[2, 1], micro_batch_size=3, global_batch_size=12,
                               memory_mb=memory_mb)
    assert hash(plan) == hash(Plan.from_dict(json.loads(text)))


def test_from_dict_unknown_field() -> None:
    data = {"balance": [1], "replicas": [1], "micro_batch_size": 1, "global_batch_size": 1, "stages": 1}
    with pytest.raises(ConfigError, match=r"unknown plan fields \['stages'\]"):
        Plan.from_dict(data)


def test_from_dict_validates() -> None:
    data = {"balance": [1, 0], "replicas": [1, 1], "micro_batch_size": 1, "global_batch_size": 1}
    with pytest.raises(ConfigError, match=re.escape("[1, 0]")):
        Plan.from_dict(data)


def test_empty_balance() -> None:
    with pytest.raises(ConfigError, match="balance is empty"):
        Plan.manual([], micro_batch_size=1, global_batch_size=1)


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_bad_balance_entries(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"balance must hold positive integers.*" + re.escape(repr(bad))):
        Plan.manual([2, bad], micro_batch_size=1, global_batch_size=1)  # type: ignore[list-item]


@pytest.mark.parametrize("bad", [0, -1, True])
def test_bad_replica_entries(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"replicas must hold positive integers.*" + re.escape(repr(bad)) +
                       re.escape("]; hint: at least 1 per stage, e.g. replicas=[1, 1]")):
        Plan.manual([2, 2], replicas=[1, bad], micro_batch_size=1, global_batch_size=4)  # type: ignore[list-item]


def test_empty_replicas() -> None:
    with pytest.raises(ConfigError, match="replicas is empty"):
        Plan(balance=(1,), replicas=(), micro_batch_size=1, global_batch_size=1)


def test_replicas_length_mismatch() -> None:
    with pytest.raises(ConfigError, match=re.escape("stages: 3, replicas: [1, 1]")):
        Plan.manual([1, 1, 1], replicas=[1, 1], micro_batch_size=1, global_batch_size=4)


@pytest.mark.parametrize("field", ["micro_batch_size", "global_batch_size"])
@pytest.mark.parametrize("bad", [0, -4, True, 2.0])
def test_bad_batch_sizes(field: str, bad: object) -> None:
    kwargs: dict[str, object] = {"micro_batch_size": 2, "global_batch_size": 4, field: bad}
    with pytest.raises(ConfigError, match=f"{field} must be a positive integer, got {re.escape(repr(bad))}"):
        Plan.manual([1], **kwargs)  # type: ignore[arg-type]


def test_global_batch_not_divisible() -> None:
    with pytest.raises(ConfigError, match="global_batch_size 10 is not divisible into micro-batches of 4; hint: "):
        Plan.manual([1], micro_batch_size=4, global_batch_size=10)


def test_more_replicas_than_micro_batches() -> None:
    with pytest.raises(ConfigError, match="stage 1 has 4 replicas but an iteration has only 3 micro-batches"):
        Plan.manual([1, 1], replicas=[3, 4], micro_batch_size=2, global_batch_size=6)


def test_as_many_replicas_as_micro_batches_is_fine() -> None:
    plan = Plan.manual([1], replicas=[3], micro_batch_size=2, global_batch_size=6)
    assert [plan.micro_batches(0, r) for r in range(3)] == [[0], [1], [2]]


def test_memory_mb_length_mismatch() -> None:
    with pytest.raises(ConfigError, match=re.escape("stages: 2, memory_mb: [512]")):
        Plan.manual([1, 1], micro_batch_size=1, global_batch_size=1, memory_mb=[512])


def test_memory_mb_entries_must_be_positive() -> None:
    message = "memory_mb must hold positive integers (MB per stage), got [512, 0]"
    with pytest.raises(ConfigError, match=re.escape(message)):
        Plan.manual([1, 1], micro_batch_size=1, global_batch_size=1, memory_mb=[512, 0])


def test_unknown_sync() -> None:
    with pytest.raises(ConfigError, match="unknown gradient sync 'ring'"):
        Plan.manual([1], micro_batch_size=1, global_batch_size=1, sync="ring")


def test_str_lists_every_stage() -> None:
    plan = Plan.manual(
        [2, 3, 2], replicas=[2, 1, 1], micro_batch_size=2, global_batch_size=8, memory_mb=[256, 512, 1024]
    )
    assert str(plan).splitlines() == [
        "Plan: 3 stage(s), 4 worker(s), 4 micro-batches of 2 (global batch 8), schedule=gpipe, sync=pipelined",
        "  stage  layers  replicas  memory MB",
        "      0  0-1            2        256",
        "      1  2-4            1        512",
        "      2  5-6            1       1024",
        "  no predictions; hint: funcpipe.simulate(plan, profile, platform).plan carries them",
    ]


def test_str_without_memory() -> None:
    lines = str(Plan.manual([1, 1], micro_batch_size=1, global_batch_size=1)).splitlines()
    assert lines[2:4] == ["      0  0              1    default", "      1  1              1    default"]


def test_prediction_fields_round_trip_and_are_checked() -> None:
    stages = tuple(
        StageReport(stage=s, replicas=1, memory_mb=1024, memory_needed_mb=300.0, compute_s=0.1, sync_s=0.0,
                    upload_s=0.05, download_s=0.05, idle_s=0.2, cost_usd=1e-5)
        for s in range(2)
    )
    plan = dataclasses.replace(Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2),
                               predicted_stages=stages, samples=100)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["samples"] == 100 and len(data["predicted_stages"]) == 2
    again = Plan.from_dict(data)
    assert again.predicted_stages == stages and again.samples == 100
    assert "predicted_stages" not in repr(plan)  # a repr stays one readable line
    with pytest.raises(ConfigError, match=r"one StageReport per stage.*got stages \[0\]"):
        dataclasses.replace(plan, predicted_stages=stages[:1])
    with pytest.raises(ConfigError, match="samples must be a positive integer"):
        dataclasses.replace(plan, samples=0)
    with pytest.raises(ConfigError, match="each must have exactly the fields"):
        Plan.from_dict({**data, "predicted_stages": [{"stage": 0}, {"stage": 1}]})


def test_plan_is_frozen() -> None:
    plan = Plan.manual([1], micro_batch_size=1, global_batch_size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.sync = "four_phase"  # type: ignore[misc]
    assert plan.sync == "pipelined"


def test_from_dict_names_missing_fields() -> None:
    with pytest.raises(ConfigError, match=r"missing fields \['global_batch_size'\]"):
        Plan.from_dict({"balance": [1], "replicas": [1], "micro_batch_size": 1})


def test_layer_stages_name_each_layers_stage() -> None:
    plan = Plan.manual([2, 3, 1], micro_batch_size=1, global_batch_size=4)
    assert plan.layer_stages() == (0, 0, 1, 1, 1, 2)
    assert [list(plan.layer_range(s)) for s in range(3)] == [[0, 1], [2, 3, 4], [5]]
