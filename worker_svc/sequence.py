"""One sequence as the worker holds it: tokens, progress, sampling state."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .block_allocator import SeqClass
from .sampler import SamplingConfig, StopChecker


class SeqState(IntEnum):
    # Ordered as the lifecycle runs.
    WAITING = 0        # registered; KV not (fully) computed yet
    RUNNING = 1
    PREEMPTED = 2      # paused, KV in the pool (RT may take its free slots, or evict it)
    CHECKPOINTED = 3   # paused, KV on host
    FINISHED = 4       # done; KV freed; record kept until the scheduler frees it


@dataclass
class Sequence:
    seq_id: str
    seq_class: SeqClass
    prompt_token_ids: list[int]
    sampling: SamplingConfig
    stop_checker: StopChecker
    detokenizer: object                      # push(token_id) -> text delta
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    state: SeqState = SeqState.WAITING
    finish_reason: str | None = None
    text: str = ""                           # detokenized output so far
    num_text_sent: int = 0                   # chars of text already reported
    generator: object = None                 # the runner's per-sequence RNG

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.state == SeqState.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
