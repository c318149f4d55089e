"""The worker with its attention forced to the Triton kernels (run by Triton's interpreter
off-GPU) against transformers and against the torch path: same greedy tokens, same
logits. Short prompts and three steps: the interpreter runs 30 layers of kernels a step."""
import pytest
import torch

from conftest import poison
from kernels.backend import TritonAttention
from worker_svc.block_allocator import SeqClass
from worker_svc.engine import Engine, EngineLimits
from worker_svc.plan import NewSeq, Plan
from worker_svc.sampler import SamplingConfig

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def generate(runner, rt: list[int], be: list[int]):
    """Three greedy steps over an RT and a BE sequence: both prefill (BE only its first
    chunk), then the RT decode beside the BE's last chunk (a mixed step), then two
    decodes. Returns the tokens and logits of each (RT gets 3 tokens, BE 2)."""
    engine = Engine(runner, EngineLimits(num_blocks=64, block_size=16, max_num_host_slots=0,
                                         max_num_seqs=8, max_num_batched_tokens=256))
    poison(runner.cache)
    greedy = SamplingConfig(max_tokens=8, temperature=0.0, ignore_eos=True)
    plans = [Plan(new_sequences=[NewSeq("rt", SeqClass.RT, rt, greedy), NewSeq("be", SeqClass.BE, be, greedy)],
                  scheduled=[("rt", len(rt)), ("be", len(be) - 3)]),
             Plan(scheduled=[("rt", 1), ("be", 3)]),
             Plan(scheduled=[("rt", 1), ("be", 1)])]
    tokens, logits = {"rt": [], "be": []}, {"rt": [], "be": []}
    runner.keep_logits = True
    try:
        for plan in plans:
            report = engine.step(plan)
            assert not report.errors, report.errors
            engine.check_integrity()
            for row, out in enumerate(o for o in report.outputs if o.token_ids):
                tokens[out.seq_id] += out.token_ids
                logits[out.seq_id].append(runner.last_logits[row])
    finally:
        runner.keep_logits = False
    return [tokens["rt"], tokens["be"]], [logits["rt"], logits["be"]]


def test_triton_attention_matches_transformers_and_the_torch_path(torch_runner, hf_model):
    """The torch path runs its small steps on the C++ stack, here with fp32 activations
    (exact; the default int16 ones move the logits ~1e-4, test_model_parity.py), so that
    the two attention paths are compared on the same arithmetic elsewhere."""
    prompts = [torch_runner.tokenizer.encode(p) for p in PROMPTS]
    saved = torch_runner.attn, torch_runner.fast_decode, torch_runner.cpu_decode
    int16 = saved[2] is not None and saved[2].int16_activations
    if saved[2] is not None:
        saved[2].set_int16_activations(False)
    try:
        want_tokens, want_logits = generate(torch_runner, *prompts)
        torch_runner.set_attention(TritonAttention(torch_runner.cache, 16, torch_runner.cfg.num_heads))
        got_tokens, got_logits = generate(torch_runner, *prompts)
    finally:
        torch_runner.attn, torch_runner.fast_decode, torch_runner.cpu_decode = saved
        if saved[2] is not None:
            saved[2].set_int16_activations(int16)
    assert [len(t) for t in got_tokens] == [3, 2]
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            hf = hf_model.generate(torch.tensor([ids]), max_new_tokens=len(got_tokens[i]), do_sample=False,
                                   pad_token_id=2, eos_token_id=None)
        assert got_tokens[i] == hf[0, len(ids):].tolist() == want_tokens[i], f"prompt {i}"
        worst = max(rel_err(a, b) for a, b in zip(got_logits[i], want_logits[i]))
        assert worst < 1e-4, f"prompt {i}: logits differ from the torch path by {worst:.2e} relative"
