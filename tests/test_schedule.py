from __future__ import annotations

import pytest

from funcpipe.schedule import Task, in_flight, worker_tasks

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


# -- 1F1B ------------------------------------------------------------------------
#
# Each list is laid out as the worker runs it: downloads posted first, then one row
# per step of the pipeline (the warm-up forwards, then each backward with what it
# posts and the forward that follows it, then the cool-down).


def one_f_one_b(stage: int, replica: int, replicas: list[int], m: int) -> list[Task]:
    return worker_tasks(stage, replica, replicas=replicas, num_micro_batches=m, schedule="1f1b")


def test_1f1b_first_of_two_stages_keeps_two_in_flight() -> None:
    assert one_f_one_b(0, 0, [1, 1], 4) == [
        (R, 0), (R, 1), (RG, 0), (R, 2),
        (F, 0), (S, 0), (F, 1), (S, 1),
        (B, 0), (RG, 1), (R, 3), (F, 2), (S, 2),
        (B, 1), (RG, 2),         (F, 3), (S, 3),
        (B, 2), (RG, 3),
        (B, 3),
        ("update", -1),
    ]


def test_1f1b_last_stage_alternates_with_inputs_one_ahead() -> None:
    assert one_f_one_b(1, 0, [1, 1], 3) == [
        (R, 0), (RT, 0), (R, 1), (RT, 1),
        (F, 0), (B, 0), (SG, 0), (R, 2), (RT, 2),
        (F, 1), (B, 1), (SG, 1),
        (F, 2), (B, 2), (SG, 2),
        ("update", -1),
    ]


def test_1f1b_three_stages() -> None:
    # Stage s of S keeps S - s micro-batches in flight.
    assert one_f_one_b(0, 0, [1, 1, 1], 5) == [
        (R, 0), (R, 1), (R, 2), (RG, 0), (R, 3),
        (F, 0), (S, 0), (F, 1), (S, 1), (F, 2), (S, 2),
        (B, 0), (RG, 1), (R, 4), (F, 3), (S, 3),
        (B, 1), (RG, 2),         (F, 4), (S, 4),
        (B, 2), (RG, 3),
        (B, 3), (RG, 4),
        (B, 4),
        ("update", -1),
    ]
    assert one_f_one_b(1, 0, [1, 1, 1], 5) == [
        (R, 0), (R, 1), (RG, 0), (R, 2),
        (F, 0), (S, 0), (F, 1), (S, 1),
        (B, 0), (SG, 0), (RG, 1), (R, 3), (F, 2), (S, 2),
        (B, 1), (SG, 1), (RG, 2), (R, 4), (F, 3), (S, 3),
        (B, 2), (SG, 2), (RG, 3),         (F, 4), (S, 4),
        (B, 3), (SG, 3), (RG, 4),
        (B, 4), (SG, 4),
        ("update", -1),
    ]


def test_1f1b_one_stage_one_replica_is_gradient_accumulation() -> None:
    assert one_f_one_b(0, 0, [1], 3) == [
        (R, 0), (RT, 0), (R, 1), (RT, 1),
        (F, 0), (B, 0), (R, 2), (RT, 2),
        (F, 1), (B, 1),
        (F, 2), (B, 2),
        ("update", -1),
    ]


