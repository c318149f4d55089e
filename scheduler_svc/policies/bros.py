"""BROS: slack-driven iteration scheduling over a bidirectional KV pool, with an
adaptive token budget (../shared/PAPER.md, mechanisms 1-3).

Each iteration, in phases:
  1. adapt the BE allowance (AIMD on tokens, driven by RT outcomes): a late first token
     or a decoding RT request behind its TPOT target cuts it, other iterations grow it,
     so BE work per step shrinks exactly when it starts to cost RT its targets;
  2. urgent RT (slack below bros_urgent_slack_ms, or below bros_urgent_iterations of
     the longest recent iterations if that is more), least slack first, picked with a
     partial sort; running, prefilling and waiting RT alike, chunked under the full
     step budget (a late first token needs prefill throughput, not smaller steps);
  3. BE fills what is left of the allowance: running BE first (the newest recomputed when
     BE alone runs the pool short), then paused BE (only when its KV fits back), then new
     BE, by arrival, and only while the free blocks keep growth room for the running
     sequences and no paused BE waits for memory. A step that serves RT takes BE work
     only while it still ends, by the learned step-time model (step_cost.py), before the
     earliest RT deadline it serves (_TimeGate), less a reserve that lets RT survive a
     full step it cannot refuse (_reserve_ms): RT that runs ahead of its TPOT target
     banks slack, and BE spends what is beyond the reserve. While RT's sequences hold more than
     bros_rt_kv_pressure of the pool, BE only decodes what it has (_rt_kv_pressed);
  4. RT with slack to spare takes what is left, running before waiting and least slack
     first within each (a decode costs one token and finishes what holds the pool; none of
     these is urgent): a BE request may have taken its place this iteration, which its
     slack absorbs (only while the BE allowance is whole: after an RT miss, every RT
     request is urgent until it regrows);
  5. if nothing could run although work is resident (every RT sequence needs a block
     and none is free or reclaimable), the newest RT sequence is recomputed, as vLLM
     does, so the pool never deadlocks.
Memory: RT may grow into blocks held by paused BE sequences (the worker checkpoints the
overwritten BE slots to host), so RT's room counts them; when even that is short, the
newest running BE sequences are paused to make room. When no running BE is left to give
way and a step would run mostly empty, a running RT sequence that cannot grow recomputes
newer RT sequences, newest first, as vLLM does (_recompute_newer_rt). BE only takes free
blocks.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable

from ..planner import (BE, RT, PlanDecision, PlanInput, PlannerConfig, SeqView, StepBudget, blocks_of,
                       holds_prefill, is_prompt_work)
from .output_lengths import FinishedLengths
from .step_cost import StepCost


class Bros:
    name = "bros"
    adaptive = True
    chunked = True
    share_kv = True
    slack_gate = True

    def __init__(self) -> None:
        self.token_budget: int | None = None   # the AIMD window, in tokens per iteration
        # Learned online from the gaps between calls (so the same policy fits a CPU worker
        # and an A100): ms per scheduled token, and ms per iteration.
        self.ms_per_token: float | None = None
        self.iteration_ms: float | None = None
        self.long_iteration_ms = 0.0
        self.cost: StepCost | None = None        # step time per regime, for the slack gate on BE
        self._last: tuple[float, int, int, bool] | None = None   # (now_ms, seqs, tokens, prefill) last plan
        self._refused: dict[str, int] = {}      # refused growth -> its computed tokens then (_note_refusals)
        # Running RT whose first token was counted -> when a TPOT miss was last counted.
        self._judged: dict[str, float | None] = {}
        self._window: deque[bool] = deque()       # recent RT outcomes, on time or not
        self._rt_resident: list[SeqView] = []    # this plan's (_plan, _recompute_newer_rt)
        self._be_active: list[str] = []
        self._short_of_blocks: list[SeqView] = []
        self.be_lengths: FinishedLengths | None = None   # only with bros_admit_headroom_sd > 0

    def plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision:
        self._learn(inp, cfg)
        by_id = {s.request_id: s for s in inp.running}
        self._note_refusals(inp, by_id)
        if cfg.bros_admit_headroom_sd > 0:
            if self.be_lengths is None:
                self.be_lengths = FinishedLengths(cfg.bros_output_length_window, cfg.bros_output_length_min_samples)
            self.be_lengths.observe(inp.running)
        out = self._plan(inp, cfg)
        self._last = (inp.now_ms, len(out.scheduled), sum(n for _, n in out.scheduled),
                      holds_prefill(out.scheduled, by_id, {s.request_id for s in inp.waiting}))
        return out

    def _note_refusals(self, inp: PlanInput, by_id: dict[str, SeqView]) -> None:
        """A sequence whose growth the worker refused (inp.refused) although the block
        arithmetic said it fit: its last block has less room than a block of its own
        would (an RT run in a block whose right end holds BE slots). Until it moves (its
        computed count changes) it counts as needing a fresh block, so a full pool leads
        to displacement or recompute instead of the same refused plan forever."""
        refused = {rid: n for rid, n in self._refused.items()
                   if rid in by_id and by_id[rid].num_computed_tokens == n}   # forget the finished and the moved
        for rid in inp.refused:
            if rid in by_id:
                refused[rid] = by_id[rid].num_computed_tokens
        self._refused = refused

    def _learn(self, inp: PlanInput, cfg: PlannerConfig) -> None:
        """Step times, from the gaps between plans (serially, the gap since the last plan is
        its step, loop included), or from the steps the loop reports (when it plans ahead,
        a plan is made while the step before it still runs)."""
        if self.cost is None:
            self.ms_per_token = self.ms_per_token or cfg.bros_prefill_ms_per_token
            self.iteration_ms = self.iteration_ms or cfg.bros_first_step_ms
            self.cost = StepCost(self.iteration_ms, cfg.bros_prefill_ms_per_token,
                                 cfg.bros_step_cost_decay, cfg.bros_step_cost_min_weight)
        self.cost.max_num_fused_tokens = inp.max_num_fused_tokens
        if inp.steps is not None:
            for step in inp.steps:
                self._observe(step.ms, step.num_seqs, step.num_tokens, step.prefill, cfg)
        elif self._last is not None:
            then, seqs, tokens, prefill = self._last
            self._observe(inp.now_ms - then, seqs, tokens, prefill, cfg)

    def _observe(self, dt: float, seqs: int, tokens: int, prefill: bool, cfg: PlannerConfig) -> None:
        if tokens > 0 and dt > 0:
            self.cost.observe(dt, seqs, tokens, prefill)
            a = cfg.bros_step_time_smoothing
            self.ms_per_token += a * (dt / tokens - self.ms_per_token)
            self.iteration_ms += a * (dt - self.iteration_ms)
            # A decaying maximum (at the default 64, halves in ~44 iterations): how long the
            # next step may take if BE fills it, which is what an RT yielding its place must survive.
            self.long_iteration_ms = max(dt, self.long_iteration_ms * (1 - 1 / cfg.bros_long_step_memory))

    def _urgent_slack_ms(self, cfg: PlannerConfig) -> float:
        """RT with less slack than this runs first: the configured floor, or a few of the
        longest recent iterations when steps are slow (a CPU worker's are ~10x a GPU's).

        While the BE allowance is below the step budget (an RT miss cut it and it has
        not grown back), every RT request is urgent: none yields its place to BE. Under
        overload a yielded place costs more than the step: the RT request holds its KV
        a step longer and the queue behind it grows, so lending resumes only once RT has
        gone ~40 steps without a miss. (5 seeds, 0.6 of capacity: RT both 0.763 -> 0.803
        on sim-paper and 0.785 -> 0.822 on sim-arxiv, with more BE; 0.1-0.4 within a
        point; docs/benchmarks.md, "Five seeds".)"""
        if self.adaptive and self.token_budget is not None and self.token_budget < cfg.max_num_batched_tokens:
            return math.inf
        return max(cfg.bros_urgent_slack_ms, cfg.bros_urgent_iterations * self.long_iteration_ms)

    def _slack(self, seq: SeqView, now_ms: float) -> float:
        """Time to spare before the next deadline, after the work still needed to meet
        it: the rest of the prompt for a first token, one iteration for the next one."""
        if seq.first_token_ms is None:
            # Per-token cost from the loop's gaps, not step_cost's prefill line: with the
            # latter, admitted RT under a 10x burst (tests/test_burst.py) fell to 0.84 on time.
            work = seq.num_uncomputed_tokens * self.ms_per_token + self.iteration_ms
        else:
            work = self.iteration_ms
        return seq.next_deadline_ms() - now_ms - work

    @staticmethod
    def _urgency(seq: SeqView, slack_ms: float) -> tuple[bool, float]:
        """Least slack first, except that a first token which can no longer be on time
        (less time left than its prefill takes) goes after those that still can: run
        first, a hopeless long prompt would make the short ones behind it late too."""
        return seq.first_token_ms is None and slack_ms < 0, slack_ms

    def _plan(self, inp: PlanInput, cfg: PlannerConfig) -> PlanDecision:
        be_allowance = self._adapt(inp, cfg)
        step_tokens = self._step_tokens(cfg)
        step = StepBudget(inp, cfg, max_tokens=step_tokens, chunked=self.chunked)
        step.needs_block = set(self._refused)
        evictable = self._evictable_blocks(inp)
        rt_running = [s for s in inp.running if s.service_class == RT]
        # This plan's candidates for _recompute_newer_rt (its victims: step.out.recompute).
        self._rt_resident = [s for s in rt_running if not s.preempted and s.num_computed_tokens > 0]
        self._be_active = [s.request_id for s in inp.running
                           if s.service_class == BE and not s.preempted and s.num_computed_tokens > 0]
        self._short_of_blocks = []
        be_running = [s for s in inp.running if s.service_class == BE]
        rt = rt_running + [s for s in inp.waiting if s.service_class == RT]
        waiting_ids = {s.request_id for s in inp.waiting}
        slack = {s.request_id: self._slack(s, inp.now_ms) for s in rt}
        resident = sum(not s.preempted for s in inp.running)
        urgent_ms = self._urgent_slack_ms(cfg)
        pausable = sorted((s for s in be_running if not s.preempted), key=lambda s: -s.arrival_ms)
        urgent = _most_pressing([s for s in rt if slack[s.request_id] < urgent_ms], waiting_ids, step.seqs,
                                cfg.max_num_seqs - resident + len(pausable),
                                key=lambda s: self._urgency(s, slack[s.request_id]))
        for seq in urgent:
            evictable, resident = self._run_rt(seq, seq.request_id in waiting_ids, step, evictable,
                                               pausable, resident, cfg)
        scheduled = {rid for rid, _ in step.out.scheduled} | set(step.out.preempt) | set(step.out.recompute)
        rt_tokens = step_tokens - step.tokens
        # Tokens BE may not use: the allowance bounds BE decodes and prefill chunks alike
        # (on a CPU a BE decode batch alone can stretch an RT step past its TPOT target).
        held_back = max(0, step.tokens - max(0, be_allowance - rt_tokens))
        step.tokens -= held_back
        time_left = self._time_left_ms(inp, rt_running, step, cfg, step_tokens) if self.slack_gate else math.inf
        gate = None if math.isinf(time_left) else _TimeGate(self.cost, time_left, step, inp, waiting_ids,
                                                            cfg.bros_prefill_switch_overheads, step_tokens)
        grow_be = not self._rt_kv_pressed(inp, rt_running, cfg)
        resident = self._run_be(inp, be_running, scheduled, step, resident, cfg, gate, grow_be)
        step.tokens += held_back
        tried = scheduled | {s.request_id for s in urgent}
        # Running first: least slack first, a waiting prompt with a nearer first-token
        # deadline took whole steps while the decodes beside it waited (half-empty steps
        # once the pool filled: up to 1.8x fcfs's makespan with loose targets).
        relaxed = _most_pressing([s for s in rt if s.request_id not in tried], waiting_ids, step.seqs,
                                 cfg.max_num_seqs - resident,
                                 key=lambda s: (s.request_id in waiting_ids, slack[s.request_id]))
        for seq in relaxed:
            evictable, resident = self._run_rt(seq, seq.request_id in waiting_ids, step, evictable, [],
                                               resident, cfg)
        if step.tokens >= cfg.bros_rt_recompute_underfill * step_tokens:
            # Half empty (by default) for want of blocks: older RT take newer RT's.
            for seq in sorted(self._short_of_blocks, key=lambda s: (s.arrival_ms, s.request_id)):
                evictable, resident = self._run_rt(seq, False, step, evictable, [], resident, cfg, recompute_rt=True)
        if not step.out.scheduled and not step.out.preempt:
            self._unjam(inp, step)
        return step.out

    def _step_tokens(self, cfg: PlannerConfig) -> int:
        """This step's token budget: max_num_batched_tokens, or the worker's fused-path size
        while a step of that size costs less per token (bros_fused_steps). Both regimes
        must have been measured; once capped, the larger regime's line keeps its last fit.
        Never without chunked prefill: a prompt runs whole there, and one longer than the
        fused path would never run (the no-chunking ablation stalled on cpu-hybrid-virtual)."""
        full, fused = cfg.max_num_batched_tokens, self.cost.max_num_fused_tokens
        if not (self.chunked and cfg.bros_fused_steps and 0 < fused < full):
            return full
        if min(self.cost.fused.w, self.cost.prefill.w) < cfg.bros_step_cost_min_weight:
            return full
        cheaper = self.cost.predict(1, fused, True) / fused < self.cost.predict(1, full, True) / full
        return fused if cheaper else full

    def _unjam(self, inp: PlanInput, step: StepBudget) -> None:
        """Work is resident or queued but nothing could run: free the KV of the newest
        sequence holding any (paused BE first, then RT), so the pool cannot deadlock."""
        holding = [s for s in inp.running if s.num_computed_tokens > 0]
        if holding and (inp.waiting or any(s.num_uncomputed_tokens for s in inp.running)):
            victim = max(holding, key=lambda s: (s.service_class == BE and s.preempted, s.arrival_ms))
            step.out.recompute.append(victim.request_id)

    # ---- phases -------------------------------------------------------------------------

    def _adapt(self, inp: PlanInput, cfg: PlannerConfig) -> int:
        """AIMD on the BE allowance, driven by RT outcomes (optionally held by a window).

        Outcomes are judged as soon as the planner can see them: a first token is on time
        or late (TTFT) the first time a running RT request shows one, and a decoding RT
        request past its next-token deadline is late (TPOT, once per TPOT period). Each
        iteration with a new miss cuts the allowance (a loss, as in TCP); every other
        iteration grows it by a step, unless bros_target_attainment > 0 and the window's
        attainment is below it (then it holds until on-time outcomes bring the window
        back, or while no RT request is resident or queued).
        """
        if self.token_budget is None or not self.adaptive:
            self.token_budget = cfg.max_num_batched_tokens
            if not self.adaptive:
                return self.token_budget
        missed = self._judge(inp, cfg)
        if missed:
            floor = min(cfg.bros_min_batched_tokens, cfg.max_num_batched_tokens)
            self.token_budget = max(floor, int(self.token_budget * cfg.bros_aimd_decrease))
        elif (cfg.bros_target_attainment <= 0 or self._attainment() >= cfg.bros_target_attainment
              or not self._any_rt(inp)):
            self.token_budget = min(cfg.max_num_batched_tokens, self.token_budget + cfg.bros_aimd_step_tokens)
        return self.token_budget

    @staticmethod
    def _any_rt(inp: PlanInput) -> bool:
        """No RT request to protect: the allowance may grow whatever the window says."""
        return any(s.service_class == RT for s in inp.running) or any(s.service_class == RT for s in inp.waiting)

    def _record(self, on_time: bool, cfg: PlannerConfig) -> None:
        self._window.append(on_time)
        while len(self._window) > cfg.bros_attainment_window:
            self._window.popleft()

    def _judge(self, inp: PlanInput, cfg: PlannerConfig) -> bool:
        """Record the RT outcomes new in this input, one or two per request (its first
        token on time or not; behind its TPOT target, at most once per TPOT period while it
        stays behind); True if any is a miss."""
        missed = False
        rt = [s for s in inp.running if s.service_class == RT]
        for seq in rt:
            if seq.first_token_ms is None:
                continue
            if seq.request_id not in self._judged:
                self._judged[seq.request_id] = None
                on_time = seq.first_token_ms <= seq.ttft_deadline_ms
                self._record(on_time, cfg)
                missed |= not on_time
            late_since = self._judged[seq.request_id]
            if not seq.preempted and inp.now_ms > seq.next_deadline_ms() and (
                    late_since is None or inp.now_ms - late_since >= seq.tpot_ms):
                self._judged[seq.request_id] = inp.now_ms   # behind on TPOT: once per TPOT period
                self._record(False, cfg)
                missed = True
        if len(self._judged) > len(rt):   # forget finished requests
            resident = {s.request_id for s in rt}
            self._judged = {rid: v for rid, v in self._judged.items() if rid in resident}
        return missed

    def _attainment(self) -> float:
        return sum(self._window) / len(self._window) if self._window else 1.0

    def _evictable_blocks(self, inp: PlanInput) -> int:
        """Blocks RT can take from paused BE sequences (the worker's count, in blocks)."""
        if not self.share_kv:
            return 0
        occ = inp.occupancy
        extra = occ.get("rt_available_slots_with_preempt", 0) - occ.get("rt_available_slots", 0)
        return max(0, extra // inp.block_size)

    def _run_rt(self, seq: SeqView, waiting: bool, step: StepBudget, evictable: int, pausable: list[SeqView],
                resident: int, cfg: PlannerConfig, recompute_rt: bool = False) -> tuple[int, int]:
        n = step.chunk(seq)
        if n == 0 or step.seqs == 0 or (waiting and resident >= cfg.max_num_seqs and not pausable):
            return evictable, resident
        if seq.request_id in step.out.recompute:   # a victim of _recompute_newer_rt
            return evictable, resident
        if not self._prompt_fits(seq, n, step, evictable, pausable):
            return evictable, resident
        need = self._blocks_short(seq, n, step)
        # Make room, in memory or in seats (the running-sequence cap, which vLLM's priority
        # policy cannot preempt for): pause (or recompute) the newest BE.
        while (need > evictable or (waiting and resident >= cfg.max_num_seqs)) and pausable:
            victim = pausable.pop(0)
            evictable += self._displace(victim, step)
            resident -= 1
        if need > evictable and not waiting and not self._be_holding(step):
            if not recompute_rt:   # _plan comes back to it if the step stays mostly empty
                self._short_of_blocks.append(seq)
                return evictable, resident
            need -= self._recompute_newer_rt(seq, need - evictable, step)
        if need > evictable or (waiting and resident >= cfg.max_num_seqs):
            return evictable, resident
        evictable -= max(0, need)
        step.blocks += max(0, need)  # those blocks come from paused BE, not the free list
        step.take(seq, n, admit=waiting)
        return evictable, resident + (1 if waiting or seq.preempted else 0)

    @staticmethod
    def _prompt_fits(seq: SeqView, n: int, step: StepBudget, extra_blocks: int = 0,
                     others: Iterable[SeqView] = ()) -> bool:
        """Whether a prompt chunk of n tokens is worth running: it is the last one, or
        the rest of the prompt fits in the free blocks plus what the caller could take
        (extra_blocks, and the blocks the `others` hold). A chunk of a prompt that cannot
        fit is work thrown away: it fills the pool, nothing can grow, the newest is
        recomputed (often itself) and starts again, while the decodes that would free the
        pool wait behind its chunks (with loose RT targets, a livelock). Decodes and last
        chunks return at once: this runs for every candidate of every plan."""
        if n >= seq.num_uncomputed_tokens:
            return True
        held = sum(blocks_of(s.num_computed_tokens, step.block_size) for s in others)
        return step.new_blocks(seq, seq.num_uncomputed_tokens) <= step.blocks + extra_blocks + held

    def _recompute_newer_rt(self, seq: SeqView, short: int, step: StepBudget) -> int:
        """Free `short` blocks for a running RT sequence by recomputing resident RT that
        arrived after it and is not in this step, newest first; nothing unless they hold
        enough. Returns the blocks freed. Only in a step that is otherwise mostly empty
        (bros_rt_recompute_underfill, which says why), and only for running sequences:
        waiting requests never take a resident's blocks this way (vLLM's fcfs does not
        either). Only newer sequences give way, so the oldest always keeps its work and
        cannot be starved by the others' recomputes."""
        key = (seq.arrival_ms, seq.request_id)
        scheduled = {rid for rid, _ in step.out.scheduled}
        newer = sorted((s for s in self._rt_resident if (s.arrival_ms, s.request_id) > key
                        and s.request_id not in scheduled and s.request_id not in step.out.recompute),
                       key=lambda s: (s.arrival_ms, s.request_id), reverse=True)
        victims, freed = [], 0
        for victim in newer:
            if freed >= short:
                break
            victims.append(victim)
            freed += blocks_of(victim.num_computed_tokens, step.block_size)
        if freed < short:
            return 0
        for victim in victims:
            step.out.recompute.append(victim.request_id)
            step.release(victim)
        return freed

    def _be_holding(self, step: StepBudget) -> bool:
        """Whether a running BE sequence still holds blocks after this step's displacements:
        then BE gives way first (phase 2 pauses it, _unjam recomputes it), never RT's work."""
        gone = set(step.out.preempt) | set(step.out.recompute)
        return any(rid not in gone for rid in self._be_active)

    @staticmethod
    def _blocks_short(seq: SeqView, n: int, step: StepBudget) -> int:
        """Blocks this growth needs beyond the free list (<= 0: the free list suffices)."""
        return step.new_blocks(seq, n) - step.blocks

    def _displace(self, victim: SeqView, step: StepBudget) -> int:
        """Make a running BE sequence give way; returns the blocks RT can now use."""
        if self.share_kv:
            step.out.preempt.append(victim.request_id)
            return blocks_of(victim.num_computed_tokens, step.block_size)
        step.out.recompute.append(victim.request_id)
        step.release(victim)
        return 0

    def _time_left_ms(self, inp: PlanInput, rt_running: list[SeqView], step: StepBudget, cfg: PlannerConfig,
                      step_tokens: int) -> float:
        """How long this step may take before the earliest deadline of an RT request it
        serves, less that request's reserve (_reserve_ms): the next token of every
        decoding RT (an RT decode not in this step waits for it too), the first token of
        each RT prefill in it. inf without RT."""
        scheduled = {rid for rid, _ in step.out.scheduled}
        full_step_ms = self.cost.predict(1, step_tokens, True)
        served = [s for s in rt_running
                  if not s.preempted and (s.first_token_ms is not None or s.request_id in scheduled)]
        served += [s for s in inp.waiting if s.request_id in scheduled]
        return min((s.next_deadline_ms() - self._reserve_ms(s, full_step_ms, cfg) for s in served),
                   default=math.inf) - inp.now_ms

    @staticmethod
    def _reserve_ms(seq: SeqView, full_step_ms: float, cfg: PlannerConfig) -> float:
        """Slack an RT request keeps from BE: bros_slack_reserve_steps times what a full step
        with prompt work (the step budget, as the step-time model prices it) overruns the
        request's TPOT target by. RT cannot refuse such a step: another RT request's
        urgent prompt chunk fills one.

            now -|---- BE may spend ----|---- reserve ----|- deadline
        Spent to its deadline, a decoding request goes late on the next such step (its last
        token may then miss TPOT, and every miss cuts BE's allowance); on a first-token
        deadline the reserve keeps BE from stretching the step that ends a prompt, which
        the next RT arrival of a burst waits behind (docs/benchmarks.md, "The slack reserve")."""
        return cfg.bros_slack_reserve_steps * max(0.0, full_step_ms - seq.tpot_ms)

    @staticmethod
    def _rt_kv_pressed(inp: PlanInput, rt_running: list[SeqView], cfg: PlannerConfig) -> bool:
        """Whether RT's sequences on this worker hold, or will once prefilled, more than
        bros_rt_kv_pressure of its pool (then BE takes no prompt work: _run_be)."""
        if cfg.bros_rt_kv_pressure >= 1:
            return False
        pool_tokens = inp.num_pool_blocks() * inp.block_size
        return sum(s.num_tokens for s in rt_running) > cfg.bros_rt_kv_pressure * pool_tokens

    def _run_be(self, inp: PlanInput, be_running: list[SeqView], taken: set[str], step: StepBudget,
                resident: int, cfg: PlannerConfig, gate: _TimeGate | None = None, grow: bool = True) -> int:
        """BE work for this step; with grow False (RT holds most of the pool), only
        decodes of running BE: their KV is there already, and finishing frees it."""
        by_arrival = lambda s: s.arrival_ms  # noqa: E731
        active = sorted((s for s in be_running if not s.preempted and s.request_id not in taken), key=by_arrival)
        paused = sorted((s for s in be_running if s.preempted and s.request_id not in taken), key=by_arrival)
        waiting = sorted((s for s in inp.waiting if s.service_class == BE), key=by_arrival)
        # Running BE first; among themselves BE compete as under FCFS: when the pool is
        # short the newest gives way by recompute (pausing would free nothing for BE).
        while active:
            seq = active.pop(0)
            n = step.chunk(seq) if gate is None else gate.allow(seq, step.chunk(seq))
            if not grow and is_prompt_work(n, False, seq):
                continue   # not scheduled, but still a recompute victim below (newest first)
            if n == 0 or step.seqs == 0:
                return resident
            if not self._prompt_fits(seq, n, step, others=active):
                continue   # the newer ones can run meanwhile; recomputing them would not make room
            while not step.fits(seq, n) and active:
                victim = active.pop()
                step.out.recompute.append(victim.request_id)
                step.release(victim)
            if not step.fits(seq, n):
                return resident
            step.take(seq, n)
            if gate is not None:
                gate.took(seq, n)
        if not grow:
            return resident
        stuck = False   # a paused BE is waiting for memory: new BE would take it first
        num_growing = sum(not s.preempted for s in inp.running)
        headroom = blocks_of(math.ceil(self._headroom_tokens(cfg, step.block_size) * num_growing), step.block_size)
        for group, is_new in ((paused, False), (waiting, True)):
            for seq in group:
                n = step.chunk(seq) if gate is None else gate.allow(seq, step.chunk(seq), is_new)
                if n == 0 or step.seqs == 0 or resident >= cfg.max_num_seqs or (is_new and stuck):
                    return resident
                if not is_new and blocks_of(seq.num_tokens, step.block_size) > step.blocks:
                    stuck = True
                    continue  # its KV may be on host: resume only when all of it fits back
                if (not step.fits(seq, n) or not self._prompt_fits(seq, n, step)
                        or (is_new and not self._room_to_grow(seq, n, step, headroom))):
                    return resident  # arrival order among new BE: no overtaking
                step.take(seq, n, admit=is_new)
                if gate is not None:
                    gate.took(seq, n, is_new)
                resident += 1
        return resident

    def _headroom_tokens(self, cfg: PlannerConfig, block_size: int) -> float:
        """Growth room a new BE must leave per growing sequence: a multiple of how much
        finished BE outputs vary, once enough have finished (else the fixed headroom), and
        never less than a block: outputs that never vary (a batch job with one max_tokens
        and ignore_eos) still grow, a block at a time."""
        spread = self.be_lengths.stdev() if self.be_lengths is not None and cfg.bros_admit_headroom_sd > 0 else None
        if spread is None:
            return cfg.bros_admit_headroom_tokens
        return max(block_size, cfg.bros_admit_headroom_sd * spread)

    @staticmethod
    def _room_to_grow(seq: SeqView, n: int, step: StepBudget, headroom: int) -> bool:
        """Admit a new BE only while the running sequences keep `headroom` free blocks to
        grow into: a prompt that takes the last free blocks is recomputed a few steps later."""
        return step.blocks - step.new_blocks(seq, n) >= headroom


class BrosNoSharing(Bros):
    """Ablation: no bidirectional sharing; BE gives way by recompute."""
    name = "bros-no-sharing"
    share_kv = False


class BrosFixedBudget(Bros):
    """Ablation: no adaptive budget."""
    name = "bros-fixed-budget"
    adaptive = False


class BrosNoChunking(Bros):
    """Ablation: prompts are prefilled whole."""
    name = "bros-no-chunking"
    chunked = False


def _most_pressing(seqs: list[SeqView], waiting_ids: set[str], num: int, num_seats: int,
                   key) -> list[SeqView]:
    """The num seqs with the smallest key (a partial sort: no more than a step can run),
    counting at most num_seats waiting ones: a waiting request with no seat free (or
    freeable) cannot start this step, and picked anyway it takes a place a running one
    needed for its decode. (Without this, RT filling every seat with more RT queued at
    less slack than theirs never decoded again.)"""
    running = [s for s in seqs if s.request_id not in waiting_ids]
    waiting = heapq.nsmallest(max(num_seats, 0), [s for s in seqs if s.request_id in waiting_ids], key=key)
    return heapq.nsmallest(max(num, 0), running + waiting, key=key)


class _TimeGate:
    """BE work in a step that serves RT (built only for one with an RT deadline) is bounded
    by RT's slack: the step, as StepCost predicts it, must end before the earliest RT
    deadline it serves. A BE prompt chunk that would turn a decode-only step into one with
    prefill must also be worth that regime's overhead: at least `overheads` times as many
    tokens as the overhead costs in token time (fewer only if that is the rest of the
    prompt, or all the step budget holds). On a CPU worker a few BE tokens would otherwise
    cost an RT decode three times its time, and many small chunks (cut by RT's slack or by
    BE's AIMD allowance) pay the overhead again and again; waiting a few steps lets RT bank
    the slack, and the allowance grow, for one large chunk."""

    def __init__(self, cost: StepCost, time_left_ms: float, step: StepBudget, inp: PlanInput,
                 waiting_ids: set[str], overheads: float, max_num_batched_tokens: int) -> None:
        self.cost, self.time_left_ms = cost, time_left_ms
        self.worth_tokens = cost.worth_tokens(overheads)    # the model does not change within a plan
        self.max_num_batched_tokens = max_num_batched_tokens   # the step budget, before BE's allowance
        self.num_seqs = len(step.out.scheduled)
        self.num_tokens = sum(n for _, n in step.out.scheduled)
        self.prefill = holds_prefill(step.out.scheduled, {s.request_id: s for s in inp.running}, waiting_ids)

    def allow(self, seq: SeqView, n: int, is_new: bool = False) -> int:
        """Tokens of seq this step can take (<= n; 0: none)."""
        if n == 0:
            return 0
        if not is_prompt_work(n, is_new, seq):   # a decode
            ms = self.cost.predict(self.num_seqs + 1, self.num_tokens + 1, self.prefill)
            return n if ms <= self.time_left_ms else 0
        fit = min(n, self.cost.prefill_tokens_within(self.time_left_ms, self.num_seqs, self.num_tokens))
        room = self.max_num_batched_tokens - self.num_tokens   # what the budget still holds
        if not self.prefill and fit < min(seq.num_uncomputed_tokens, self.worth_tokens, room):
            return 0
        return fit

    def took(self, seq: SeqView, n: int, is_new: bool = False) -> None:
        self.num_seqs += 1
        self.num_tokens += n
        self.prefill = self.prefill or is_prompt_work(n, is_new, seq)
