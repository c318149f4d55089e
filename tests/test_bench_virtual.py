"""The virtual-time hybrid benchmark: workloads, the driver, the metrics."""
import math
import random
import time

import pytest

from scheduler_svc.bench import metrics, virtual, workload
from scheduler_svc.bench.metrics import IterationRecord, RequestRecord
from scheduler_svc.bench.scenarios import build_workload, capacity, policy_names, run_policy
from scheduler_svc.bench.workload import Request
from scheduler_svc.planner import BE, RT, PlanDecision, PlannerConfig, make_policy
from worker_svc.sim.cost_model import CostModel

needs_traces = pytest.mark.skipif(not (workload.traces_dir() / workload.AZURE_CONV).exists(),
                                  reason="shared traces not found (set BROS_TRACES)")
PLANNER = PlannerConfig(max_num_seqs=64, max_num_batched_tokens=512)


def tiny_workload(seed=3):
    """20 RT requests from the Azure trace and 20 paper-synthetic BE ones, within 30 s."""
    rt = workload.rt_azure(1.0, 30, seed, max_model_len=4096, ttft_ms=250, tpot_ms=100)[:20]
    be = workload.be_requests("poisson", "paper", 1.0, 30, seed, max_model_len=4096)[:20]
    assert len(rt) == len(be) == 20
    return workload.merge(rt, be)


# ---- workloads -----------------------------------------------------------------------------


@needs_traces
def test_rt_trace_is_rescaled_to_the_requested_mean_rate():
    reqs = workload.rt_azure(2.0, 600, seed=1, max_model_len=8192, ttft_ms=250, tpot_ms=100)
    assert 0.8 * 1200 < len(reqs) < 1.2 * 1200
    assert all(r.arrival_ms < 600_000 and r.service_class == RT for r in reqs)
    assert [r.arrival_ms for r in reqs] == sorted(r.arrival_ms for r in reqs)
    assert all(r.prompt_len + r.output_len <= 8192 for r in reqs)
    assert reqs == workload.rt_azure(2.0, 600, seed=1, max_model_len=8192, ttft_ms=250, tpot_ms=100)


def test_clip_shortens_the_prompt_first():
    assert workload.clip_lengths(14050, 300, 8192) == (7892, 300)
    assert workload.clip_lengths(100, 9000, 8192) == (100, 4096)
    assert workload.clip_lengths(0, 0, 8192) == (1, 1)


def test_be_backlog_arrives_at_once_with_the_paper_lengths():
    reqs = workload.be_requests("backlog", "paper", 2.0, 50, seed=0, max_model_len=8192)
    assert len(reqs) == 100
    assert all(r.arrival_ms == 0 and r.service_class == BE for r in reqs)
    assert all(512 <= r.prompt_len <= 1024 and 32 <= r.output_len <= 128 for r in reqs)


def test_capacity_grows_with_batch_and_shrinks_with_length():
    cost = CostModel.opt13b_a100()
    assert 0 < workload.capacity_req_s(cost, 768, 80, 1) < workload.capacity_req_s(cost, 768, 80, 16)
    assert workload.capacity_req_s(cost, 2000, 300, 16) < workload.capacity_req_s(cost, 768, 80, 16)
    assert workload.max_batch_for_pool(16_000, 700, 100, 64) == 20
    assert workload.max_batch_for_pool(16_000, 700, 100, 8) == 8


# ---- the driver -----------------------------------------------------------------------------


@needs_traces
def test_tiny_workload_under_fcfs_finishes_every_request_quickly():
    reqs = tiny_workload()
    t0 = time.perf_counter()
    result = virtual.run(reqs, make_policy("fcfs"), PLANNER)
    assert time.perf_counter() - t0 < 10
    assert result.stop_reason == "done"
    assert result.num_dropped == 0 and result.error_fields == {}
    for rec in result.requests:
        assert rec.finished and rec.first_token_ms is not None
        assert rec.num_output_tokens == rec.request.output_len
        assert rec.request.arrival_ms < rec.first_token_ms <= rec.finish_ms <= result.end_ms
    m = metrics.compute(result.requests, result.iterations)
    for name in ("rt_attain_ttft", "rt_attain_tpot", "rt_attain_both"):
        assert 0 <= getattr(m, name) <= 1
    assert m.rt_attain_both <= min(m.rt_attain_ttft, m.rt_attain_tpot)
    assert m.num_rt == m.num_be == 20 and m.rt_unfinished == m.be_unfinished == 0
    assert m.be_tok_s > 0 and m.total_tok_s > m.be_tok_s and m.mean_batch_size >= 1


