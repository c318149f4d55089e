"""Fit a sim cost model to a live worker's steps, as the scheduler logged them
(--step-log; the live cpu-hybrid bench's --step-logs DIR):

    python -m scheduler_svc.bench.fit_cost bench/out/cpu-hybrid-steps [--against smollm2_cpu]

A step costs what the loop waited for it: the gap from its plan to the next plan, which
is the worker's step plus the loop's Redis and gRPC round trips (what bros' step-time
model sees, and what the sim worker's CostModel stands in for). Gaps that also hold the
loop idling (its next plan came more than MAX_LOOP_MS after the report: nothing was
runnable) are dropped. Least squares per regime, as CostModel has them:

    decode only:                  gap = decode_base + decode_per_seq * num_seqs
    prompt tokens, <= max_num_fused_tokens:
        gap - decode_per_seq * num_decodes = fused_base + fused_per_prompt_token * num_prompt_tokens
    prompt tokens, larger:
        gap - decode_per_seq * num_decodes = prefill_base + prefill_per_token * num_prompt_tokens

(the decodes beside prompt tokens at the decode-only rate, as CostModel.iteration_ms
charges them). With --large-batch-threshold N, decode-only steps of N sequences or more
get a line of their own (CostModel's large_decode_*): on a CPU worker, steps of up to
MAX_BLOCK_ROWS rows read the GGUF's 4-bit blocks and larger ones fp32, and one line
cannot follow the kink between them.

It prints each regime's fit and its error, the same error for a preset (--against), the
median decode gap by batch size (a line cannot follow a kink there: the CPU stack reads
the GGUF's 4-bit blocks only up to worker_svc's MAX_BLOCK_ROWS rows), and the preset's
fields as a JSON object (--json writes it too).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from worker_svc.sim.cost_model import CostModel

# ms from a report to the next plan beyond which the loop is taken to have idled (its
# round trips take ~2-4 ms; an idle loop polls every 5 ms and plans only once work is
# runnable), so the gap is not the step's cost.
MAX_LOOP_MS = 10.0


@dataclass(frozen=True)
class Step:
    gap_ms: float
    step_ms: float       # the worker's own time
    num_seqs: int
    num_tokens: int
    num_prompt_tokens: int
    prefill: bool
    max_num_fused_tokens: int

    @property
    def num_decodes(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def regime(self) -> str:
        if not self.prefill:
            return "decode"
        return "fused" if self.num_tokens <= self.max_num_fused_tokens else "prefill"


def read_steps(paths: list[Path]) -> list[Step]:
    """Every step with a known gap, from step-log files or directories of them."""
    files = [f for p in paths for f in (sorted(p.glob("*.jsonl")) if p.is_dir() else [p])]
    steps: list[Step] = []
    for f in files:
        by_worker: dict[str, list[dict]] = {}
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                by_worker.setdefault(rec["worker"], []).append(rec)
        for recs in by_worker.values():
            recs.sort(key=lambda r: r["plan_ms"])
            for this, after in zip(recs, recs[1:]):
                if after["plan_ms"] - this["report_ms"] > MAX_LOOP_MS:
                    continue
                steps.append(Step(after["plan_ms"] - this["plan_ms"], this["step_ms"], this["num_seqs"],
                                  this["num_tokens"], this["num_prefill_tokens"], this["prefill"],
                                  this["max_num_fused_tokens"]))
    return steps


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(base, slope) of y = base + slope * x; slope 0 if the x values are all alike."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - slope * mx, slope


@dataclass(frozen=True)
class Fit:
    regime: str
    num_steps: int
    base_ms: float
    slope_ms: float
    x_name: str
    rms_ms: float       # root mean square of the residuals
    mean_gap_ms: float


def fit(steps: list[Step], large_batch_threshold: int | None = None) -> dict[str, Fit]:
    """Per regime ("decode", "large decode" with a threshold, "fused", "prefill")."""
    split = large_batch_threshold or 1 << 30
    decodes = [s for s in steps if s.regime() == "decode"]
    fits: dict[str, Fit] = {}
    for regime, sel in (("decode", [s for s in decodes if s.num_seqs < split]),
                        ("large decode", [s for s in decodes if s.num_seqs >= split])):
        if sel:
            fits[regime] = _fit(regime, sel, "seq", lambda s: s.num_seqs, lambda s: s.gap_ms)
    small = fits["decode"].slope_ms if "decode" in fits else 0.0
    large = fits["large decode"].slope_ms if "large decode" in fits else small

    def prompt_part(s: Step) -> float:   # the gap less its decodes, at their batch's rate
        return s.gap_ms - (large if s.num_decodes >= split else small) * s.num_decodes
    for regime in ("fused", "prefill"):
        sel = [s for s in steps if s.regime() == regime]
        if sel:
            fits[regime] = _fit(regime, sel, "prompt token", lambda s: s.num_prompt_tokens, prompt_part)
    return fits


def _fit(regime: str, steps: list[Step], x_name: str, x, y) -> Fit:
    xs, ys = [float(x(s)) for s in steps], [float(y(s)) for s in steps]
    base, slope = least_squares(xs, ys)
    rms = math.sqrt(statistics.fmean((yy - base - slope * xx) ** 2 for xx, yy in zip(xs, ys)))
    return Fit(regime, len(steps), base, slope, x_name, rms, statistics.fmean(s.gap_ms for s in steps))


def preset_fields(fits: dict[str, Fit], max_num_fused_tokens: int,
                  large_batch_threshold: int | None = None) -> dict[str, float]:
    """The CostModel fields these fits give (no context or quadratic terms: at the live
    scenario's lengths a CPU step is the weights' streaming and the GEMMs)."""
    fields: dict[str, float] = {"prefill_ms_per_token_sq": 0.0, "decode_ms_per_context_token": 0.0,
                                "large_decode_ms_per_context_token": 0.0}
    if "decode" in fits:
        d = fits["decode"]
        large = fits.get("large decode", d)
        fields.update(decode_base_ms=d.base_ms, decode_ms_per_seq=d.slope_ms,
                      large_decode_base_ms=large.base_ms, large_decode_ms_per_seq=large.slope_ms)
        if large_batch_threshold and large is not d:
            fields["large_batch_threshold"] = large_batch_threshold
    if "fused" in fits:
        fields.update(fused_max_tokens=max_num_fused_tokens, fused_base_ms=fits["fused"].base_ms,
                      fused_ms_per_prompt_token=fits["fused"].slope_ms)
    if "prefill" in fits:
        fields.update(prefill_base_ms=fits["prefill"].base_ms, prefill_ms_per_token=fits["prefill"].slope_ms)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}


def preset_error(steps: list[Step], model: CostModel) -> dict[str, tuple[float, float]]:
    """Per regime, the preset's (mean, rms) error against the gaps (ms; > 0: it is slower).
    The log has no context lengths, so a preset's context terms count nothing here."""
    out = {}
    for regime in ("decode", "fused", "prefill"):
        errs = [model.iteration_ms(_chunks(s), [0] * s.num_decodes) - s.gap_ms for s in steps if s.regime() == regime]
        if errs:
            out[regime] = (statistics.fmean(errs), math.sqrt(statistics.fmean(e * e for e in errs)))
    return out


