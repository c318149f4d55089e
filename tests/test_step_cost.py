"""bros' step-time model (policies/step_cost.py) and the slack gate it drives: BE work
joins a step that serves RT only if the step still ends before RT's earliest deadline."""
import math

import pytest

from scheduler_svc.planner import BE, RT, PlanInput, PlannerConfig, SeqView, make_policy
from scheduler_svc.policies.step_cost import StepCost


def cpu_like(cost: StepCost, steps: int = 40) -> None:
    """A CPU worker: decode-only steps 26 + 3.4/seq ms, any prefill 72 + 1.23/token ms."""
    for i in range(steps):
        seqs = 1 + i % 5
        cost.observe(26 + 3.4 * seqs, seqs, seqs, False)
        tokens = 8 + 17 * (i % 9)
        cost.observe(72 + 1.23 * tokens, 2, tokens, True)


def test_learns_both_regimes_and_the_prefill_overhead():
    cost = StepCost(first_step_ms=50, prefill_ms_per_token=0.15)
    cpu_like(cost)
    assert math.isclose(cost.predict(3, 3, False), 26 + 3 * 3.4, rel_tol=0.02)
    assert math.isclose(cost.predict(2, 100, True), 72 + 123, rel_tol=0.02)
    assert math.isclose(cost.ms_per_prefill_token(), 1.23, rel_tol=0.02)
    assert 40 < cost.prefill_penalty_ms() < 50            # 72 vs the decode line's 26 + 3.4 * 1
    assert cost.worth_tokens() == math.ceil(cost.prefill_penalty_ms() / cost.ms_per_prefill_token())
    # 300 ms for a step already holding 2 sequences / 10 tokens: (300 - 72 - 12.3) / 1.23
    assert cost.prefill_tokens_within(300, 2, 10) == 175


def test_before_any_data_it_uses_the_priors_and_the_other_regime():
    cost = StepCost(first_step_ms=50, prefill_ms_per_token=0.15)
    assert cost.predict(1, 200, True) == 50 + 0.15 * 200 and cost.prefill_penalty_ms() == 0
    for _ in range(5):
        cost.observe(20, 4, 4, False)
    assert cost.predict(1, 100, True) == 20 + 0.15 * 100   # the decode line's base, the prior slope


def test_ignores_empty_and_negative_gaps():
    cost = StepCost(first_step_ms=50, prefill_ms_per_token=0.15)
    cost.observe(-3, 2, 2, False)
    cost.observe(10, 0, 0, True)
    assert cost.decode.w == cost.prefill.w == 0


def fused_cpu(cost: StepCost, steps: int = 40) -> None:
    """A CPU worker with a fused path for steps of <= 64 tokens: decode-only 21 + 1.9/seq
    ms, a fused step with prompt tokens 22 + 1.0/token, a larger one 32 + 1.42/token."""
    for i in range(steps):
        seqs = 1 + i % 5
        cost.observe(21 + 1.9 * seqs, seqs, seqs, False)
        small = 6 + 7 * (i % 9)
        cost.observe(22 + 1.0 * small, 2, small, True)
        large = 70 + 23 * (i % 9)
        cost.observe(32 + 1.42 * large, 2, large, True)


def test_a_fused_path_is_a_regime_of_its_own():
    cost = StepCost(first_step_ms=50, prefill_ms_per_token=0.15, max_num_fused_tokens=64)
    fused_cpu(cost)
    assert math.isclose(cost.predict(3, 3, False), 21 + 3 * 1.9, rel_tol=0.02)
    assert math.isclose(cost.predict(2, 40, True), 22 + 40, rel_tol=0.02)
    assert math.isclose(cost.predict(2, 64, True), 22 + 64, rel_tol=0.02)
    assert math.isclose(cost.predict(2, 65, True), 32 + 1.42 * 65, rel_tol=0.02)
    # A small chunk joins a decode step at the fused line's price: ~1 ms over the decode
    # line's base, so it is worth one token, not the ~37 the eager path's overhead asks.
    assert cost.ms_per_prefill_token() == cost.fused.fit()[1]
    assert cost.prefill_penalty_ms() < 2 and cost.worth_tokens(4) <= 8
    # 60 ms holding 2 tokens: (60 - 22 - 2) / 1.0 = 36 more, in the fused regime.
    assert cost.prefill_tokens_within(60, 2, 2) in (35, 36)
    # 100 ms: the fused regime stops at 62 more (64 in all, 86 ms); 2 + 45 eager tokens
    # would also fit 100 ms, but a step that small runs fused: 62.
    assert cost.prefill_tokens_within(100, 2, 2) == 62
    # 200 ms: eager, (200 - 32 - 1.42 * 2) / 1.42 = 116 more (a 118-token step).
    assert cost.prefill_tokens_within(200, 2, 2) in (115, 116)


