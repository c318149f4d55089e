"""bros' record of finished BE output lengths (policies/output_lengths.py)."""
import statistics

from scheduler_svc.planner import BE, RT, SeqView
from scheduler_svc.policies.output_lengths import FinishedLengths


def running(*outputs, cls=BE, prefix="be"):
    return [SeqView(request_id=f"{prefix}{i}", service_class=cls, arrival_ms=i, num_prompt_tokens=100,
                    num_tokens=100 + n) for i, n in enumerate(outputs)]


def test_a_be_request_gone_since_the_last_plan_counts_with_its_last_length():
    f = FinishedLengths(min_samples=2)
    f.observe(running(5, 9) + running(40, cls=RT, prefix="rt"))
    f.observe(running(6, 9))             # be0 moved on, be1 unchanged: nobody finished
    assert f.stdev() is None
    f.observe(running(7))                # be1 finished with 9 tokens
    f.observe([])                        # be0 with 7; RT never counts
    assert f.stdev() == statistics.pstdev([9, 7])


def test_the_spread_waits_for_enough_samples_and_follows_the_window():
    f = FinishedLengths(window=4, min_samples=3)
    lengths = [10, 50, 10, 50, 200, 200, 200, 200]
    for i, n in enumerate(lengths):
        f.observe([SeqView(request_id=f"r{i}", service_class=BE, arrival_ms=0, num_prompt_tokens=1,
                           num_tokens=1 + n)])
        f.observe([])
        if i < 2:
            assert f.stdev() is None
    assert f.stdev() == 0.0              # the window holds the last four: all 200
    f = FinishedLengths(window=4, min_samples=3)
    for i, n in enumerate(lengths[:5]):
        f.observe(running(n, prefix=f"s{i}-"))
        f.observe([])
    assert abs(f.stdev() - statistics.pstdev(lengths[1:5])) < 1e-9
