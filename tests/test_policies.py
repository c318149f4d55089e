"""Baselines and the bros policy, as specs on hand-made inputs (pure: no Redis, no gRPC)."""
import random
from dataclasses import replace

import pytest

from scheduler_svc.planner import BE, RT, PlanInput, PlannerConfig, SeqView, StepSample, make_policy
from scheduler_svc.policies import POLICIES


def seq(rid, arrival, prompt, cls, computed=0, produced=0, deadline=1e9, tpot=100.0, first=None, preempted=False):
    return SeqView(request_id=rid, service_class=cls, arrival_ms=arrival, num_prompt_tokens=prompt,
                   num_tokens=prompt + produced, num_computed_tokens=computed, ttft_deadline_ms=deadline,
                   tpot_ms=tpot, first_token_ms=first, num_output_tokens=produced, preempted=preempted)


def inp(running=(), waiting=(), free_blocks=100, now=0.0, occupancy=None, refused=()):
    return PlanInput(now_ms=now, running=list(running), waiting=list(waiting), free_blocks=free_blocks,
                     block_size=16, occupancy=occupancy or {"num_blocks": 200}, refused=frozenset(refused))


def test_priority_puts_rt_first_and_recomputes_be_under_pressure():
    p = make_policy("priority")
    d = p.plan(inp(waiting=[seq("be", 1, 8, BE), seq("rt", 5, 8, RT)]), PlannerConfig())
    assert [r for r, _ in d.scheduled] == ["rt", "be"]
    running = [seq("be-old", 1, 32, BE, computed=32, produced=1), seq("rt", 5, 32, RT, computed=32, produced=1)]
    d = p.plan(inp(running=running, free_blocks=0), PlannerConfig())
    assert d.recompute == ["be-old"] and d.scheduled == [("rt", 1)]


def test_priority_evicts_the_newest_be_for_a_waiting_rt_when_memory_is_short():
    # 4 BE decodes fill the pool (2 blocks each of 16 tokens, room left in the second; no
    # free block); an 8-token RT prompt needs one block, so the newest BE goes by recompute
    # and the rest keep running.
    running = [seq(f"be{i}", i, 24, BE, computed=24, produced=1) for i in range(4)]
    d = make_policy("priority").plan(inp(running=running, waiting=[seq("rt", 9, 8, RT)], free_blocks=0),
                                     PlannerConfig())
    assert d.recompute == ["be3"] and d.admit == ["rt"]
    assert [r for r, _ in d.scheduled] == ["be0", "be1", "be2", "rt"]
    # A waiting BE request never evicts anyone, nor does RT evict RT.
    d = make_policy("priority").plan(inp(running=running, waiting=[seq("be9", 9, 8, BE)], free_blocks=0),
                                     PlannerConfig())
    assert d.recompute == [] and d.admit == []
    rt_running = [seq(f"rt{i}", i, 24, RT, computed=24, produced=1) for i in range(4)]
    d = make_policy("priority").plan(inp(running=rt_running, waiting=[seq("rt9", 9, 8, RT)], free_blocks=0),
                                     PlannerConfig())
    assert d.recompute == [] and d.admit == []


def test_priority_eviction_gives_back_the_victims_tokens_this_step():
    # be0's 32-token chunk and be1's decode leave 7 tokens and no block: the RT prompt
    # evicts be1, whose token and 4 blocks come back, and runs whole (8 tokens, not 7).
    running = [seq("be0", 0, 64, BE, computed=32), seq("be1", 1, 60, BE, computed=60, produced=1)]
    d = make_policy("priority").plan(inp(running=running, waiting=[seq("rt", 9, 8, RT)], free_blocks=2),
                                     PlannerConfig(max_num_batched_tokens=40))
    assert d.recompute == ["be1"] and d.scheduled == [("be0", 32), ("rt", 8)]