def test_without_a_fused_path_small_steps_with_prefill_are_the_prefill_regime():
    cost = StepCost(first_step_ms=50, prefill_ms_per_token=0.15)
    cost.observe(40, 2, 10, True)
    assert cost.prefill.w == 1 and cost.fused.w == 0
    cost = StepCost(first_step_ms=50, prefill_ms_per_token=0.15, max_num_fused_tokens=64)
    cost.observe(40, 2, 10, True)
    cost.observe(90, 2, 65, True)
    assert cost.prefill.w == cost.fused.w == 1
    # Before the fused line has the weight, a fused step costs the decode line's base.
    for _ in range(5):
        cost.observe(20, 4, 4, False)
    assert cost.predict(1, 10, True) == pytest.approx(20 + 0.15 * 10)


def _plan_with_rt_slack(slack_ms: float, gate: bool, token_budget: int | None = None, **knobs):
    p = make_policy("bros")
    p.slack_gate = gate
    cfg = PlannerConfig(**{"max_num_batched_tokens": 256, "bros_urgent_slack_ms": 0, "bros_urgent_iterations": 0,
                           "bros_slack_reserve_steps": 0, **knobs})
    p.plan(PlanInput(now_ms=0, running=[], waiting=[], free_blocks=100, block_size=16), cfg)  # set up
    cpu_like(p.cost)
    p.long_iteration_ms = 0
    if token_budget is not None:
        p.token_budget = token_budget - cfg.bros_aimd_step_tokens   # the next plan grows it back
    now = 1000.0
    rt = SeqView("rt", RT, 0, 8, num_tokens=9, num_computed_tokens=8, ttft_deadline_ms=1e9, tpot_ms=100,
                 first_token_ms=now + slack_ms - 100, num_output_tokens=1)   # next token due at now + slack
    be = SeqView("be", BE, 1, 96, num_tokens=96)
    return p.plan(PlanInput(now_ms=now, running=[rt], waiting=[be], free_blocks=100, block_size=16), cfg)


def test_gate_keeps_a_be_prompt_out_of_a_step_rt_cannot_wait_for():
    # 40 ms of slack: an RT decode alone (~30 ms) fits, any prefill step (>= 72 ms) does not.
    d = _plan_with_rt_slack(40, gate=True)
    assert ("rt", 1) in d.scheduled and "be" not in d.admit
    assert "be" in _plan_with_rt_slack(40, gate=False).admit   # what the gate prevents


def test_gate_sizes_a_be_chunk_to_the_banked_slack():
    # 200 ms banked: (200 - 72 - 1.23 * 1) / 1.23 -> a 101-token step, i.e. the whole 96-token prompt.
    d = dict(_plan_with_rt_slack(200, gate=True).scheduled)
    assert d["be"] == 96
    # 150 ms: (150 - 72 - 1.23) / 1.23 = 62 tokens, more than the ~37 the regime change
    # costs, but under the default 4 x 37 and short of the rest of the prompt: it waits for
    # RT to bank the slack for all 96 in one step.
    assert "be" not in dict(_plan_with_rt_slack(150, gate=True).scheduled)
    d = dict(_plan_with_rt_slack(150, gate=True, bros_prefill_switch_overheads=1).scheduled)
    assert 55 <= d["be"] <= 63


def test_gate_waits_for_the_allowance_to_hold_a_chunk_worth_its_overhead():
    # RT has slack to spare, but BE's AIMD allowance holds only 40 tokens (so RT does not
    # yield: it goes first, leaving 39): not worth turning the step into a prefill one,
    # unless the rule is off.
    assert "be" not in dict(_plan_with_rt_slack(1000, gate=True, token_budget=40).scheduled)
    d = dict(_plan_with_rt_slack(1000, gate=True, token_budget=40, bros_prefill_switch_overheads=0).scheduled)
    assert d == {"rt": 1, "be": 39}


