"""Which worker takes a queued request, when a replica drives several.

Every worker loop pulls from the same Redis queues; left alone, whichever loop plans
first would take the next request. The board holds each driven worker's last report so
a loop only takes a class's queued work when its worker has (nearly) the most room for
that class among the workers with a free seat: a roomy worker whose every seat is taken
cannot start anything now, so it must not hold work back from the others. An idle
worker takes queued BE work whatever the others have: idle GPUs are the one thing BE
traffic must never leave behind.
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
    free_seats: dict[str, int] = field(default_factory=dict)  # worker -> unpaused seats left

    def report(self, worker: str, occupancy: dict, free_seats: int = 1) -> None:
        self.rooms[worker] = occupancy
        self.free_seats[worker] = free_seats

    def forget(self, worker: str) -> None:
        self.rooms.pop(worker, None)
        self.free_seats.pop(worker, None)

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