def test_priority_keeps_vllms_gap_when_the_sequence_cap_is_full():
    running = [seq(f"be{i}", i, 8, BE, computed=8, produced=1) for i in range(4)]
    d = make_policy("priority").plan(inp(running=running, waiting=[seq("rt", 9, 8, RT)]),
                                     PlannerConfig(max_num_seqs=4))
    assert "rt" not in d.admit  # memory is plentiful; the cap, not memory, blocks RT


def test_bros_pauses_be_for_a_seat_when_the_sequence_cap_is_full():
    # The gap priority keeps open: memory is plentiful, every seat is held by BE.
    running = [seq(f"be{i}", i, 8, BE, computed=8, produced=1) for i in range(4)]
    d = make_policy("bros").plan(inp(running=running, waiting=[seq("rt", 9, 8, RT, deadline=100)]),
                                 PlannerConfig(max_num_seqs=4))
    assert "rt" in d.admit and ("rt", 8) in d.scheduled
    assert d.preempt == ["be3"]                       # the newest BE gives its seat up
    assert sum(1 for rid, _ in d.scheduled if rid.startswith("be")) == 3


def test_bros_keeps_decoding_rt_that_holds_every_seat_while_more_rt_waits():
    # Four RT decodes hold every seat; four RT requests wait with less slack than theirs
    # (first-token deadlines nearer than the decodes' next tokens) but no seat is free and
    # no BE can give one up. Those cannot start, so they must not take the step's places:
    # picked first, they left the decodes unscheduled, step after step (a live stall with
    # loose targets: 8 seats, 60 s TPOT, tests/test_drain.py's rolling restart).
    running = [seq(f"run{i}", i, 8, RT, computed=8, produced=1, first=0.0, tpot=60_000.0) for i in range(4)]
    waiting = [seq(f"wait{i}", 10 + i, 8, RT, deadline=50_000.0) for i in range(4)]
    d = make_policy("bros").plan(inp(running=running, waiting=waiting), PlannerConfig(max_num_seqs=4))
    assert d.scheduled == [(f"run{i}", 1) for i in range(4)] and d.admit == [] and d.recompute == []
    # One seat free: the waiting request with least slack takes it, beside the decodes.
    d = make_policy("bros").plan(inp(running=running[:3], waiting=waiting), PlannerConfig(max_num_seqs=4))
    assert d.admit == ["wait0"] and sorted(r for r, _ in d.scheduled) == ["run0", "run1", "run2", "wait0"]


def test_bros_runs_no_chunk_of_a_prompt_that_cannot_fit_and_lets_the_decodes_free_the_pool():
    # Two RT decodes hold 38 blocks (300 tokens each); 4 blocks are free. A 561-token prompt
    # (36 blocks) cannot fit whatever runs: chunks of it would fill the pool, be
    # recomputed and start again, and with the step budget theirs the decodes that would
    # free the pool never ran (a livelock found by a random sweep in virtual time).
    decodes = [seq(f"dec{i}", i, 250, RT, computed=300, produced=51, first=0.0, tpot=60_000.0) for i in range(2)]
    cfg = PlannerConfig(max_num_seqs=4, max_num_batched_tokens=64)
    rt_prompt = seq("rt-big", 5, 561, RT, deadline=500.0)          # urgent: least slack of all
    d = make_policy("bros").plan(inp(running=decodes, waiting=[rt_prompt], free_blocks=4), cfg)
    assert d.scheduled == [("dec0", 1), ("dec1", 1)] and d.admit == []
    be_prompt = seq("be-big", 5, 561, BE, computed=64)               # running, 4 blocks in
    d = make_policy("bros").plan(inp(running=decodes + [be_prompt], free_blocks=4), cfg)
    assert sorted(d.scheduled) == [("dec0", 1), ("dec1", 1)]
    # A prompt that fits runs as before, chunk by chunk (beside the decodes: it has slack).
    d = make_policy("bros").plan(inp(running=decodes, waiting=[seq("rt-small", 5, 100, RT, deadline=500.0)],
                                     free_blocks=8), cfg)
    assert d.admit == ["rt-small"] and d.scheduled == [("dec0", 1), ("dec1", 1), ("rt-small", 62)]