def _chunks(s: Step) -> list[int]:
    """The step's prompt work as one chunk (no quadratic term is fitted, so the split does
    not change the cost)."""
    return [s.num_prompt_tokens] if s.num_prompt_tokens else []


def decode_by_batch(steps: list[Step]) -> list[tuple[int, int, float, float]]:
    """(num_seqs, num_steps, median gap, median worker step) for decode-only steps."""
    rows = []
    for n in sorted({s.num_seqs for s in steps if s.regime() == "decode"}):
        sel = [s for s in steps if s.regime() == "decode" and s.num_seqs == n]
        rows.append((n, len(sel), statistics.median(s.gap_ms for s in sel), statistics.median(s.step_ms for s in sel)))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scheduler_svc.bench.fit_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="step-log files, or directories of *.jsonl")
    p.add_argument("--against", default="smollm2_cpu", help="a cost preset to measure against the steps")
    p.add_argument("--json", type=Path, default=None, help="also write the fitted fields here")
    p.add_argument("--large-batch-threshold", type=int, default=None,
                   help="decode-only steps of this many sequences or more get a line of their own "
                        "(a CPU worker: its MAX_BLOCK_ROWS + 1)")
    args = p.parse_args(argv)
    missing = [str(x) for x in args.paths if not x.exists()]
    if missing:
        p.error(f"paths: not found: {', '.join(missing)}")
    steps = read_steps(args.paths)
    if not steps:
        sys.exit("fit_cost: no steps with a known gap in " + ", ".join(map(str, args.paths)))
    if args.large_batch_threshold is not None and args.large_batch_threshold < 2:
        p.error("--large-batch-threshold: must be >= 2")
    fits = fit(steps, args.large_batch_threshold)
    print(f"{len(steps)} steps")
    print("| regime | steps | base ms | ms per x | x | rms ms | mean gap ms |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for f in fits.values():
        print(f"| {f.regime} | {f.num_steps} | {f.base_ms:.2f} | {f.slope_ms:.3f} | {f.x_name} | {f.rms_ms:.2f} | "
              f"{f.mean_gap_ms:.1f} |")
    model = CostModel.from_dict({"preset": args.against})
    print(f"\n{args.against} against these steps (ms; > 0: the preset is slower)")
    print("| regime | mean error | rms error |")
    print("|---|---:|---:|")
    for regime, (mean, rms) in preset_error(steps, model).items():
        print(f"| {regime} | {mean:+.2f} | {rms:.2f} |")
    print("\ndecode-only steps by batch size")
    print("| seqs | steps | median gap ms | median worker step ms |")
    print("|---:|---:|---:|---:|")
    for n, k, gap, step in decode_by_batch(steps):
        print(f"| {n} | {k} | {gap:.1f} | {step:.1f} |")
    fused = max(s.max_num_fused_tokens for s in steps)
    fields = preset_fields(fits, fused, args.large_batch_threshold)
    print("\n" + json.dumps(fields))
    if args.json is not None:
        args.json.write_text(json.dumps(fields, indent=2) + "\n")


if __name__ == "__main__":
    main()