@needs_traces
def test_driver_is_deterministic():
    reqs = tiny_workload(seed=5)
    runs = [virtual.run(reqs, make_policy("fcfs"), PLANNER) for _ in range(2)]
    dicts = [metrics.compute(r.requests, r.iterations).to_dict() for r in runs]
    for d in dicts:
        d.pop("planner_p50_ms"), d.pop("planner_p99_ms")
    assert dicts[0] == dicts[1]
    assert [(r.first_token_ms, r.finish_ms) for r in runs[0].requests] == \
           [(r.first_token_ms, r.finish_ms) for r in runs[1].requests]


def _requests(*specs):
    return [Request(f"r{i}", cls, arrival, prompt, output, 250.0, 100.0)
            for i, (cls, arrival, prompt, output) in enumerate(specs)]


@pytest.mark.parametrize("name", policy_names())
def test_views_mirror_the_worker_after_every_step(name):
    """Under any registered policy, on a pool small enough to force preemption, what the
    planner is shown equals the worker's state after every step."""
    rng = random.Random(0)
    reqs = _requests(*[(RT if i % 3 == 0 else BE, 10.0 * i, rng.randint(20, 200), rng.randint(20, 80))
                       for i in range(40)])
    d = virtual._Driver(reqs, make_policy(name), PlannerConfig(max_num_seqs=8, max_num_batched_tokens=128),
                        virtual.VirtualConfig(num_blocks=48, host_cache_mb=4, stall_ms=2_000))
    for plan_id in range(1, 3000):
        if d._stop_reason(plan_id):
            break
        d._iterate(plan_id)
        for rid, res in d.resident.items():
            seq, alloc = d.engine.seqs[rid], d.engine.allocator.seqs[rid]
            assert res.view.num_computed_tokens == seq.num_computed_tokens, rid
            assert res.view.num_tokens == seq.num_tokens, rid
            assert res.view.num_output_tokens == len(seq.output_token_ids), rid
            assert res.view.preempted == alloc.paused, rid
        d.engine.check_integrity()


@pytest.mark.parametrize("name", policy_names())
def test_a_pipelined_driver_plans_ahead_and_its_views_catch_up(name):
    """pipeline_depth 1: each plan is made before the report of the one before is read,
    from a projection; once read, the views equal the worker's state but for the
    sequences the plan still in flight pauses, resumes or recomputes. Every request ends."""
    rng = random.Random(0)
    # Prompt and output fit one step (bros-no-chunking recomputes a sequence whole).
    reqs = _requests(*[(RT if i % 3 == 0 else BE, 10.0 * i, rng.randint(20, 60), rng.randint(20, 60))
                       for i in range(40)])
    d = virtual._Driver(reqs, make_policy(name), PlannerConfig(max_num_seqs=8, max_num_batched_tokens=128),
                        virtual.VirtualConfig(num_blocks=48, host_cache_mb=4, stall_ms=2_000, pipeline_depth=1))
    ahead = 0
    for plan_id in range(1, 4000):
        if d._stop_reason(plan_id):
            break
        d._iterate(plan_id)
        ahead += bool(d.in_flight)
        touched = {rid for made in d.in_flight for rid in (*made.plan.recompute, *made.plan.preempt,
                                                            *made.plan.checkpoint, *(r for r, _ in made.plan.scheduled))}
        new = {n.seq_id for made in d.in_flight for n in made.plan.new_sequences}
        for rid, res in d.resident.items():
            if rid in new:   # admitted by the plan in flight: not on the worker yet
                assert rid not in d.engine.seqs, rid
                continue
            seq, alloc = d.engine.seqs[rid], d.engine.allocator.seqs[rid]
            assert res.view.num_tokens == seq.num_tokens, rid
            assert res.view.num_output_tokens == len(seq.output_token_ids), rid
            if rid not in touched:
                assert res.view.num_computed_tokens == seq.num_computed_tokens, rid
                assert res.view.preempted == alloc.paused, rid
        d.engine.check_integrity()
    assert d._stop_reason(plan_id) == "done"
    assert ahead > 100   # most iterations end with the next plan waiting for the worker