def test_bros_recomputes_the_newest_rt_when_an_older_rt_cannot_grow_and_no_be_can_give_way():
    # RT only, the pool full: each decode has filled its last block (32 tokens, 2 blocks)
    # and needs a new one. Waiting for blocks ran steps of 1-3 tokens for seconds (1.56x
    # fcfs's makespan on tests/test_liveness.py's seed 1189): as vLLM does, the newest
    # gives its blocks up by recompute and the older ones grow.
    decodes = [seq(f"dec{i}", i, 32, RT, computed=32, produced=1, first=0.0, tpot=60_000.0) for i in range(3)]
    d = make_policy("bros").plan(inp(running=decodes, free_blocks=0), PlannerConfig())
    assert d.recompute == ["dec2"] and d.scheduled == [("dec0", 1), ("dec1", 1)]
    # Only newer ones give way: the oldest always keeps its work, so this cannot livelock.
    d = make_policy("bros").plan(inp(running=decodes[:1], free_blocks=0), PlannerConfig())
    assert d.recompute == ["dec0"] and d.scheduled == []      # nothing can run: _unjam, as before
    # A sequence in this step is never the victim; a waiting RT prompt recomputes no one.
    d = make_policy("bros").plan(inp(running=decodes[:2], waiting=[seq("new", 9, 8, RT, deadline=50.0)],
                                     free_blocks=0), PlannerConfig())
    assert d.recompute == ["dec1"] and d.scheduled == [("dec0", 1)] and d.admit == []
    # Only in a step that would otherwise run mostly empty: here a newer prompt's last
    # chunk fills 10 of 16 tokens (in its own block), so the decodes wait and no RT work
    # is thrown away (under overload, recomputing whenever one was short cost sim-paper
    # 0.742 -> 0.643 of RT on time at 0.6 of capacity).
    prompt = seq("prompt", 7, 12, RT, computed=2, deadline=500.0)
    cfg = PlannerConfig(max_num_batched_tokens=16)
    d = make_policy("bros").plan(inp(running=decodes[:2] + [prompt], free_blocks=0), cfg)
    assert d.recompute == [] and d.scheduled == [("prompt", 10)]
    d = make_policy("bros").plan(inp(running=decodes[:2] + [prompt], free_blocks=0),
                                 replace(cfg, bros_rt_recompute_underfill=0.25))
    assert d.recompute == ["dec1"] and d.scheduled == [("prompt", 10), ("dec0", 1)]   # 6 of 16 left
    # While a running BE holds blocks, RT work is not thrown away for BE's sake: the BE
    # gives way (here, nothing else able to run, by _unjam's recompute, as before).
    be = seq("be", 5, 32, BE, computed=32, produced=1)
    d = make_policy("bros").plan(inp(running=decodes[:2] + [be], free_blocks=0,
                                     occupancy={"num_blocks": 200, "rt_available_slots": 0,
                                                "rt_available_slots_with_preempt": 0}), PlannerConfig())
    assert d.recompute == ["be"] and d.scheduled == []


def test_bros_decodes_relaxed_rt_before_it_starts_prompts_with_less_slack():
    # Loose targets, RT only: three decodes far ahead of their TPOT deadlines, a waiting
    # prompt whose first-token deadline is nearer but not urgent. Least slack first, the
    # prompt took the whole 16-token step and the decodes waited (half-empty steps and 1.8x
    # fcfs's makespan on a random small-pool workload, tests/test_liveness.py): a decode
    # costs one token and finishes what holds the pool, so it goes first.
    decodes = [seq(f"dec{i}", i, 8, RT, computed=19, produced=12, first=0.0, tpot=60_000.0) for i in range(3)]
    waiting = [seq("prompt", 5, 100, RT, deadline=30_000.0)]
    d = make_policy("bros").plan(inp(running=decodes, waiting=waiting), PlannerConfig(max_num_batched_tokens=16))
    assert d.scheduled == [("dec0", 1), ("dec1", 1), ("dec2", 1), ("prompt", 13)] and d.admit == ["prompt"]


