"""The scheduler's configuration: one frozen dataclass, validated on construction, filled
from the command line (the one place arguments are read)."""
from __future__ import annotations

import argparse
import uuid
from dataclasses import dataclass

from bros.config_cli import add_config_flags


@dataclass(frozen=True)
class SchedulerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str = "redis://127.0.0.1:6379/0"
    workers: tuple[str, ...] = ()            # host:port of each worker
    policy: str = "bros"                     # fcfs, priority, partition, bros (+ ablations)
    replica_id: str = ""                     # default: a fresh uuid per process
    max_num_seqs: int = 64                   # running sequences per worker
    max_num_batched_tokens: int = 512        # tokens per step (chunked prefill budget)
    rt_ttft_ms: float = 1000.0               # default RT targets when a request sets none
    rt_tpot_ms: float = 200.0
    be_ttft_ms: float = 0.0                  # BE: no target (0), queue order by arrival only
    max_prompt_chars: int = 1_000_000        # text prompts beyond this are refused
    result_ttl_s: int = 3600                 # finished results stay readable this long
    lease_ttl_ms: int = 3000                 # a dead replica's workers are taken over after this
    key_prefix: str = "bros"

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port < 65536, "port", "must be in [0, 65536)"),
            (self.max_num_seqs > 0, "max_num_seqs", "must be > 0"),
            (self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0"),
            (self.rt_ttft_ms > 0 and self.rt_tpot_ms > 0, "rt_ttft_ms", "RT targets must be > 0"),
            (self.lease_ttl_ms >= 500, "lease_ttl_ms", "must be >= 500"),
            (self.result_ttl_s > 0, "result_ttl_s", "must be > 0"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def resolved_replica_id(self) -> str:
        return self.replica_id or _PROCESS_REPLICA_ID

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "SchedulerConfig":
        p = argparse.ArgumentParser(prog="python -m scheduler_svc", description="bros scheduler")
        add_config_flags(p, cls, skip=("workers",))
        p.add_argument("--workers", default="", help="comma-separated host:port of the workers")
        ns = vars(p.parse_args(argv))
        ns["workers"] = tuple(w.strip() for w in ns["workers"].split(",") if w.strip())
        return cls(**ns)


_PROCESS_REPLICA_ID = f"replica-{uuid.uuid4().hex[:12]}"
