import time

import pytest
from hypothesis import given, strategies as st

from worker_svc.sim.clock import Clock, RealClock, VirtualClock
from worker_svc.sim.cost_model import PRESETS, CostModel

TP1 = CostModel.opt13b_a100()


# --- PAPER.md check values ----------------------------------------------------------

def test_512_token_prefill_is_about_72_ms():
    assert TP1.iteration_ms([512], []) == pytest.approx(72.0, rel=0.02)


def test_decode_of_32_requests_at_1000_context_is_about_41_ms():
    assert TP1.iteration_ms([], [1000] * 32) == pytest.approx(41.0, rel=0.02)


def test_empty_iteration_costs_nothing():
    assert TP1.iteration_ms([], []) == 0.0


def test_prefill_formula():
    assert TP1.iteration_ms([100, 300], []) == pytest.approx(18.10 + 0.1019 * 400 + 7.12e-6 * (100**2 + 300**2))


# --- decode regimes -----------------------------------------------------------------

def test_decode_regime_switches_at_95_requests():
    small = TP1.iteration_ms([], [500] * 94)
    large = TP1.iteration_ms([], [500] * 95)
    assert small == pytest.approx(19.93 + 6.27e-4 * 500 * 94 + 0.0385 * 94)
    assert large == pytest.approx(7.17 + 5.80e-4 * 500 * 95 + 0.158 * 95)


def test_threshold_is_configurable():
    model = CostModel.from_dict({"large_batch_threshold": "10"})
    assert model.iteration_ms([], [500] * 10) == pytest.approx(7.17 + 5.80e-4 * 5000 + 0.158 * 10)


# --- mixed iterations ---------------------------------------------------------------

def test_mixed_iteration_pays_the_larger_constant_once():
    prefill = TP1.iteration_ms([512], [])
    decode = TP1.iteration_ms([], [1000] * 32)
    # TP1's decode constant (19.93) is the larger, so the prefill constant is dropped.
    assert TP1.iteration_ms([512], [1000] * 32) == pytest.approx(prefill + decode - TP1.prefill_base_ms)


def test_mixed_iteration_with_a_large_decode_batch_keeps_the_prefill_constant():
    prefill = TP1.iteration_ms([64], [])
    decode = TP1.iteration_ms([], [100] * 128)       # large-batch constant 7.17 < 18.10
    assert TP1.iteration_ms([64], [100] * 128) == pytest.approx(prefill + decode - TP1.large_decode_base_ms)


lengths = st.lists(st.integers(0, 4096), max_size=200)


@given(chunks=lengths, contexts=lengths)
def test_mixed_is_no_cheaper_than_either_half_and_no_dearer_than_both(chunks, contexts):
    mixed = TP1.iteration_ms(chunks, contexts)
    prefill, decode = TP1.iteration_ms(chunks, []), TP1.iteration_ms([], contexts)
    assert max(prefill, decode) <= mixed + 1e-9
    assert mixed <= prefill + decode + 1e-9


# --- chunked prefill ----------------------------------------------------------------

@given(chunks=st.lists(st.integers(1, 1024), min_size=1, max_size=8))
def test_chunks_of_one_prompt_cost_the_unchunked_prompt_plus_a_constant_each(chunks):
    computed = [sum(chunks[:i]) for i in range(len(chunks))]
    chunked = sum(TP1.iteration_ms([l], [], [c]) for l, c in zip(chunks, computed))
    whole = TP1.iteration_ms([sum(chunks)], [])
    assert chunked == pytest.approx(whole + (len(chunks) - 1) * TP1.prefill_base_ms)


def test_a_fused_path_charges_small_mixed_iterations_the_decode_formula_plus_prompt_tokens():
    cost = CostModel(decode_base_ms=20.0, decode_ms_per_context_token=0.0, decode_ms_per_seq=2.0,
                     prefill_base_ms=30.0, prefill_ms_per_token=1.5, prefill_ms_per_token_sq=0.0,
                     fused_max_tokens=64, fused_base_ms=23.0, fused_ms_per_prompt_token=1.0)
    assert cost.iteration_ms([8], [100] * 4) == pytest.approx(23 + 2 * 4 + 8)      # 12 tokens: fused
    assert cost.iteration_ms([60], [100] * 4) == pytest.approx(23 + 2 * 4 + 60)    # 64: fused
    assert cost.iteration_ms([61], [100] * 4) == pytest.approx(30 + 1.5 * 61 + 2 * 4)  # 65: not
    assert cost.iteration_ms([], [100] * 4) == pytest.approx(20 + 2 * 4)           # decodes alone as before
    assert cost.iteration_ms([64], []) == pytest.approx(23 + 64)
    assert CostModel.from_dict({"fused_max_tokens": "32"}).fused_max_tokens == 32


