"""Live mode (the full stack on a real clock) and virtual mode (the same planner and sim
engine on a discrete-event clock) agree on a short sim workload."""
import random

from scheduler_svc.bench.live import run_live
from scheduler_svc.bench.metrics import compute
from scheduler_svc.bench.virtual import VirtualConfig, run
from scheduler_svc.bench.workload import Request
from scheduler_svc.planner import BE, RT, PlannerConfig, make_policy


def workload(seed=0):
    rng = random.Random(seed)
    reqs, t = [], 0.0
    for i in range(16):                       # RT: Poisson at ~2 req/s over ~8 s
        t += rng.expovariate(2.0) * 1e3
        reqs.append(Request(f"rt-{i}", RT, t, rng.randint(64, 512), rng.randint(16, 48), 1000.0, 200.0))
    for i in range(12):                       # BE: a backlog at t = 0
        reqs.append(Request(f"be-{i}", BE, 0.0, rng.randint(256, 768), rng.randint(32, 96), 0.0, 0.0))
    return reqs


def test_live_and_virtual_agree_within_ten_percent(tmp_path):
    reqs = workload()
    planner = PlannerConfig(max_num_seqs=32, max_num_batched_tokens=1024)
    virtual = run(reqs, make_policy("bros"), planner, VirtualConfig(num_blocks=512))
    v = compute(virtual.requests, virtual.iterations)
    live = run_live(reqs, "bros", planner, num_blocks=512, log_dir=str(tmp_path))
    assert live.rt_unfinished == live.be_unfinished == 0
    # Throughput and makespan: live adds a few ms of gRPC/Redis per iteration to a
    # cost-model step of 20-70 ms. (Per-token latency does not agree yet: live RT TPOT
    # runs 1.3-2x virtual on this 2-core machine, where scheduler, worker, Redis and 28
    # client threads share the cores; see docs/benchmarks.md.)
    for name in ("total_tok_s", "be_tok_s", "be_req_s", "makespan_s"):
        lv, vv = getattr(live, name), getattr(v, name)
        assert abs(lv - vv) <= 0.10 * vv, f"{name}: live {lv:.2f} vs virtual {vv:.2f}"
