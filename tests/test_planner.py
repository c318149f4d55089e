"""The pure planner: FCFS with chunked prefill, a token budget and a sequence cap."""
from scheduler_svc.planner import BE, RT, PlanInput, PlannerConfig, SeqView, make_policy
from scheduler_svc.policies.fcfs import FCFS

import pytest


def seq(rid, arrival, prompt, cls=RT, computed=0, produced=0):
    return SeqView(request_id=rid, service_class=cls, arrival_ms=arrival, num_prompt_tokens=prompt,
                   num_tokens=prompt + produced, num_computed_tokens=computed)


def plan(running=(), waiting=(), free_blocks=100, budget=64, max_seqs=8):
    inp = PlanInput(now_ms=0.0, running=list(running), waiting=list(waiting), free_blocks=free_blocks, block_size=16)
    return FCFS().plan(inp, PlannerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget))


def test_running_decodes_first_then_oldest_waiting_chunked():
    d = plan(running=[seq("a", 1, 10, computed=10, produced=1), seq("b", 2, 10, computed=10, produced=1)],
             waiting=[seq("late", 9, 100, BE), seq("early", 3, 100, RT)], budget=40)
    # Two decodes (1 each), then 38 tokens of the earliest waiting prompt as a prefill chunk.
    assert d.scheduled == [("a", 1), ("b", 1), ("early", 38)]
    assert d.admit == ["early"]


def test_unfinished_prefill_continues_before_new_admissions():
    d = plan(running=[seq("p", 1, 100, computed=64)], waiting=[seq("w", 2, 5)], budget=64)
    assert d.scheduled == [("p", 36), ("w", 5)]


def test_sequence_cap():
    d = plan(waiting=[seq(f"w{i}", i, 4) for i in range(5)], max_seqs=3)
    assert [r for r, _ in d.scheduled] == ["w0", "w1", "w2"]


def test_strict_fcfs_does_not_let_a_small_request_jump_a_big_one():
    d = plan(waiting=[seq("big", 1, 64 * 16), seq("small", 2, 4)], free_blocks=2, budget=2048)
    assert d.scheduled == []  # big does not fit; small waits behind it


def test_memory_pressure_preempts_the_newest_by_recompute():
    running = [seq("old", 1, 32, computed=32, produced=1), seq("new", 5, 32, computed=32, produced=1)]
    # Both are at a block boundary: each decode opens a block; only one is free.
    d = plan(running=running, waiting=[seq("w", 9, 4)], free_blocks=0)
    assert d.recompute == ["new"]
    assert d.scheduled == [("old", 1)]
    assert d.admit == []


def test_budget_and_cap_hold_for_random_inputs():
    import random
    rng = random.Random(0)
    for _ in range(200):
        running = [seq(f"r{i}", rng.random(), rng.randint(1, 50), computed=0) for i in range(rng.randint(0, 6))]
        for s in running:
            s.num_computed_tokens = rng.randint(0, s.num_tokens - 1)
        waiting = [seq(f"w{i}", rng.random(), rng.randint(1, 80), rng.choice([RT, BE])) for i in range(rng.randint(0, 6))]
        budget, cap = rng.randint(1, 100), rng.randint(1, 8)
        d = plan(running, waiting, free_blocks=rng.randint(0, 20), budget=budget, max_seqs=cap)
        ids = [r for r, _ in d.scheduled]
        assert len(ids) == len(set(ids)) <= cap
        assert sum(n for _, n in d.scheduled) <= budget
        assert set(d.admit) <= {w.request_id for w in waiting}
        assert all(n >= 1 for _, n in d.scheduled)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope")


def test_every_planner_knob_is_a_documented_scheduler_flag():
    """Every constant a policy uses lives in PlannerConfig; each one must be a scheduler
    flag with the same default and a row in docs/scheduler.md's table."""
    from pathlib import Path

    from scheduler_svc.config import SchedulerConfig
    from scheduler_svc.planner import PlannerConfig

    doc = (Path(__file__).parent.parent / "docs" / "scheduler.md").read_text()
    for name, f in PlannerConfig.__dataclass_fields__.items():
        assert getattr(SchedulerConfig(), name) == f.default, name
        assert f"| `--{name.replace('_', '-')}` |" in doc, f"docs/scheduler.md has no row for --{name}"


def test_the_pool_size_comes_from_the_report_else_from_what_is_free_and_held():
    running = [SeqView("a", RT, 0.0, 40, 40, num_computed_tokens=40), SeqView("b", BE, 1.0, 17, 17, num_computed_tokens=17)]
    before_any_report = PlanInput(now_ms=0.0, running=running, waiting=[], free_blocks=10, block_size=16)
    assert before_any_report.num_pool_blocks() == 10 + 3 + 2
    reported = PlanInput(now_ms=0.0, running=running, waiting=[], free_blocks=10, block_size=16,
                         occupancy={"num_blocks": 64})
    assert reported.num_pool_blocks() == 64