class _AdmitAll:
    """A test policy: admit everything waiting, run every resident sequence greedily."""
    name = "admit-all"

    def plan(self, inp, cfg):
        out = PlanDecision(admit=[s.request_id for s in inp.waiting])
        budget = cfg.max_num_batched_tokens
        for s in inp.running + inp.waiting:
            n = min(s.num_tokens - s.num_computed_tokens, budget)
            if n > 0:
                out.scheduled.append((s.request_id, n))
                budget -= n
        return out


def test_a_request_the_worker_refuses_is_dropped_and_the_rest_finish():
    reqs = _requests((RT, 0.0, 40, 4), (BE, 0.0, 5000, 4), (BE, 10.0, 30, 3))
    result = virtual.run(reqs, _AdmitAll(), PLANNER, virtual.VirtualConfig(num_blocks=64))  # 1024 slots
    assert result.stop_reason == "done"
    # Its scheduled item is refused too (unknown sequence), as on the live worker.
    assert result.num_dropped == 1 and result.error_fields["new_sequences.prompt_token_ids"] == 1
    dropped = [r for r in result.requests if r.error]
    assert [r.request.request_id for r in dropped] == ["r1"] and not dropped[0].finished
    assert all(r.num_output_tokens == r.request.output_len for r in result.requests if not r.error)


def test_idle_worker_jumps_to_the_next_arrival():
    reqs = _requests((RT, 0.0, 16, 2), (RT, 50_000.0, 16, 2))
    result = virtual.run(reqs, make_policy("fcfs"), PLANNER)
    assert result.stop_reason == "done"
    assert len(result.iterations) < 10  # no idle ticking across the 50 s gap
    assert result.requests[1].first_token_ms > 50_000


def test_a_policy_that_never_runs_anything_is_stopped_as_stalled():
    class Idle:
        name = "idle"

        def plan(self, inp, cfg):
            return PlanDecision()

    result = virtual.run(_requests((RT, 0.0, 16, 2)), Idle(), PLANNER, virtual.VirtualConfig(stall_ms=100))
    assert result.stop_reason == "stalled"
    m = metrics.compute(result.requests, result.iterations)
    assert m.rt_unfinished == 1 and m.rt_attain_ttft == 0


# ---- metrics ------------------------------------------------------------------------------


def _record(rid, cls, arrival, first, finish, n, ttft_ms=250.0, tpot_ms=100.0):
    return RequestRecord(Request(rid, cls, arrival, 100, max(n, 1), ttft_ms, tpot_ms), first, finish, n)


def test_metrics_by_hand():
    records = [
        _record("ok", RT, 0, 100, 1000, 10),        # TTFT 100, TPOT 900/9 = 100: meets both (<=)
        _record("late", RT, 0, 300, 500, 5),        # TTFT 300 misses; TPOT 200/4 = 50 meets
        _record("slow", RT, 1000, 1100, 2100, 3),   # TTFT 100 meets; TPOT 1000/2 = 500 misses
        _record("lost", RT, 0, None, None, 0),      # never started: misses both
        _record("bulk", BE, 0, 2000, 4000, 20),     # the last finish: makespan 4 s
    ]
    iterations = [IterationRecord(0, 10, 2, 100, 0.5, 1), IterationRecord(10, 0, 0, 0, 0.1, 0),
                  IterationRecord(10, 10, 4, 4, 0.3, 2)]
    m = metrics.compute(records, iterations)
    assert m.rt_ttft_p50_ms == 100 and m.rt_ttft_p99_ms == pytest.approx(100 + 200 * 0.98)
    assert m.rt_tpot_p50_ms == 100 and m.rt_tpot_p99_ms == pytest.approx(100 + 400 * 0.98)
    assert (m.rt_attain_ttft, m.rt_attain_tpot, m.rt_attain_both) == (0.5, 0.5, 0.25)
    assert m.rt_norm_latency_ms == pytest.approx((1000 / 10 + 500 / 5 + 1100 / 3) / 3)
    assert m.makespan_s == 4 and m.be_req_s == 0.25 and m.be_tok_s == 5
    assert m.total_tok_s == (10 + 5 + 3 + 20) / 4
    assert m.preemptions == 3 and m.mean_batch_size == 3  # the empty iteration does not count
    assert m.planner_p50_ms == 0.3 and m.rt_unfinished == 1 and m.be_unfinished == 0


