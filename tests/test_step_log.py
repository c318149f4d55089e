"""The scheduler's step log (--step-log, scheduler_svc/step_log.py) and the cost fit that
reads it (scheduler_svc/bench/fit_cost.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bros.client import Client, Final
from bros.redis_server import EmbeddedRedis
from scheduler_svc.bench import fit_cost
from stack import sim_stack
from worker_svc.sim.cost_model import CostModel

LOOP_MS = 3.0   # the synthetic loop's round trips, on top of each step


def test_the_scheduler_logs_every_step_a_worker_ran(tmp_path):
    """A 200-token prompt in steps of at most 64 tokens, then 4 decodes: every token the
    worker ran is in the log once, with the plan's shape and times."""
    log = tmp_path / "steps.jsonl"
    with sim_stack(tmp_path, "--step-log", str(log), "--max-num-batched-tokens", "64") as (sched, worker):
        events = list(Client(sched.address, timeout=60).generate(list(range(100, 300)), service_class="be",
                                                                  max_tokens=5, ignore_eos=True))
    assert isinstance(events[-1], Final) and events[-1].num_output_tokens == 5
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    prompt = [s for s in lines if s["prefill"]]
    decodes = [s for s in lines if not s["prefill"]]
    assert sum(s["num_tokens"] for s in prompt) == 200
    assert all(s["num_tokens"] <= 64 for s in prompt) and len(prompt) >= 4
    assert sum(s["num_prefill_tokens"] for s in prompt) == 200
    assert [(s["num_seqs"], s["num_tokens"], s["num_prefill_tokens"]) for s in decodes] == [(1, 1, 0)] * 4
    assert {s["worker"] for s in lines} == {worker.address}
    assert all(s["plan_ms"] < s["report_ms"] and s["step_ms"] > 0 for s in lines)
    assert all(a["report_ms"] <= b["plan_ms"] for a, b in zip(lines, lines[1:]))   # serial loop: in order


def test_an_unwritable_step_log_is_a_one_line_exit_naming_the_flag(tmp_path):
    with EmbeddedRedis() as redis_server:
        proc = subprocess.run([sys.executable, "-m", "scheduler_svc", "--redis-url", redis_server.url,
                               "--workers", "127.0.0.1:1", "--port", "0",
                               "--step-log", str(tmp_path / "missing" / "steps.jsonl")],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--step-log" in proc.stderr and "Traceback" not in proc.stderr


def _synthetic_log(path: Path, model: CostModel, idle_after: int | None = None) -> None:
    """A step log whose gaps are the model's step times plus LOOP_MS: decode steps of 1-8
    sequences, fused steps of 8-60 prompt tokens beside 0-3 decodes, larger prompt steps.
    idle_after: the loop idles 500 ms after that step (nothing runnable)."""
    shapes = [(n, n, 0) for n in range(1, 9) for _ in range(3)]
    shapes += [(1 + d, p + d, p) for p in (8, 20, 33, 47, 60) for d in (0, 1, 3)]
    shapes += [(1 + d, p + d, p) for p in (100, 160, 256) for d in (0, 2)]
    t = 1_000.0
    with path.open("w") as f:
        for i, (num_seqs, num_tokens, num_prompt) in enumerate(shapes):
            step = model.iteration_ms([num_prompt] if num_prompt else [], [1] * (num_tokens - num_prompt))
            f.write(json.dumps({"worker": "w:1", "plan_ms": t, "report_ms": t + step + 1.0, "step_ms": step,
                                "num_seqs": num_seqs, "num_tokens": num_tokens, "num_prefill_tokens": num_prompt,
                                "prefill": num_prompt > 0, "max_num_fused_tokens": model.fused_max_tokens}) + "\n")
            t += step + LOOP_MS + (500.0 if i == idle_after else 0.0)


def test_the_fit_recovers_the_cost_model_the_gaps_came_from(tmp_path):
    model = CostModel.smollm2_cpu()
    _synthetic_log(tmp_path / "a.jsonl", model, idle_after=5)
    steps = fit_cost.read_steps([tmp_path])
    assert len(steps) == 24 + 15 + 6 - 2   # the last step has no next plan; the idle gap is dropped
    fits = fit_cost.fit(steps)
    expect = {"decode": (model.decode_base_ms, model.decode_ms_per_seq),
              "fused": (model.fused_base_ms, model.fused_ms_per_prompt_token),
              "prefill": (model.prefill_base_ms, model.prefill_ms_per_token)}
    for regime, (base, slope) in expect.items():
        assert fits[regime].base_ms == pytest.approx(base + LOOP_MS, abs=1e-6), regime
        assert fits[regime].slope_ms == pytest.approx(slope, abs=1e-6), regime
        assert fits[regime].rms_ms == pytest.approx(0, abs=1e-6), regime
    errors = fit_cost.preset_error(steps, model)
    assert {r: round(mean, 6) for r, (mean, _) in errors.items()} == {r: -LOOP_MS for r in expect}
    fields = fit_cost.preset_fields(fits, model.fused_max_tokens)
    refit = model.with_overrides({k: v - LOOP_MS if k.endswith("base_ms") else v for k, v in fields.items()})
    assert refit == model


def test_an_idle_gap_would_skew_the_fit_if_kept(tmp_path, monkeypatch):
    """The idle filter is what keeps the fit exact above (a 500 ms gap on a decode step)."""
    _synthetic_log(tmp_path / "a.jsonl", CostModel.smollm2_cpu(), idle_after=5)
    monkeypatch.setattr(fit_cost, "MAX_LOOP_MS", 1e9)
    assert fit_cost.fit(fit_cost.read_steps([tmp_path]))["decode"].rms_ms > 50


def test_decode_steps_by_batch_size_show_medians(tmp_path):
    model = CostModel.smollm2_cpu()
    _synthetic_log(tmp_path / "a.jsonl", model)
    rows = fit_cost.decode_by_batch(fit_cost.read_steps([tmp_path]))
    assert [n for n, *_ in rows] == list(range(1, 9))
    n, k, gap, step = rows[2]
    assert (k, gap, step) == (3, pytest.approx(model.iteration_ms([], [1] * 3) + LOOP_MS),
                              pytest.approx(model.iteration_ms([], [1] * 3)))


def test_the_command_prints_the_fits_and_writes_the_preset_fields(tmp_path, capsys):
    _synthetic_log(tmp_path / "a.jsonl", CostModel.smollm2_cpu())
    fit_cost.main([str(tmp_path), "--json", str(tmp_path / "fit.json")])
    out = capsys.readouterr().out
    assert "| decode | 24 |" in out and "| fused | 15 |" in out and "| prefill | 5 |" in out
    fields = json.loads((tmp_path / "fit.json").read_text())
    assert fields["decode_ms_per_seq"] == pytest.approx(1.87) and fields["fused_max_tokens"] == 64
    with pytest.raises(SystemExit) as e:
        fit_cost.main([str(tmp_path / "nowhere")])
    assert e.value.code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no steps"):
        fit_cost.main([str(tmp_path / "empty")])
