"""Redis round trips, counted at the socket.

Every command, and every pipeline (its commands go out in one write and come back
together), is one `send_packed_command` on a connection: one round trip. `install`
makes a client's connections count those sends for whoever called `count_into` in the
current asyncio context. A worker loop calls it at the top of its task, so its count
takes in the tasks it starts (the report write) and leaves out everything else sharing
the client: client streams, the stream hub's reads, admission. A new connection's
handshake (HELLO, CLIENT SETINFO) counts too: those are round trips as well.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol


class Sink(Protocol):
    round_trips: int


_sink: ContextVar[Sink | None] = ContextVar("bros_redis_round_trip_sink", default=None)


def install(client) -> None:
    """Count on every connection the client's pool opens from now on (idempotent)."""
    pool = client.connection_pool
    base = pool.connection_class
    if getattr(base, "counts_round_trips", False):
        return

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        sink = _sink.get()
        if sink is not None:
            sink.round_trips += 1
        await base.send_packed_command(self, command, check_health)

    pool.connection_class = type(f"Counting{base.__name__}", (base,),
                                 {"send_packed_command": send_packed_command, "counts_round_trips": True})


def count_into(sink: Sink | None) -> None:
    """Round trips made from this asyncio context (and the tasks it starts) go to sink."""
    _sink.set(sink)
