from __future__ import annotations

import pytest

from funcpipe.schedule import Task, worker_tasks

R, RT, RG = "recv", "recv_target", "recv_grad"
F, S, B, SG = "forward", "send", "backward", "send_grad"


def test_single_stage_single_replica() -> None:
    assert worker_tasks(0, 0, replicas=[1], num_micro_batches=2) == [
        (R, 0), (RT, 0), (R, 1), (RT, 1),
        (F, 0), (B, 0),
        (F, 1), (B, 1),
        ("update", -1),
    ]


def test_middle_stage_prefetches_everything_then_gpipe_order() -> None:
    assert worker_tasks(1, 0, replicas=[1, 1, 1], num_micro_batches=2) == [
        (R, 0), (R, 1), (RG, 0), (RG, 1),
        (F, 0), (S, 0), (F, 1), (S, 1),
        (B, 0), (SG, 0), (B, 1), (SG, 1),
        ("update", -1),
    ]


def test_first_stage_sends_no_input_gradient() -> None:
    assert worker_tasks(0, 0, replicas=[1, 1], num_micro_batches=3) == [
        (R, 0), (R, 1), (R, 2), (RG, 0), (RG, 1), (RG, 2),
        (F, 0), (S, 0), (F, 1), (S, 1), (F, 2), (S, 2),
        (B, 0), (B, 1), (B, 2),
        ("update", -1),
    ]


def test_last_stage_runs_backward_right_after_forward() -> None:
    assert worker_tasks(1, 0, replicas=[1, 1], num_micro_batches=2) == [
        (R, 0), (RT, 0), (R, 1), (RT, 1),
        (F, 0), (B, 0), (SG, 0),
        (F, 1), (B, 1), (SG, 1),
        ("update", -1),
    ]


def test_replicas_take_micro_batches_round_robin_and_sync() -> None:
    # 5 micro-batches over 3 replicas: replica 0 owns 0 and 3, replica 1 owns 1 and 4,
    # replica 2 owns only 2 (5 is not a multiple of 3).
    assert worker_tasks(0, 0, replicas=[3, 1], num_micro_batches=5) == [
        (R, 0), (R, 3), (RG, 0), (RG, 3),
        (F, 0), (S, 0), (F, 3), (S, 3),
        (B, 0), (B, 3),
        ("sync", -1), ("update", -1),
    ]
    assert worker_tasks(0, 2, replicas=[3, 1], num_micro_batches=5) == [
        (R, 2), (RG, 2),
        (F, 2), (S, 2),
        (B, 2),
        ("sync", -1), ("update", -1),
    ]


def test_every_micro_batch_runs_exactly_once_per_stage() -> None:
    replicas = [2, 1, 3]
    for stage, count in enumerate(replicas):
        forwards = sorted(
            task.micro_batch
            for replica in range(count)
            for task in worker_tasks(stage, replica, replicas=replicas, num_micro_batches=7)
            if task.op == "forward"
        )
        assert forwards == list(range(7))


def test_tasks_are_named_tuples() -> None:
    task = worker_tasks(0, 0, replicas=[1], num_micro_batches=1)[0]
    assert isinstance(task, Task) and task.op == "recv" and task.micro_batch == 0


@pytest.mark.parametrize(("stage", "replica"), [(2, 0), (-1, 0), (0, 2)])
def test_out_of_range_worker_is_rejected(stage: int, replica: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        worker_tasks(stage, replica, replicas=[2, 1], num_micro_batches=4)
