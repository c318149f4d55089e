"""The engine on a tiny pool with the real model: RT shares a paused BE block, collides,
checkpoints the BE run to host, and the BE sequence resumes bit-identically."""
import pytest
import torch

from conftest import poison
from worker_svc.block_allocator import SeqClass
from worker_svc.engine import Engine, EngineLimits
from worker_svc.plan import NewSeq, Plan
from worker_svc.sampler import SamplingConfig

GREEDY = SamplingConfig(max_tokens=16, temperature=0.0, ignore_eos=True)


def tiny_engine(runner, num_blocks=4, host_slots=64):
    poison(runner.cache)
    return Engine(runner, EngineLimits(num_blocks=num_blocks, block_size=16, max_num_host_slots=host_slots,
                                       max_num_seqs=8, max_num_batched_tokens=256))


def run_be(engine, runner, prompt, num_decodes, interrupt=None):
    """Prefill and decode the BE sequence 'b', calling interrupt() after its first token;
    returns b's tokens and the logits of each of its steps."""
    runner.keep_logits = True
    logits, tokens = [], []
    try:
        r = engine.step(Plan(new_sequences=[NewSeq("b", SeqClass.BE, prompt, GREEDY)],
                             scheduled=[("b", len(prompt))]))
        tokens += r.outputs[0].token_ids
        logits.append(runner.last_logits[0].clone())
        if interrupt:
            interrupt()
        for _ in range(num_decodes):
            r = engine.step(Plan(scheduled=[("b", 1)]))
            assert not r.errors, r.errors
            tokens += r.outputs[0].token_ids
            logits.append(runner.last_logits[0].clone())
            engine.check_integrity()
    finally:
        runner.keep_logits = False
    return tokens, logits


@pytest.mark.model
def test_rt_collision_checkpoints_be_and_restore_is_bit_identical(torch_runner):
    prompt = torch_runner.tokenizer.encode("Best-effort work: summarise the following report in detail. " * 3)[:40]
    ref_tokens, ref_logits = run_be(tiny_engine(torch_runner), torch_runner, prompt, 4)

    engine = tiny_engine(torch_runner)
    seen = {}

    def rt_burst():
        # b holds blocks 0, 1 (16 each) and the right 9 slots of block 2 after its first
        # token; block 3 is free. Pause b; RT gets block 3, then the left of block 2.
        engine.step(Plan(preempt=["b"]))
        rt_prompt = torch_runner.tokenizer.encode("Real-time question: what is two plus two? " * 2)[:20]
        r = engine.step(Plan(new_sequences=[NewSeq("r", SeqClass.RT, rt_prompt, GREEDY)],
                             scheduled=[("r", 20)]))
        assert not r.errors
        alloc = engine.allocator
        assert alloc.slots("r") == list(range(48, 64)) + [32, 33, 34, 35]
        occ = r.occupancy
        assert (occ["shared_blocks"], occ["be_host_slots"], occ["free_blocks"]) == (1, 0, 0)
        # b's KV on block 2 is 8 slots (47 down to 40): r fills 36..39, then its fifth
        # decode needs slot 40 and the collision moves b's run to host.
        for _ in range(5):
            r = engine.step(Plan(scheduled=[("r", 1)]))
            assert not r.errors
        seen["occ"] = r.occupancy
        assert alloc.seqs["b"].num_host_tokens == 8
        engine.check_integrity()
        engine.step(Plan(free=["r"]))

    tokens, logits = run_be(engine, torch_runner, prompt, 4, interrupt=rt_burst)
    assert seen["occ"]["be_host_slots"] == 8 and seen["occ"]["shared_blocks"] == 0
    assert engine.allocator.num_evictions == 1
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.model
def test_host_full_recomputes_and_still_matches(torch_runner):
    prompt = torch_runner.tokenizer.encode("Another long best-effort prompt for the recompute fallback. " * 3)[:40]
    ref_tokens, _ = run_be(tiny_engine(torch_runner), torch_runner, prompt, 3)
    engine = tiny_engine(torch_runner, host_slots=0)
    recompute = {}

    def rt_burst():
        engine.step(Plan(preempt=["b"]))
        rt_prompt = torch_runner.tokenizer.encode("Quick question: " * 10)[:26]
        r = engine.step(Plan(new_sequences=[NewSeq("r", SeqClass.RT, rt_prompt, GREEDY)],
                             scheduled=[("r", 26)]))
        recompute["ids"] = r.recompute_needed
        engine.step(Plan(free=["r"]))
        # The scheduler re-prefills what was lost, then b decodes on.
        b = engine.seqs["b"]
        engine.step(Plan(scheduled=[("b", b.num_uncomputed_tokens - 1)]))

    tokens, _ = run_be(engine, torch_runner, prompt, 3, interrupt=rt_burst)
    assert recompute["ids"] == ["b"]
    assert tokens == ref_tokens
