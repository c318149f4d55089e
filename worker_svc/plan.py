"""The engine's input and output for one iteration, free of protobuf.

service.py converts bros.v1.StepPlan / StepReport to and from these; the engine and its
tests never touch protobuf.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .block_allocator import SeqClass
from .sampler import SamplingConfig


@dataclass
class NewSeq:
    seq_id: str
    seq_class: SeqClass
    prompt_token_ids: list[int]
    sampling: SamplingConfig
    output_token_ids: list[int] = field(default_factory=list)  # carried over from elsewhere


@dataclass
class Plan:
    plan_id: int = 0
    new_sequences: list[NewSeq] = field(default_factory=list)
    scheduled: list[tuple[str, int]] = field(default_factory=list)   # (seq_id, num_tokens)
    preempt: list[str] = field(default_factory=list)
    checkpoint: list[str] = field(default_factory=list)
    restore: list[str] = field(default_factory=list)
    recompute: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    list_resident: bool = False


@dataclass
class SeqOutput:
    seq_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None        # "stop", "length", "abort"
    num_computed_tokens: int
    num_output_tokens: int


@dataclass
class ItemError:
    seq_id: str
    field: str
    message: str


@dataclass
class Timings:
    step_ms: float = 0.0
    forward_ms: float = 0.0
    sample_ms: float = 0.0
    copy_ms: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    clock_ms: float = 0.0


@dataclass
class ResidentSeq:
    seq_id: str
    seq_class: SeqClass
    state: str
    num_prompt_tokens: int
    num_computed_tokens: int
    output_token_ids: list[int]
    finished: bool
    finish_reason: str | None


@dataclass
class Report:
    plan_id: int
    outputs: list[SeqOutput] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)
    occupancy: dict[str, int] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    resident: list[ResidentSeq] = field(default_factory=list)
    recompute_needed: list[str] = field(default_factory=list)
