"""The request store: the only code that talks to Redis. Pure data in, pure data out.

Every state change of a request is one Lua script, so it is atomic on the server and
any number of scheduler replicas can race on it safely:

    admit ──▶ queued ──claim──▶ running ──finish──▶ finished (record and stream expire
                 ▲                 │                          result_ttl_s later)
                 └─────requeue─────┘
    request_abort: queued -> finished("abort") at once; running -> the worker's abort set.

Invariants the scripts keep (each one script, so no reader sees them broken):
- a request id is in its class's queue zset iff its state is "queued", and in exactly
  one worker's running set iff its state is "running";
- queued_tokens(class) = sum of num_prompt_tokens over the queue; running_count(class) =
  the class's total over all running sets;
- the token stream holds entry `0-(i+1)` for output token i, contiguous from index 0,
  then at most one final entry `1-0`. The IDs are the dedup: the append script skips
  every index at or below the stream's last ID (Redis would refuse it anyway), so a
  token is stored once however often it is re-sent, and nothing after the final entry;
  a reader resuming "after index i" reads from ID `0-(i+1)` and misses nothing.

Batching: the writes of one scheduler iteration go in one round trip:

    async with store.batch() as b:
        b.append_tokens("r1", 7, [42], ["hi"], now_ms)
        b.finish("r2", "stop", now_ms)
        b.set_worker_state("w0", {"occupancy": report_bytes})
    # on exit: one MULTI/EXEC pipeline of EVALSHA/HSET; b.results holds the replies

A batch calls EVALSHA with the scripts' known SHAs (a redis-py Script in a pipeline
would add a SCRIPT EXISTS round trip on every execute). If the server lost them
(restart, SCRIPT FLUSH) the batch reloads the scripts and runs again once: every batch
operation is idempotent, so a partial first run is harmless. The one-op methods
`Store.append_tokens` / `finish` / `set_worker_state` are a batch of one.

Needs a standalone server (the scripts reach keys built from key heads, which a cluster
would refuse) and a client with decode_responses=False (sampling params are raw bytes).
Nothing here uses KEYS or SCAN: every key is reached from an id the caller holds.
"""
from __future__ import annotations

import contextlib
import struct
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from redis.exceptions import NoScriptError

from .keys import ABORTS, REALTIME, REQ, RUNNING, SERVICE_CLASSES, TOK, WORKER, Keys

EXPIRE_BATCH = 256         # expired requests ended per loop iteration (the rest next time)
RECENT_MAX = 1000          # outcomes kept per class for the attainment in GetLoad
WORKERS_KEEP_MS = 3_600_000  # a worker silent this long leaves the workers zset
FINAL_ID = b"1-0"          # the stream's last entry; sorts after every token entry 0-n
STATES = ("queued", "running", "finished")


def wall_ms(t: float | None = None) -> float:
    """t itself when given, else the wall clock in epoch ms (callers normally pass theirs)."""
    return t if t is not None else time.time() * 1000.0


# --- data ------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    request_id: str
    service_class: int                      # 1 REALTIME, 2 BEST_EFFORT (bros.v1.ServiceClass)
    prompt_token_ids: list[int]
    sampling: bytes                         # a serialized bros.v1.SamplingParams
    ttft_ms: float                          # targets; <= 0 means none (always met)
    tpot_ms: float
    arrival_ms: float                       # epoch ms, scheduler clock
    submitted: bool = False                 # made by Submit: a cancelled stream must not abort it
    state: str = "queued"                   # one of STATES
    worker_id: str = ""                     # the worker it runs (or last ran) on
    num_output_tokens: int = 0              # tokens in the stream, i.e. delivered for good
    deadline_ms: float | None = None         # epoch ms after which it ends as "timeout"
    ttft_flagged: bool = False               # admitted although its TTFT target looked infeasible
    first_scheduled_ms: float | None = None
    first_token_ms: float | None = None
    last_token_ms: float | None = None
    finished_ms: float | None = None
    finish_reason: str = ""                 # "stop", "length", "abort", ... ("" until finished)
    error: str = ""
    abort_requested: bool = False           # a client asked; the worker has not confirmed yet
    prompt_len: int | None = None           # set on peeked records (loop_inputs): no prompt carried
    owner: str = ""                         # identity of the sender's token (never the token); "" without auth
    trace_context: str = ""                 # W3C traceparent of the request's span; "" = not traced
    # Generate streams that have attached to it (the one that made it counts 1, each resume
    # adds one): an abort for an abandoned stream lands only if none came since.
    num_attaches: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids) if self.prompt_len is None else self.prompt_len

    @property
    def queue_score(self) -> float:
        """RT queue order is the TTFT deadline, BE order is arrival."""
        if self.service_class == REALTIME:
            return self.arrival_ms + self.ttft_ms
        return self.arrival_ms


