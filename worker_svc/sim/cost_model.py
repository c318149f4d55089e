"""How long one engine iteration takes on a GPU we do not have: DistServe's fitted model.

A simulated worker sleeps for iteration_ms(batch) instead of running the model. The
coefficients are DistServe's least-squares fit for OPT-13B on A100-80GB (docs: PAPER.md,
"Iteration-latency cost models"):

    prefill  = base + per_token * sum(L) + per_token_sq * sum(L^2)    L: chunk lengths
    decode   = base + per_context_token * sum(context) + per_seq * batch

with a second decode fit for batches of large_batch_threshold requests or more.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True)
class CostModel:
    """Iteration latency in milliseconds. The defaults are OPT-13B, one A100 (TP1)."""
    # Prefill iteration.
    prefill_base_ms: float = 18.10             # ms, once per iteration
    prefill_ms_per_token: float = 0.1019       # ms per prompt token in the iteration
    prefill_ms_per_token_sq: float = 7.12e-6   # ms per (chunk length)^2: attention's quadratic work
    # Decode iteration of fewer than large_batch_threshold requests.
    decode_base_ms: float = 19.93              # ms, once per iteration
    decode_ms_per_context_token: float = 6.27e-4  # ms per context token, summed over requests
    decode_ms_per_seq: float = 0.0385          # ms per decoding request
    # Decode iteration of large_batch_threshold requests or more.
    large_batch_threshold: int = 95            # requests
    large_decode_base_ms: float = 7.17         # ms, once per iteration
    large_decode_ms_per_context_token: float = 5.80e-4  # ms per context token, summed
    large_decode_ms_per_seq: float = 0.158     # ms per decoding request
    # A fused path (a CPU worker's C++ stack): an iteration of at most fused_max_tokens
    # tokens in all, prompt tokens among them, costs fused_base_ms, the decode formula's
    # variable terms for its decodes, and fused_ms_per_prompt_token per prompt token (0
    # tokens: no such path).
    fused_max_tokens: int = 0                  # tokens per iteration
    fused_base_ms: float = 0.0                 # ms, once per such iteration
    fused_ms_per_prompt_token: float = 0.0     # ms per prompt token in such an iteration

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"cost model {f.name} must be finite and >= 0, got {value!r}")
        if self.large_batch_threshold < 1:
            raise ValueError(f"cost model large_batch_threshold must be >= 1, got {self.large_batch_threshold}")

    @classmethod
    def opt13b_a100(cls) -> CostModel:
        return cls()

    @classmethod
    def opt13b_a100_tp2(cls) -> CostModel:
        return cls._without_large_batch_fit(prefill=(14.74, 0.0686, 2.45e-6),
                                            decode=(13.29, 3.41e-4, 0.0630))

    @classmethod
    def opt13b_a100_tp4(cls) -> CostModel:
        return cls._without_large_batch_fit(prefill=(12.06, 0.0381, 5.23e-7),
                                            decode=(10.26, 1.88e-4, 0.0327))

    @classmethod
    def smollm2_cpu(cls) -> CostModel:
        """SmolLM2-135M in fp32 on a 2-core AVX-512 CPU worker (torch backend), a step
        as the scheduler's loop sees it (docs/benchmarks.md, cpu-hybrid): least-squares
        fits to the live cpu-hybrid run at commit 7d02999 (4 seeds, every policy), three
        regimes as the worker has three paths:
        - decode-only, the fused C++ stack: 18.7 ms + 1.87 ms per sequence (bros' gaps
          between plans, 4,561 steps);
        - with prompt tokens, <= 64 tokens in all, the same stack (each prompt token a
          row): 26.0 ms + 0.98 ms per prompt token, decodes at the decode rate (bros'
          gaps, 2,576 steps);
        - larger, the eager model: 24.8 ms + 1.48 ms per token (the worker's own times
          for the 2,968 such steps of fcfs, priority and partition, + the loop's median
          2.7 ms a step between report and plan).
        No context or quadratic term: at cpu-hybrid's lengths (prompts <= 256 tokens) the
        step is the weights' streaming and the GEMMs, not attention."""
        return cls(prefill_base_ms=24.8, prefill_ms_per_token=1.48, prefill_ms_per_token_sq=0.0,
                   decode_base_ms=18.7, decode_ms_per_context_token=0.0, decode_ms_per_seq=1.87,
                   large_decode_base_ms=18.7, large_decode_ms_per_context_token=0.0, large_decode_ms_per_seq=1.87,
                   fused_max_tokens=64, fused_base_ms=26.0, fused_ms_per_prompt_token=0.98)

    @classmethod
    def smollm2_cpu_avx2(cls) -> CostModel:
        """The same on a 2-core AVX2 CPU (AMD EPYC; no AVX-512: the C++ stack's broadcast
        tiles are half as wide, prompt steps of more than 32 rows run MKL): least-squares
        fits to live cpu-hybrid runs (4 seeds, every policy; `python -m
        scheduler_svc.bench.fit_cost DIR --large-batch-threshold 5` over their
        --step-logs), the gaps between plans:
        - decode-only, up to 4 sequences (the GGUF's 4-bit blocks, int16 activations):
          11.7 ms + 4.05 ms per sequence (the run at b50fc16, 14,540 steps; 16.8 + 3.58
          with fp32 activations at d94b1b4); 5 or more (fp32 weights, broadcast tiles):
          25.7 ms + 2.66 ms per sequence (d94b1b4, 14,427 steps; b50fc16: 25.9 + 2.72);
        - with prompt tokens, <= 64 tokens in all (the C++ stack): 18.8 ms + 1.94 ms per
          prompt token, decodes at the decode rate (d94b1b4; b50fc16, which did not change
          these steps, measured 20.3 + 2.15 on a slower hour of the machine);
        - larger (the eager model): 61.1 ms + 2.14 ms per prompt token, decodes at the
          decode rate (d94b1b4; rms 74 ms: the least regular regime; b50fc16: 96.4 + 1.95,
          the same at the ~200-token steps BE makes).
        (docs/benchmarks.md, "Fitting the replica"; the fit before AVX2 had broadcast
        tiles, at 821197e, is there too.)"""
        return cls(prefill_base_ms=61.1, prefill_ms_per_token=2.14, prefill_ms_per_token_sq=0.0,
                   decode_base_ms=11.7, decode_ms_per_context_token=0.0, decode_ms_per_seq=4.05,
                   large_batch_threshold=5,
                   large_decode_base_ms=25.7, large_decode_ms_per_context_token=0.0, large_decode_ms_per_seq=2.66,
                   fused_max_tokens=64, fused_base_ms=18.8, fused_ms_per_prompt_token=1.94)

    @classmethod
    def _without_large_batch_fit(cls, prefill: tuple[float, float, float],
                                 decode: tuple[float, float, float]) -> CostModel:
        """A model whose large-batch decode reuses the small-batch fit.

        PAPER.md lists no large-batch decode fit for TP2/TP4. Scaling the TP1 one by the
        small-batch ratios would be invented data; reusing the small-batch fit is the
        listed curve extrapolated, which slightly overestimates large batches (on TP1
        the large-batch fit is the cheaper of the two past 95 requests).
        """
        prefill_base, prefill_per_token, prefill_per_token_sq = prefill
        decode_base, decode_per_context_token, decode_per_seq = decode
        return cls(prefill_base_ms=prefill_base, prefill_ms_per_token=prefill_per_token,
                   prefill_ms_per_token_sq=prefill_per_token_sq,
                   decode_base_ms=decode_base, decode_ms_per_context_token=decode_per_context_token,
                   decode_ms_per_seq=decode_per_seq,
                   large_decode_base_ms=decode_base, large_decode_ms_per_context_token=decode_per_context_token,
                   large_decode_ms_per_seq=decode_per_seq)

    @classmethod
    def from_dict(cls, overrides: Mapping[str, Any]) -> CostModel:
        """A preset (key "preset", default "opt13b_a100") with any fields overridden.

        Values may be strings, as from `--sim-cost key=value`. Unknown keys raise.
        """
        overrides = dict(overrides)
        name = overrides.pop("preset", "opt13b_a100")
        if name not in PRESETS:
            raise ValueError(f"unknown cost model preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]().with_overrides(overrides)

    def with_overrides(self, overrides: Mapping[str, Any]) -> CostModel:
        types = {f.name: f.type for f in fields(self)}
        unknown = sorted(set(overrides) - set(types))
        if unknown:
            raise ValueError(f"unknown cost model key(s) {unknown}; known: {sorted(types)}")
        # Field types are strings under `from __future__ import annotations`.
        return replace(self, **{k: (int if types[k] == "int" else float)(v) for k, v in overrides.items()})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def iteration_ms(self, prefill_chunk_lens: Sequence[int], decode_context_lens: Sequence[int],
                     prefill_computed_lens: Sequence[int] | None = None) -> float:
        """Milliseconds for one iteration; 0 for an empty one.

        prefill_chunk_lens: tokens each prefilling request computes this iteration.
        decode_context_lens: context tokens each decoding request attends to.
        prefill_computed_lens: tokens of each prefilling request already in the KV cache
            before its chunk (chunked prefill); None means all 0, PAPER.md's formula as is.

        A mixed iteration is the prefill formula plus the decode terms, with one constant:
        the larger of the two (the per-iteration overhead is paid once, and taking the
        larger keeps a mixed iteration no cheaper than either of its halves alone). The
        decode regime is chosen by the number of decoding requests. An iteration small
        enough for the fused path (fused_max_tokens) is the decode formula plus its prompt
        tokens at fused_ms_per_prompt_token, over fused_base_ms.
        """
        num_tokens = sum(prefill_chunk_lens) + len(decode_context_lens)
        if len(prefill_chunk_lens) and num_tokens <= self.fused_max_tokens:
            decode_variable_ms = self._decode_terms(decode_context_lens)[1]
            return self.fused_base_ms + decode_variable_ms + self.fused_ms_per_prompt_token * sum(prefill_chunk_lens)
        base_ms = 0.0
        variable_ms = 0.0
        if len(prefill_chunk_lens):
            base_ms = self.prefill_base_ms
            variable_ms += self._prefill_variable_ms(prefill_chunk_lens, prefill_computed_lens)
        if len(decode_context_lens):
            decode_base_ms, decode_variable_ms = self._decode_terms(decode_context_lens)
            base_ms = max(base_ms, decode_base_ms)
            variable_ms += decode_variable_ms
        return base_ms + variable_ms

    def _prefill_variable_ms(self, chunk_lens: Sequence[int], computed_lens: Sequence[int] | None) -> float:
        if computed_lens is None:
            computed_lens = [0] * len(chunk_lens)
        if len(computed_lens) != len(chunk_lens):
            raise ValueError(f"{len(chunk_lens)} prefill chunks but {len(computed_lens)} computed lengths")
        # The L^2 term is attention over the prompt. A chunk of l tokens after c computed
        # ones adds (c + l)^2 - c^2 = l^2 + 2lc to it, so a prompt's chunks together cost
        # exactly the unchunked prompt's L^2: chunking neither creates nor hides attention.
        squares = sum(l * l + 2 * l * c for l, c in zip(chunk_lens, computed_lens))
        return self.prefill_ms_per_token * sum(chunk_lens) + self.prefill_ms_per_token_sq * squares

    def _decode_terms(self, context_lens: Sequence[int]) -> tuple[float, float]:
        """(constant, variable) milliseconds of a decode batch, in its regime."""
        batch = len(context_lens)
        if batch < self.large_batch_threshold:
            base, per_context_token, per_seq = (
                self.decode_base_ms, self.decode_ms_per_context_token, self.decode_ms_per_seq)
        else:
            base, per_context_token, per_seq = (
                self.large_decode_base_ms, self.large_decode_ms_per_context_token, self.large_decode_ms_per_seq)
        return base, per_context_token * sum(context_lens) + per_seq * batch


PRESETS: dict[str, Callable[[], CostModel]] = {
    "opt13b_a100": CostModel.opt13b_a100,
    "opt13b_a100_tp2": CostModel.opt13b_a100_tp2,
    "opt13b_a100_tp4": CostModel.opt13b_a100_tp4,
    "smollm2_cpu": CostModel.smollm2_cpu,
    "smollm2_cpu_avx2": CostModel.smollm2_cpu_avx2,
}
