"""The worker with its attention forced to the Triton kernels (run by Triton's interpreter
off-GPU) against transformers and against the torch path: same greedy tokens, same
logits. Short prompts and few tokens: the interpreter runs 30 layers of kernels a step."""
import pytest
import torch

from conftest import poison
from kernels.backend import TritonAttention
from worker_svc.block_allocator import SeqClass
from worker_svc.engine import Engine, EngineLimits
from worker_svc.plan import NewSeq, Plan
from worker_svc.sampler import SamplingConfig

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NUM_NEW = 4


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def generate(runner, prompts: list[list[int]]):
    """Greedy tokens and logits per prompt. An RT and a BE sequence; the BE prompt is
    prefilled in two chunks, the second beside the RT decode (a mixed step)."""
    engine = Engine(runner, EngineLimits(num_blocks=64, block_size=16, max_num_host_slots=0,
                                         max_num_seqs=8, max_num_batched_tokens=256))
    poison(runner.cache)
    greedy = SamplingConfig(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    rt, be = prompts
    plans = [Plan(new_sequences=[NewSeq("rt", SeqClass.RT, rt, greedy), NewSeq("be", SeqClass.BE, be, greedy)],
                  scheduled=[("rt", len(rt)), ("be", len(be) - 3)]),
             Plan(scheduled=[("rt", 1), ("be", 3)])]
    tokens, logits = {"rt": [], "be": []}, {"rt": [], "be": []}
    runner.keep_logits = True
    try:
        while min(len(t) for t in tokens.values()) < NUM_NEW:
            plan = plans.pop(0) if plans else Plan(scheduled=[(s, 1) for s in tokens if len(tokens[s]) < NUM_NEW])
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
    prompts = [torch_runner.tokenizer.encode(p) for p in PROMPTS]
    want_tokens, want_logits = generate(torch_runner, prompts)
    saved = torch_runner.attn, torch_runner.fast_decode
    torch_runner.set_attention(TritonAttention(torch_runner.cache, 16, torch_runner.cfg.num_heads))
    try:
        got_tokens, got_logits = generate(torch_runner, prompts)
    finally:
        torch_runner.attn, torch_runner.fast_decode = saved
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            hf = hf_model.generate(torch.tensor([ids]), max_new_tokens=NUM_NEW, do_sample=False,
                                   pad_token_id=2, eos_token_id=None)
        assert got_tokens[i] == hf[0, len(ids):].tolist() == want_tokens[i], f"prompt {i}"
        worst = max(rel_err(a, b) for a, b in zip(got_logits[i], want_logits[i]))
        assert worst < 1e-4, f"prompt {i}: logits differ from the torch path by {worst:.2e} relative"