def test_computed_lens_must_match_chunks():
    with pytest.raises(ValueError, match="2 prefill chunks but 1 computed"):
        TP1.iteration_ms([10, 20], [], [0])


# --- presets and overrides ----------------------------------------------------------

def test_tensor_parallel_presets_carry_paper_coefficients():
    tp2, tp4 = CostModel.opt13b_a100_tp2(), CostModel.opt13b_a100_tp4()
    assert (tp2.prefill_base_ms, tp2.prefill_ms_per_token, tp2.prefill_ms_per_token_sq) == (14.74, 0.0686, 2.45e-6)
    assert (tp4.decode_base_ms, tp4.decode_ms_per_context_token, tp4.decode_ms_per_seq) == (10.26, 1.88e-4, 0.0327)
    # No large-batch fit is published for TP2/TP4: the small-batch fit carries on past 95.
    assert tp2.iteration_ms([], [800] * 200) == pytest.approx(13.29 + 3.41e-4 * 800 * 200 + 0.0630 * 200)


def test_presets_get_cheaper_with_more_gpus():
    costs = [PRESETS[name]().iteration_ms([2048], [1000] * 16)
             for name in ("opt13b_a100", "opt13b_a100_tp2", "opt13b_a100_tp4")]
    assert costs == sorted(costs, reverse=True)


def test_from_dict_overrides_any_field_from_strings():
    model = CostModel.from_dict({"preset": "opt13b_a100_tp4", "prefill_base_ms": "3.5", "decode_ms_per_seq": 0.2})
    assert model.prefill_base_ms == 3.5 and model.decode_ms_per_seq == 0.2
    assert model.decode_base_ms == 10.26
    assert CostModel.from_dict({}) == CostModel.opt13b_a100() == CostModel()
    assert CostModel.from_dict(TP1.to_dict()) == TP1


@pytest.mark.parametrize("d, message", [
    ({"prefil_base_ms": 1}, "unknown cost model key"),
    ({"preset": "h100"}, "unknown cost model preset"),
    ({"decode_base_ms": -1}, "decode_base_ms must be finite and >= 0"),
    ({"decode_base_ms": "nan"}, "decode_base_ms must be finite"),
    ({"large_batch_threshold": 0}, "large_batch_threshold must be >= 1"),
])
def test_bad_cost_settings_raise(d, message):
    with pytest.raises(ValueError, match=message):
        CostModel.from_dict(d)


# --- clocks -------------------------------------------------------------------------

def test_both_clocks_are_clocks():
    assert isinstance(RealClock(), Clock) and isinstance(VirtualClock(), Clock)


def test_virtual_clock_advances_without_sleeping():
    clock = VirtualClock(start_ms=5.0)
    started = time.monotonic()
    for _ in range(10_000):
        clock.sleep_ms(100.0)
    assert time.monotonic() - started < 1.0
    assert clock.now_ms() == pytest.approx(5.0 + 1_000_000.0)


def test_virtual_clock_ignores_non_positive_sleeps_and_rejects_infinite_ones():
    clock = VirtualClock()
    clock.sleep_ms(-3.0)
    clock.sleep_ms(0.0)
    assert clock.now_ms() == 0.0
    with pytest.raises(ValueError, match="finite"):
        clock.sleep_ms(float("inf"))


def test_real_clock_sleeps_for_real():
    clock = RealClock()
    started = time.monotonic()
    before = clock.now_ms()
    clock.sleep_ms(20.0)
    elapsed_ms = (time.monotonic() - started) * 1000.0
    assert 20.0 <= elapsed_ms < 60.0
    assert clock.now_ms() - before >= 20.0


def test_real_clock_returns_at_once_for_non_positive_sleeps():
    started = time.monotonic()
    RealClock().sleep_ms(-5.0)
    assert time.monotonic() - started < 0.01


def test_worker_refuses_an_unknown_preset_naming_the_field():
    from worker_svc.config import WorkerConfig
    with pytest.raises(ValueError, match=r"sim_cost must be one of .*smollm2_cpu.*got 'opt13b'"):
        WorkerConfig(backend="sim", sim_cost="opt13b")
    assert WorkerConfig(backend="sim", sim_cost="smollm2_cpu").sim_cost == "smollm2_cpu"


