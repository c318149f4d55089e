"""`make bench-worker`: our engine against transformers' generate, same weights, one run.

Decode throughput at batch 1 and 32 over 128-token prompts, prefill throughput, and the
batch-1 step time against the memory-bandwidth floor (weight bytes / read bandwidth).
Prints a table and writes bench/out/worker.json. A benchmark, not a test: it asserts
nothing; docs/performance.md records what it printed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from .block_allocator import SeqClass
from .build import build_engine
from .config import WorkerConfig
from .plan import NewSeq, Plan
from .sampler import SamplingConfig

CONTEXT = 128
DECODE_STEPS = 32
PREFILL_LEN = 512


def read_bandwidth_gbs(num_bytes: int = 1 << 30, repeats: int = 7) -> float:
    """Best streaming-read rate over a 1 GiB buffer (well past the last-level cache), on
    all threads: what a batch-1 decode must do with every weight, every step."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(repeats))
    return num_bytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _prompt(i: int, n: int, vocab: int) -> list[int]:
    return [(1000 + 7 * i + 13 * j) % vocab for j in range(n)]


def ours_decode(engine, batch: int) -> tuple[float, float]:
    """tokens/s and median step ms for DECODE_STEPS decode steps at this batch size."""
    greedy = SamplingConfig(max_tokens=DECODE_STEPS + 8, temperature=0.0, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    vocab = engine.runner.vocab_size
    engine.step(Plan(new_sequences=[NewSeq(s, SeqClass.RT, _prompt(i, CONTEXT, vocab), greedy)
                                    for i, s in enumerate(ids)]))
    for chunk in range(0, batch, 8):  # prefill within the step token budget
        engine.step(Plan(scheduled=[(s, CONTEXT) for s in ids[chunk:chunk + 8]]))
    for _ in range(2):
        engine.step(Plan(scheduled=[(s, 1) for s in ids]))
    steps = []
    for _ in range(DECODE_STEPS):
        t0 = time.perf_counter()
        engine.step(Plan(scheduled=[(s, 1) for s in ids]))
        steps.append(time.perf_counter() - t0)
    engine.step(Plan(free=ids))
    return batch * len(steps) / sum(steps), statistics.median(steps) * 1e3


def stacks_decode(engine, batch: int, steps: int) -> dict[str, float]:
    """Median step ms of the C++ and the TorchScript decode stacks, their steps interleaved
    (A B A B ...) over the same sequences in one process, so that a noisy neighbour slows
    both alike: on a shared machine the ratio is the number to read."""
    runner = engine.runner
    cpp = runner.cpu_decode
    if cpp is None or not cpp.handles(batch):
        return {}
    greedy = SamplingConfig(max_tokens=2 * steps + 8, temperature=0.0, ignore_eos=True)
    ids = [f"ab{batch}-{i}" for i in range(batch)]
    vocab = runner.vocab_size
    engine.step(Plan(new_sequences=[NewSeq(s, SeqClass.RT, _prompt(i, CONTEXT, vocab), greedy)
                                    for i, s in enumerate(ids)]))
    for chunk in range(0, batch, 8):
        engine.step(Plan(scheduled=[(s, CONTEXT) for s in ids[chunk:chunk + 8]]))
    times: dict[str, list[float]] = {"cpp": [], "script": []}
    try:
        for i in range(steps + 2):
            for name, stack in (("cpp", cpp), ("script", None)):
                runner.cpu_decode = stack
                t0 = time.perf_counter()
                engine.step(Plan(scheduled=[(s, 1) for s in ids]))
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
    finally:
        runner.cpu_decode = cpp
    engine.step(Plan(free=ids))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def ours_prefill(engine, repeats: int = 3) -> float:
    greedy = SamplingConfig(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for r in range(repeats + 1):
        s = f"p{r}"
        t0 = time.perf_counter()
        engine.step(Plan(new_sequences=[NewSeq(s, SeqClass.BE, _prompt(r, PREFILL_LEN, engine.runner.vocab_size),
                                               greedy)], scheduled=[(s, PREFILL_LEN)]))
        times.append(time.perf_counter() - t0)
        engine.step(Plan(free=[s]))
    return PREFILL_LEN / statistics.median(times[1:])


def hf_decode(model, batch: int, vocab: int) -> float:
    ids = torch.tensor([_prompt(i, CONTEXT, vocab) for i in range(batch)])
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=2)
            return time.perf_counter() - t0

    gen(2)
    # Decode time = generate(1 + N) - generate(1): the prefill and first token cancel out.
    t_full = statistics.median(gen(DECODE_STEPS + 1) for _ in range(2))
    t_first = statistics.median(gen(1) for _ in range(3))
    return batch * DECODE_STEPS / (t_full - t_first)


def hf_prefill(model, vocab: int, repeats: int = 3) -> float:
    ids = torch.tensor([_prompt(0, PREFILL_LEN, vocab)])
    with torch.inference_mode():
        model(ids)
        times = [_timed(lambda: model(ids, logits_to_keep=1)) for _ in range(repeats)]
    return PREFILL_LEN / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench/out/worker.json")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpu-weights", default="auto", choices=("auto", "float32"),
                   help="what the C++ stack streams: the GGUF's blocks where it can (auto), or fp32")
    p.add_argument("--cpu-activations", default="int16", choices=("int16", "float32"),
                   help="how small steps multiply the blocks: int16 activations, or fp32 (exact)")
    p.add_argument("--skip-hf", action="store_true", help="only measure our engine")
    p.add_argument("--compare-stacks", type=int, default=0, metavar="STEPS",
                   help="also interleave STEPS decode steps of the C++ and TorchScript stacks (batch 1 and 32)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    engine = build_engine(WorkerConfig(backend="torch", dtype=args.dtype, kv_cache_mb=512, warmup=False,
                                       max_num_seqs=64, max_num_batched_tokens=2048, cpu_weights=args.cpu_weights,
                                       cpu_activations=args.cpu_activations))
    runner = engine.runner
    # What a batch-1 step must read: the C++ stack's weights (blocks where it reads them).
    weight_bytes = (runner.cpu_decode.weight_bytes if runner.cpu_decode is not None else
                    sum(t.numel() * t.element_size() for t in runner.model.state_dict().values()))
    bw = read_bandwidth_gbs()
    res: dict[str, float | str] = {
        "dtype": args.dtype, "cpu_weights": args.cpu_weights, "cpu_activations": args.cpu_activations,
        "int16_activations": bool(runner.cpu_decode is not None and runner.cpu_decode.int16_activations),
        "block_matrices": runner.cpu_decode.num_block_matrices if runner.cpu_decode is not None else 0,
        "threads": torch.get_num_threads(), "context": CONTEXT,
        "decode_steps": DECODE_STEPS, "prefill_len": PREFILL_LEN, "machine": platform.processor() or platform.machine(),
        "weight_bytes": weight_bytes, "read_bandwidth_gb_s": round(bw, 2),
        "bandwidth_floor_ms_b1": weight_bytes / (bw * 1e9) * 1e3,
    }
    ours_decode(engine, 1)  # warm every path once
    res["ours_decode_tok_s_b1"], res["ours_step_ms_b1"] = ours_decode(engine, 1)
    res["decode_stack_b1"] = runner.last_forward
    res["ours_decode_tok_s_b32"], res["ours_step_ms_b32"] = ours_decode(engine, 32)
    res["decode_stack_b32"] = runner.last_forward
    for batch in (1, 32) if args.compare_stacks else ():
        for name, ms in stacks_decode(engine, batch, args.compare_stacks).items():
            res[f"{name}_step_ms_b{batch}"] = ms
    res["ours_prefill_tok_s"] = ours_prefill(engine)
    engine.check_integrity()
    if not args.skip_hf:
        from transformers import LlamaForCausalLM

        from .model.checkpoint import resolve_model
        hf = LlamaForCausalLM.from_pretrained(str(resolve_model(None)), dtype=getattr(torch, args.dtype)).eval()
        res["hf_decode_tok_s_b1"] = hf_decode(hf, 1, runner.vocab_size)
        res["hf_decode_tok_s_b32"] = hf_decode(hf, 32, runner.vocab_size)
        res["hf_prefill_tok_s"] = hf_prefill(hf, runner.vocab_size)
        res["speedup_decode_b1"] = res["ours_decode_tok_s_b1"] / res["hf_decode_tok_s_b1"]
        res["speedup_decode_b32"] = res["ours_decode_tok_s_b32"] / res["hf_decode_tok_s_b32"]
    res["step_over_floor_b1"] = res["ours_step_ms_b1"] / res["bandwidth_floor_ms_b1"]
    print_table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}, indent=2))
    print(f"wrote {out}")