def test_partition_keeps_each_class_in_its_share():
    waiting = [seq(f"be{i}", i, 64, BE) for i in range(8)] + [seq("rt", 50, 64, RT)]
    d = make_policy("partition").plan(inp(waiting=waiting), PlannerConfig(max_num_batched_tokens=128))
    tokens = {rid: n for rid, n in d.scheduled}
    assert tokens["rt"] == 64                                 # RT's half is its own
    assert sum(n for rid, n in tokens.items() if rid != "rt") <= 64


def test_partition_gives_each_class_a_seat_and_a_token_and_refuses_a_config_that_cannot():
    from scheduler_svc.config import SchedulerConfig
    from scheduler_svc.policies.partition import split
    assert split(4, 0.9) == (3, 1) and split(4, 0.1) == (1, 3) and split(64, 0.5) == (32, 32)
    # Before: RT's share rounded to all 4 seats at 0.9, and BE never ran.
    running = [seq(f"rt{i}", i, 8, RT, computed=8, produced=1, first=0.0) for i in range(3)]
    d = make_policy("partition").plan(inp(running=running, waiting=[seq("be", 9, 8, BE)]),
                                      PlannerConfig(max_num_seqs=4, partition_rt_fraction=0.9))
    assert d.admit == ["be"]
    for flag in ("max_num_seqs", "max_num_batched_tokens"):
        with pytest.raises(ValueError, match=f"^{flag} must be >= 2 with policy partition"):
            SchedulerConfig(policy="partition", **{flag: 1})
        assert SchedulerConfig(policy="fcfs", **{flag: 1})


def test_bros_runs_urgent_rt_before_be_and_lets_relaxed_rt_yield():
    cfg = PlannerConfig(max_num_batched_tokens=40, bros_urgent_slack_ms=150)
    running = [seq("rt-urgent", 0, 8, RT, computed=8, produced=1, first=0.0, tpot=100.0),   # due at 100
               seq("rt-relaxed", 0, 8, RT, computed=8, produced=1, first=5000.0, tpot=100.0),  # due at 5100
               seq("be-run", 0, 100, BE, computed=70)]
    d = make_policy("bros").plan(inp(running=running, now=0.0), cfg)
    # The urgent decode, then BE's 30-token chunk, then the relaxed decode in what is left.
    assert d.scheduled == [("rt-urgent", 1), ("be-run", 30), ("rt-relaxed", 1)]
    # One token short: the relaxed decode (slack ~5 s) skips this step, not BE's chunk.
    d = make_policy("bros").plan(inp(running=running, now=0.0), replace(cfg, max_num_batched_tokens=31))
    assert d.scheduled == [("rt-urgent", 1), ("be-run", 30)]


def test_bros_picks_least_slack_first():
    waiting = [seq(f"rt{i}", 0, 4, RT, deadline=d) for i, d in enumerate([220, 110, 160, 190])]
    d = make_policy("bros").plan(inp(waiting=waiting), PlannerConfig())
    assert [r for r, _ in d.scheduled] == ["rt1", "rt2", "rt3", "rt0"]


def test_bros_serves_first_tokens_that_can_still_be_on_time_before_hopeless_ones():
    # Before any step is measured a prefill is taken as 50 ms + 0.15 ms/token: "long" (1000
    # tokens, ~200 ms) cannot make a 120 ms deadline any more; "short" (8 tokens) can, if
    # it goes first. A step of 1008 tokens holds both; one of 512 holds only the first.
    waiting = [seq("long", 0, 1000, RT, deadline=120), seq("short", 1, 8, RT, deadline=130)]
    d = make_policy("bros").plan(inp(waiting=waiting), PlannerConfig(max_num_batched_tokens=512))
    assert d.scheduled == [("short", 8), ("long", 504)]


