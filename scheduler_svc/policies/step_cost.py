"""How long an iteration takes, learned online from the gaps between plans. Pure.

Up to three regimes, because workers have up to three: a step of decodes only, a small
step with prompt tokens in it, and a large one. On an A100 they cost about the same per
step. A CPU worker runs every step of up to `max_num_fused_tokens` tokens (its
WorkerInfo says how many; 64 there) through one fused C++ stack, prompt tokens as rows
like decodes (for SmolLM2 in the live loop: decodes ~19 ms + 1.9 ms per sequence, a step
with prompt tokens ~26 ms + 1.0 ms per prompt token), and a larger step with prompt
tokens through the eager model (~25 ms + 1.5 ms per token). Each regime is a
straight line fitted by exponentially weighted least squares:

    decode only:                    ms = base + per_seq   * num_seqs
    with prefill, <= fused tokens:  ms = base + per_token * num_tokens   (decodes count as
    with prefill, larger:           ms = base + per_token * num_tokens    a token each)

With max_num_fused_tokens 0 (GPU and sim workers) the middle regime does not exist.
The gap between plans is what a token waits for (the step, and the loop's own Redis and
gRPC round trips), so it is what slack is measured against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Below this variance of x (tokens or sequences, squared) the x values seen barely
# differ and a fitted slope would be noise: the prior slope stands in (a numeric guard,
# not a tuning knob).
MIN_X_VARIANCE = 1.0


@dataclass
class _Line:
    """y = base + slope * x, exponentially weighted least squares; slope falls back to a
    prior while the x values seen so far barely differ."""
    prior_slope: float
    decay: float
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w, self.sx, self.sy = d * self.w + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + x * x, d * self.sxy + x * y

    def fit(self) -> tuple[float, float]:
        """(base, slope), both >= 0; requires w > 0."""
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        slope = (self.sxy / self.w - mx * my) / var if var > MIN_X_VARIANCE else self.prior_slope
        slope = max(0.0, slope)
        return max(0.0, my - slope * mx), slope


class StepCost:
    def __init__(self, first_step_ms: float, prefill_ms_per_token: float, decay: float = 0.97,
                 min_weight: float = 4.0, max_num_fused_tokens: int = 0) -> None:
        """decay: the weight older gaps keep per new one; min_weight: the weight a regime
        needs before its own line is used (PlannerConfig.bros_step_cost_*);
        max_num_fused_tokens: the worker's (PlanInput), 0 for none."""
        self.first_step_ms = first_step_ms
        self.min_weight = min_weight
        self.max_num_fused_tokens = max_num_fused_tokens
        self.decode = _Line(prior_slope=0.0, decay=decay)
        self.fused = _Line(prior_slope=prefill_ms_per_token, decay=decay)
        self.prefill = _Line(prior_slope=prefill_ms_per_token, decay=decay)

    def _regime(self, num_tokens: int, has_prefill: bool) -> _Line:
        if not has_prefill:
            return self.decode
        return self.fused if num_tokens <= self.max_num_fused_tokens else self.prefill

    def observe(self, gap_ms: float, num_seqs: int, num_tokens: int, has_prefill: bool) -> None:
        if gap_ms <= 0 or num_seqs <= 0:
            return
        line = self._regime(num_tokens, has_prefill)
        line.add(num_seqs if line is self.decode else num_tokens, gap_ms)

    def predict(self, num_seqs: int, num_tokens: int, has_prefill: bool) -> float:
        own = self._regime(num_tokens, has_prefill)
        x = num_seqs if own is self.decode else num_tokens
        base, slope = self._line(own)
        return base + slope * x

    def _line(self, own: _Line) -> tuple[float, float]:
        """(base, slope) of a regime: its own fit once it has the weight, else the nearest
        regime's overhead (a fused step's is a decode step's; the others' each other's)
        with its prior slope, else the first-step guess."""
        if own.w >= self.min_weight:
            return own.fit()
        if own is self.decode:
            near = (self.fused, self.prefill)
        elif own is self.fused:
            near = (self.decode, self.prefill)
        else:
            near = (self.fused, self.decode)
        for other in near:
            if other.w >= self.min_weight and (other is not self.fused or self.max_num_fused_tokens):
                return other.fit()[0], own.prior_slope
        return self.first_step_ms, own.prior_slope

    def _small_prefill(self) -> _Line:
        """The regime a small prompt chunk joining a decode step takes."""
        return self.fused if self.max_num_fused_tokens > 0 else self.prefill

    def ms_per_prefill_token(self) -> float:
        return self._line(self._small_prefill())[1]

    def prefill_penalty_ms(self) -> float:
        """What turning a decode-only step into one with prefill costs beyond its tokens
        (the eager path's overhead on a CPU worker without a fused path; little with one,
        or on a GPU)."""
        line = self._small_prefill()
        if line.w < self.min_weight or self.decode.w < self.min_weight:
            return 0.0
        return max(0.0, line.fit()[0] - self.decode.fit()[0])

    def prefill_tokens_within(self, budget_ms: float, num_seqs: int, num_tokens: int) -> int:
        """Prompt tokens a step with prefill, holding num_seqs / num_tokens so far, can add
        (with one more sequence) and still take at most budget_ms; a large number when
        tokens cost nothing measurable. With a fused regime, the most of: what fits
        within it, and what fits in a step larger than it."""
        best = 0
        for line, lo, hi in [(self.fused, 1, self.max_num_fused_tokens - num_tokens),
                             (self.prefill, max(1, self.max_num_fused_tokens - num_tokens + 1), 1 << 30)]:
            if hi < lo:
                continue
            base, slope = self._line(line)
            room = budget_ms - base - slope * num_tokens
            if room < slope * lo:
                continue
            n = int(room / slope) if slope > 0 else 1 << 30
            best = max(best, min(n, hi))
        return best

    def worth_tokens(self, overheads: float = 1.0) -> int:
        """The smallest prompt chunk worth a decode-only step's change of regime: as many
        tokens as `overheads` times the regime's overhead costs in token time (0 where it
        costs nothing)."""
        per_token = self.ms_per_prefill_token()
        return math.ceil(overheads * self.prefill_penalty_ms() / per_token) if per_token > 0 else 0
