"""Which worker takes a queued request, when there are several.

Every worker loop, in every replica, pulls from the same Redis queues; left alone,
whichever loop plans first would take the next request. The board holds each worker's
last report so a loop only takes a class's queued work when its worker has (nearly) the
most room for that class among the workers with a free seat: a roomy worker whose every
seat is taken cannot start anything now, so it must not hold work back from the others.
An idle worker takes queued BE work whatever the others have: idle GPUs are the one
thing BE traffic must never leave behind.

The workers this replica drives report to the board after every step; the ones other
replicas drive come from Redis (every loop publishes its worker's room there with each
report), refreshed by `sync_board` every few tens of ms. A worker whose last report is
older than a lease is off the board: its driver is gone, and whoever takes its lease
over reports it again.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from .planner import BE, RT

log = logging.getLogger(__name__)

# Room per class, from PoolOccupancy: RT can also grow into paused BE KV.
ROOM_FIELD = {RT: "rt_available_slots_with_preempt", BE: "be_available_slots"}
# The worker-state fields the board reads back from Redis for other replicas' workers.
BOARD_FIELDS = (*ROOM_FIELD.values(), "free_seats")


@dataclass
class RoomBoard:
    tolerance: float = 0.9          # take work when own room >= tolerance x the best room
                                    # (SchedulerConfig.placement_tolerance sets it)
    rooms: dict[str, dict] = field(default_factory=dict)  # worker -> last occupancy
    free_seats: dict[str, int] = field(default_factory=dict)  # worker -> unpaused seats left
    local: set[str] = field(default_factory=set)   # driven here: entries come from their loops

    def report(self, worker: str, occupancy: dict, free_seats: int = 1) -> None:
        self.local.add(worker)
        self.rooms[worker] = occupancy
        self.free_seats[worker] = free_seats

    def forget(self, worker: str) -> None:
        self.local.discard(worker)
        self.rooms.pop(worker, None)
        self.free_seats.pop(worker, None)

    def merge_remote(self, remote: dict[str, dict]) -> None:
        """Replace every entry this replica does not drive with `remote` (worker -> its
        BOARD_FIELDS as Redis last had them): a worker missing from it is gone."""
        for worker in [w for w in self.rooms if w not in self.local and w not in remote]:
            del self.rooms[worker]
            self.free_seats.pop(worker, None)
        for worker, fields in remote.items():
            if worker in self.local:
                continue   # its own loop's report is newer than Redis' copy
            self.rooms[worker] = {k: fields[k] for k in ROOM_FIELD.values() if k in fields}
            self.free_seats[worker] = fields.get("free_seats", 1)

    def takes(self, worker: str, service_class: int, idle: bool) -> bool:
        if idle and service_class == BE:
            return True
        key = ROOM_FIELD[service_class]
        own = self.rooms.get(worker, {}).get(key)
        if own is None or len(self.rooms) < 2:
            return True
        # Rivals are workers that could seat the request now; this worker's own policy
        # decides for itself (bros may pause BE to free a seat for RT).
        rivals = [occ.get(key, 0) for w, occ in self.rooms.items() if w == worker or self.free_seats.get(w, 1) > 0]
        return own >= self.tolerance * max(rivals)


async def sync_board(board: RoomBoard, read, period_s: float) -> None:
    """Keep the board's other-replica entries fresh: `read()` returns worker -> fields of
    the workers that reported recently (Store.worker_fields). Runs until cancelled; a
    failed read keeps the last entries (placement then errs on stale room, never stops)."""
    while True:
        try:
            board.merge_remote(await read())
        except RedisError as e:
            log.debug("placement board not refreshed: %s", e)
        await asyncio.sleep(period_s)