def print_table(r: dict) -> None:
    def row(name, ours, hf, unit):
        o, h = r.get(ours), r.get(hf)
        ratio = f"{o / h:5.2f}x" if o and h else "   - "
        print(f"| {name:<24} | {o:>10.1f} | {h if h is not None else float('nan'):>12.1f} | {ratio} | {unit}")
    weights = f"{r['block_matrices']} matrices as GGUF blocks" if r["block_matrices"] else "fp32 matrices"
    print(f"\nSmolLM2-135M-Instruct, {r['dtype']} ({weights}), {r['threads']} threads, "
          f"{r['context']}-token prompts\n")
    print(f"| {'metric':<24} | {'bros':>10} | {'transformers':>12} | ratio  | unit")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 14}|--------|------")
    row("decode, batch 1", "ours_decode_tok_s_b1", "hf_decode_tok_s_b1", "tok/s")
    row("decode, batch 32", "ours_decode_tok_s_b32", "hf_decode_tok_s_b32", "tok/s")
    row(f"prefill, {r['prefill_len']} tokens", "ours_prefill_tok_s", "hf_prefill_tok_s", "tok/s")
    print(f"\nbatch-1 step {r['ours_step_ms_b1']:.1f} ms; bandwidth floor {r['bandwidth_floor_ms_b1']:.1f} ms "
          f"({r['weight_bytes'] / 1e6:.0f} MB at {r['read_bandwidth_gb_s']:.1f} GB/s read) "
          f"-> {r['step_over_floor_b1']:.2f}x the floor")
    print(f"decode stacks: batch 1 {r['decode_stack_b1']}, batch 32 {r['decode_stack_b32']}")
    for batch in (1, 32):
        cpp, script = r.get(f"cpp_step_ms_b{batch}"), r.get(f"script_step_ms_b{batch}")
        if cpp and script:
            print(f"interleaved, batch {batch}: C++ {cpp:.1f} ms, TorchScript {script:.1f} ms per step "
                  f"-> {script / cpp:.2f}x")


if __name__ == "__main__":
    main()
