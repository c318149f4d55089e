"""The C++ decode stack (worker_svc/model/csrc/decode.cpp) equals the eager model.

Decode-only steps over random RT/BE placements from the real allocator (blocks shared by
an RT and a BE owner, paused BE sequences whose slots sit beside the running rows), on a
pool whose every unwritten slot is poisoned: reading one slot that is not the row's own
wrecks the result. A small model with odd sizes exercises every tile tail; the default
model runs the same check on its real shapes. tests/test_model_parity.py then runs its
batched decodes through this path (test_engine_picks_the_stack_by_batch says so).
"""
import random

import pytest
import torch

from conftest import POISON, poison
from worker_svc.attention import BatchSeq, TorchAttention, build_row_metadata
from worker_svc.block_allocator import BlockAllocator, SeqClass
from worker_svc.engine import Engine, EngineLimits
from worker_svc.kv_cache import KVCache
from worker_svc.model.config import ModelConfig
from worker_svc.model.cpu_decode import MAX_NUM_ROWS, CpuDecode, isa_flags, load_extension
from worker_svc.model.llama import LlamaModel
from worker_svc.plan import NewSeq, Plan
from worker_svc.sampler import SamplingConfig

# Sizes that are not multiples of the vector width (16) or of the 8-row tile: hidden 72,
# head_dim 14 (q|k|v = 140 rows), intermediate 102 (a tail tile of 2 gate + 2 up rows).
ODD = ModelConfig(name="odd", vocab_size=97, hidden_size=72, intermediate_size=102, num_layers=3, num_heads=6,
                  num_kv_heads=2, head_dim=14, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=128, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def ext():
    module = load_extension()
    assert module is not None, "the C++ decode stack did not build on this machine (see the warning)"
    return module


def random_model(cfg: ModelConfig, seed: int) -> LlamaModel:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.15):
        return torch.randn(*shape, generator=g) * scale

    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    state = {"model.embed_tokens.weight": w(cfg.vocab_size, cfg.hidden_size, scale=1.0),
             "model.norm.weight": 1 + w(cfg.hidden_size)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": 1 + w(cfg.hidden_size),
                  p + "post_attention_layernorm.weight": 1 + w(cfg.hidden_size),
                  p + "self_attn.q_proj.weight": w(q, cfg.hidden_size), p + "self_attn.k_proj.weight": w(kv, cfg.hidden_size),
                  p + "self_attn.v_proj.weight": w(kv, cfg.hidden_size), p + "self_attn.o_proj.weight": w(cfg.hidden_size, q),
                  p + "mlp.gate_proj.weight": w(cfg.intermediate_size, cfg.hidden_size),
                  p + "mlp.up_proj.weight": w(cfg.intermediate_size, cfg.hidden_size),
                  p + "mlp.down_proj.weight": w(cfg.hidden_size, cfg.intermediate_size)}
    return LlamaModel.from_state_dict(cfg, state)