def test_every_preset_builds_a_sim_worker():
    from worker_svc.build import build_engine
    from worker_svc.config import WorkerConfig
    from worker_svc.sim.clock import VirtualClock
    for name in PRESETS:
        engine = build_engine(WorkerConfig(backend="sim", sim_cost=name, sim_clock="virtual", num_blocks=8,
                                           warmup=False), clock=VirtualClock())
        assert engine.runner.cost == PRESETS[name]()


# ---- host copies: checkpoints beside the forward pass, restores in line (SimRunner) ----

def _runner(overlap: bool):
    from worker_svc.sim.runner import SimModel, SimRunner
    # One slot copies in 1 ms; a decode step of any size costs 20 ms.
    model = SimModel(num_layers=4, hidden_size=8, dtype_bytes=2, host_copy_bytes_per_ms=2 * 4 * 8 * 2,
                     overlap_copies=overlap)
    cost = CostModel(decode_base_ms=20.0, decode_ms_per_context_token=0.0, decode_ms_per_seq=0.0)
    return SimRunner(VirtualClock(), cost, model)


def _decode_item():
    from types import SimpleNamespace
    seq = SimpleNamespace(prompt_token_ids=[3, 3], num_computed_tokens=2, num_tokens=2, seq_id="s",
                          sampling=SimpleNamespace(seed=1))
    return SimpleNamespace(seq=seq, num_new_tokens=1, start_position=2, samples=True)


def _copy(kind: str, handle: int, num_slots: int):
    from worker_svc.block_allocator import SlotCopy
    return SlotCopy(kind, handle, tuple(range(num_slots)))


def _step_ms(runner, copies) -> float:
    """Time from issuing the copies to the end of the step that follows them."""
    t0 = runner.clock.now_ms()
    assert runner.apply_copies(copies) == pytest.approx(float(sum(len(c.slots) for c in copies)))
    runner.execute([_decode_item()])
    return runner.clock.now_ms() - t0


def test_sim_kv_bytes_per_slot_is_opt13b_fp16_by_default():
    from worker_svc.sim.runner import SimModel
    assert SimModel().kv_bytes_per_slot == 2 * 40 * 5120 * 2 == 819_200


def test_a_checkpoint_does_not_delay_the_step():
    runner = _runner(overlap=True)
    assert _step_ms(runner, [_copy("to_host", 1, 30)]) == pytest.approx(20.0)


def test_a_restore_runs_in_line_before_the_step():
    runner = _runner(overlap=True)
    _step_ms(runner, [_copy("to_host", 1, 10)])     # lands 10 ms in, during the step
    assert _step_ms(runner, [_copy("from_host", 1, 10)]) == pytest.approx(10.0 + 20.0)


def test_a_restore_waits_for_its_checkpoint_to_land():
    runner = _runner(overlap=True)
    # Two checkpoints queue on the copy stream (30 ms, then 30 more); restoring the second
    # at once waits 60 ms for it, copies it back in 30, then steps.
    steps = [_copy("to_host", 1, 30), _copy("to_host", 2, 30), _copy("from_host", 2, 30)]
    assert _step_ms(runner, steps) == pytest.approx(60.0 + 30.0 + 20.0)


def test_a_dropped_checkpoint_is_forgotten():
    runner = _runner(overlap=True)
    runner.apply_copies([_copy("to_host", 7, 5), _copy("drop_host", 7, 0)])
    assert runner._host_ready_ms == {}


def test_without_overlap_every_copy_runs_before_the_step():
    runner = _runner(overlap=False)
    assert _step_ms(runner, [_copy("to_host", 1, 10)]) == pytest.approx(30.0)
    assert _step_ms(runner, [_copy("from_host", 1, 10)]) == pytest.approx(30.0)


def test_worker_config_turns_overlap_off():
    from worker_svc.build import build_engine
    from worker_svc.config import WorkerConfig
    on = build_engine(WorkerConfig(backend="sim", sim_clock="virtual", num_blocks=8, warmup=False),
                      clock=VirtualClock())
    off = build_engine(WorkerConfig(backend="sim", sim_clock="virtual", num_blocks=8, warmup=False,
                                    sim_overlap_copies=False, max_model_len=512), clock=VirtualClock())
    assert on.runner.sim.overlap_copies and not off.runner.sim.overlap_copies
    assert off.runner.max_model_len == 512
