"""sim-scale's process placement (the benchmark itself is `make bench SCENARIO=sim-scale`)."""
import os
import subprocess
import sys

from scheduler_svc.bench.scale import split_cpus


def test_sim_scale_gives_the_scheduler_a_core_of_its_own():
    """The split sim-scale runs under: the scheduler's CPU is nobody else's, the others
    keep the rest; on one CPU there is nothing to split."""
    mine = os.sched_getaffinity(0)
    sched, others = split_cpus()
    if len(mine) >= 2:
        assert len(sched) == 1 and not sched & others and sched | others == mine
    one = min(mine)
    code = ("import os; os.sched_setaffinity(0, {%d}); "
            "from scheduler_svc.bench.scale import split_cpus; print(split_cpus())" % one)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(None, None)"
