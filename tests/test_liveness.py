"""Every policy finishes every request it accepts, in reasonable time, on random small
workloads in virtual time: bursts and trickles, RT-only to BE-only, targets tight and
loose, 1 to 32 seats, 16 to 2048 tokens a step, pools from 40 blocks to the sim's
default, serial and pipelined. (This found two bros livelocks on small pools, and
partition configurations that starve a class; docs/scheduler.md, "Policies".)

A case fails if a policy does not finish (the driver's stall, time or iteration limits)
or, for bros and its ablations, takes over 3x as long as the faster of fcfs and
priority (+2 s): bros defers RT with slack to spare, but never by leaving a worker idle.
`make test` runs 30 cases (~15 s); `make test-faults` 400.
"""
from __future__ import annotations

import random

import pytest

from scheduler_svc.bench.virtual import VirtualConfig, run
from scheduler_svc.bench.workload import Request
from scheduler_svc.planner import BE, RT, PlannerConfig, make_policy
from scheduler_svc.policies import POLICIES
from scheduler_svc.policies.partition import Partition

SLOWDOWN, SLACK_MS = 3.0, 2_000.0
BLOCK_SIZE = 16   # the sim worker's


def random_case(seed: int) -> tuple[list[Request], PlannerConfig, VirtualConfig]:
    rng = random.Random(seed)
    loose, burst = rng.random() < 0.5, rng.random() < 0.4
    rt_share = rng.choice([0.0, 0.3, 0.7, 1.0])
    requests, t = [], 0.0
    for i in range(rng.randint(5, 60)):
        t += 0 if burst else rng.expovariate(1 / rng.choice([5, 50, 300]))
        prompt = rng.choice([rng.randint(1, 40), rng.randint(40, 600)])
        output = rng.randint(1, 150)
        if rng.random() < rt_share:
            ttft, tpot = ((rng.choice([60_000, 120_000]), rng.choice([10_000, 60_000])) if loose else
                          (rng.choice([100, 250, 1000]), rng.choice([30, 100, 200])))
            requests.append(Request(f"rt-{i}", RT, t, prompt, output, ttft, tpot))
        else:
            requests.append(Request(f"be-{i}", BE, t, prompt, output))
    planner = PlannerConfig(max_num_seqs=rng.choice([1, 2, 3, 4, 8, 32]),
                            max_num_batched_tokens=rng.choice([16, 32, 64, 256, 2048]))
    virtual = VirtualConfig(num_blocks=rng.choice([None, 40, 64, 200]), pipeline_depth=rng.choice([0, 1]))
    return requests, planner, virtual


def admitted(name: str, requests: list[Request], planner: PlannerConfig, virtual: VirtualConfig) -> bool:
    """Whether the scheduler would run this workload with this policy at all (it refuses
    such configurations at startup, and such requests at admission)."""
    longest = max(r.prompt_len + r.output_len for r in requests)
    if not getattr(POLICIES[name], "chunked", True) and planner.max_num_batched_tokens < longest:
        return False
    if name == "partition":
        if min(planner.max_num_seqs, planner.max_num_batched_tokens) < 2:
            return False
        num_blocks = virtual.num_blocks or 10**6
        return all(r.prompt_len + r.output_len <= Partition.max_request_tokens(
            r.service_class, num_blocks, BLOCK_SIZE, planner) for r in requests)
    return True


def check_case(seed: int) -> None:
    requests, planner, virtual = random_case(seed)
    ends = {}
    for name in POLICIES:
        if admitted(name, requests, planner, virtual):
            result = run(requests, make_policy(name), planner, virtual)
            ends[name] = (result.stop_reason, result.end_ms)
    where = f"seed {seed}: {len(requests)} requests, {planner.max_num_seqs} seats, " \
            f"{planner.max_num_batched_tokens} tokens, {virtual.num_blocks} blocks, depth {virtual.pipeline_depth}"
    assert all(stop == "done" for stop, _ in ends.values()), f"{where}: {ends}"
    baseline = min(ends["fcfs"][1], ends["priority"][1])
    slow = {n: e for n, (_, e) in ends.items() if n.startswith("bros") and e > SLOWDOWN * baseline + SLACK_MS}
    assert not slow, f"{where}: bros took {slow} against {baseline:.0f} ms"


@pytest.mark.parametrize("seed", range(40, 70))
def test_every_policy_finishes_a_random_workload(seed):
    check_case(seed)


@pytest.mark.faults
@pytest.mark.parametrize("seed", range(1000, 1400))
def test_every_policy_finishes_a_random_workload_long(seed):
    check_case(seed)