def test_busy_fraction_is_the_share_of_the_run_with_a_request_in_the_system():
    records = [
        _record("a", BE, 1000, 1100, 2000, 5),      # the run starts at the first arrival
        _record("b", BE, 1500, 1600, 3000, 5),      # overlaps a: busy 1000-3000
        _record("c", BE, 4000, 4100, 4500, 5),      # after a 1 s idle gap: busy 4000-4500
        _record("d", BE, 5000, 5100, 6000, 5),      # busy 5000-6000, the last finish: span 5 s
        _record("e", BE, 5200, 5300, 5400, 5),      # inside d's run: adds nothing
    ]
    assert metrics.busy_fraction(records) == pytest.approx((2000 + 500 + 1000) / 5000)
    # An unfinished request keeps the worker busy to the end of the run.
    lost = _record("lost", BE, 3500, None, None, 0)
    assert metrics.busy_fraction(records + [lost]) == pytest.approx(1.0 - 500 / 5000)
    assert metrics.busy_fraction([lost]) == 0.0


def test_one_token_output_meets_tpot_and_is_left_out_of_its_percentiles():
    r = _record("one", RT, 0, 50, 50, 1)
    assert r.tpot_ms() == 0 and r.tpot_met()
    m = metrics.compute([r], [])
    assert math.isnan(m.rt_tpot_p99_ms) and m.rt_attain_both == 1


def test_percentile_interpolates_like_numpy():
    assert metrics.percentile([4, 1, 3, 2], 50) == 2.5
    assert metrics.percentile([1, 2, 3, 4, 5], 100) == 5
    assert math.isnan(metrics.percentile([], 50))


def test_bench_flags_reach_the_planner_config():
    from scheduler_svc.bench.__main__ import configure, parse_args
    scn = configure(parse_args(["--bros-admit-headroom-sd", "2.5", "--rates", "0.3"]), "sim-arxiv")
    assert scn.planner().bros_admit_headroom_sd == 2.5 and scn.rate_fracs == (0.3,)   # the default is 1.5
    assert configure(parse_args(["--bros-admit-headroom-sd", "0"]), "sim-arxiv").planner().bros_admit_headroom_sd == 0.0


def test_overlap_copies_flag_reaches_the_sim_worker():
    from scheduler_svc.bench.__main__ import configure, parse_args
    from scheduler_svc.bench.cpu_hybrid import VIRTUAL
    default = configure(parse_args([]), "sim-paper")
    off = configure(parse_args(["--no-overlap-copies"]), "sim-paper")
    assert default.virtual().worker_config(default.planner()).sim_overlap_copies
    assert not off.virtual().worker_config(off.planner()).sim_overlap_copies
    assert not VIRTUAL.overlap_copies   # the CPU worker copies in line


def test_bench_runs_every_scenario_when_none_is_named(monkeypatch):
    from scheduler_svc.bench import __main__ as bench
    ran = []
    monkeypatch.setattr(bench, "run_scenario", lambda name, args: ran.append((name, args.policies)))
    bench.main(["--policies", "bros,fcfs"])
    assert ran == [(name, ["bros", "fcfs"]) for name in bench.ALL_SCENARIOS]
    assert set(bench.ALL_SCENARIOS) == set(bench.SCENARIOS) | {"cpu-hybrid", "cpu-hybrid-virtual", "sim-scale"}
    ran.clear()
    bench.main(["--scenario", "sim-arxiv"])
    assert ran == [("sim-arxiv", None)]


def test_bench_refuses_an_unknown_policy_before_running_anything(monkeypatch):
    from scheduler_svc.bench import __main__ as bench
    monkeypatch.setattr(bench, "run_scenario", lambda name, args: pytest.fail("ran"))
    with pytest.raises(SystemExit, match="--policies: unknown \\['nope'\\]"):
        bench.main(["--scenario", "sim-scale", "--policies", "bros,nope"])