def test_bros_pauses_be_to_make_room_for_rt_when_memory_is_short():
    running = [seq("be-old", 0, 64, BE, computed=64), seq("be-new", 5, 64, BE, computed=64)]
    waiting = [seq("rt", 10, 40, RT, deadline=100)]
    d = make_policy("bros").plan(inp(running=running, waiting=waiting, free_blocks=0,
                                     occupancy={"rt_available_slots": 0, "rt_available_slots_with_preempt": 0}),
                                 PlannerConfig())
    assert d.preempt[0] == "be-new"      # the newest BE gives way, keeping its KV
    assert ("rt", 40) in d.scheduled and d.admit == ["rt"]
    d2 = make_policy("bros-no-sharing").plan(inp(running=running, waiting=waiting, free_blocks=0), PlannerConfig())
    assert d2.recompute[0] == "be-new" and not d2.preempt


def test_bros_aimd_cuts_the_budget_on_misses_and_regrows_it_once_attainment_is_back():
    p = make_policy("bros")
    cfg = PlannerConfig(max_num_batched_tokens=512, bros_aimd_step_tokens=16, bros_aimd_decrease=0.5,
                        bros_target_attainment=0.5)
    on_time = lambda rid, t=0.0: seq(rid, 0, 8, RT, computed=8, produced=1, first=t, tpot=10.0,  # noqa: E731
                                     deadline=t + 100)
    p.plan(inp(running=[on_time("a")], now=0.0), cfg)
    assert p.token_budget == 512                       # first token on time: at the cap already
    p.plan(inp(running=[on_time("a")], now=50.0), cfg)
    assert p.token_budget == 256                       # "a" fell behind its TPOT target: cut
    p.plan(inp(running=[on_time("a")], now=55.0), cfg)
    assert p.token_budget == 272                       # within one TPOT period it counts once; 1/2 on time
    late_first = seq("b", 0, 8, RT, computed=8, produced=1, first=300.0, tpot=10.0, deadline=250)
    p.plan(inp(running=[late_first], now=300.0), cfg)
    assert p.token_budget == 136                       # a late first token: cut
    p.plan(inp(running=[late_first], now=300.0), cfg)
    assert p.token_budget == 136                       # 1 of 3 on time: below target, hold
    p.plan(inp(running=[on_time("c", 315.0), on_time("d", 315.0)], now=320.0), cfg)
    assert p.token_budget == 152                       # 3 of 5 on time: grow again
    late_too = seq("e", 0, 8, RT, computed=8, produced=1, first=330.0, tpot=10.0, deadline=320)
    p.plan(inp(running=[late_too], now=330.0), cfg)
    assert p.token_budget == 76                        # another late first token: cut
    p.plan(inp(running=[seq("be", 0, 8, BE, computed=8, produced=1)], now=340.0), cfg)
    assert p.token_budget == 92                        # no RT left to protect: grow
    fixed = make_policy("bros-fixed-budget")
    fixed.plan(inp(running=[on_time("a")], now=50.0), cfg)
    assert fixed.token_budget == 512


def test_bros_default_aimd_regrows_on_every_iteration_without_a_new_miss():
    p = make_policy("bros")
    cfg = PlannerConfig(max_num_batched_tokens=512, bros_aimd_step_tokens=16, bros_aimd_decrease=0.5)
    late_first = seq("b", 0, 8, RT, computed=8, produced=1, first=300.0, tpot=100.0, deadline=250)
    p.plan(inp(running=[late_first], now=300.0), cfg)
    assert p.token_budget == 256                       # a miss: cut
    p.plan(inp(running=[late_first], now=301.0), cfg)
    assert p.token_budget == 272                       # no new miss: grow, whatever the window says


