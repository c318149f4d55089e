"""One blocking XREAD for every token stream this replica's clients are waiting on.

A blocking read per client call holds one Redis connection for as long as it waits, so a
few hundred concurrent streams exhaust the client pool (redis-py: 100) and, across
replicas, the server (maxclients 10,000). The hub waits on all of them at once on its own
connection and wakes the calls whose streams moved; each call then reads its new entries
with a short non-blocking XREAD from the shared pool.

    call:  register(rid, index) ---- read ---- yield ---- wait() ---- read ...
    hub:   XREAD BLOCK  poke:<replica> <cursor>  tok:<rid1> <cursor1>  tok:<rid2> ...
                 |-> entries on tok:<rid>: advance its cursor, wake its calls

A call that starts waiting on a stream the hub is not reading yet pokes it (XADD to this
replica's poke stream, which every hub XREAD includes) so the wait restarts with the new
key at once; later waits on that stream cost nothing. Nothing here is needed for
correctness: a call also re-reads after `poll_s` without a wake, so a hub that lost Redis
only slows streams down.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

POKE_MAXLEN = 16
POKE_TTL_MS = 3_600_000


@dataclass
class _Watched:
    """One request's stream: the hub's cursor in it and the calls waiting on it."""
    cursor: str                                   # last entry id the hub has seen
    waiters: set[asyncio.Event] = field(default_factory=set)


class StreamHub:
    def __init__(self, redis_client, keys, replica_id: str, block_ms: int = 2_000):
        # block_ms stays under redis-py's default 5 s socket timeout, which a longer block trips.
        # A connection of our own: a blocked XREAD must not occupy the shared pool.
        pool = redis_client.connection_pool
        self._redis = type(redis_client)(connection_pool=type(pool)(
            connection_class=pool.connection_class, max_connections=1, **pool.connection_kwargs))
        self._shared = redis_client
        self._keys = keys
        self._poke_key = keys.poke(replica_id)
        self._poke_cursor = "0-0"
        self._block_ms = block_ms
        self._watched: dict[str, _Watched] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stream hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._redis.aclose()

    async def register(self, rid: str, after_index: int) -> asyncio.Event:
        """A wake-up event for the entries of rid after after_index (-1: all)."""
        event = asyncio.Event()
        cursor = f"0-{after_index + 1}"
        watched = self._watched.get(rid)
        if watched is None:
            self._watched[rid] = _Watched(cursor, {event})
            await self._poke()
        else:
            watched.waiters.add(event)
            if _id_key(cursor) < _id_key(watched.cursor):
                # Entries after after_index exist already (the hub, or the call that
                # registered first, is past it): read now, no need to rewind the hub.
                event.set()
        return event

    def unregister(self, rid: str, event: asyncio.Event) -> None:
        watched = self._watched.get(rid)
        if watched is None:
            return
        watched.waiters.discard(event)
        if not watched.waiters:
            del self._watched[rid]   # the hub drops the key at its next XREAD

    def wake_all(self) -> None:
        """Wake every waiting call now (the replica is closing its streams)."""
        for watched in self._watched.values():
            for event in watched.waiters:
                event.set()

    @property
    def num_watched(self) -> int:
        return len(self._watched)

    async def _poke(self) -> None:
        try:
            async with self._shared.pipeline(transaction=False) as pipe:
                pipe.xadd(self._poke_key, {"p": "1"}, maxlen=POKE_MAXLEN, approximate=True)
                pipe.pexpire(self._poke_key, POKE_TTL_MS)
                await pipe.execute()
        except RedisError:
            pass  # the call's own poll covers it

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._read_once()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except RedisError as e:
                log.warning("stream hub: redis: %s", e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:  # noqa: BLE001 — the hub only speeds streams up; keep it alive
                log.exception("stream hub failed")
                await asyncio.sleep(1.0)

    async def _read_once(self) -> None:
        streams = {self._poke_key: self._poke_cursor}
        rids = {}
        for rid, watched in self._watched.items():
            key = self._keys.tok(rid)
            streams[key] = watched.cursor
            rids[key.encode()] = rid
        reply = await self._redis.xread(streams, block=self._block_ms)
        for key, entries in _stream_items(reply):
            last_id = entries[-1][0].decode()
            if key == self._poke_key.encode():
                self._poke_cursor = last_id
                continue
            watched = self._watched.get(rids.get(key, ""))
            if watched is None:
                continue
            watched.cursor = last_id
            for event in watched.waiters:
                event.set()


def _stream_items(reply) -> list[tuple[bytes, list]]:
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return [(k, v[0]) for k, v in reply.items()]
    return [(k, entries) for k, entries in reply]


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)