@needs_traces
def test_several_seeds_report_each_run_and_their_mean(tmp_path, capsys):
    import json
    from scheduler_svc.bench import __main__ as bench
    common = ["--scenario", "sim-paper", "--duration-s", "8", "--rates", "0.2", "--policies", "fcfs,bros"]
    bench.main(common + ["--num-seeds", "2", "--out", str(tmp_path / "two")])
    assert "mean over seeds [0, 1]" in capsys.readouterr().out
    bench.main(common + ["--seed", "1", "--out", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "sim-paper.json").read_text())
    one = json.loads((tmp_path / "one" / "sim-paper.json").read_text())
    assert two["seeds"] == [0, 1] and one["seeds"] == [1]
    for name in ("fcfs", "bros"):
        runs = two["points"][0]["policies"][name]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        alone = one["points"][0]["policies"][name]
        # seed 1's run is the one a single-seed run at --seed 1 makes (wall time aside)
        assert {k: v for k, v in runs[1].items() if k not in ("seed", "wall_s", "planner_p50_ms", "planner_p99_ms")} \
            == {k: v for k, v in alone.items() if k not in ("wall_s", "planner_p50_ms", "planner_p99_ms")}
        mean = two["points"][0]["policies"][name]
        assert mean["be_tok_s"] == pytest.approx((runs[0]["be_tok_s"] + runs[1]["be_tok_s"]) / 2)
    num_requests = two["points"][0]["num_requests"]
    assert len(num_requests) == 2 and num_requests[1] == one["points"][0]["num_requests"]
    # RT served alone: every RT request and none of the BE, faster than with fcfs's BE
    alone = two["points"][0]["rt_alone"]["runs"][1]
    assert alone["num_rt"] == one["points"][0]["policies"]["bros"]["num_rt"] and alone["num_be"] == 0
    assert alone["rt_norm_latency_ms"] <= one["points"][0]["policies"]["fcfs"]["rt_norm_latency_ms"]


def test_sim_scale_refuses_several_seeds_and_every_scenario_fewer_than_one(monkeypatch):
    from scheduler_svc.bench import __main__ as bench
    with pytest.raises(SystemExit, match="--num-seeds: sim-scale runs one seed"):
        bench.main(["--scenario", "sim-scale", "--num-seeds", "2"])
    monkeypatch.setattr(bench, "run_scenario", lambda name, args: pytest.fail("ran"))
    with pytest.raises(SystemExit, match="--num-seeds: must be at least 1, got 0"):
        bench.main(["--scenario", "sim-paper", "--num-seeds", "0"])


@needs_traces
def test_rt_target_flags_reach_every_rt_request_and_bros_answers_a_tighter_tpot():
    from scheduler_svc.bench.__main__ import configure, parse_args
    base = configure(parse_args(["--duration-s", "20"]), "sim-paper")
    tight = configure(parse_args(["--duration-s", "20", "--rt-ttft-ms", "400", "--rt-tpot-ms", "20"]), "sim-paper")
    cap = capacity(base)
    rate = 0.2 * cap.rt_req_s
    loose_reqs = build_workload(base, cap, rate, base.duration_s, 0)
    tight_reqs = build_workload(tight, cap, rate, tight.duration_s, 0)
    rt = [r for r in tight_reqs if r.service_class == RT]
    assert rt and all(r.ttft_ms == 400 and r.tpot_ms == 20 for r in rt)
    assert all(r.ttft_ms == 250 and r.tpot_ms == 100 for r in loose_reqs if r.service_class == RT)
    # bros spends RT's TPOT slack on BE work; with less slack, RT tokens come faster
    loose = run_policy(base, loose_reqs, "bros").metrics
    fast = run_policy(tight, tight_reqs, "bros").metrics
    assert fast.rt_tpot_p50_ms < 0.8 * loose.rt_tpot_p50_ms


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_rt_target_flags_refuse_what_is_not_positive(value, capsys):
    from scheduler_svc.bench.__main__ import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--rt-tpot-ms", value])
    assert "--rt-tpot-ms: must be > 0" in capsys.readouterr().err