def test_bros_treats_a_refused_growth_as_needing_a_block():
    # The worker refused "rt" last step (its last block is shared with BE slots), so with
    # no free block it cannot run; with nothing else able to run, its KV is recomputed
    # instead of planning the same refused step forever.
    p = make_policy("bros")
    cfg = PlannerConfig()
    rt = lambda: seq("rt", 0, 8, RT, computed=8, produced=1, first=0.0, tpot=100.0)  # noqa: E731
    full = {"rt_available_slots": 0, "rt_available_slots_with_preempt": 0}
    assert p.plan(inp(running=[rt()], free_blocks=0, occupancy=full), cfg).scheduled == [("rt", 1)]
    d = p.plan(inp(running=[rt()], free_blocks=0, occupancy=full, now=5.0, refused=["rt"]), cfg)
    assert d.scheduled == [] and d.recompute == ["rt"]
    # Still unmoved a step later (its recompute not reported yet): the refusal holds.
    d = p.plan(inp(running=[rt()], free_blocks=0, occupancy=full, now=10.0), cfg)
    assert d.scheduled == []
    # Once it moves (here: it grew), it is planned like any other sequence again.
    moved = seq("rt", 0, 8, RT, computed=9, produced=2, first=0.0, tpot=100.0)
    assert p.plan(inp(running=[moved], free_blocks=0, occupancy=full, now=15.0), cfg).scheduled == [("rt", 1)]


def test_bros_without_chunking_runs_a_prompt_whole_or_not_at_all():
    d = make_policy("bros-no-chunking").plan(inp(waiting=[seq("be", 0, 600, BE)]),
                                             PlannerConfig(max_num_batched_tokens=512))
    assert d.scheduled == []
    d = make_policy("bros").plan(inp(waiting=[seq("be", 0, 600, BE)]), PlannerConfig(max_num_batched_tokens=512))
    assert d.scheduled == [("be", 512)]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_keeps_the_contract_on_random_inputs(name):
    rng = random.Random(name)
    for _ in range(300):
        running = []
        for i in range(rng.randint(0, 8)):
            prompt = rng.randint(1, 80)
            computed = rng.randint(0, prompt)
            produced = rng.randint(0, 5) if computed == prompt else 0
            running.append(seq(f"r{i}", rng.random() * 100, prompt, rng.choice([RT, BE]), computed=computed,
                               produced=produced + (1 if computed == prompt else 0), deadline=rng.random() * 400,
                               first=rng.random() * 100 if produced else None, preempted=rng.random() < 0.2))
        waiting = [seq(f"w{i}", rng.random() * 100, rng.randint(1, 80), rng.choice([RT, BE]),
                       deadline=rng.random() * 400) for i in range(rng.randint(0, 8))]
        cfg = PlannerConfig(max_num_seqs=rng.randint(1, 10), max_num_batched_tokens=rng.randint(1, 200))
        occ = {"num_blocks": 64, "rt_available_slots": 0, "rt_available_slots_with_preempt": rng.randint(0, 200)}
        d = make_policy(name).plan(inp(running, waiting, free_blocks=rng.randint(0, 20), now=rng.random() * 300,
                                       occupancy=occ), cfg)
        ids = [r for r, _ in d.scheduled]
        assert len(ids) == len(set(ids)) <= cfg.max_num_seqs
        assert sum(n for _, n in d.scheduled) <= cfg.max_num_batched_tokens
        assert set(d.admit) <= {w.request_id for w in waiting} and set(d.admit) <= set(ids)
        by_id = {s.request_id: s for s in running + waiting}
        assert all(1 <= n <= by_id[r].num_uncomputed_tokens for r, n in d.scheduled)
        assert not set(ids) & (set(d.preempt) | set(d.recompute))


def test_bros_admits_new_be_only_with_growth_headroom_for_the_running():
    # 4 running BE sequences at block boundaries; a 16-token prompt needs 1 block.
    running = [seq(f"r{i}", i, 16, BE, computed=16, produced=1) for i in range(4)]
    new = [seq("new", 9, 16, BE)]
    cfg = PlannerConfig(bros_admit_headroom_tokens=16)   # 1 block of growth each
    # 4 decodes take 4 blocks; 9 free leaves 5 -> 1 for "new" leaves 4 = 4 x 1: admitted.
    assert "new" in make_policy("bros").plan(inp(running=running, waiting=new, free_blocks=9), cfg).admit
    # 8 free leaves 4 after the decodes: "new" would leave 3 < 4, so it waits.
    assert "new" not in make_policy("bros").plan(inp(running=running, waiting=new, free_blocks=8), cfg).admit
    assert "new" in make_policy("priority").plan(inp(running=running, waiting=new, free_blocks=8), cfg).admit