def shared_block_step(B: int) -> tuple[BlockAllocator, list[str]]:
    """A step whose rows read a shared block from both ends, with a padded row:

        block 0: [ r1 r1 | b b ]   RT r1 opened here while BE b was paused (no free block)
        block 2: [ .. .. .. b ]    b's next token, after r2 freed the block
        block 4: [ r4 r4 r4 .. ]   r4 has one block, padded to two in the block table
    """
    alloc = BlockAllocator(5, B)
    for seq_id, cls, n in [("b", SeqClass.BE, B // 2), ("r1", SeqClass.RT, B), ("r2", SeqClass.RT, B),
                           ("r3", SeqClass.RT, B), ("r4", SeqClass.RT, B // 2)]:
        alloc.add_sequence(seq_id, cls)
        alloc.allocate(seq_id, n)
    alloc.pause("b")
    alloc.allocate("r1", 1)
    alloc.free("r2")
    alloc.resume("b")
    rows = ["r1", "b", "r4"]
    for seq_id in rows:
        alloc.allocate(seq_id, 1)
    assert alloc.rt_owner[0] == "r1" and alloc.be_owner[0] == "b"
    return alloc, rows


def random_pool(B: int, num_blocks: int, seed: int, max_rows: int) -> tuple[BlockAllocator, list[str], random.Random]:
    """Sequences of both classes and random lengths filling the pool, half the BE ones
    paused (their slots stay poisoned); up to max_rows others that can grow, and the rng."""
    rng = random.Random(seed)
    alloc = BlockAllocator(num_blocks, B)
    for i in range(4 * max_rows):
        seq_id = f"s{i}"
        alloc.add_sequence(seq_id, rng.choice([SeqClass.RT, SeqClass.BE]))
        n = rng.randint(1, 3 * B)
        if alloc.capacity(seq_id) <= n:
            alloc.free(seq_id)
            continue
        alloc.allocate(seq_id, n)
        if alloc.seqs[seq_id].seq_class == SeqClass.BE and rng.random() < 0.5:
            alloc.pause(seq_id)
    rows = [s for s, a in alloc.seqs.items() if not a.paused and alloc.capacity(s) > 0][:max_rows]
    return alloc, rows, rng


def random_step(B: int, num_blocks: int, seed: int, max_rows: int) -> tuple[BlockAllocator, list[str]]:
    """random_pool's rows decode one token each."""
    alloc, rows, _ = random_pool(B, num_blocks, seed, max_rows)
    for seq_id in rows:
        alloc.allocate(seq_id, 1)
    return alloc, rows


def random_mixed_step(B: int, num_blocks: int, seed: int, max_rows: int) -> tuple[BlockAllocator, dict[str, int]]:
    """random_pool's rows take 1 to 7 new tokens each (a decode, or a prompt chunk after
    earlier ones), at most max_rows in all: {seq: new tokens}."""
    alloc, rows, rng = random_pool(B, num_blocks, seed, max_rows)
    step: dict[str, int] = {}
    for seq_id in rows:
        n = min(rng.randint(1, 7), alloc.capacity(seq_id), max_rows - sum(step.values()))
        if n > 0:
            alloc.allocate(seq_id, n)
            step[seq_id] = n
    return alloc, step


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_step(ext, model: LlamaModel, cache: KVCache, alloc: BlockAllocator, rows: list[str], seed: int,
               tol: float) -> None:
    """One decode step through the eager model and through the C++ stack, from the same
    poisoned pool: the same hidden states, logits and K/V writes up to fp32 summation order
    (tol: relative to the largest value), and not one other pool value changed."""
    alloc.check_integrity()
    cfg, B = model.cfg, alloc.block_size
    poison(cache)
    g = torch.Generator().manual_seed(seed)
    for s in rows:  # the tokens before the new one have K/V in the pool, in every layer
        old = torch.tensor(alloc.slots(s)[:-1], dtype=torch.long)
        cache.k[:, old] = torch.randn(cfg.num_layers, len(old), cfg.num_kv_heads, cfg.head_dim, generator=g)
        cache.v[:, old] = torch.randn(cfg.num_layers, len(old), cfg.num_kv_heads, cfg.head_dim, generator=g)
    attn = TorchAttention(cache, B)
    meta = attn.build_metadata([BatchSeq(alloc.slots(s), 1, [(r.block_id, r.num_tokens) for r in alloc.seqs[s].runs],
                                         alloc.seqs[s].seq_class == SeqClass.BE) for s in rows])
    ids = torch.randint(cfg.vocab_size, (len(rows),), generator=g)
    positions = torch.tensor([len(alloc.slots(s)) - 1 for s in rows])
    before_k, before_v = cache.k.clone(), cache.v.clone()
    with torch.inference_mode():
        ref = model(ids, positions, attn, meta)
        ref_k, ref_v = cache.k.clone(), cache.v.clone()
        cache.k.copy_(before_k)
        cache.v.copy_(before_v)
        cpp = CpuDecode(ext, model, cache.k, cache.v, B)
        out = cpp.forward(ids, positions, meta)
        assert rel_err(out, ref) < tol
        assert rel_err(cpp.logits(out), model.compute_logits(ref)) < tol
    new = meta.slot_mapping
    for layer in range(cfg.num_layers):
        assert rel_err(cache.k[layer, new], ref_k[layer, new]) < tol, layer
        assert rel_err(cache.v[layer, new], ref_v[layer, new]) < tol, layer
    untouched = torch.ones(cache.k.shape[1], dtype=torch.bool)
    untouched[new] = False
    assert torch.equal(cache.k[:, untouched], before_k[:, untouched])
    assert torch.equal(cache.v[:, untouched], before_v[:, untouched])


def test_small_odd_model_matches_eager(ext):
    """Row counts on both sides of every tile shape: 1-2 and 3-4 rows per register tile,
    several groups of 4, and from kBcastRows rows the column layout (16 on AVX-512: one or
    two 16-row vectors, then a second pass; 5 on AVX2: 8-row vectors, 4 weight rows a pass)."""
    model = random_model(ODD, seed=1)
    cache = KVCache(ODD.num_layers, 160 * 4, ODD.num_kv_heads, ODD.head_dim, torch.float32)
    check_step(ext, model, cache, *shared_block_step(4), seed=0, tol=1e-5)
    num_rows = []
    for seed, max_rows in enumerate([1, 2, 3, 4, 5, 9, 15, 16, 17, 33, 48, MAX_NUM_ROWS]):
        alloc, rows = random_step(4, 160, seed, max_rows)
        num_rows.append(len(rows))
        check_step(ext, model, cache, alloc, rows, seed=seed, tol=1e-5)
    assert {1, 2, 3, 5, 15, 16, 17, 33} <= set(num_rows) and max(num_rows) > 48, num_rows


def test_default_model_matches_eager(ext, torch_runner):
    """30 layers of real weights amplify fp32 rounding: on these steps both fp32 paths sit
    up to ~1e-4 (relative) from a float64 run of the eager model, in either direction; the
    tolerance is the parity test's."""
    model, cache = torch_runner.model, torch_runner.cache
    check_step(ext, model, cache, *shared_block_step(16), seed=0, tol=1e-3)
    for seed, rows in [(1, 1), (2, 5), (3, MAX_NUM_ROWS)]:
        check_step(ext, model, cache, *random_step(16, 64, seed, max_rows=rows), seed=seed, tol=1e-3)


def test_prefill_steps_take_the_cpp_gemm_up_to_its_row_cap(ext, torch_runner):
    """Steps with prompt tokens run the eager model; its matmuls go through the C++ GEMM
    when the step holds at most linear_max_rows tokens, torch's above, with the same
    hidden states and K/V writes as torch's GEMM (a step of prefill chunks, one after
    earlier chunks, and decodes on a poisoned pool)."""
    assert torch_runner.model.linear is ext.linear_small   # the worker wires it in, capped by ISA
    assert torch_runner.model.linear_max_rows == (512 if ext.isa() == "avx512" else 32)
    model = random_model(ODD, seed=3)
    B = 4
    cache = KVCache(ODD.num_layers, 64 * B, ODD.num_kv_heads, ODD.head_dim, torch.float32)
    alloc = BlockAllocator(64, B)
    steps = [("d0", SeqClass.RT, 9, 1), ("d1", SeqClass.BE, 6, 1), ("p0", SeqClass.BE, 0, 11),
             ("p1", SeqClass.RT, 5, 7)]   # (seq, class, tokens already in the pool, new tokens)
    for seq_id, cls, old, new in steps:
        alloc.add_sequence(seq_id, cls)
        alloc.allocate(seq_id, old + new)
    seqs = [BatchSeq(alloc.slots(s), new, [(r.block_id, r.num_tokens) for r in alloc.seqs[s].runs],
                     cls == SeqClass.BE) for s, cls, _, new in steps]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(ODD.vocab_size, (sum(n for *_, n in steps),), generator=g)
    positions = torch.tensor([p for _, _, old, new in steps for p in range(old, old + new)])
    calls = []

    def counted(x, w):
        calls.append(x.shape[0])
        return ext.linear_small(x, w)

    poison(cache)
    for s, _, old, _ in steps:
        slots = torch.tensor(alloc.slots(s)[:old], dtype=torch.long)
        cache.k[:, slots] = torch.randn(ODD.num_layers, old, ODD.num_kv_heads, ODD.head_dim, generator=g)
        cache.v[:, slots] = torch.randn(ODD.num_layers, old, ODD.num_kv_heads, ODD.head_dim, generator=g)
    before = cache.k.clone(), cache.v.clone()
    outs = {}
    with torch.inference_mode():
        for name, max_rows in [("torch", 0), ("cpp", len(ids)), ("over the cap", len(ids) - 1)]:
            cache.k.copy_(before[0])
            cache.v.copy_(before[1])
            model.use_linear(counted, max_rows)
            attn = TorchAttention(cache, B)
            calls.clear()
            outs[name] = model(ids, positions, attn, attn.build_metadata(seqs)), cache.k.clone(), cache.v.clone()
            assert calls == ([len(ids)] * 4 * ODD.num_layers if name == "cpp" else []), name
    new_slots = torch.tensor([t for s, _, old, _ in steps for t in alloc.slots(s)[old:]])
    ref, got = outs["torch"], outs["cpp"]
    assert rel_err(got[0], ref[0]) < 1e-5
    for i in (1, 2):   # K, V: the step's slots up to fp32 order, every other one untouched
        assert rel_err(got[i][:, new_slots], ref[i][:, new_slots]) < 1e-5
        rest = torch.ones(got[i].shape[1], dtype=torch.bool)
        rest[new_slots] = False
        assert torch.equal(got[i][:, rest], ref[i][:, rest])
    for ref, got in zip(outs["torch"], outs["over the cap"]):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_steps_run_in_cpp_one_row_per_token(ext, seed):
    """A step of prompt chunks and decodes from both classes, sharing blocks, on a poisoned
    pool: the C++ stack with every token a row (build_row_metadata) gives the eager model's
    hidden states and K/V writes, and writes nothing else. TorchAttention reads the row
    metadata the same way, so the builder is checked apart from the C++ code."""
    model = random_model(ODD, seed=5 + seed)
    B = 4
    alloc, step = random_mixed_step(B, 160, seed, MAX_NUM_ROWS)
    alloc.check_integrity()
    assert any(n > 1 for n in step.values()) and any(n == 1 for n in step.values())
    assert any(alloc.rt_owner[b] is not None and alloc.be_owner[b] is not None for b in range(160))
    cache = KVCache(ODD.num_layers, 160 * B, ODD.num_kv_heads, ODD.head_dim, torch.float32)
    poison(cache)
    g = torch.Generator().manual_seed(seed)
    for s, n in step.items():
        old = torch.tensor(alloc.slots(s)[:-n], dtype=torch.long)
        cache.k[:, old] = torch.randn(ODD.num_layers, len(old), ODD.num_kv_heads, ODD.head_dim, generator=g)
        cache.v[:, old] = torch.randn(ODD.num_layers, len(old), ODD.num_kv_heads, ODD.head_dim, generator=g)
    # The engine's order: single-token rows first (build_metadata needs it; rows do not).
    order = sorted(step, key=lambda s: step[s] > 1)
    seqs = [BatchSeq(alloc.slots(s), step[s], [(r.block_id, r.num_tokens) for r in alloc.seqs[s].runs],
                     alloc.seqs[s].seq_class == SeqClass.BE) for s in order]
    num_rows = sum(step.values())
    ids = torch.randint(ODD.vocab_size, (num_rows,), generator=g)
    positions = torch.tensor([p for s in order for p in range(len(alloc.slots(s)) - step[s], len(alloc.slots(s)))])
    before = cache.k.clone(), cache.v.clone()
    attn = TorchAttention(cache, B)
    rows = build_row_metadata(seqs, B)
    assert rows.num_decode == num_rows and not rows.prefills and num_rows > len(seqs)
    outs = {}
    with torch.inference_mode():
        for name in ("eager", "eager, rows", "cpp"):
            cache.k.copy_(before[0])
            cache.v.copy_(before[1])
            if name == "cpp":
                hidden = CpuDecode(ext, model, cache.k, cache.v, B).forward(ids, positions, rows)
            else:
                hidden = model(ids, positions, attn, rows if name == "eager, rows" else attn.build_metadata(seqs))
            outs[name] = hidden, cache.k.clone(), cache.v.clone()
    new = rows.slot_mapping
    untouched = torch.ones(cache.k.shape[1], dtype=torch.bool)
    untouched[new] = False
    ref = outs["eager"]
    for name in ("eager, rows", "cpp"):
        got = outs[name]
        assert rel_err(got[0], ref[0]) < 1e-5, name
        for i in (1, 2):
            assert rel_err(got[i][:, new], ref[i][:, new]) < 1e-5, name
            assert torch.equal(got[i][:, untouched], before[i - 1][:, untouched]), name


def test_engine_runs_small_mixed_steps_in_cpp(torch_runner):
    """The worker sends a step with prompt tokens through the C++ stack while it holds at
    most MAX_NUM_ROWS tokens, and its outputs match the eager model's (greedy tokens of
    the same requests served by steps too large for it)."""
    engine = Engine(torch_runner, EngineLimits(num_blocks=64, block_size=16, max_num_host_slots=0,
                                               max_num_seqs=8, max_num_batched_tokens=4096))
    greedy = SamplingConfig(max_tokens=3, temperature=0.0, ignore_eos=True)
    tok = torch_runner.tokenizer
    prompt = tok.encode("The capital of France is a city called")
    filler = tok.encode(" and".join(["one two three four five six seven eight nine ten"] * 6))
    got = {}
    for case, pad in [("small", 0), ("large", MAX_NUM_ROWS + 1 - len(prompt))]:
        new = [NewSeq(case, SeqClass.RT, prompt, greedy)]
        scheduled = [(case, len(prompt))]
        if pad:   # a BE prompt riding along pushes the step past the C++ stack's rows
            new.append(NewSeq(case + "-be", SeqClass.BE, filler[:pad], greedy))
            scheduled.append((case + "-be", pad))
        report = engine.step(Plan(new_sequences=new, scheduled=scheduled))
        assert not report.errors
        assert torch_runner.last_forward == ("cpp" if case == "small" else "eager")
        got[case] = [o.token_ids for o in report.outputs if o.seq_id == case]
        engine.step(Plan(free=[s for s, _ in scheduled]))
    assert got["small"] == got["large"]
    engine.check_integrity()


def test_bad_indices_are_rejected_before_any_write(ext):
    model = random_model(ODD, seed=2)
    cache = KVCache(ODD.num_layers, 8 * 4, ODD.num_kv_heads, ODD.head_dim, torch.float32)
    poison(cache)
    cpp = CpuDecode(ext, model, cache.k, cache.v, 4)
    attn = TorchAttention(cache, 4)
    meta = attn.build_metadata([BatchSeq([0, 1, 2], 1, [(0, 3)], False)])
    one = torch.tensor([1])
    meta.slot_mapping = torch.tensor([8 * 4])  # one past the pool
    with pytest.raises(RuntimeError, match=r"slot_mapping\[0\] = 32 is outside \[0, 32\)"):
        cpp.forward(one, torch.tensor([2]), meta)
    meta.slot_mapping = torch.tensor([2])
    with pytest.raises(RuntimeError, match=r"input_ids\[0\] = 97"):
        cpp.forward(torch.tensor([97]), torch.tensor([2]), meta)
    assert (cache.k == POISON).all()


def test_compile_flags_name_only_what_the_cpu_reports():
    avx512 = {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}
    assert isa_flags(avx512)[:1] == ["-mavx512f"]
    assert isa_flags(avx512 - {"avx512bw"}) == ["-mavx2", "-mfma", "-mf16c"]
    assert isa_flags({"sse2", "avx"}) == []


def test_a_failed_build_falls_back_with_a_warning(tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("#include <no/such/header_bros.h>\n")
    assert load_extension(broken, tmp_path / "ext") is None
    assert "C++ decode stack unavailable" in caplog.text


def test_engine_picks_the_stack_by_batch(torch_runner):
    """Decode-only steps of up to MAX_NUM_ROWS rows run in C++, larger ones in TorchScript,
    prefills in eager PyTorch; the two decode stacks give the same logits."""
    assert torch_runner.cpu_decode is not None
    poison(torch_runner.cache)
    engine = Engine(torch_runner, EngineLimits(num_blocks=256, block_size=16, max_num_host_slots=0,
                                               max_num_seqs=MAX_NUM_ROWS + 1, max_num_batched_tokens=4096))
    greedy = SamplingConfig(max_tokens=4, temperature=0.0, ignore_eos=True)
    tok = torch_runner.tokenizer
    prompts = [tok.encode(f"Count from {i} to ten:") for i in range(MAX_NUM_ROWS + 1)]
    logits = {}
    torch_runner.keep_logits = True
    try:
        for group, num_rows, stack in [("big", MAX_NUM_ROWS + 1, "script"), ("small", MAX_NUM_ROWS, "cpp")]:
            ids = [f"{group}{i}" for i in range(num_rows)]
            engine.step(Plan(new_sequences=[NewSeq(s, SeqClass.RT if i % 2 else SeqClass.BE, prompts[i], greedy)
                                            for i, s in enumerate(ids)],
                             scheduled=[(s, len(prompts[i])) for i, s in enumerate(ids)]))
            assert torch_runner.last_forward == "eager"
            report = engine.step(Plan(scheduled=[(s, 1) for s in ids]))
            assert not report.errors and torch_runner.last_forward == stack
            for row, o in enumerate(report.outputs):
                logits.setdefault(int(o.seq_id[len(group):]), {})[group] = torch_runner.last_logits[row]
            engine.step(Plan(free=ids))
    finally:
        torch_runner.keep_logits = False
    for i in range(MAX_NUM_ROWS):
        assert rel_err(logits[i]["small"], logits[i]["big"]) < 1e-3, i
    engine.check_integrity()


# ---------------------------------------------------------------- GGUF blocks


def blocks_step(cache: KVCache, rows: int, seed: int):
    """A decode step of `rows` rows on a poisoned pool with random K/V behind each row:
    (ids, positions, meta, the pool's contents to restore before each run)."""
    alloc, names = random_step(16, 64, seed, max_rows=rows)
    assert len(names) == rows
    cfg_layers, num_kv_heads, head_dim = cache.k.shape[0], cache.k.shape[2], cache.k.shape[3]
    poison(cache)
    g = torch.Generator().manual_seed(seed)
    for s in names:
        old = torch.tensor(alloc.slots(s)[:-1], dtype=torch.long)
        cache.k[:, old] = torch.randn(cfg_layers, len(old), num_kv_heads, head_dim, generator=g)
        cache.v[:, old] = torch.randn(cfg_layers, len(old), num_kv_heads, head_dim, generator=g)
    meta = TorchAttention(cache, 16).build_metadata(
        [BatchSeq(alloc.slots(s), 1, [(r.block_id, r.num_tokens) for r in alloc.seqs[s].runs],
                  alloc.seqs[s].seq_class == SeqClass.BE) for s in names])
    ids = torch.randint(1000, (rows,), generator=g)
    positions = torch.tensor([len(alloc.slots(s)) - 1 for s in names])
    return ids, positions, meta, (cache.k.clone(), cache.v.clone())


def run_stack(cpp: CpuDecode, cache: KVCache, step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, positions, meta, (k0, v0) = step
    cache.k.copy_(k0)
    cache.v.copy_(v0)
    with torch.inference_mode():
        hidden = cpp.forward(ids, positions, meta)
        return hidden, cpp.logits(hidden), cache.k.clone(), cache.v.clone()


@pytest.fixture(scope="module")
def gguf_blocks(model_dir):
    from worker_svc.model.checkpoint import load_blocks
    return load_blocks(model_dir)


def test_the_worker_reads_the_ggufs_blocks_unless_told_float32(torch_runner, model_dir):
    """Every matrix of the default model (Q4_1 layers, a Q8_0 tied LM head) is read as
    blocks by default; --cpu-weights float32 reads none."""
    from worker_svc.config import WorkerConfig
    from worker_svc.torch_runner import TorchRunner
    cfg = torch_runner.model.cfg
    assert torch_runner.cpu_decode.num_block_matrices == 4 * cfg.num_layers + 1
    runner = TorchRunner(str(model_dir), weight_blocks=False)
    runner.allocate_cache(16, 16)
    assert runner.cpu_decode is not None and runner.cpu_decode.num_block_matrices == 0
    assert runner.cpu_decode.weight_bytes > 5 * torch_runner.cpu_decode.weight_bytes   # 32 bits vs ~5
    with pytest.raises(ValueError, match="cpu_weights"):
        WorkerConfig(cpu_weights="int4")


def test_gguf_blocks_give_the_fp32_stack_bit_for_bit(ext, torch_runner, gguf_blocks):
    """The blocks dequantize to the fp32 weights bit for bit and run through the same FMAs
    (in registers on AVX2 builds, through a scratch buffer on the others), so steps of up to
    MAX_BLOCK_ROWS rows (blocks) and larger ones (fp32) give exactly the fp32 stack's
    hidden states, logits and K/V writes."""
    model, cache = torch_runner.model, torch_runner.cache
    blocks = CpuDecode(ext, model, cache.k, cache.v, 16, gguf_blocks)
    fp32 = CpuDecode(ext, model, cache.k, cache.v, 16)
    assert blocks.num_block_matrices == 4 * model.cfg.num_layers + 1 and fp32.num_block_matrices == 0
    for seed, rows in enumerate([1, 2, 3, ext.MAX_BLOCK_ROWS, ext.MAX_BLOCK_ROWS + 1]):
        step = blocks_step(cache, rows, seed)
        for a, b in zip(run_stack(blocks, cache, step), run_stack(fp32, cache, step)):
            assert torch.equal(a, b), rows


def test_int16_activations_stay_within_a_bound_of_the_fp32_stack(ext, torch_runner, gguf_blocks):
    """With int16 activations (the worker's default) a step of 1 to MAX_INT16_ROWS rows
    quantizes each block matrix's input: on an AVX2 build its outputs differ from the exact
    stack's (so the integer tiles ran; from MAX_BLOCK_ROWS + 1 rows on, the exact stack
    reads fp32 weights, these the blocks, 4 x rows at a time): K/V writes by < 1e-4 of their
    range (~3e-6 measured), hidden states and logits by < 1e-2 (1-4e-3 measured: the random
    K/V here make outliers that share a block's scale with small values; real prompts stay
    within ~2e-4, test_model_parity.py), and it writes no other slot. A larger step reads
    fp32 and is exactly the exact stack's. Elsewhere the switch stays off and every step is
    exact. (Greedy tokens are checked on real prompts, test_model_parity.py: random K/V
    make near ties, 3e-4 apart at 6 rows here, which any rounding may flip.)"""
    model, cache = torch_runner.model, torch_runner.cache
    exact = CpuDecode(ext, model, cache.k, cache.v, 16, gguf_blocks)
    quant = CpuDecode(ext, model, cache.k, cache.v, 16, gguf_blocks, int16_activations=True)
    avx2 = ext.isa() == "avx2"
    assert not exact.int16_activations and quant.int16_activations == avx2
    assert ext.MAX_INT16_ROWS == (8 if avx2 else 0)
    limit = max(ext.MAX_INT16_ROWS, ext.MAX_BLOCK_ROWS)
    for seed, rows in enumerate([1, 2, 3, ext.MAX_BLOCK_ROWS, ext.MAX_BLOCK_ROWS + 1, 6, limit, limit + 1]):
        step = blocks_step(cache, rows, seed)
        got, ref = run_stack(quant, cache, step), run_stack(exact, cache, step)
        if rows > ext.MAX_INT16_ROWS or not avx2:
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), rows
            continue
        for a, b, bound in zip(got, ref, (1e-2, 1e-2, 1e-4, 1e-4)):
            assert not torch.equal(a, b) and rel_err(a, b) < bound, rows
        written = (ref[2] != step[3][0]).any(-1).any(-1).any(0)   # the slots this step writes
        for i in (2, 3):
            assert torch.equal(got[i][:, ~written], ref[i][:, ~written]), rows


def test_int16_activations_on_the_lm_head(ext, torch_runner, gguf_blocks):
    """The tied LM head (Q8_0 blocks, BlockLinear) on int16 activations: 1 to MAX_INT16_ROWS
    rows within 1e-4 of the exact logits' range on an AVX2 build (~2e-5 measured), more
    rows exact."""
    model, cache = torch_runner.model, torch_runner.cache
    exact = CpuDecode(ext, model, cache.k, cache.v, 16, gguf_blocks)
    quant = CpuDecode(ext, model, cache.k, cache.v, 16, gguf_blocks, int16_activations=True)
    g = torch.Generator().manual_seed(3)
    for rows in range(1, max(ext.MAX_INT16_ROWS, ext.MAX_BLOCK_ROWS) + 2):
        hidden = torch.randn(rows, model.cfg.hidden_size, generator=g)
        got, ref = quant.logits(hidden), exact.logits(hidden)
        if rows > ext.MAX_INT16_ROWS or ext.isa() != "avx2":
            assert torch.equal(got, ref), rows
        else:
            assert not torch.equal(got, ref) and rel_err(got, ref) < 1e-4, rows


def test_the_worker_takes_int16_activations_unless_told_float32(torch_runner, model_dir):
    """--cpu-activations: int16 by default (on an AVX2 build with blocks), float32 exact;
    anything else is refused naming the field."""
    from worker_svc.config import WorkerConfig
    from worker_svc.torch_runner import TorchRunner
    assert WorkerConfig().cpu_activations == "int16"
    assert torch_runner.cpu_decode.int16_activations == (load_extension().isa() == "avx2")
    runner = TorchRunner(str(model_dir), int16_activations=False)
    runner.allocate_cache(16, 16)
    assert runner.cpu_decode.num_block_matrices and not runner.cpu_decode.int16_activations
    with pytest.raises(ValueError, match="cpu_activations must be int16 or float32, got 'int8'"):
        WorkerConfig(cpu_activations="int8")


@pytest.mark.parametrize("rows", [1, 4])
def test_small_steps_read_the_blocks_not_the_fp32_weights(ext, torch_runner, gguf_blocks, rows):
    """With the fp32 copies of layer 0's o matrix and of the LM head (past the ids the steps
    embed) zeroed after binding, a step of 1 or MAX_BLOCK_ROWS rows is unchanged (it
    reads their blocks), and one of more rows is not."""
    assert rows in (1, ext.MAX_BLOCK_ROWS)
    model, cache = torch_runner.model, torch_runner.cache
    cpp = CpuDecode(ext, model, cache.k, cache.v, 16, gguf_blocks)
    small, large = blocks_step(cache, rows, 1), blocks_step(cache, ext.MAX_BLOCK_ROWS + 1, 2)
    before = {name: run_stack(cpp, cache, step) for name, step in (("small", small), ("large", large))}
    o, head = model.layers[0].o_proj.weight, model.embed_tokens.weight[1000:]   # blocks_step's ids are < 1000
    saved = o.clone(), head.clone()
    try:
        with torch.no_grad():
            o.zero_()
            head.zero_()
        after = {name: run_stack(cpp, cache, step) for name, step in (("small", small), ("large", large))}
    finally:
        with torch.no_grad():
            o.copy_(saved[0])
            head.copy_(saved[1])
    assert all(torch.equal(a, b) for a, b in zip(after["small"], before["small"]))
    hidden, logits = after["large"][:2]
    assert not torch.equal(hidden, before["large"][0]) and logits[:, 1000:].abs().max() == 0


def test_blocks_that_are_not_the_weights_are_refused(ext, torch_runner, gguf_blocks, caplog):
    """Blocks with two rows swapped, or read as another type, are refused by the stack with
    the matrix and row named; the worker then reads that matrix as fp32 and logs why."""
    model, cache = torch_runner.model, torch_runner.cache
    cpp = CpuDecode(ext, model, cache.k, cache.v, 16)
    down, ggml_type = gguf_blocks["model.layers.3.mlp.down_proj.weight"]
    swapped = down.clone()
    swapped[[5, 6]] = down[[6, 5]]
    with pytest.raises(RuntimeError, match="down of layer 3: row 5 of the blocks does not dequantize"):
        cpp.stack.set_blocks(3, "down", swapped, ggml_type)
    with pytest.raises(RuntimeError, match=r"blocks must be a contiguous uint8 CPU tensor \[576, 1632\], got \[576, 960\]"):
        cpp.stack.set_blocks(3, "down", down, 8)       # Q8_0 rows are 34 bytes a block, not 20
    with pytest.raises(RuntimeError, match="ggml type 12 is not one the stack reads"):
        cpp.stack.set_blocks(3, "down", down, 12)      # Q4_K
    assert cpp.stack.num_block_matrices() == 0
    bad = dict(gguf_blocks)
    bad["model.layers.3.mlp.down_proj.weight"] = (swapped, ggml_type)
    with caplog.at_level("WARNING"):
        partial = CpuDecode(ext, model, cache.k, cache.v, 16, bad)
    assert partial.num_block_matrices == 4 * model.cfg.num_layers   # all but that one
    assert "layer 3 down: GGUF blocks refused, reading fp32" in caplog.text
