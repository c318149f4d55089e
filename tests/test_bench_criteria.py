"""The benchmark's acceptance checks (issue #4), on one seed and on several."""
import pytest

from scheduler_svc.bench.__main__ import sim_point
from scheduler_svc.bench.criteria import check, format_rows
from scheduler_svc.bench.metrics import mean_of_runs


def entry(both, ttft, norm, be, total, **extra):
    return {"rt_attain_both": both, "rt_attain_ttft": ttft, "rt_norm_latency_ms": norm,
            "be_tok_s": be, "total_tok_s": total, "stop_reason": "done", **extra}


def seed_runs(seed, fcfs_ttft, fcfs_norm, bros_be):
    return {"fcfs": {"seed": seed, **entry(fcfs_ttft, fcfs_ttft, fcfs_norm, 100.0, 200.0)},
            "priority": {"seed": seed, **entry(0.8, 0.8, 40.0, 100.0, 200.0)},
            "bros": {"seed": seed, **entry(0.97, 0.97, 30.0, bros_be, 200.0)}}


def test_one_seed_is_checked_only_where_fcfs_fails_ttft():
    fails = {"rt_rate": 0.5, "policies": {name: {k: v for k, v in e.items() if k != "seed"}
                                            for name, e in seed_runs(0, 0.4, 150.0, 100.0).items()}}
    passes = {"rt_rate": 0.2, "policies": {name: {k: v for k, v in e.items() if k != "seed"}
                                             for name, e in seed_runs(0, 0.6, 150.0, 100.0).items()}}
    rows = check({"seed": 7, "points": [passes, fails]})
    assert [(r["rt_rate"], r["seed"]) for r in rows] == [(0.5, 7)]
    assert "rt_alone_norm_latency_cut" not in rows[0]   # a result from before rt_alone was measured
    assert "| 0.500 | 7 | 0.400 | 0.970 | - | 80% | - | 100.0% |" in format_rows(rows)
    assert rows[0]["norm_latency_cut"] == pytest.approx(0.8)
    assert rows[0]["ok"] == {"attain": True, "norm_cut": True, "total": True, "beats_priority": True}


def test_several_seeds_are_checked_each_and_on_their_mean():
    # Seed 0: a mild fcfs queue (cut 40%) and 1% less BE than priority; seed 1: fcfs's queue
    # blew up (cut 90%). The mean's cut is of the mean latencies: 1 - 30 / 200 = 85%.
    per_seed = [seed_runs(0, 0.3, 50.0, 99.0), seed_runs(1, 0.1, 300.0, 102.0)]
    runs = {name: [s[name] for s in per_seed] for name in per_seed[0]}
    alone = [{"seed": 0, **entry(1.0, 1.0, 20.0, 0.0, 50.0)}, {"seed": 1, **entry(0.9, 1.0, 30.0, 0.0, 60.0)}]
    point = sim_point(0.5, 0.2, [40, 42], runs, alone)
    assert point["seeds"] == [0, 1] and point["num_requests"] == [40, 42]
    assert point["policies"]["fcfs"]["rt_norm_latency_ms"] == 175.0
    assert point["policies"]["bros"]["be_tok_s"] == 100.5
    assert point["policies"]["bros"]["runs"] == runs["bros"]
    assert point["rt_alone"]["rt_norm_latency_ms"] == 25.0 and point["rt_alone"]["runs"] == alone
    rows = check({"points": [point]})
    assert [r["seed"] for r in rows] == [0, 1, "mean"]
    cuts = [round(r["norm_latency_cut"], 3) for r in rows]
    assert cuts == [0.4, 0.9, round(1 - 30 / 175, 3)]
    assert [r["ok"]["norm_cut"] for r in rows] == [False, True, True]
    assert [r["ok"]["beats_priority"] for r in rows] == [False, True, True]
    # the bound: each seed's RT alone against that seed's fcfs; the mean's, of the means
    assert [round(r["rt_alone_norm_latency_cut"], 3) for r in rows] == [0.6, 0.9, round(1 - 25 / 175, 3)]
    assert all("rt_alone_norm_latency_cut" not in r["ok"] for r in rows)   # a bound, not a check
    table = format_rows(rows)
    assert "| 0.500 | mean | 0.200 | 0.970 | 0.950 | 83% | 86% |" in table
    assert "| 0.500 | 0 | 0.300 | 0.970 | 1.000 | 40% | 60% | 100.0% | 99.0% | - | norm_cut, beats_priority |" in table
    assert [r["rt_alone_attain_both"] for r in rows] == [1.0, 0.9, 0.95]   # the ceiling, not a check
    assert all("rt_alone_attain_both" not in r["ok"] for r in rows)


def test_a_seed_where_fcfs_meets_ttft_gets_no_row_but_the_mean_may():
    per_seed = [seed_runs(0, 0.7, 50.0, 100.0), seed_runs(1, 0.2, 300.0, 100.0)]
    point = sim_point(0.5, 0.2, [40, 40], {name: [s[name] for s in per_seed] for name in per_seed[0]})
    assert [r["seed"] for r in check({"points": [point]})] == [1, "mean"]   # the mean's fcfs TTFT: 0.45


def test_one_seed_keeps_the_flat_shape():
    alone = [{"seed": 3, **entry(1.0, 1.0, 30.0, 0.0, 60.0)}]
    point = sim_point(0.5, 0.2, [40], {name: [e] for name, e in seed_runs(3, 0.4, 150.0, 100.0).items()}, alone)
    assert "runs" not in point["policies"]["bros"] and "seed" not in point["policies"]["bros"]
    assert point["num_requests"] == 40 and "seeds" not in point
    assert point["rt_alone"] == {k: v for k, v in alone[0].items() if k != "seed"}
    assert check({"seed": 3, "points": [point]})[0]["rt_alone_norm_latency_cut"] == pytest.approx(0.8)


def test_the_mean_skips_missing_values_and_non_numbers():
    # a metric no run could measure (a live run's preemptions) stays None, never a misleading 0
    runs = [{"seed": 0, "a": 1.0, "b": None, "c": "done", "d": [1], "e": True, "f": 2},
            {"seed": 1, "a": 3.0, "b": None, "c": "late", "d": [2], "e": False, "f": None}]
    assert mean_of_runs(runs) == {"a": 2.0, "b": None, "f": 2}
    assert sim_point(0.5, 0.2, [1, 1], {"x": [dict(r, stop_reason=r["c"]) for r in runs]}
                     )["policies"]["x"]["stop_reason"] == "done,late"
