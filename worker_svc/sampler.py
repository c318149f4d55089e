"""Per-request token sampling for a batch, and the per-sequence stop rules.

Each row of a batch's logits is one sequence's next-token scores, sampled under that
request's own SamplingConfig. A row takes one of three paths, chosen by its config alone:

    greedy    temperature ~ 0                   argmax, no randomness
    plain     temperature only                  softmax(logits / T), draw
    filtered  top_k and/or top_p as well        sort, top-k, then top-p, draw

A draw is inverse-CDF: the row's generator gives one uniform number per step, and the
token is where that number lands in the row's cumulative distribution. Because the path
and the generator depend only on the row's own request, a seeded request produces the
same tokens whether it runs alone or beside any other requests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, NamedTuple, Sequence

import torch

# Dividing logits by a temperature this small overflows them to inf (softmax then gives
# NaN), and the distribution is already a point mass, so such rows are greedy.
GREEDY_TEMPERATURE_EPS = 1e-5

# The wire seed is a uint64 (bros.v1.SamplingParams.seed).
_SEED_LIMIT = 2**64


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0                  # 1.0: off
    top_k: int = 0                      # 0: off
    seed: int | None = None             # None: a fresh nondeterministic generator
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_top_k_or_top_p(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    def validate(self) -> None:
        """Raise ValueError naming the first field that breaks its rule."""
        _require(self.max_tokens > 0, "max_tokens", "must be > 0", self.max_tokens)
        _require(math.isfinite(self.temperature) and self.temperature >= 0,
                 "temperature", "must be finite and >= 0", self.temperature)
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _require(self.top_k >= 0, "top_k", "must be >= 0", self.top_k)
        _require(self.seed is None or 0 <= self.seed < _SEED_LIMIT,
                 "seed", "must be in [0, 2**64)", self.seed)
        _require(all(t >= 0 for t in self.stop_token_ids),
                 "stop_token_ids", "must all be >= 0", self.stop_token_ids)
        # An empty stop string would match before the first token.
        _require(all(self.stop), "stop", "must not contain empty strings", self.stop)


def _require(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"sampling.{field} {rule}, got {value!r}")


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A request's own generator: seeded, or (seed None) seeded nondeterministically.

    A fresh torch.Generator starts from one fixed default seed, so an unseeded request
    must be reseeded (Generator.seed() draws from std::random_device) or every unseeded
    request would produce the same tokens. CPU is the default device: a draw costs one
    number per step, and the same seed then gives the same draws on any accelerator.
    """
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# One path: (logits [n, vocab], configs, generators) -> token ids [n] (int64).
_Path = Callable[[torch.Tensor, Sequence[SamplingConfig], Sequence["torch.Generator | None"]], torch.Tensor]


class Sampler:
    """Stateless: per-request state lives in the configs and the generators."""

    def sample(self, logits: torch.Tensor, configs: Sequence[SamplingConfig],
               generators: Sequence[torch.Generator | None]) -> list[int]:
        """One token id per row of logits [num_seqs, vocab]; logits are not modified.

        A None generator draws from torch's global generator (not reproducible).
        """
        num_seqs = logits.shape[0]
        if logits.dim() != 2 or len(configs) != num_seqs or len(generators) != num_seqs:
            raise ValueError(f"logits {tuple(logits.shape)} need one config and one generator "
                             f"per row; got {len(configs)} and {len(generators)}")
        rows_by_path: dict[_Path, list[int]] = {}
        for row, config in enumerate(configs):
            rows_by_path.setdefault(_path_of(config), []).append(row)
        if len(rows_by_path) == 1:
            # The common case (all greedy, say): one call, no gathering or scattering.
            path = next(iter(rows_by_path))
            return path(logits, configs, generators).tolist()
        tokens = torch.empty(num_seqs, dtype=torch.long, device=logits.device)
        for path, rows in rows_by_path.items():
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = path(logits.index_select(0, index),
                                 [configs[r] for r in rows], [generators[r] for r in rows])
        return tokens.tolist()


def _path_of(config: SamplingConfig) -> _Path:
    if config.is_greedy:
        return _greedy
    return _filtered if config.uses_top_k_or_top_p else _plain


def _greedy(logits, configs, generators) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _plain(logits, configs, generators) -> torch.Tensor:
    probs = torch.softmax(_scaled(logits, configs), dim=-1)
    return _draw(probs, _uniforms(generators, logits.device))