def test_bros_headroom_follows_the_spread_of_finished_be_outputs():
    # As above, but the room per sequence comes from finished BE outputs of 16 and 48
    # tokens (standard deviation 16: one block at 1.0 sd) instead of the fixed 0.
    cfg = PlannerConfig(bros_admit_headroom_tokens=0, bros_admit_headroom_sd=1.0)
    finished = [seq(f"done{i}", i, 16, BE, computed=16, produced=16 if i % 2 else 48) for i in range(32)]
    running = [seq(f"r{i}", 100 + i, 16, BE, computed=16, produced=1) for i in range(4)]
    new = [seq("new", 200, 16, BE)]

    def admits(free_blocks, cfg):
        p = make_policy("bros")
        p.plan(inp(running=finished, free_blocks=1000), cfg)
        p.plan(inp(running=[], free_blocks=1000), cfg)   # all 32 finished
        return "new" in p.plan(inp(running=running, waiting=new, free_blocks=free_blocks), cfg).admit

    assert admits(9, cfg) and not admits(8, cfg)
    assert admits(8, PlannerConfig(bros_admit_headroom_tokens=0, bros_admit_headroom_sd=0))  # the fixed rule would


def test_bros_headroom_keeps_a_block_per_sequence_when_be_outputs_never_vary():
    # 32 finished BE outputs of exactly 40 tokens: spread 0, yet each running sequence
    # still needs its next block, so the room is one block each as with a fixed 16.
    cfg = PlannerConfig(bros_admit_headroom_tokens=0, bros_admit_headroom_sd=1.5)
    finished = [seq(f"done{i}", i, 16, BE, computed=16, produced=40) for i in range(32)]
    running = [seq(f"r{i}", 100 + i, 16, BE, computed=16, produced=1) for i in range(4)]
    p = make_policy("bros")
    p.plan(inp(running=finished, free_blocks=1000), cfg)
    p.plan(inp(running=[], free_blocks=1000), cfg)
    assert p.be_lengths.stdev() == 0.0
    assert "new" not in p.plan(inp(running=running, waiting=[seq("new", 200, 16, BE)], free_blocks=8), cfg).admit


def test_bros_makes_rt_urgent_within_two_of_its_longest_recent_steps():
    p = make_policy("bros")
    cfg = PlannerConfig(max_num_batched_tokens=40, bros_urgent_slack_ms=150, bros_urgent_iterations=2.0)
    be = lambda: seq("be-run", 0, 100, BE, computed=60)  # noqa: E731
    relaxed = lambda now: seq("rt", 0, 8, RT, computed=8, produced=1, first=now, tpot=400.0)  # noqa: E731
    # Slack ~400 ms > 150: with short steps the RT may yield to the BE chunk.
    p.plan(inp(running=[be(), relaxed(0.0)], now=0.0), cfg)
    assert dict(p.plan(inp(running=[be(), relaxed(10.0)], now=10.0), cfg).scheduled)["be-run"] == 40
    # After a 300 ms step, 2 x 300 ms > its slack: it runs first.
    d = p.plan(inp(running=[be(), relaxed(310.0)], now=310.0), cfg)
    assert d.scheduled[0] == ("rt", 1)


