"""Scheduling policies behind planner.Policy. `bros` is the paper's; the rest are the
baselines users would otherwise run, and bros's ablations."""
from .bros import Bros, BrosFixedBudget, BrosNoChunking, BrosNoSharing
from .fcfs import FCFS
from .partition import Partition
from .priority import Priority

POLICIES: dict[str, type] = {
    "fcfs": FCFS,
    "priority": Priority,
    "partition": Partition,
    "bros": Bros,
    "bros-no-sharing": BrosNoSharing,
    "bros-fixed-budget": BrosFixedBudget,
    "bros-no-chunking": BrosNoChunking,
}