def _filtered(logits, configs, generators) -> torch.Tensor:
    # Stable, so tied tokens keep vocab order and top_k=1 agrees with argmax.
    sorted_logits, sorted_ids = _scaled(logits, configs).sort(dim=-1, descending=True, stable=True)
    probs = _top_k_top_p(sorted_logits, configs)
    ranks = _draw(probs, _uniforms(generators, logits.device))
    return sorted_ids.gather(1, ranks.unsqueeze(1)).squeeze(1)


def _scaled(logits: torch.Tensor, configs: Sequence[SamplingConfig]) -> torch.Tensor:
    """logits / temperature as a new float32 tensor; the caller's tensor is left as is."""
    temperatures = torch.tensor([c.temperature for c in configs], dtype=torch.float32,
                                device=logits.device)
    return logits.float() / temperatures.unsqueeze(1)


def _top_k_top_p(sorted_logits: torch.Tensor, configs: Sequence[SamplingConfig]) -> torch.Tensor:
    """Probabilities [n, vocab] in descending order, zero outside each row's kept set.

    Top-p applies to the distribution renormalised after top-k. A token is kept when the
    tokens ranked above it hold less than top_p of the mass: that is the smallest prefix
    reaching top_p, and it always includes the top token (nothing ranks above it).
    """
    num_rows, vocab = sorted_logits.shape
    device = sorted_logits.device
    top_k = [c.top_k if 0 < c.top_k < vocab else vocab for c in configs]
    # top_p 1.0 means off: a float32 running sum can reach 1.0 before the tail ends.
    top_p = [c.top_p if c.top_p < 1.0 else math.inf for c in configs]
    ranks = torch.arange(vocab, device=device)
    beyond_k = ranks >= torch.tensor(top_k, device=device).unsqueeze(1)             # [n, vocab]
    probs = torch.softmax(sorted_logits.masked_fill(beyond_k, -math.inf), dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs                                       # [n, vocab]
    beyond_p = mass_above >= torch.tensor(top_p, device=device).unsqueeze(1)
    return probs.masked_fill(beyond_p, 0.0)


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One number in [0, 1) per row [n], each from the row's own generator."""
    uniforms = torch.rand(len(generators))
    for row, generator in enumerate(generators):
        if generator is not None:
            uniforms[row] = torch.rand((), generator=generator, device=generator.device).item()
    return uniforms.to(device)


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw [n] from probs [n, vocab], which need not sum to 1.

    The target is kept strictly below the row's total, so the first cdf entry above it
    always belongs to a token with nonzero probability (a zero adds nothing to the cdf).
    float32 throughout: tokens rarer than ~2**-24 are drawn only approximately.
    """
    cdf = probs.cumsum(dim=-1)                                                       # [n, vocab]
    total = cdf[:, -1:]                                                              # [n, 1]
    target = torch.minimum(uniforms.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


FinishReason = Literal["stop", "length"]


class StopDecision(NamedTuple):
    finished: bool
    reason: FinishReason | None
    # Set for a stop string only: the returned text is text_so_far[:truncate_text_at].
    truncate_text_at: int | None


NOT_FINISHED = StopDecision(False, None, None)


class StopChecker:
    """Whether one sequence is done, asked once per generated token.

    No torch, no I/O; its one piece of state is how much text it has already searched.
    text_so_far must only grow between calls (an incremental detokenizer's settled text):
    a new stop string must end in the new delta, so the search starts len(longest stop)-1
    characters before it rather than at the start of the text.
    """

    def __init__(self, config: SamplingConfig, eos_token_ids: Iterable[int] = ()):
        eos = () if config.ignore_eos else tuple(eos_token_ids)
        self._stop_token_ids = frozenset(config.stop_token_ids).union(eos)
        self._stop_strings = config.stop
        self._lookback = max(map(len, config.stop), default=1) - 1
        self._max_tokens = config.max_tokens
        self._num_chars_searched = 0

    def check(self, token_id: int, text_so_far: str, num_output_tokens: int) -> StopDecision:
        # A stop string comes first: its truncation must happen even if the token also
        # ends the sequence for another reason.
        cut = self._find_stop_string(text_so_far)
        if cut is not None:
            return StopDecision(True, "stop", cut)
        if token_id in self._stop_token_ids:
            return StopDecision(True, "stop", None)
        if num_output_tokens >= self._max_tokens:
            return StopDecision(True, "length", None)
        return NOT_FINISHED

    def _find_stop_string(self, text: str) -> int | None:
        """Start of the earliest stop string in text, searching only where a new one can be."""
        if not self._stop_strings:
            return None
        start = max(0, min(self._num_chars_searched, len(text)) - self._lookback)
        self._num_chars_searched = len(text)
        hits = [i for s in self._stop_strings if (i := text.find(s, start)) >= 0]
        return min(hits, default=None)
