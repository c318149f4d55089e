"""A pipelined loop (--pipeline-depth 1) makes its next plan just before the step in
flight should end, not as soon as it sent the last one: a plan made at the step's start
would leave a request that arrives during the step a whole step more to wait.

The arithmetic of that wait (worker_loop.WorkerLoop._until_plan_time), on a loop that is
never started: the clock and the sleep are the test's.
"""
from __future__ import annotations

import asyncio

import pytest

import scheduler_svc.worker_loop as worker_loop
from bros.v1 import worker_pb2
from scheduler_svc.planner import PlannerConfig, make_policy


def waits_ms(monkeypatch, *, now: float, sent_at: list[float], reported_at: float, step_ms: float,
             plan_phase_ms: float) -> list[float]:
    """What the loop sleeps before planning, with plans sent at sent_at still out."""
    loop = worker_loop.WorkerLoop("127.0.0.1:1", None, make_policy("fcfs"), PlannerConfig(), "r", pipeline_depth=1)
    loop._sent.extend(worker_loop._Sent(worker_pb2.StepPlan(plan_id=i + 1), sent_ms=t) for i, t in enumerate(sent_at))
    loop._last_report_ms, loop.status.last_step_ms, loop._plan_phase_ms = reported_at, step_ms, plan_phase_ms
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds * 1e3)

    monkeypatch.setattr(worker_loop, "now_ms", lambda: now)
    monkeypatch.setattr(worker_loop.asyncio, "sleep", sleep)
    asyncio.run(loop._until_plan_time())
    return slept


def test_the_next_plan_waits_until_a_margin_before_the_step_should_end(monkeypatch):
    # sent at 1000 (the report before came at 990): the step should end at 1080; the
    # margin is a quarter of a step (20 ms, more than 3 x 2 ms of planning) + 1 ms
    assert waits_ms(monkeypatch, now=1000, sent_at=[1000], reported_at=990, step_ms=80,
                    plan_phase_ms=2) == pytest.approx([59])


def test_slow_planning_widens_the_margin(monkeypatch):
    # 3 x 10 ms of queue read and planning outweighs a quarter of the 80 ms step
    assert waits_ms(monkeypatch, now=1000, sent_at=[1000], reported_at=990, step_ms=80,
                    plan_phase_ms=10) == pytest.approx([49])


def test_a_step_counts_from_the_later_of_its_plan_and_the_last_report(monkeypatch):
    # plan sent at 1000 while the worker still ran the step before (reported at 1030):
    # it could start only then, so it should end at 1110
    assert waits_ms(monkeypatch, now=1040, sent_at=[1000], reported_at=1030, step_ms=80,
                    plan_phase_ms=2) == pytest.approx([49])


def test_plans_in_flight_end_one_after_the_other(monkeypatch):
    assert waits_ms(monkeypatch, now=1000, sent_at=[990, 1000], reported_at=980, step_ms=80,
                    plan_phase_ms=2) == pytest.approx([990 + 160 - 21 - 1000])


@pytest.mark.parametrize("sent_at", [[], [900]], ids=["no plan out", "step overdue"])
def test_no_wait_with_nothing_in_flight_or_a_step_already_overdue(monkeypatch, sent_at):
    assert waits_ms(monkeypatch, now=1000, sent_at=sent_at, reported_at=890, step_ms=80, plan_phase_ms=2) == []
