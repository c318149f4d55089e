"""sim-scale's process placement (the benchmark itself is `make bench SCENARIO=sim-scale`)."""
import os
import subprocess
import sys

from scheduler_svc.bench.scale import split_cpus


def test_sim_scale_gives_the_scheduler_a_core_of_its_own():
    """The split sim-scale runs under: the scheduler's CPU is nobody else's, the others
    keep the rest; on one CPU there is nothing to split."""
    mine = os.sched_getaffinity(0)
    sched, others = split_cpus()
    if len(mine) >= 2:
        assert len(sched) == 1 and not sched & others and sched | others == mine
    one = min(mine)
    code = ("import os; os.sched_setaffinity(0, {%d}); "
            "from scheduler_svc.bench.scale import split_cpus; print(split_cpus())" % one)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(None, None)"


def test_sim_scale_writes_every_policy_in_the_benchmark_shape(tmp_path):
    """A small sim-scale (1 sim worker, 40 BE queued, 3 s) through two policies: the
    JSON has the points/policies shape with the planner and round-trip figures, RT fields
    null (no RT is queued), and BE work actually served by each."""
    import json

    from scheduler_svc.bench.scale import run_scale

    run_scale(["bros", "priority"], num_workers=1, num_be=40, window_s=3.0, out=tmp_path, own_core=False)
    doc = json.loads((tmp_path / "sim-scale.json").read_text())
    assert doc["scenario"] == "sim-scale" and len(doc["points"]) == 1
    point = doc["points"][0]
    assert point["rt_rate"] == 0.0 and set(point["policies"]) == {"bros", "priority"}
    for m in point["policies"].values():
        assert m["rt_attain_both"] is None and m["rt_ttft_p99_ms"] is None
        assert 0 < m["planner_p50_ms"] <= m["planner_p99_ms"] and m["redis_round_trips_per_iter"] >= 2
        assert m["be_tok_s"] > 0 and m["mean_batch_size"] >= 1 and m["iterations"] > 0
        assert m["be_queued_at_end"] < 40
