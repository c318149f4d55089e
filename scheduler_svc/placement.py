"""Which worker takes a queued request, when a replica drives several.

Every worker loop pulls from the same Redis queues; left alone, whichever loop plans
first would take the next request. The board holds each driven worker's last report so
a loop only takes a class's queued work when its worker has (nearly) the most room for
that class. An idle worker takes queued BE work whatever the others have: idle GPUs are
the one thing BE traffic must never leave behind.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .planner import BE, RT

# Room per class, from PoolOccupancy: RT can also grow into paused BE KV.
ROOM_FIELD = {RT: "rt_available_slots_with_preempt", BE: "be_available_slots"}


@dataclass
class RoomBoard:
    tolerance: float = 0.9          # take work when own room >= tolerance x the best room
                                    # (SchedulerConfig.placement_tolerance sets it)
    rooms: dict[str, dict] = field(default_factory=dict)  # worker -> last occupancy

    def report(self, worker: str, occupancy: dict) -> None:
        self.rooms[worker] = occupancy

    def forget(self, worker: str) -> None:
        self.rooms.pop(worker, None)

    def takes(self, worker: str, service_class: int, idle: bool) -> bool:
        if idle and service_class == BE:
            return True
        key = ROOM_FIELD[service_class]
        own = self.rooms.get(worker, {}).get(key)
        if own is None or len(self.rooms) < 2:
            return True
        best = max(occ.get(key, 0) for occ in self.rooms.values())
        return own >= self.tolerance * best
