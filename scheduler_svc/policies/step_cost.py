"""How long an iteration takes, learned online from the gaps between plans. Pure.

Two regimes, because workers have two: a step of decodes only, and a step with prompt
tokens in it. On an A100 they cost about the same per step; on a CPU worker a decode-only
batch runs a fused path (~21 ms for SmolLM2 at batch 1) while any prefill chunk sends the
whole step through the eager model (~32 ms + 1.4 ms per token), so one 8-token BE chunk
riding along with an RT decode doubles that RT's token time. Each regime is a straight
line fitted by exponentially weighted least squares:

    decode only:   ms = base + per_seq   * num_seqs
    with prefill:  ms = base + per_token * num_tokens      (decodes count as a token each)

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
                 min_weight: float = 4.0) -> None:
        """decay: the weight older gaps keep per new one; min_weight: the weight a regime
        needs before its own line is used (PlannerConfig.bros_step_cost_*)."""
        self.first_step_ms = first_step_ms
        self.min_weight = min_weight
        self.decode = _Line(prior_slope=0.0, decay=decay)
        self.prefill = _Line(prior_slope=prefill_ms_per_token, decay=decay)

    def observe(self, gap_ms: float, num_seqs: int, num_tokens: int, has_prefill: bool) -> None:
        if gap_ms <= 0 or num_seqs <= 0:
            return
        if has_prefill:
            self.prefill.add(num_tokens, gap_ms)
        else:
            self.decode.add(num_seqs, gap_ms)

    def predict(self, num_seqs: int, num_tokens: int, has_prefill: bool) -> float:
        own, other = (self.prefill, self.decode) if has_prefill else (self.decode, self.prefill)
        x = num_tokens if has_prefill else num_seqs
        if own.w >= self.min_weight:
            base, slope = own.fit()
        elif other.w >= self.min_weight:
            base, slope = other.fit()[0], own.prior_slope   # the other regime's overhead
        else:
            base, slope = self.first_step_ms, own.prior_slope
        return base + slope * x

    def ms_per_prefill_token(self) -> float:
        return self.prefill.fit()[1] if self.prefill.w >= self.min_weight else self.prefill.prior_slope

    def prefill_penalty_ms(self) -> float:
        """What turning a decode-only step into one with prefill costs beyond its tokens
        (the eager path's overhead on a CPU worker; about nothing on a GPU)."""
        if self.prefill.w < self.min_weight or self.decode.w < self.min_weight:
            return 0.0
        return max(0.0, self.prefill.fit()[0] - self.decode.fit()[0])

    def prefill_tokens_within(self, budget_ms: float, num_seqs: int, num_tokens: int) -> int:
        """Prompt tokens a step with prefill, holding num_seqs / num_tokens so far, can add
        (with one more sequence) and still take at most budget_ms; a large number when
        tokens cost nothing measurable."""
        base = self.predict(num_seqs + 1, num_tokens, True)
        slope = self.ms_per_prefill_token()
        if base > budget_ms:
            return 0
        return int((budget_ms - base) / slope) if slope > 0 else 1 << 30

    def worth_tokens(self, overheads: float = 1.0) -> int:
        """The smallest prompt chunk worth a decode-only step's change of regime: as many
        tokens as `overheads` times the regime's overhead costs in token time (0 where it
        costs nothing)."""
        per_token = self.ms_per_prefill_token()
        return math.ceil(overheads * self.prefill_penalty_ms() / per_token) if per_token > 0 else 0
