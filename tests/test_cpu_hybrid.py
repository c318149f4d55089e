"""cpu-hybrid: the live scenario's configuration, and its virtual replica end to end."""
import json

import pytest
import torch

from scheduler_svc.bench import cpu_hybrid as ch
from scheduler_svc.config import SchedulerConfig
from worker_svc.config import MB, WorkerConfig
from worker_svc.kv_cache import kv_bytes_per_slot, num_blocks_for_budget
from worker_svc.model.config import ModelConfig
from worker_svc.sim.cost_model import CostModel
from test_bench_virtual import needs_traces


def test_the_replica_pool_is_the_live_workers(model_dir):
    """The virtual pool holds as many blocks as the torch worker carves from
    --kv-cache-mb for the default model in fp32."""
    cfg = ModelConfig.from_hf_dir(str(model_dir))
    per_slot = kv_bytes_per_slot(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    assert per_slot == ch.SMOLLM2_KV_BYTES_PER_SLOT
    assert ch.VIRTUAL.num_blocks == num_blocks_for_budget(ch.KV_CACHE_MB * MB, WorkerConfig().block_size, per_slot)


def test_the_live_scheduler_gets_the_replicas_planner():
    """Both modes plan with the same knobs: the live scheduler's flags give PLANNER."""
    args = ["--max-num-seqs", str(ch.PLANNER.max_num_seqs),
            "--max-num-batched-tokens", str(ch.PLANNER.max_num_batched_tokens), *ch.SCHEDULER_ARGS]
    cfg = SchedulerConfig.from_args(args)
    assert cfg.planner_config() == ch.PLANNER
    assert cfg.rt_infeasible == "flag"
    assert ch.PLANNER.bros_admit_headroom_tokens == 64 // ch.LENGTH_SCALE


def test_the_replica_takes_the_preset_fitted_on_this_kind_of_cpu(monkeypatch):
    monkeypatch.setattr(ch, "isa_flags", lambda: ["-mavx512f", "-mavx2"])
    assert ch.replica_preset() == "smollm2_cpu"
    monkeypatch.setattr(ch, "isa_flags", lambda: ["-mavx2", "-mfma"])
    assert ch.replica_preset() == "smollm2_cpu_avx2"
    monkeypatch.setattr(ch, "isa_flags", lambda: [])
    assert ch.replica_preset() == "smollm2_cpu_avx2"


def test_smollm2_cpu_avx2_costs():
    """Decodes up to 4 sequences (the GGUF's blocks, int16 activations) on one line, 5 or
    more on another."""
    cost = CostModel.smollm2_cpu_avx2()
    assert cost.iteration_ms([], [100] * 4) == pytest.approx(11.7 + 4.05 * 4)
    assert cost.iteration_ms([], [100] * 5) == pytest.approx(25.7 + 2.66 * 5)
    assert cost.iteration_ms([60], [50, 60]) == pytest.approx(18.8 + 1.94 * 60 + 4.05 * 2)
    assert cost.iteration_ms([200], [50] * 6) == pytest.approx(61.1 + 2.14 * 200 + 2.66 * 6)


def test_smollm2_cpu_costs():
    cost = CostModel.smollm2_cpu()
    assert cost.iteration_ms([], [100]) == pytest.approx(18.7 + 1.87)           # decode-only: the C++ stack
    assert cost.iteration_ms([], [100] * 8) == pytest.approx(18.7 + 1.87 * 8)
    assert cost.iteration_ms([60], [50, 60]) == pytest.approx(26.0 + 0.98 * 60 + 1.87 * 2)   # 62 tokens: C++
    assert cost.iteration_ms([100], []) == pytest.approx(24.8 + 1.48 * 100)     # larger: the eager model
    assert cost.iteration_ms([100], [50, 60]) == pytest.approx(24.8 + 1.48 * 100 + 1.87 * 2)
    # Per prompt token a full fused step is the cheaper one, which bros_fused_steps uses.
    assert cost.iteration_ms([64], []) / 64 < cost.iteration_ms([256], []) / 256


@needs_traces
def test_bros_keeps_the_replicas_steps_within_the_fused_path():
    """The replica's worker reports its fused size (64) through the virtual driver, and
    once bros has measured both prompt regimes (four small prompt steps take it ~250
    plans here, since uncapped BE prompts mostly run whole) it caps every step there;
    without bros_fused_steps whole BE prompts keep making larger steps."""
    from dataclasses import replace
    from scheduler_svc.bench import virtual
    from scheduler_svc.planner import make_policy
    reqs = ch.build(30.0, 0, 1e9, 1e9, ch.BE_RATE)
    sizes = {}
    for on in (True, False):
        result = virtual.run(reqs, make_policy("bros"), replace(ch.PLANNER, bros_fused_steps=on), ch.VIRTUAL)
        sizes[on] = [it.num_tokens for it in result.iterations if it.batch_size]
    assert max(sizes[True][:300]) > 64 >= max(sizes[True][300:])   # capped once both were seen
    assert sum(n > 64 for n in sizes[False][300:]) > 10


@needs_traces
def test_virtual_replica_serves_every_request_and_writes_the_result(tmp_path):
    result = ch.run_cpu_hybrid(["bros", "priority"], duration_s=20, num_seeds=2, out=tmp_path, mode="virtual",
                               rt_rates=[ch.RT_RATE], sim_cost=ch.VIRTUAL.sim_cost)   # the same on any CPU
    saved = json.loads((tmp_path / "cpu-hybrid-virtual.json").read_text())
    assert saved["scenario"] == "cpu-hybrid-virtual" and saved["mode"] == "virtual"
    assert saved["seeds"] == [0, 1]
    alone = saved["rt_alone"]
    # Targets from the RT-only run, as live; on this cost model RT alone decodes at ~18.7 + 1.87 ms.
    assert saved["targets_ms"]["tpot"] == pytest.approx(ch.TARGET_FACTOR * alone["rt_tpot_p50_ms"])
    assert 20 < alone["rt_tpot_p50_ms"] < 40
    (point,) = saved["points"]
    for name in ("bros", "priority"):
        runs = point["policies"][name]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert r["rt_unfinished"] == 0 and r["be_unfinished"] == 0
            assert r["num_rt"] > 0 and r["num_be"] > 0
            # In virtual time the steps are seen: counted, not left at "not measured".
            assert isinstance(r["preemptions"], int) and r["mean_batch_size"] >= 1
        for key in ("rt_ttft_p50_ms", "rt_ttft_p99_ms", "rt_tpot_p50_ms", "rt_tpot_p99_ms", "rt_attain_ttft",
                    "rt_attain_tpot", "rt_attain_both", "rt_norm_latency_ms", "be_req_s", "be_tok_s",
                    "total_tok_s", "preemptions", "mean_batch_size"):
            assert key in point["policies"][name], key
    assert result["points"][0]["policies"]["bros"]["num_rt"] == point["policies"]["bros"]["num_rt"]
    # The run states the load it measured under: BE alone, the first seed's stream.
    assert saved["config"]["be_rate"] == point["be_rate"] == ch.BE_RATE
    assert 0 < saved["be_alone"]["busy_fraction"] <= 1 and saved["be_alone"]["be_unfinished"] == 0
    # Each seed's RT requests alone, against the same targets: the ceiling on attainment.
    alone_runs = point["rt_alone"]["runs"]
    assert [r["seed"] for r in alone_runs] == [0, 1]
    for a, b in zip(alone_runs, point["policies"]["bros"]["runs"]):
        assert a["num_rt"] == b["num_rt"] and a["num_be"] == 0 and a["rt_unfinished"] == 0
    assert point["rt_alone"]["rt_attain_both"] == pytest.approx(sum(r["rt_attain_both"] for r in alone_runs) / 2)
    # Against ~2x its own p50 the first seed's RT alone misses some (the targets are real).
    assert alone_runs[0]["rt_attain_both"] < 1
    # That seed's is the targets' own run judged again, as if served against them.
    t = saved["targets_ms"]
    served, _ = ch.serve([r for r in ch.build(20, 0, t["ttft"], t["tpot"]) if r.service_class == ch.RT],
                         "fcfs", "virtual")
    for key in ("rt_attain_ttft", "rt_attain_tpot", "rt_attain_both", "rt_norm_latency_ms", "num_rt"):
        assert alone_runs[0][key] == pytest.approx(getattr(served, key)), key


@needs_traces
def test_targets_from_p99_are_the_rt_only_runs_p99(tmp_path):
    from scheduler_svc.bench.__main__ import main
    main(["--scenario", "cpu-hybrid-virtual", "--sim-cost", ch.VIRTUAL.sim_cost,
          "--policies", "fcfs", "--duration-s", "20", "--num-seeds", "1",
          "--rt-rates", str(ch.RT_RATE), "--targets-from", "p99", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "cpu-hybrid-virtual.json").read_text())
    alone, t = saved["rt_alone"], saved["targets_ms"]
    assert saved["config"]["targets_from"] == "p99"
    assert saved["config"]["sim_cost"] == ch.VIRTUAL.sim_cost   # --sim-cost reaches the replica
    assert (t["ttft"], t["tpot"]) == (pytest.approx(alone["rt_ttft_p99_ms"]), pytest.approx(alone["rt_tpot_p99_ms"]))
    assert t["ttft"] > ch.TARGET_FACTOR * alone["rt_ttft_p50_ms"]   # looser than the default here
    with pytest.raises(SystemExit, match="--targets-from"):
        main(["--scenario", "sim-paper", "--targets-from", "p99"])


@needs_traces
def test_an_rt_rate_sweep_judges_every_rate_against_the_same_targets(tmp_path):
    """--rt-rates: a point per rate, each with its own RT-alone runs, all against the
    targets measured at RT_RATE; the targets' own run is reused only at that rate; more
    RT load, more RT requests; the attainment-against-rate plot is written."""
    from scheduler_svc.bench.__main__ import main
    main(["--scenario", "cpu-hybrid-virtual", "--sim-cost", ch.VIRTUAL.sim_cost,
          "--policies", "fcfs,bros", "--duration-s", "20",
          "--num-seeds", "1", "--rt-rates", f"0.25,{ch.RT_RATE},1.5,0.25", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "cpu-hybrid-virtual.json").read_text())
    assert [pt["rt_rate"] for pt in saved["points"]] == [0.25, ch.RT_RATE, 1.5]   # a repeated rate served once
    assert saved["config"]["rt_rates"] == [0.25, ch.RT_RATE, 1.5] and saved["config"]["targets_rt_rate"] == ch.RT_RATE
    t = saved["targets_ms"]
    assert t["ttft"] == pytest.approx(ch.TARGET_FACTOR * saved["rt_alone"]["rt_ttft_p50_ms"])
    num_rt = [pt["rt_alone"]["num_rt"] for pt in saved["points"]]
    assert num_rt[0] < num_rt[1] < num_rt[2]
    for pt in saved["points"]:
        assert pt["policies"]["fcfs"]["num_rt"] == pt["rt_alone"]["num_rt"]
        # Each rate's RT alone is that rate's RT requests served against the one set of targets.
        reqs = ch.build(20, 0, t["ttft"], t["tpot"], rt_rate=pt["rt_rate"])
        served, _ = ch.serve([r for r in reqs if r.service_class == ch.RT], "fcfs", "virtual")
        assert pt["rt_alone"]["rt_attain_both"] == pytest.approx(served.rt_attain_both)
    # The heavier RT load is the harder one for RT served alone, against fixed targets.
    assert saved["points"][2]["rt_alone"]["rt_norm_latency_ms"] > saved["points"][0]["rt_alone"]["rt_norm_latency_ms"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "cpu-hybrid-virtual-vs-rate.png").stat().st_size > 0
    assert (tmp_path / "cpu-hybrid-virtual-ttft-cdf.png").stat().st_size > 0


@needs_traces
def test_a_higher_be_rate_keeps_the_replica_busier(tmp_path):
    """--be-rate reaches the workload, and the BE-alone measurement follows it."""
    from scheduler_svc.bench.__main__ import main
    busy = {}
    for rate in (0.5, 3.0):
        out = tmp_path / str(rate)
        main(["--scenario", "cpu-hybrid-virtual", "--sim-cost", ch.VIRTUAL.sim_cost,
              "--policies", "fcfs", "--duration-s", "20",
              "--num-seeds", "1", "--be-rate", str(rate), "--rt-rates", str(ch.RT_RATE), "--out", str(out)])
        saved = json.loads((out / "cpu-hybrid-virtual.json").read_text())
        assert saved["config"]["be_rate"] == rate
        busy[rate] = saved["be_alone"]["busy_fraction"]
        # ~rate x 20 s of BE requests (Poisson arrivals; the replica raises if any is left unserved)
        assert 0.4 * rate * 20 < saved["points"][0]["policies"]["fcfs"]["num_be"] < 2 * rate * 20
    assert busy[0.5] < 0.5 < busy[3.0]


@pytest.mark.parametrize("flag, value, bad", [("--be-rate", "2", "0"), ("--rt-rates", "0.5", "0.5,-1")])
def test_cpu_hybrid_flags_are_refused_elsewhere_and_when_not_positive(capsys, flag, value, bad):
    from scheduler_svc.bench.__main__ import main
    with pytest.raises(SystemExit, match=f"{flag}: only for --scenario cpu-hybrid"):
        main(["--scenario", "sim-paper", flag, value])
    with pytest.raises(SystemExit):
        main(["--scenario", "cpu-hybrid-virtual", flag, bad])
    assert f"{flag}: must be > 0" in capsys.readouterr().err


@needs_traces
def test_the_slack_reserve_keeps_rt_on_time_for_the_same_be():
    """bros_slack_reserve_steps on the replica (4 seeds, the scenario's targets at
    ~2x the RT-alone p50): with a full 64-token step ~90 ms against a 41 ms TPOT target,
    BE spending RT's slack to the deadline leaves RT late on the next step it cannot
    refuse; keeping that step's overrun in reserve puts more RT requests on time, and BE
    finishes as soon (docs/benchmarks.md, "The slack reserve")."""
    from dataclasses import replace
    from scheduler_svc.bench import virtual
    from scheduler_svc.bench.metrics import compute
    from scheduler_svc.planner import make_policy
    both, be = {}, {}
    for steps in (0.0, 1.0):
        runs = []
        for seed in range(4):
            result = virtual.run(ch.build(90.0, seed, 273.0, 41.0), make_policy("bros"),
                                 replace(ch.PLANNER, bros_slack_reserve_steps=steps), ch.VIRTUAL)
            runs.append(compute(result.requests, result.iterations))
        both[steps] = sum(m.rt_attain_both for m in runs) / len(runs)
        be[steps] = sum(m.be_tok_s for m in runs) / len(runs)
    assert both[1.0] > both[0.0] + 0.03
    assert be[1.0] > 0.995 * be[0.0]
