"""The torch backend: a real model over the KV pool, on CPU or CUDA."""
from __future__ import annotations

import logging
import time

import torch

from .attention import BatchSeq, TorchAttention
from .block_allocator import SeqClass, SlotCopy
from .engine import RunResult, StepItem
from .kv_cache import KVCache, kv_bytes_per_slot
from .model.checkpoint import generation_defaults, load_blocks, load_state_dict
from .model.config import ModelConfig
from .model.cpu_decode import MAX_NUM_ROWS, CpuDecode, eager_linear
from .model.fast_decode import FastDecode
from .model.llama import LlamaModel
from .model.tokenizer import Tokenizer
from .sampler import Sampler, SamplingConfig, make_generator

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchRunner:
    name = "torch"

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu",
                 max_model_len: int | None = None, weight_blocks: bool = True, int16_activations: bool = True):
        self.cfg = ModelConfig.from_hf_dir(model_dir)
        self.dtype_name, self.dtype, self.device = dtype, DTYPES[dtype], torch.device(device)
        self.model = LlamaModel.from_state_dict(self.cfg, load_state_dict(model_dir), self.dtype, self.device)
        self.model.use_linear(*eager_linear(self.model))
        # Where a GGUF's quantized blocks come from, for the C++ stack to read instead of
        # fp32 (cpu_decode.py); read when the stack is built, not kept here.
        self._blocks_dir = model_dir if weight_blocks and self.device.type == "cpu" else None
        self._int16_activations = int16_activations
        self.tokenizer = Tokenizer(model_dir)
        self.model_name = self.cfg.name
        self.vocab_size = self.cfg.vocab_size
        self.max_model_len = min(max_model_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        self.eos_token_ids = tuple(self.tokenizer.eos_token_ids)
        self.sampler = Sampler()
        # What unset sampling fields mean for this model (greedy when it recommends nothing).
        self.default_sampling = SamplingConfig(max_tokens=1, **{"temperature": 0.0, **generation_defaults(model_dir)})
        self.cache: KVCache | None = None
        self.attn: TorchAttention | None = None
        self.fast_decode: FastDecode | None = None
        self.cpu_decode: CpuDecode | None = None
        self.last_forward = ""            # which stack ran the last step: cpp, script or eager
        self.keep_logits = False          # tests: keep the last step's logits
        self.last_logits: torch.Tensor | None = None

    @property
    def max_num_fused_tokens(self) -> int:
        """Steps of up to this many tokens run the C++ stack (0 before the pool exists, or
        where it does not apply)."""
        return MAX_NUM_ROWS if self.cpu_decode is not None else 0

    @property
    def kv_bytes_per_slot(self) -> int:
        return kv_bytes_per_slot(self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype)

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        self.cache = KVCache(self.cfg.num_layers, num_blocks * block_size, self.cfg.num_kv_heads,
                             self.cfg.head_dim, self.dtype, self.device)
        self.attn = TorchAttention(self.cache, block_size)
        self.fast_decode = FastDecode(self.model, self.cache.k, self.cache.v, block_size)
        blocks = load_blocks(self._blocks_dir) if self._blocks_dir is not None else None
        self.cpu_decode = CpuDecode.create(self.model, self.cache.k, self.cache.v, block_size, blocks,
                                           self._int16_activations)
        if self.cpu_decode is not None and self.cpu_decode.num_block_matrices:
            log.info("C++ decode stack: %d matrices read as GGUF blocks%s", self.cpu_decode.num_block_matrices,
                     f", int16 activations in steps of up to {self.cpu_decode.max_int16_rows} rows"
                     if self.cpu_decode.int16_activations else "")

    def set_attention(self, backend) -> None:
        """Swap the attention backend (the Triton kernels plug in here)."""
        self.attn = backend
        self.fast_decode = None  # the scripted and C++ paths inline the torch attention
        self.cpu_decode = None

    def apply_copies(self, copies: list[SlotCopy]) -> float:
        if not copies:
            return 0.0
        t0 = time.perf_counter()
        self.cache.apply(copies)
        return (time.perf_counter() - t0) * 1e3

    def new_detokenizer(self):
        return self.tokenizer.incremental_detokenizer(skip_special_tokens=True)

    def now_ms(self) -> float:
        return time.monotonic() * 1e3

    @torch.inference_mode()
    def execute(self, items: list[StepItem]) -> RunResult:
        t0 = time.perf_counter()
        input_ids, positions, last_rows, row = [], [], [], 0
        for item in items:
            input_ids += item.input_token_ids
            positions += range(item.start_position, item.start_position + item.num_new_tokens)
            row += item.num_new_tokens
            if item.samples:
                last_rows.append(row - 1)
        seqs = [BatchSeq(i.ctx_slots, i.num_new_tokens, i.runs, i.seq.seq_class == SeqClass.BE) for i in items]
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.cpu_decode is not None and self.cpu_decode.handles(len(input_ids)):
            # Prompt tokens too: each is a row of the C++ stack (attention.build_row_metadata).
            meta = self.attn.build_row_metadata(seqs)
            hidden, self.last_forward = self.cpu_decode.forward(ids, pos, meta), "cpp"
        else:
            meta = self.attn.build_metadata(seqs)
            if meta.num_decode == len(items) and self.fast_decode is not None:
                hidden, self.last_forward = self.fast_decode.forward(ids, pos, meta), "script"
            else:
                hidden, self.last_forward = self.model(ids, pos, self.attn, meta), "eager"
        token_ids: list[int] = []
        t1 = time.perf_counter()
        if last_rows:
            logits = self._logits(hidden[torch.tensor(last_rows, device=self.device)])
            if self.keep_logits:
                self.last_logits = logits.clone()
            t1 = time.perf_counter()
            sampling = [i for i in items if i.samples]
            for i in sampling:
                if i.seq.generator is None and not i.seq.sampling.is_greedy:
                    i.seq.generator = make_generator(i.seq.sampling.seed, self.device)
            token_ids = self.sampler.sample(logits, [i.seq.sampling for i in sampling],
                                            [i.seq.generator for i in sampling])
        t2 = time.perf_counter()
        return RunResult([int(t) for t in token_ids], (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cpu_decode is not None and self.cpu_decode.handles(hidden.shape[0]):
            return self.cpu_decode.logits(hidden)  # a GEMV streaming the LM head once
        return self.model.compute_logits(hidden)
