"""Every Redis key of the project, in one place.

A key is `{prefix}:{kind}` for the few global ones (per service class) and
`{prefix}:{kind}:{id}` for the per-request and per-worker ones. Lua scripts that learn
an id from a record (the worker a request runs on, say) build its key as
`head(kind) + id`, so the naming stays here: the store passes the heads in as arguments.

The prefix isolates deployments and tests sharing one server. Nothing depends on key
order or on a pattern scan: every key is reached from an id the caller already holds.
"""
from __future__ import annotations

from dataclasses import dataclass

# Same numbers as bros.v1.ServiceClass.
REALTIME = 1
BEST_EFFORT = 2
SERVICE_CLASSES = (REALTIME, BEST_EFFORT)
CLASS_NAMES = {REALTIME: "rt", BEST_EFFORT: "be"}

# Per-request kinds.
REQ = "req"            # hash: the request record (spec, state, timings); see store.RequestRecord
TOK = "tok"            # stream: output tokens, entry ID 0-(index+1); the final marker is 1-0
# Per-worker kinds.
RUNNING = "running"    # set: ids of the requests claimed by this worker and not yet finished
LEASE = "lease"        # string with PX: id of the scheduler replica driving this worker
WORKER = "worker"      # hash: the worker's last report (occupancy...), for GetLoad and placement from any replica
ABORTS = "aborts"      # set: ids of this worker's running requests a client asked to abort
PER_ID_KINDS = (REQ, TOK, RUNNING, LEASE, WORKER, ABORTS)


@dataclass(frozen=True)
class Keys:
    prefix: str = "bros"

    def __post_init__(self) -> None:
        if not self.prefix or ":" in self.prefix:
            raise ValueError(f"prefix must be non-empty and contain no ':', got {self.prefix!r}")

    def head(self, kind: str) -> str:
        """`head(kind) + id` is the key of that id; Lua scripts get heads, never patterns."""
        if kind not in PER_ID_KINDS:
            raise ValueError(f"unknown per-id key kind {kind!r}")
        return f"{self.prefix}:{kind}:"

    # --- per request ---------------------------------------------------------------
    def req(self, request_id: str) -> str:
        return self.head(REQ) + request_id

    def tok(self, request_id: str) -> str:
        return self.head(TOK) + request_id

    # --- per service class -----------------------------------------------------------
    def queue(self, service_class: int) -> str:
        """zset of queued request ids. RT: score = TTFT deadline (arrival + ttft, epoch ms);
        BE: score = arrival (epoch ms). Member iff the record's state is "queued"."""
        return f"{self.prefix}:queue:{CLASS_NAMES[service_class]}"

    def queued_tokens(self, service_class: int) -> str:
        """string (integer): sum of the prompt lengths of this class's queued requests."""
        return f"{self.prefix}:queued_tokens:{CLASS_NAMES[service_class]}"

    def running_count(self, service_class: int) -> str:
        """string (integer): how many of this class's requests are claimed by any worker
        (the per-class total of the per-worker running sets, kept so GetLoad needs no scan)."""
        return f"{self.prefix}:running_count:{CLASS_NAMES[service_class]}"

    def recent(self, service_class: int) -> str:
        """list, newest first, at most 1000: one outcome per finished request, the string
        "<ttft_met><tpot_met>" with each digit 1 or 0 (e.g. "10": TTFT met, TPOT missed)."""
        return f"{self.prefix}:recent:{CLASS_NAMES[service_class]}"

    # --- per worker ----------------------------------------------------------------
    def running(self, worker_id: str) -> str:
        return self.head(RUNNING) + worker_id

    def lease(self, worker_id: str) -> str:
        return self.head(LEASE) + worker_id

    def worker(self, worker_id: str) -> str:
        return self.head(WORKER) + worker_id

    def aborts(self, worker_id: str) -> str:
        return self.head(ABORTS) + worker_id

    # --- global --------------------------------------------------------------------
    def deadlines(self) -> str:
        """zset of the unfinished requests that have a deadline; score = deadline (epoch ms).
        Every worker loop's per-iteration read sweeps the expired ones."""
        return f"{self.prefix}:deadlines"

    def poke(self, replica_id: str) -> str:
        """stream (MAXLEN ~16, expires): entries wake one replica's StreamHub when a call
        starts watching a request it was not waiting on."""
        return f"{self.prefix}:poke:{replica_id}"

    def workers(self) -> str:
        """zset: worker id -> when its last report was written (epoch ms). How a replica
        finds the workers other replicas drive, and how fresh their WORKER hashes are
        (placement.py)."""
        return f"{self.prefix}:workers"

    def replica_seq(self) -> str:
        """string (integer): INCR gives each scheduler replica a unique id."""
        return f"{self.prefix}:replica_seq"
