"""The worker loop's cost figures (in the worker state hash; sim-scale reads them):
planner time as wall clock and as CPU time of the planning thread, which part when the
OS runs something else mid-plan."""
from scheduler_svc.worker_loop import LoopStats


def test_summary_reports_wall_and_cpu_quantiles_separately():
    stats = LoopStats(iterations=4, round_trips=10)
    stats.planner_ms.extend([0.1] * 98 + [5.0, 9.0])      # two plans cut by a time slice
    stats.planner_cpu_ms.extend([0.1] * 99 + [0.3])
    s = stats.summary()
    assert s["planner_p50_ms"] == 0.1 and s["planner_p99_ms"] == 9.0
    assert s["planner_cpu_p50_ms"] == 0.1 and s["planner_cpu_p99_ms"] == 0.3
    assert s["redis_round_trips_per_iter"] == 2.5 and s["iterations"] == 4


def test_summary_of_no_plans_is_zero():
    s = LoopStats().summary()
    assert s["planner_p99_ms"] == s["planner_cpu_p99_ms"] == 0.0 and s["redis_round_trips_per_iter"] == 0.0

