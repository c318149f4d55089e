"""The scheduler's configuration: one frozen dataclass, validated on construction, filled
from the command line (the one place arguments are read)."""
from __future__ import annotations

import argparse
import uuid
from dataclasses import dataclass

from bros.config_cli import add_config_flags
from bros.telemetry import telemetry_checks
from bros.tls import check_pair

from .planner import PlannerConfig
from .policies import POLICIES

_P = PlannerConfig  # the policies' knobs: defaults and their meaning live in planner.py


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
    # Policy knobs (scheduler_svc/planner.py PlannerConfig documents each).
    partition_rt_fraction: float = _P.partition_rt_fraction
    bros_urgent_slack_ms: float = _P.bros_urgent_slack_ms
    bros_urgent_iterations: float = _P.bros_urgent_iterations
    bros_prefill_ms_per_token: float = _P.bros_prefill_ms_per_token
    bros_aimd_step_tokens: int = _P.bros_aimd_step_tokens
    bros_aimd_decrease: float = _P.bros_aimd_decrease
    bros_min_batched_tokens: int = _P.bros_min_batched_tokens
    bros_target_attainment: float = _P.bros_target_attainment
    bros_attainment_window: int = _P.bros_attainment_window
    bros_admit_headroom_tokens: int = _P.bros_admit_headroom_tokens
    bros_admit_headroom_sd: float = _P.bros_admit_headroom_sd
    bros_prefill_switch_overheads: float = _P.bros_prefill_switch_overheads
    bros_rt_kv_pressure: float = _P.bros_rt_kv_pressure
    bros_slack_reserve_steps: float = _P.bros_slack_reserve_steps
    bros_rt_recompute_underfill: float = _P.bros_rt_recompute_underfill
    bros_fused_steps: bool = _P.bros_fused_steps
    bros_first_step_ms: float = _P.bros_first_step_ms
    bros_step_time_smoothing: float = _P.bros_step_time_smoothing
    bros_long_step_memory: float = _P.bros_long_step_memory
    bros_step_cost_decay: float = _P.bros_step_cost_decay
    bros_step_cost_min_weight: float = _P.bros_step_cost_min_weight
    bros_output_length_window: int = _P.bros_output_length_window
    bros_output_length_min_samples: int = _P.bros_output_length_min_samples
    # Several workers: a loop takes a class's queued work only while its worker's room for
    # that class (its last report) is at least this share of the roomiest worker's; an
    # idle worker takes BE regardless (scheduler_svc/placement.py).
    placement_tolerance: float = 0.9
    # ... and the room of workers other replicas drive is re-read from Redis this often.
    placement_refresh_ms: int = 50
    # Plans sent ahead of the worker's reports: 0 plans each step against the last report;
    # 1 sends the next plan while the worker runs the current one, so the queue read and
    # the planning between two steps leave the worker's path (scheduler_svc/projection.py).
    pipeline_depth: int = 0
    rt_ttft_ms: float = 1000.0               # default RT targets when a request sets none
    rt_tpot_ms: float = 200.0
    be_ttft_ms: float = 0.0                  # BE: no target (0), queue order by arrival only
    # Request limits: a request over one is refused with INVALID_ARGUMENT naming the field.
    max_prompt_chars: int = 1_000_000        # text prompts, and chat content in total
    max_chat_messages: int = 1024            # messages in a chat prompt
    max_stop_strings: int = 16               # sampling.stop entries
    max_stop_string_chars: int = 256         # characters of one stop string
    max_stop_token_ids: int = 256            # sampling.stop_token_ids entries
    max_request_id_chars: int = 128          # a client-chosen request_id
    result_ttl_s: int = 3600                 # finished results stay readable this long
    lease_ttl_ms: int = 3000                 # a dead replica's workers are taken over after this
    step_timeout_ms: int = 30_000            # a worker with no report for this long is dropped
    worker_requeue_after_ms: int = 5_000     # a lost worker's requests are requeued after this
    redis_retry_s: float = 30.0              # open streams wait this long for Redis to come back
    # A Generate whose call ends early (cancelled, or its connection broke: the server cannot
    # tell which) keeps its request this long for the client to resume it; then it is aborted
    # (docs/clients.md). 0 aborts at once. The clients in this repository Abort when their
    # caller stops reading, so only a lost connection waits this out.
    resume_grace_s: float = 5.0
    default_timeout_ms: int = 0              # a request's timeout when it sets none (0 = none)
    # Overload (docs/reliability.md#overload): bounds on what waits in the queues, both
    # classes together. BE is admitted only below be_queue_share of them, so a burst
    # refuses BE first and keeps the rest for RT.
    max_queued_requests: int = 100_000
    max_queued_tokens: int = 20_000_000      # prompt tokens
    be_queue_share: float = 0.8
    rt_infeasible: str = "reject"            # an RT request whose TTFT target can't be met: reject|flag
    retry_after_ms: int = 1000               # the hint sent with RESOURCE_EXHAUSTED
    drain_grace_s: float = 30.0              # SIGTERM: time to finish in-flight RT, then exit
    key_prefix: str = "bros"
    # access (docs/reliability.md#access); every file is read once, at startup
    tls_cert_file: str = ""                  # clients' TLS: this server's certificate ("" = plaintext)
    tls_key_file: str = ""
    tls_client_ca_file: str = ""             # require client certificates signed by this CA
    auth_tokens_file: str = ""               # bearer tokens and their classes ("" = no auth)
    worker_tls_ca_file: str = ""             # TLS to the workers, verified against this CA
    worker_tls_cert_file: str = ""           # this scheduler's client certificate for the workers
    worker_tls_key_file: str = ""
    redis_password_file: str = ""            # else a password in --redis-url is used
    redis_ca_file: str = ""                  # CA of a rediss:// server
    # observability (docs/scheduler.md#tracing-and-metrics)
    metrics_port: int = 0                    # Prometheus /metrics on host:metrics_port (0 = off)
    otlp_endpoint: str = ""                  # OTLP trace collector URL ("" = tracing off)
    otlp_protocol: str = "grpc"              # grpc, or http (http/protobuf, path /v1/traces)
    trace_sample_ratio: float = 1.0          # share of root traces kept (callers' decisions win)
    service_name: str = "bros-scheduler"     # service.name of this process's spans
    step_log: str = ""                       # append one JSON line per worker step here ("" = off; step_log.py)

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port < 65536, "port", "must be in [0, 65536)"),
            (self.max_num_seqs > 0, "max_num_seqs", "must be > 0"),
            (self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0"),
            (self.rt_ttft_ms > 0 and self.rt_tpot_ms > 0, "rt_ttft_ms", "RT targets must be > 0"),
            (self.lease_ttl_ms >= 500, "lease_ttl_ms", "must be >= 500"),
            (self.result_ttl_s > 0, "result_ttl_s", "must be > 0"),
            (self.max_prompt_chars > 0, "max_prompt_chars", "must be > 0"),
            (self.max_chat_messages > 0, "max_chat_messages", "must be > 0"),
            (self.max_stop_strings >= 0, "max_stop_strings", "must be >= 0"),
            (self.max_stop_string_chars > 0, "max_stop_string_chars", "must be > 0"),
            (self.max_stop_token_ids >= 0, "max_stop_token_ids", "must be >= 0"),
            (self.max_request_id_chars > 0, "max_request_id_chars", "must be > 0"),
            (self.step_timeout_ms >= 100, "step_timeout_ms", "must be >= 100"),
            (self.max_queued_requests > 0, "max_queued_requests", "must be > 0"),
            (self.max_queued_tokens > 0, "max_queued_tokens", "must be > 0"),
            (0 < self.be_queue_share <= 1, "be_queue_share", "must be in (0, 1]"),
            (self.rt_infeasible in ("reject", "flag"), "rt_infeasible", "must be reject or flag"),
            (self.retry_after_ms >= 0, "retry_after_ms", "must be >= 0"),
            (self.worker_requeue_after_ms >= 0, "worker_requeue_after_ms", "must be >= 0"),
            (self.resume_grace_s >= 0, "resume_grace_s", "must be >= 0"),
            (self.policy in POLICIES, "policy", f"must be one of {', '.join(sorted(POLICIES))}"),
            # partition gives each class its own seats and step tokens: at least one each.
            (self.policy != "partition" or self.max_num_seqs >= 2, "max_num_seqs", "must be >= 2 with policy partition"),
            (self.policy != "partition" or self.max_num_batched_tokens >= 2, "max_num_batched_tokens",
             "must be >= 2 with policy partition"),
            (0 < self.placement_tolerance <= 1, "placement_tolerance", "must be in (0, 1]"),
            (self.placement_refresh_ms > 0, "placement_refresh_ms", "must be > 0"),
            (self.pipeline_depth in (0, 1), "pipeline_depth", "must be 0 or 1"),
            *telemetry_checks(self),
        ]
        try:
            self.planner_config()
        except ValueError as e:
            raise ValueError(f"policy config: {e}") from None
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")
        check_pair(self.tls_cert_file, self.tls_key_file, "--tls-cert-file", "--tls-key-file")
        check_pair(self.worker_tls_cert_file, self.worker_tls_key_file, "--worker-tls-cert-file",
                   "--worker-tls-key-file")

    def planner_config(self) -> PlannerConfig:
        names = PlannerConfig.__dataclass_fields__
        return PlannerConfig(**{k: getattr(self, k) for k in names})

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
        try:
            return cls(**ns)
        except ValueError as e:  # one line naming the flag, exit 2, instead of a traceback
            p.error(str(e))


_PROCESS_REPLICA_ID = f"replica-{uuid.uuid4().hex[:12]}"