def test_gate_keeps_a_full_prompt_steps_overrun_of_tpot_in_reserve():
    # The step budget's 256 tokens cost 72 + 1.23 * 256 = 387 ms, 287 over RT's 100 ms TPOT:
    # of 450 ms banked BE may spend 163, (163 - 72 - 1.23) / 1.23 = 73 tokens.
    d = dict(_plan_with_rt_slack(450, gate=True, bros_prefill_switch_overheads=0, bros_slack_reserve_steps=1).scheduled)
    assert d["rt"] == 1 and 72 <= d["be"] <= 75
    assert dict(_plan_with_rt_slack(450, gate=True, bros_prefill_switch_overheads=0).scheduled)["be"] == 96
    # Half a step's overrun in reserve: 306 ms to spend, the whole prompt fits again.
    d = dict(_plan_with_rt_slack(450, gate=True, bros_prefill_switch_overheads=0,
                                 bros_slack_reserve_steps=0.5).scheduled)
    assert d["be"] == 96
    # The reserve is priced at the step budget: at 128 tokens a full step is 229 ms, 129 over.
    d = dict(_plan_with_rt_slack(300, gate=True, bros_prefill_switch_overheads=0, bros_slack_reserve_steps=1,
                                 max_num_batched_tokens=128).scheduled)
    assert 78 <= d["be"] <= 80    # (300 - 129 - 72 - 1.23) / 1.23
    # Not even a BE decode joins a step once the reserve is all RT has left.
    be = SeqView("be", BE, 1, 8, num_tokens=20, num_computed_tokens=19, num_output_tokens=12)
    p = make_policy("bros")
    cfg = PlannerConfig(max_num_batched_tokens=256, bros_urgent_slack_ms=0, bros_urgent_iterations=0)
    p.plan(PlanInput(now_ms=0, running=[], waiting=[], free_blocks=100, block_size=16), cfg)
    cpu_like(p.cost)
    for slack, joins in ((300, False), (400, True)):   # a decode step of both: 26 + 2 * 3.4 ms
        rt = SeqView("rt", RT, 0, 8, num_tokens=9, num_computed_tokens=8, ttft_deadline_ms=1e9, tpot_ms=100,
                     first_token_ms=1000 + slack - 100, num_output_tokens=1)
        d = p.plan(PlanInput(now_ms=1000, running=[rt, be], waiting=[], free_blocks=100, block_size=16), cfg)
        assert ("be", 1) in d.scheduled if joins else d.scheduled == [("rt", 1)]


def test_gate_keeps_the_reserve_on_a_first_token_deadline():
    # An RT prompt ending in this step, due 450 ms from now: a BE prompt gets what ends
    # the step 287 ms (a full step's overrun of TPOT) before that deadline.
    p = make_policy("bros")
    cfg = PlannerConfig(max_num_batched_tokens=256, bros_urgent_slack_ms=1e9, bros_prefill_switch_overheads=0)
    p.plan(PlanInput(now_ms=0, running=[], waiting=[], free_blocks=100, block_size=16), cfg)
    cpu_like(p.cost)
    rt = SeqView("rt", RT, 990, 10, num_tokens=10, ttft_deadline_ms=1450, tpot_ms=100)
    be = SeqView("be", BE, 1, 96, num_tokens=96)
    d = dict(p.plan(PlanInput(now_ms=1000, running=[], waiting=[rt, be], free_blocks=100, block_size=16),
                    cfg).scheduled)
    assert d["rt"] == 10 and 63 <= d["be"] <= 65    # (450 - 287 - 72 - 1.23 * 10) / 1.23 = 64


def test_gate_takes_what_the_step_budget_holds_when_that_is_under_the_minimum():
    # A 40-token step budget can never hold 4 x 37 tokens: a BE prompt must not wait for
    # that forever, so all the budget holds is enough.
    d = dict(_plan_with_rt_slack(1000, gate=True, max_num_batched_tokens=40, bros_min_batched_tokens=40).scheduled)
    assert d["be"] == 40



def _be_prompt_step(fused_steps: bool = True, max_num_fused_tokens: int = 64, train=fused_cpu,
                    policy: str = "bros") -> int:
    """Tokens a bros step gives a lone 200-token BE prompt once the step-time model knows
    the worker (no RT: nothing else bounds the step)."""
    p = make_policy(policy)
    cfg = PlannerConfig(max_num_batched_tokens=256, bros_fused_steps=fused_steps)
    empty = PlanInput(now_ms=0, running=[], waiting=[], free_blocks=100, block_size=16,
                      max_num_fused_tokens=max_num_fused_tokens)
    p.plan(empty, cfg)
    train(p.cost)
    be = SeqView("be", BE, 1, 200, num_tokens=200)
    d = p.plan(PlanInput(now_ms=1000, running=[], waiting=[be], free_blocks=100, block_size=16,
                         max_num_fused_tokens=max_num_fused_tokens), cfg)
    return dict(d.scheduled)["be"]


def test_steps_stay_within_the_fused_path_while_it_is_cheaper_per_token():
    # fused_cpu: a 64-token step costs (22 + 64) / 64 = 1.34 ms a token, a 256-token one
    # (32 + 1.42 * 256) / 256 = 1.55: the prompt goes through in 64-token steps.
    assert _be_prompt_step() == 64
    assert _be_prompt_step(fused_steps=False) == 200
    assert _be_prompt_step(max_num_fused_tokens=0) == 200     # no fused path: nothing to cap at
    # Without chunked prefill a prompt runs whole: capped at 64 tokens it never ran
    # (the no-chunking ablation stalled on cpu-hybrid-virtual).
    assert _be_prompt_step(policy="bros-no-chunking") == 200

    def big_steps_cheaper(cost: StepCost) -> None:
        for i in range(40):   # a fused step dear per token (3 ms), a large one cheap (1 ms)
            cost.observe(22 + 3.0 * (6 + 7 * (i % 9)), 2, 6 + 7 * (i % 9), True)
            cost.observe(32 + 1.0 * (70 + 23 * (i % 9)), 2, 70 + 23 * (i % 9), True)
    assert _be_prompt_step(train=big_steps_cheaper) == 200