def test_bros_rt_stops_yielding_while_a_miss_keeps_the_be_allowance_cut():
    p = make_policy("bros")
    cfg = PlannerConfig(max_num_batched_tokens=40, bros_urgent_slack_ms=150, bros_urgent_iterations=0,
                        bros_min_batched_tokens=8)
    be = lambda: seq("be-run", 0, 100, BE, computed=60)  # noqa: E731
    relaxed = lambda now: seq("rt", 0, 8, RT, computed=8, produced=1, first=now, tpot=400.0)  # noqa: E731
    p.plan(inp(running=[be(), relaxed(0.0)], now=0.0), cfg)
    # Slack ~400 ms and the allowance whole: the RT decode yields to the BE chunk.
    assert dict(p.plan(inp(running=[be(), relaxed(10.0)], now=10.0), cfg).scheduled) == {"be-run": 40}
    # A late RT first token cuts the allowance (40 -> 28): the same relaxed decode now goes first.
    late = seq("late", 5, 8, RT, computed=8, produced=1, deadline=100.0, first=900.0, tpot=400.0)
    d = p.plan(inp(running=[be(), relaxed(20.0), late], now=20.0), cfg)
    assert p.token_budget < cfg.max_num_batched_tokens
    assert d.scheduled[0][1] == 1 and d.scheduled[0][0] in ("rt", "late") and ("rt", 1) in d.scheduled
    # Once the allowance has grown back, it yields again.
    for now in (30.0, 40.0):
        d = p.plan(inp(running=[be(), relaxed(now)], now=now), cfg)
    assert p.token_budget == cfg.max_num_batched_tokens
    assert dict(d.scheduled) == {"be-run": 40}


def test_bros_times_steps_by_the_reported_steps_when_the_loop_plans_ahead():
    """Serially the gap between two plans is the step; planned ahead it is not (the plan is
    made while the step before it runs), so the loop's reported steps are used instead."""
    cfg = PlannerConfig(bros_step_time_smoothing=1.0)   # the last sample, whole
    running = [seq("be", 0, 8, BE, computed=8, produced=1)]
    serial, ahead = make_policy("bros"), make_policy("bros")
    for p, steps in ((serial, None), (ahead, ())):
        p.plan(PlanInput(now_ms=0.0, running=running, waiting=[], free_blocks=100, block_size=16, steps=steps), cfg)
    serial.plan(inp(running=running, now=10.0), cfg)
    assert serial.iteration_ms == 10.0                  # the gap
    ahead.plan(PlanInput(now_ms=10.0, running=running, waiting=[], free_blocks=100, block_size=16,
                         steps=(StepSample(1, 1, False, 80.0),)), cfg)
    assert ahead.iteration_ms == 80.0                   # the reported step, not the 10 ms gap


def test_bros_gives_be_no_prompt_work_while_rt_holds_most_of_the_pool():
    # The pool: 200 blocks of 16 = 3200 tokens; the default share is 0.6 (1920 tokens).
    def plan(rt_tokens, **knobs):
        rt = seq("rt", 0, rt_tokens - 1, RT, computed=rt_tokens - 1, produced=1, first=0.0, tpot=1e6)
        running = [rt, seq("be-dec", 1, 16, BE, computed=16, produced=1), seq("be-pre", 2, 64, BE, computed=16),
                   seq("be-paused", 3, 16, BE, computed=16, produced=1, preempted=True)]
        d = make_policy("bros").plan(inp(running=running, waiting=[seq("be-new", 4, 16, BE)]), PlannerConfig(**knobs))
        return {rid for rid, _ in d.scheduled}
    everyone = {"rt", "be-dec", "be-pre", "be-paused", "be-new"}
    assert plan(1900) == everyone
    # RT holds 2000 tokens (62.5%): BE only decodes what it has; it neither prefills,
    # resumes nor admits, each of which would take KV the next RT requests need
    assert plan(2000) == {"rt", "be-dec"}
    assert plan(2000, bros_rt_kv_pressure=0.7) == everyone
    assert plan(3000, bros_rt_kv_pressure=1.0) == everyone   # 1: off
    with pytest.raises(ValueError, match="bros_rt_kv_pressure"):
        PlannerConfig(bros_rt_kv_pressure=0)