@dataclass
class StreamEntry:
    """One output token, or the final marker (final=True: read the record for the result)."""
    index: int = -1
    token_id: int = 0
    text: str = ""
    final: bool = False


@dataclass
class ClassStats:
    service_class: int
    queued_requests: int
    queued_tokens: int
    running_requests: int
    recent_finished: int                    # over the last RECENT_MAX finishes, aborts excluded
    recent_ttft_attainment: float           # fraction met; 1.0 when nothing finished yet
    recent_tpot_attainment: float


@dataclass
class WorkerStats:
    worker_id: str
    running_requests: int
    leased_by: str                          # replica id, "" when no lease
    state: dict[str, bytes] = field(default_factory=dict)  # last set_worker_state fields, raw


# --- pure encoding -----------------------------------------------------------------------

def pack_tokens(token_ids: list[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


def unpack_tokens(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def _num(value: float) -> str:
    # repr is the shortest string that parses back to the same float, in Python and Lua.
    return repr(float(value))


_OPTIONAL_TIMES = ("deadline_ms", "first_scheduled_ms", "first_token_ms", "last_token_ms", "finished_ms")


def record_to_fields(rec: RequestRecord) -> dict[str, bytes | str]:
    """The record hash. num_prompt_tokens and score are derived, stored for the scripts."""
    fields: dict[str, bytes | str] = {
        "request_id": rec.request_id,
        "service_class": str(rec.service_class),
        "prompt": pack_tokens(rec.prompt_token_ids),
        "num_prompt_tokens": str(rec.num_prompt_tokens),
        "sampling": rec.sampling,
        "ttft_ms": _num(rec.ttft_ms),
        "tpot_ms": _num(rec.tpot_ms),
        "arrival_ms": _num(rec.arrival_ms),
        "score": _num(rec.queue_score),
        "submitted": "1" if rec.submitted else "0",
        "state": rec.state,
        "worker_id": rec.worker_id,
        "num_output_tokens": str(rec.num_output_tokens),
        "finish_reason": rec.finish_reason,
        "error": rec.error,
        "abort_requested": "1" if rec.abort_requested else "0",
        "owner": rec.owner,
        "attaches": str(rec.num_attaches),
    }
    if rec.trace_context:  # written by admit, with the rest of the record: no extra round trip
        fields["trace_context"] = rec.trace_context
    for name in _OPTIONAL_TIMES:
        if getattr(rec, name) is not None:
            fields[name] = _num(getattr(rec, name))
    return fields


# What planning reads of a queued request, each iteration (the peek): lengths, class and
# times, not the prompt or sampling. Every iteration re-reads up to max_num_seqs queued
# records, so their size is the loop's cost (shipping prompts cost more than the rest of
# the loop; the whole light record still cost a fifth of the scheduler's CPU at 10,000 queued).
PLAN_FIELDS = ("request_id", "service_class", "num_prompt_tokens", "ttft_ms", "tpot_ms", "arrival_ms",
               "num_output_tokens", "first_token_ms", "last_token_ms")


def record_from_fields(raw: dict[bytes, bytes]) -> RequestRecord:
    f = {k.decode(): v for k, v in raw.items()}

    def text(name: str) -> str:
        return f.get(name, b"").decode()

    return RequestRecord(
        request_id=text("request_id"),
        service_class=int(f["service_class"]),
        prompt_token_ids=unpack_tokens(f["prompt"]) if "prompt" in f else [],
        prompt_len=None if "prompt" in f else int(f["num_prompt_tokens"]),
        sampling=f.get("sampling", b""),
        ttft_ms=float(f["ttft_ms"]),
        tpot_ms=float(f["tpot_ms"]),
        arrival_ms=float(f["arrival_ms"]),
        submitted=f.get("submitted") == b"1",
        state=text("state"),
        worker_id=text("worker_id"),
        num_output_tokens=int(f.get("num_output_tokens", b"0")),
        finish_reason=text("finish_reason"),
        error=text("error"),
        abort_requested=f.get("abort_requested") == b"1",
        ttft_flagged=f.get("ttft_flagged") == b"1",
        owner=text("owner"),
        trace_context=text("trace_context"),
        num_attaches=int(f.get("attaches", b"0")),
        **{name: float(f[name]) if name in f else None for name in _OPTIONAL_TIMES},
    )


def _pairs_to_dict(flat: list) -> dict:
    return dict(zip(flat[0::2], flat[1::2]))


def entry_from_stream(entry_id: bytes, fields: dict[bytes, bytes]) -> StreamEntry:
    if entry_id == FINAL_ID:
        return StreamEntry(final=True)
    return StreamEntry(index=int(fields[b"i"]), token_id=int(fields[b"t"]),
                       text=fields[b"s"].decode())


def attainment(outcomes: list[bytes]) -> tuple[int, float, float]:
    """(count, TTFT attainment, TPOT attainment) of "<ttft_met><tpot_met>" outcomes."""
    if not outcomes:
        return 0, 1.0, 1.0
    ttft = sum(o[0:1] == b"1" for o in outcomes)
    tpot = sum(o[1:2] == b"1" for o in outcomes)
    return len(outcomes), ttft / len(outcomes), tpot / len(outcomes)


# --- Lua -----------------------------------------------------------------------------------

# Every request script gets the same context (Store._ctx_keys, Store._ctx_args):
#   KEYS[c] queue, KEYS[2+c] queued_tokens, KEYS[4+c] recent, KEYS[6+c] running_count,
#   where c is the service class (1 RT, 2 BE), and KEYS[9] the deadlines zset;
#   ARGV[1..4] key heads (request record, token stream, running set, abort set),
#   ARGV[5] result TTL (s). A script's own arguments start at ARGV[A+1].
_PRELUDE = """
local A = 5
local REQ, TOK, RUNNING, ABORTS, TTL = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local FINAL_ID = '1-0'

-- "<ttft_met><tpot_met>" from HMGET fields 5..10 of finish_request.
local function outcome(f)
  local arrival, ttft, tpot = tonumber(f[5]), tonumber(f[6]), tonumber(f[7])
  local first, last, n = tonumber(f[8]), tonumber(f[9]), tonumber(f[10]) or 0
  local ttft_met = ttft <= 0 or (first ~= nil and first - arrival <= ttft)
  local tpot_met = tpot <= 0 or n < 2 or (last - first) / (n - 1) <= tpot
  return (ttft_met and '1' or '0') .. (tpot_met and '1' or '0')
end

-- Any state -> finished, once. 1 if it finished now, 0 if unknown or already finished.
local function finish_request(id, reason, now, err)
  local rec = REQ .. id
  local f = redis.call('HMGET', rec, 'state', 'service_class', 'worker_id', 'num_prompt_tokens',
    'arrival_ms', 'ttft_ms', 'tpot_ms', 'first_token_ms', 'last_token_ms', 'num_output_tokens')
  local state, c = f[1], tonumber(f[2])
  if not state or state == 'finished' then return 0 end
  redis.call('ZREM', KEYS[9], id)
  if state == 'queued' then
    if redis.call('ZREM', KEYS[c], id) == 1 then redis.call('DECRBY', KEYS[2 + c], f[4]) end
  elseif redis.call('SREM', RUNNING .. f[3], id) == 1 then
    redis.call('DECR', KEYS[6 + c])
  end
  local tok = TOK .. id
  redis.call('XADD', tok, FINAL_ID, 'f', '1')
  redis.call('HSET', rec, 'state', 'finished', 'finished_ms', now, 'finish_reason', reason,
    'error', err)
  -- A client's abort says nothing about how well we serve: keep it out of attainment.
  -- (A timeout does: the request did not finish in the time it was given.)
  if reason ~= 'abort' then
    redis.call('LPUSH', KEYS[4 + c], outcome(f))
    redis.call('LTRIM', KEYS[4 + c], 0, %(recent_max)d - 1)
  end
  redis.call('EXPIRE', rec, TTL)
  redis.call('EXPIRE', tok, TTL)
  return 1
end
""" % {"recent_max": RECENT_MAX}

# ARGV[A+1] id, [A+2] class, [A+3] queue score, [A+4] num prompt tokens, [A+5] deadline
# (epoch ms, '' for none), [A+6] max queued requests and [A+7] max queued tokens (both
# classes together, this one included), [A+8] RT: the queued RT tokens its TTFT target
# allows ('' = no check), [A+9] '1': admit past a budget and flag it, [A+10] RT: "now"
# (epoch ms): infeasible while a queued RT request's deadline (its score) is already
# past ('' = no check), [A+11..] field, value...
# Returns 1 admitted, 0 the id exists, -1 the queues are full, -2 RT target infeasible.
_ADMIT = """
local id, c, n = ARGV[A + 1], tonumber(ARGV[A + 2]), tonumber(ARGV[A + 4])
local rec = REQ .. id
if redis.call('EXISTS', rec) == 1 then return 0 end
local queued = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
local tokens = (tonumber(redis.call('GET', KEYS[3])) or 0) + (tonumber(redis.call('GET', KEYS[4])) or 0)
if queued + 1 > tonumber(ARGV[A + 6]) or tokens + n > tonumber(ARGV[A + 7]) then return -1 end
local flagged = '0'
local over = (ARGV[A + 8] ~= '' and (tonumber(redis.call('GET', KEYS[2 + c])) or 0) + n > tonumber(ARGV[A + 8]))
  or (ARGV[A + 10] ~= '' and redis.call('ZCOUNT', KEYS[c], '-inf', ARGV[A + 10]) > 0)
if over then
  if ARGV[A + 9] ~= '1' then return -2 end
  flagged = '1'
end
redis.call('HSET', rec, unpack(ARGV, A + 11))
redis.call('HSET', rec, 'ttft_flagged', flagged)
if ARGV[A + 5] ~= '' then redis.call('ZADD', KEYS[9], ARGV[A + 5], id) end
redis.call('ZADD', KEYS[c], ARGV[A + 3], id)
redis.call('INCRBY', KEYS[2 + c], ARGV[A + 4])
return 1
"""

# ARGV[A+1] max RT, [A+2] max BE, [A+3..] the record fields to return (PLAN_FIELDS).
# Returns per class a list of {id, flat field/value pairs}.
_PEEK = """
local out = {}
local names = {}
for i = A + 3, #ARGV do names[#names + 1] = ARGV[i] end
for c = 1, 2 do
  local rows = {}
  local n = tonumber(ARGV[A + c])
  if n > 0 then
    for _, id in ipairs(redis.call('ZRANGE', KEYS[c], 0, n - 1)) do
      local values = redis.call('HMGET', REQ .. id, unpack(names))
      local flat = {}
      for i, v in ipairs(names) do
        if values[i] then  -- an optional time not set yet comes back nil (false here)
          flat[#flat + 1] = v
          flat[#flat + 1] = values[i]
        end
      end
      rows[#rows + 1] = {id, flat}
    end
  end
  out[c] = rows
end
return out
"""

# ARGV[A+1] worker, [A+2] now, [A+3..] ids. Returns the ids this call claimed.
_CLAIM = """
local worker, now = ARGV[A + 1], ARGV[A + 2]
local claimed = {}
for i = A + 3, #ARGV do
  local id = ARGV[i]
  local rec = REQ .. id
  local f = redis.call('HMGET', rec, 'service_class', 'num_prompt_tokens')
  local c = tonumber(f[1])
  -- Removing the id from its queue is the claim: exactly one caller gets ZREM == 1.
  if c and redis.call('ZREM', KEYS[c], id) == 1 then
    redis.call('DECRBY', KEYS[2 + c], f[2])
    redis.call('INCR', KEYS[6 + c])
    redis.call('SADD', RUNNING .. worker, id)
    redis.call('HSET', rec, 'state', 'running', 'worker_id', worker)
    redis.call('HSETNX', rec, 'first_scheduled_ms', now)
    claimed[#claimed + 1] = id
  end
end
return claimed
"""

# ARGV[A+1] worker, [A+2] now, [A+3..] ids. Returns the ids put back in their queue.
_REQUEUE = """
local worker, now = ARGV[A + 1], ARGV[A + 2]
local running = RUNNING .. worker
local requeued = {}
for i = A + 3, #ARGV do
  local id = ARGV[i]
  if redis.call('SISMEMBER', running, id) == 1 then
    local rec = REQ .. id
    local f = redis.call('HMGET', rec, 'service_class', 'num_prompt_tokens', 'score',
      'abort_requested')
    if f[4] == '1' then
      -- Its abort never reached the worker: honour it instead of running it again.
      finish_request(id, 'abort', now, '')
    else
      local c = tonumber(f[1])
      redis.call('SREM', running, id)
      redis.call('DECR', KEYS[6 + c])
      redis.call('ZADD', KEYS[c], f[3], id)
      redis.call('INCRBY', KEYS[2 + c], f[2])
      redis.call('HSET', rec, 'state', 'queued', 'worker_id', '')
      requeued[#requeued + 1] = id
    end
  end
end
return requeued
"""

# ARGV[A+1] now, [A+2] max. Ends up to max requests whose deadline has passed, as
# "timeout"; a running one's id also goes to its worker's abort set, so the loop driving
# that worker frees its KV in the same iteration. Returns how many ended.
_EXPIRE = """
local now = ARGV[A + 1]
local ended = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now, 'LIMIT', 0, tonumber(ARGV[A + 2]))) do
  local f = redis.call('HMGET', REQ .. id, 'state', 'worker_id')
  if f[1] == 'running' then redis.call('SADD', ABORTS .. f[2], id) end
  if finish_request(id, 'timeout', now, 'deadline passed') == 1 then
    ended = ended + 1
  else
    redis.call('ZREM', KEYS[9], id)
  end
end
return ended
"""

# ARGV[A+1] id, [A+2] start index, [A+3] now, [A+4] n, then n token ids, then n texts.
# Returns how many of the tokens were new.
_APPEND = """
local id, start, now, n = ARGV[A + 1], tonumber(ARGV[A + 2]), ARGV[A + 3], tonumber(ARGV[A + 4])
local rec, tok = REQ .. id, TOK .. id
if redis.call('EXISTS', rec) == 0 then return 0 end
local have = 0
local last = redis.call('XREVRANGE', tok, '+', '-', 'COUNT', 1)
if #last > 0 then
  if last[1][1] == FINAL_ID then return 0 end  -- finished: late tokens are dropped
  have = tonumber(string.sub(last[1][1], 3))   -- entry 0-k is index k-1: k tokens stored
end
if start > have then
  return redis.error_reply('BROSGAP ' .. id .. ': stream has ' .. have .. ' tokens, got index ' .. start)
end
local first_new = have - start
if first_new >= n then return 0 end
for k = first_new, n - 1 do
  local index = start + k
  redis.call('XADD', tok, '0-' .. (index + 1), 'i', index, 't', ARGV[A + 5 + k],
    's', ARGV[A + 5 + n + k])
end
redis.call('HSET', rec, 'num_output_tokens', start + n, 'last_token_ms', now)
redis.call('HSETNX', rec, 'first_token_ms', now)
return n - first_new
"""

# ARGV[A+1] id, [A+2] reason, [A+3] now, [A+4] error.
_FINISH = """
return finish_request(ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4])
"""

# ARGV[A+1] id, [A+2] now, [A+3] '' for a client's Abort, or the attach count of the
# Generate stream that was abandoned: then only a request made by a Generate (not
# Submit) whose count is still that (no stream attached since) is aborted. 1: a queued
# request finished now, or a running one's worker will be told; 0: not aborted.
_ABORT = """
local id, now, attaches = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
local rec = REQ .. id
local f = redis.call('HMGET', rec, 'state', 'worker_id', 'attaches', 'submitted')
if attaches and attaches ~= '' and (f[4] == '1' or (f[3] or '0') ~= attaches) then return 0 end
if f[1] == 'queued' then return finish_request(id, 'abort', now, '') end
if f[1] ~= 'running' then return 0 end
redis.call('HSET', rec, 'abort_requested', '1')
redis.call('SADD', ABORTS .. f[2], id)
return 1
"""

# ARGV[A+1] id. A stream attaching to the request: the record's new attach count, or 0
# for an unknown (or expired) request, which must not be brought back as a stub hash.
_ATTACH = """
local rec = REQ .. ARGV[A + 1]
if redis.call('EXISTS', rec) == 0 then return 0 end
return redis.call('HINCRBY', rec, 'attaches', 1)
"""

# Leases: KEYS[1] the lease, ARGV[1] replica id, ARGV[2] ttl (ms).
_LEASE_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_LEASE_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1] the workers zset; ARGV[1] the WORKER key head, [2] reported since (epoch ms),
# [3] forget workers silent since (epoch ms), [4..] fields. Returns {id, {values}} per
# worker that reported since ARGV[2] (a missing field comes back nil).
_WORKER_FIELDS = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local names = {}
for i = 4, #ARGV do names[#names + 1] = ARGV[i] end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')) do
  out[#out + 1] = {id, redis.call('HMGET', ARGV[1] .. id, unpack(names))}
end
return out
"""

_REQUEST_SCRIPTS = {"admit": _ADMIT, "expire": _EXPIRE, "peek": _PEEK, "claim": _CLAIM, "requeue": _REQUEUE,
                    "append": _APPEND, "finish": _FINISH, "abort": _ABORT, "attach": _ATTACH}
_LEASE_SCRIPTS = {"acquire": _LEASE_ACQUIRE, "renew": _LEASE_RENEW, "release": _LEASE_RELEASE}


# --- admission bounds ------------------------------------------------------------------

@dataclass(frozen=True)
class AdmissionBounds:
    """What admission may fill, checked atomically with the write (so replicas together
    never overshoot). Defaults: unbounded."""
    max_queued_requests: int = 2**62
    max_queued_tokens: int = 2**62
    rt_token_budget: float | None = None   # RT: queued RT prompt tokens its TTFT allows
    rt_late_after_ms: float | None = None  # RT: infeasible if RT queued with a deadline before this
    flag_infeasible: bool = False          # past rt_token_budget: admit and flag, not refuse


class QueuesFull(Exception):
    def __init__(self, max_requests: int, max_tokens: int):
        super().__init__(f"queues full for this class (bounds: {max_requests} requests, {max_tokens} tokens)")


class TargetInfeasible(Exception):
    def __init__(self, bounds: AdmissionBounds):
        budget = "" if bounds.rt_token_budget is None else f" (about {int(bounds.rt_token_budget)} queued RT prompt tokens fit)"
        super().__init__(f"its TTFT target cannot be met: RT queued ahead is past its own deadline or exceeds "
                         f"what prefills in time{budget}")


# --- the store ---------------------------------------------------------------------------

class Store:
    def __init__(self, redis_client, prefix: str = "bros", result_ttl_s: int = 3600) -> None:
        if redis_client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("Store needs a redis client with decode_responses=False")
        if result_ttl_s <= 0:
            raise ValueError(f"result_ttl_s must be > 0, got {result_ttl_s}")
        self.redis = redis_client
        self.keys = Keys(prefix)
        self.result_ttl_s = result_ttl_s
        # Registered once; each holds its SHA, so a call is one EVALSHA round trip.
        self._scripts = {name: redis_client.register_script(_PRELUDE + src)
                         for name, src in _REQUEST_SCRIPTS.items()}
        self._scripts.update({name: redis_client.register_script(src)
                              for name, src in _LEASE_SCRIPTS.items()})
        self._scripts["worker_fields"] = redis_client.register_script(_WORKER_FIELDS)
        k = self.keys
        self._ctx_keys = ([k.queue(c) for c in SERVICE_CLASSES]
                          + [k.queued_tokens(c) for c in SERVICE_CLASSES]
                          + [k.recent(c) for c in SERVICE_CLASSES]
                          + [k.running_count(c) for c in SERVICE_CLASSES]
                          + [k.deadlines()])
        self._ctx_args = [k.head(REQ), k.head(TOK), k.head(RUNNING), k.head(ABORTS),
                          str(result_ttl_s)]

    async def _run(self, name: str, args: list) -> object:
        return await self._scripts[name](keys=self._ctx_keys, args=self._ctx_args + args)

    def _queue_script(self, pipe, name: str, args: list) -> None:
        keys = self._ctx_keys
        pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *self._ctx_args, *args)

    async def load_scripts(self) -> None:
        """(Re)load every script into the server, e.g. after it restarted."""
        for script in self._scripts.values():
            script.sha = await self.redis.script_load(script.script)

    # --- admission and queues ----------------------------------------------------------

    async def admit(self, rec: RequestRecord, bounds: "AdmissionBounds | None" = None) -> tuple[str, bool]:
        """Create and enqueue the request unless its id exists: (id, created). Raises
        QueuesFull or TargetInfeasible (nothing written) when `bounds` refuse it."""
        bounds = bounds or AdmissionBounds()
        if rec.state != "queued" or rec.worker_id:
            raise ValueError(f"admit takes a fresh queued record, got state={rec.state!r}")
        if rec.service_class not in SERVICE_CLASSES:
            raise ValueError(f"service_class must be 1 or 2, got {rec.service_class}")
        flat = [x for pair in record_to_fields(rec).items() for x in pair]
        deadline = "" if rec.deadline_ms is None else _num(rec.deadline_ms)
        rt_budget = "" if bounds.rt_token_budget is None else str(int(bounds.rt_token_budget))
        rt_late = "" if bounds.rt_late_after_ms is None else _num(bounds.rt_late_after_ms)
        status = await self._run("admit", [rec.request_id, rec.service_class, _num(rec.queue_score),
                                           rec.num_prompt_tokens, deadline, bounds.max_queued_requests,
                                           bounds.max_queued_tokens, rt_budget, "1" if bounds.flag_infeasible else "0",
                                           rt_late, *flat])
        if status == -1:
            raise QueuesFull(bounds.max_queued_requests, bounds.max_queued_tokens)
        if status == -2:
            raise TargetInfeasible(bounds)
        return rec.request_id, status == 1

    async def get(self, request_id: str) -> RequestRecord | None:
        raw = await self.redis.hgetall(self.keys.req(request_id))
        return record_from_fields(raw) if raw else None

    async def claim(self, worker_id: str, request_ids: list[str], now_ms: float) -> list[str]:
        if not request_ids:
            return []
        claimed = await self._run("claim", [worker_id, _num(now_ms), *request_ids])
        return [i.decode() for i in claimed]

    async def requeue(self, worker_id: str, request_ids: list[str],
                      now_ms: float | None = None) -> list[str]:
        """Back to their queues at their admission scores; a request whose abort is pending
        finishes as aborted instead (at now_ms). Returns the ids requeued."""
        if not request_ids:
            return []
        requeued = await self._run("requeue", [worker_id, _num(wall_ms(now_ms)), *request_ids])
        return [i.decode() for i in requeued]

    async def running(self, worker_id: str) -> set[str]:
        return {i.decode() for i in await self.redis.smembers(self.keys.running(worker_id))}

    # --- tokens and results ------------------------------------------------------------

    def batch(self) -> contextlib.AbstractAsyncContextManager["Batch"]:
        """Writes queued on the Batch run in one round trip when the block exits cleanly."""
        return _batch(self)

    async def append_tokens(self, request_id: str, start_index: int, token_ids: list[int],
                            texts: list[str], now_ms: float | None = None) -> int:
        """Tokens start_index, start_index+1, ...; returns how many were new."""
        async with self.batch() as b:
            b.append_tokens(request_id, start_index, token_ids, texts, now_ms)
        return b.results[0]

    async def finish(self, request_id: str, reason: str, now_ms: float, error: str = "") -> bool:
        """True if it finished now; False if unknown or already finished."""
        async with self.batch() as b:
            b.finish(request_id, reason, now_ms, error)
        return bool(b.results[0])

    async def read_stream(self, request_id: str, after_index: int,
                          count: int | None = None) -> list[StreamEntry]:
        """Entries after output index after_index (-1: from the start), without waiting:
        a call that waits for more does so through the replica's StreamHub."""
        key = self.keys.tok(request_id)
        reply = await self.redis.xread({key: f"0-{after_index + 1}"}, count=count)
        if isinstance(reply, dict):  # RESP3
            entries = reply.get(key.encode(), [[]])[0]
        else:
            entries = reply[0][1] if reply else []
        return [entry_from_stream(entry_id, fields) for entry_id, fields in entries]

    # --- leases ------------------------------------------------------------------------

    async def new_replica_id(self) -> str:
        return f"replica-{await self.redis.incr(self.keys.replica_seq())}"

    async def acquire_lease(self, worker_id: str, replica_id: str, ttl_ms: int) -> bool:
        """Take a free lease, or extend our own; False while another replica holds it."""
        return await self._lease("acquire", worker_id, [replica_id, int(ttl_ms)])

    async def renew_lease(self, worker_id: str, replica_id: str, ttl_ms: int) -> bool:
        return await self._lease("renew", worker_id, [replica_id, int(ttl_ms)])

    async def release_lease(self, worker_id: str, replica_id: str) -> bool:
        return await self._lease("release", worker_id, [replica_id])

    async def _lease(self, name: str, worker_id: str, args: list) -> bool:
        return bool(await self._scripts[name](keys=[self.keys.lease(worker_id)], args=args))

    async def lease_holder(self, worker_id: str) -> str | None:
        holder = await self.redis.get(self.keys.lease(worker_id))
        return holder.decode() if holder is not None else None

    # --- aborts ------------------------------------------------------------------------

    async def request_abort(self, request_id: str, now_ms: float | None = None) -> bool:
        return bool(await self._run("abort", [request_id, _num(wall_ms(now_ms)), ""]))

    async def abort_abandoned(self, request_id: str, num_attaches: int, now_ms: float | None = None) -> bool:
        """The abort for a Generate stream that ended early, the num_attaches-th to attach:
        it lands only if no stream has attached since and the request was not Submitted."""
        return bool(await self._run("abort", [request_id, _num(wall_ms(now_ms)), str(num_attaches)]))

    async def attach(self, request_id: str) -> int:
        """Count a stream attaching to the request: its new attach count (0: unknown)."""
        return int(await self._run("attach", [request_id]))

    async def loop_inputs(self, worker_id: str, replica_id: str, ttl_ms: int, max_rt: int, max_be: int
                          ) -> tuple[bool, list[str], list[RequestRecord], list[RequestRecord]]:
        """What a worker loop reads each iteration, in ONE round trip: renew its lease, take
        the pending aborts, peek both queues (PLAN_FIELDS of each record only). Returns (lease still ours,
        aborts, rt, be); when the lease is lost, nothing else was consumed."""
        for attempt in (0, 1):
            pipe = self.redis.pipeline(transaction=True)
            pipe.evalsha(self._scripts["renew"].sha, 1, self.keys.lease(worker_id), replica_id, int(ttl_ms))
            self._queue_script(pipe, "expire", [_num(wall_ms()), EXPIRE_BATCH])
            self._queue_script(pipe, "peek", [max(0, max_rt), max(0, max_be), *PLAN_FIELDS])
            pipe.smembers(self.keys.aborts(worker_id))
            pipe.delete(self.keys.aborts(worker_id))
            try:
                renewed, _, (rt, be), aborts, _ = await pipe.execute()
                break
            except NoScriptError:
                if attempt:
                    raise
                await self.load_scripts()  # the server restarted and forgot them
        # Aborts taken by a replica that just lost the lease are not lost: the record's
        # abort_requested flag is what the next replica's reconciliation acts on.
        return bool(renewed), sorted(i.decode() for i in aborts), _records(rt), _records(be)

    # --- load --------------------------------------------------------------------------

    async def set_worker_state(self, worker_id: str, fields: dict) -> None:
        async with self.batch() as b:
            b.set_worker_state(worker_id, fields)

    async def worker_fields(self, fields: tuple[str, ...], max_age_ms: float) -> dict[str, dict[str, int]]:
        """worker id -> {field: int} (fields it has) for every worker whose state was
        written in the last max_age_ms, from any replica; one round trip."""
        now = wall_ms()
        rows = await self._scripts["worker_fields"](
            keys=[self.keys.workers()],
            args=[self.keys.head(WORKER), _num(now - max_age_ms), _num(now - WORKERS_KEEP_MS), *fields])
        return {wid.decode(): {f: int(float(v)) for f, v in zip(fields, values) if v is not None}
                for wid, values in rows}

    async def load(self, worker_ids: list[str]) -> dict:
        """{"classes": {class: ClassStats}, "workers": {worker_id: WorkerStats}}, one round trip."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for c in SERVICE_CLASSES:
            pipe.zcard(k.queue(c))
            pipe.get(k.queued_tokens(c))
            pipe.get(k.running_count(c))
            pipe.lrange(k.recent(c), 0, -1)
        for w in worker_ids:
            pipe.scard(k.running(w))
            pipe.get(k.lease(w))
            pipe.hgetall(k.worker(w))
        replies = await pipe.execute()
        classes = {}
        for i, c in enumerate(SERVICE_CLASSES):
            zcard, tokens, running, outcomes = replies[4 * i: 4 * i + 4]
            n, ttft, tpot = attainment(outcomes)
            classes[c] = ClassStats(c, zcard, int(tokens or 0), int(running or 0), n, ttft, tpot)
        workers = {}
        base = 4 * len(SERVICE_CLASSES)
        for j, w in enumerate(worker_ids):
            scard, lease, state = replies[base + 3 * j: base + 3 * j + 3]
            workers[w] = WorkerStats(w, scard, lease.decode() if lease else "",
                                     {f.decode(): v for f, v in state.items()})
        return {"classes": classes, "workers": workers}


def _records(rows: list) -> list[RequestRecord]:
    # A row whose hash vanished (cannot happen while the invariants hold) is skipped.
    return [record_from_fields(_pairs_to_dict(flat)) for _, flat in rows if flat]


# --- batching ------------------------------------------------------------------------------

class Batch:
    """Idempotent writes collected for one round trip; see the module docstring."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._ops: list[Callable[[object], None]] = []
        self.results: list = []

    def append_tokens(self, request_id: str, start_index: int, token_ids: list[int],
                      texts: list[str], now_ms: float | None = None) -> None:
        if len(token_ids) != len(texts):
            raise ValueError(f"{len(token_ids)} token ids but {len(texts)} texts")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        args = [request_id, start_index, _num(wall_ms(now_ms)), len(token_ids), *token_ids, *texts]
        self._ops.append(lambda pipe: self._store._queue_script(pipe, "append", args))

    def finish(self, request_id: str, reason: str, now_ms: float, error: str = "") -> None:
        if not reason:
            raise ValueError("finish needs a reason")
        args = [request_id, reason, _num(now_ms), error]
        self._ops.append(lambda pipe: self._store._queue_script(pipe, "finish", args))

    def set_worker_state(self, worker_id: str, fields: dict) -> None:
        """Field values: bytes as they are (e.g. a serialized proto), anything else str()."""
        if not fields:
            return
        keys = self._store.keys
        key, workers = keys.worker(worker_id), keys.workers()
        mapping = {f: v if isinstance(v, bytes) else str(v) for f, v in fields.items()}

        def write(pipe) -> None:
            pipe.hset(key, mapping=mapping)
            pipe.zadd(workers, {worker_id: wall_ms()})   # when: as sent, for placement's freshness
        self._ops.append(write)

    async def execute(self) -> list:
        if not self._ops:
            return []
        try:
            self.results = await self._send()
        except NoScriptError:
            # The server lost our scripts (restart, SCRIPT FLUSH). Every op is
            # idempotent, so running the whole batch again is safe.
            await self._store.load_scripts()
            self.results = await self._send()
        return self.results

    async def _send(self) -> list:
        pipe = self._store.redis.pipeline(transaction=True)
        for op in self._ops:
            op(pipe)
        return await pipe.execute()


@contextlib.asynccontextmanager
async def _batch(store: Store) -> AsyncIterator[Batch]:
    b = Batch(store)
    yield b
    await b.execute()