def test_1f1b_replicas_that_do_not_divide_the_micro_batches() -> None:
    # Replicas [2, 1, 3], 7 micro-batches. Stage 0 has W = 6 workers from it on, so each
    # of its 2 replicas keeps ceil(6 / 2) = 3 of its micro-batches in flight; replica 1
    # owns only 1, 3, 5: all three in flight, no steady phase.
    assert one_f_one_b(0, 0, [2, 1, 3], 7) == [
        (R, 0), (R, 2), (R, 4), (RG, 0), (R, 6),
        (F, 0), (S, 0), (F, 2), (S, 2), (F, 4), (S, 4),
        (B, 0), (RG, 2), (F, 6), (S, 6),
        (B, 2), (RG, 4),
        (B, 4), (RG, 6),
        (B, 6),
        ("sync", -1), ("update", -1),
    ]
    assert one_f_one_b(0, 1, [2, 1, 3], 7) == [
        (R, 1), (R, 3), (R, 5), (RG, 1),
        (F, 1), (S, 1), (F, 3), (S, 3), (F, 5), (S, 5),
        (B, 1), (RG, 3),
        (B, 3), (RG, 5),
        (B, 5),
        ("sync", -1), ("update", -1),
    ]
    # Stage 1: W = 4 workers from it on, one replica: 4 in flight.
    assert one_f_one_b(1, 0, [2, 1, 3], 7) == [
        (R, 0), (R, 1), (R, 2), (R, 3), (RG, 0), (R, 4),
        (F, 0), (S, 0), (F, 1), (S, 1), (F, 2), (S, 2), (F, 3), (S, 3),
        (B, 0), (SG, 0), (RG, 1), (R, 5), (F, 4), (S, 4),
        (B, 1), (SG, 1), (RG, 2), (R, 6), (F, 5), (S, 5),
        (B, 2), (SG, 2), (RG, 3),         (F, 6), (S, 6),
        (B, 3), (SG, 3), (RG, 4),
        (B, 4), (SG, 4), (RG, 5),
        (B, 5), (SG, 5), (RG, 6),
        (B, 6), (SG, 6),
        ("update", -1),
    ]
    # The last stage's replica 2 owns 2 and 5.
    assert one_f_one_b(2, 2, [2, 1, 3], 7) == [
        (R, 2), (RT, 2), (R, 5), (RT, 5),
        (F, 2), (B, 2), (SG, 2),
        (F, 5), (B, 5), (SG, 5),
        ("sync", -1), ("update", -1),
    ]


@pytest.mark.parametrize(("stage", "replicas", "m", "expected"), [
    (0, [1, 1, 1, 1], 8, 4), (1, [1, 1, 1, 1], 8, 3), (3, [1, 1, 1, 1], 8, 1),
    (0, [1, 1, 1, 1], 2, 2),  # never more than the replica's micro-batches
    (0, [8], 8, 1),  # LambdaML: one micro-batch per worker
    (0, [8, 1], 16, 2), (0, [1, 8], 16, 9), (1, [1, 8], 16, 1),
])
def test_1f1b_in_flight(stage: int, replicas: list[int], m: int, expected: int) -> None:
    assert in_flight(stage, replicas, m, "1f1b") == expected


def test_gpipe_in_flight_is_every_micro_batch_but_on_the_last_stage() -> None:
    assert in_flight(0, [2, 1], 7, "gpipe") == 4
    assert in_flight(1, [2, 1], 7, "gpipe") == 1


@pytest.mark.parametrize(("replicas", "m"), [
    (replicas, m)
    for replicas in ([1], [3], [1, 1], [2, 1, 3], [1, 4], [4, 1, 2, 1], [1, 1, 1, 1, 1])
    for m in (1, 4, 7, 12)
    if max(replicas) <= m  # a plan has at most one replica per micro-batch
])
def test_1f1b_downloads_come_in_the_order_compute_uses_them(replicas: list[int], m: int) -> None:
    """Every micro-batch runs once per stage; a replica never holds more than ``in_flight``
    activations, ``in_flight + 1`` inputs and one output gradient; and the single download
    thread fetches in exactly the order the compute thread consumes (so it never waits on
    an object that is needed after one queued behind it)."""
    for stage, count in enumerate(replicas):
        last = stage == len(replicas) - 1
        forwards = []
        for replica in range(count):
            tasks = one_f_one_b(stage, replica, replicas, m)
            k = min(in_flight(stage, replicas, m, "1f1b"), len(range(replica, m, count)))
            posted, consumed = [], []
            alive, inputs, grads = set(), 0, 0
            most = {"alive": 0, "inputs": 0, "grads": 0}
            for op, mb in tasks:
                if op in ("recv", "recv_grad"):
                    posted.append((op, mb))
                    inputs += op == "recv"
                    grads += op == "recv_grad"
                elif op == "forward":
                    forwards.append(mb)
                    consumed.append(("recv", mb))
                    alive.add(mb)
                elif op == "backward":
                    if not last:
                        consumed.append(("recv_grad", mb))
                        grads -= 1
                    alive.discard(mb)
                    inputs -= 1
                most = {"alive": max(most["alive"], len(alive)), "inputs": max(most["inputs"], inputs),
                        "grads": max(most["grads"], grads)}
            assert posted == consumed
            assert most["alive"] <= k and most["inputs"] <= k + 1 and most["grads"] <= 1
        assert sorted(forwards) == list(range(m))


def test_unknown_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'"):
        worker_tasks(0, 0, replicas=[1], num_micro_batches=2, schedule="pipedream")
