"""Graceful drain on SIGTERM: health goes NOT_SERVING, nothing new is admitted, in-flight RT
finishes, BE goes back to the queue for someone else, and the process exits within its
grace time; the clients' requests all complete, every token exactly once."""
import re
import signal
import time

import pytest

from bros.client import BrosError, Chunk, Client, Final, RetryPolicy
from bros.redis_server import EmbeddedRedis
from hybrid import HybridRun
from stack import Scheduler, Worker, free_port, health_status

RETRY = RetryPolicy(max_attempts=60, initial_backoff_s=0.1, max_backoff_s=0.5)
SIM = ("--backend", "sim", "--sim-clock", "real", "--num-blocks", "1024")
GRACE_S = 8


def drain_moved(log) -> int:
    """BE requests a draining loop handed back to the queue, from the scheduler's log."""
    return drain_moved_text(log.read_text())


def drain_moved_text(text: str) -> int:
    return sum(int(m) for m in re.findall(r"draining: (\d+) BE requests back", text))


def terminate_and_watch(proc, address: str) -> tuple[float, list[str]]:
    """SIGTERM; seconds until the process exits, and the health it reported meanwhile."""
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    seen = []
    while proc.proc.poll() is None and time.monotonic() - t0 < GRACE_S + 10:
        seen.append(health_status(address))
        time.sleep(0.1)
    return time.monotonic() - t0, seen


PIPELINE = pytest.mark.parametrize("depth", [0, 1], ids=["serial", "pipelined"])


@PIPELINE
def test_scheduler_drain_finishes_rt_and_hands_over(tmp_path, depth):
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp_path, *SIM).start()
        args = ("--lease-ttl-ms", "1500", "--drain-grace-s", str(GRACE_S), "--pipeline-depth", str(depth))
        s1 = Scheduler(tmp_path, redis_server.url, [worker.address], *args, "--replica-id", "s1").start()
        time.sleep(0.5)  # s1 takes the worker's lease first
        s2 = Scheduler(tmp_path, redis_server.url, [worker.address], *args, "--replica-id", "s2").start()
        client = Client(f"ipv4:127.0.0.1:{s1.port},127.0.0.1:{s2.port}", retry=RETRY)
        try:
            assert health_status(s1.address, "liveness") == "SERVING"
            run = HybridRun(client, 40, 120).start()
            run.wait_progress(20)
            took_s, seen = terminate_and_watch(s1, s1.address)
            exit_code = s1.proc.returncode
            run.join(timeout=90)
        finally:
            client.close()
            s1.kill()
            s2.stop()
            worker.stop()
    assert exit_code == 0 and took_s < GRACE_S + 3, (exit_code, took_s)
    assert seen and "SERVING" not in seen, seen  # NOT_SERVING (or gone) from the first check
    run.check()
    # The work moved by the drain itself, not by the lease-loss or worker-loss recovery.
    assert drain_moved(s1.log) > 0 and "lost" not in s2.log.read_text()


@PIPELINE
def test_worker_drain_moves_be_and_finishes_rt(tmp_path, depth):
    with EmbeddedRedis() as redis_server:
        w1 = Worker(tmp_path, *SIM, "--drain-grace-s", str(GRACE_S), name="w1").start()
        w2 = Worker(tmp_path, *SIM, name="w2").start()
        sched = Scheduler(tmp_path, redis_server.url, [w1.address, w2.address], "--pipeline-depth", str(depth)).start()
        client = Client(sched.address, retry=RETRY)
        try:
            run = HybridRun(client, 60, 120).start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                w = {x["worker_id"]: x for x in client.load()["workers"]}[w1.address]
                if int(w["running_sequences"]) >= 6:
                    break
                time.sleep(0.05)
            took_s, seen = terminate_and_watch(w1, w1.address)
            exit_code = w1.proc.returncode
            run.join(timeout=90)
            finished_without_w1 = len(run.done)
        finally:
            client.close()
            sched.stop()
            w1.kill()
            w2.stop()
    assert exit_code == 0 and took_s < GRACE_S + 3, (exit_code, took_s)
    assert "SERVING" not in seen, seen
    assert finished_without_w1 == 60
    run.check()
    log = sched.log.read_text()
    assert drain_moved(sched.log) > 0 and "lost: requeued" not in log


def test_a_stream_cut_by_a_scheduler_shutdown_resumes_elsewhere_and_is_not_aborted(tmp_path):
    """A replica that stops while its client's RT stream runs on another replica's worker
    ends that stream with UNAVAILABLE naming where to resume, and does not take the cut for
    the client leaving: the request runs on and the client gets the rest from the other."""
    slow = ("--sim-cost-set", "decode_base_ms=40")  # 200 tokens take ~8 s: the stop lands mid-way
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp_path, *SIM, *slow).start()
        args = ("--lease-ttl-ms", "1500", "--drain-grace-s", str(GRACE_S))
        s2 = Scheduler(tmp_path, redis_server.url, [worker.address], *args, "--replica-id", "s2").start()
        time.sleep(0.5)  # s2 takes the worker's lease: s1 only serves the stream, from Redis
        s1 = Scheduler(tmp_path, redis_server.url, [worker.address], *args, "--replica-id", "s1").start()
        c1, c2 = Client(s1.address), Client(s2.address, retry=RETRY)
        indices, cut, stopped = [], None, False
        try:
            stream = c1.generate([7] * 9, service_class="rt", max_tokens=200, temperature=0.0,
                                 request_id="rt-cut", ttft_ms=120_000, tpot_ms=60_000, resume=False)
            try:
                for ev in stream:
                    assert isinstance(ev, Chunk), ev
                    indices += range(ev.index, ev.index + len(ev.token_ids))
                    if len(indices) >= 10 and not stopped:
                        s1.proc.send_signal(signal.SIGTERM)
                        stopped = True
            except BrosError as e:
                cut = e
            s1.proc.wait(GRACE_S + 5)
            rest = list(c2.watch("rt-cut", resume_from_index=indices[-1]))
        finally:
            c1.close()
            c2.close()
            s1.kill()
            s2.stop()
            worker.stop()
    assert s1.proc.returncode == 0
    assert cut is not None and cut.code == "UNAVAILABLE", cut
    assert f"resume after index {indices[-1]}" in cut.message, cut.message
    for ev in rest[:-1]:
        indices += range(ev.index, ev.index + len(ev.token_ids))
    final = rest[-1]
    assert isinstance(final, Final) and final.finish_reason == "length", final
    assert indices == list(range(200)) and final.num_output_tokens == 200


@pytest.mark.faults
def test_a_rolling_restart_of_every_replica_loses_nothing(tmp_path):
    """What `helm upgrade` does to the schedulers: each replica in turn gets SIGTERM,
    drains, exits and comes back on its port (a new replica id, as a new pod has), while
    a hybrid load runs on two workers. Every request completes, every token reaches its
    client exactly once, and the work moved only by drains: no lease-loss or worker-loss
    recovery, nothing aborted by a cut stream."""
    # 8 seats a worker and ~4 s a request: waves of 16 requests, so the load outlasts both
    # restarts (asserted below). Which requests a drain holds then is up to bros: in the
    # runs so far only BE (handed back), the RT-finishing drain is the tests above.
    slow = ("--sim-cost-set", "decode_base_ms=40")
    with EmbeddedRedis() as redis_server:
        workers = [Worker(tmp_path, *SIM, *slow, name=f"w{i}").start() for i in range(2)]
        ports = [free_port(), free_port()]
        args = ("--lease-ttl-ms", "1500", "--drain-grace-s", str(GRACE_S), "--max-num-seqs", "8")

        def start(i: int, generation: int) -> Scheduler:
            return Scheduler(tmp_path, redis_server.url, [w.address for w in workers], *args,
                             "--replica-id", f"s{i}-{generation}", port=ports[i]).start()

        scheds = [start(0, 0), start(1, 0)]
        client = Client("ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports), retry=RETRY)
        exits, progress = [], []
        try:
            run = HybridRun(client, 80, 100).start()
            run.wait_progress(20)
            for i in range(2):
                progress.append(len(run.done))
                took_s, _ = terminate_and_watch(scheds[i], scheds[i].address)
                exits.append((scheds[i].proc.returncode, round(took_s, 1)))
                scheds[i] = start(i, 1)
            progress.append(len(run.done))
            run.join(timeout=120)
        finally:
            client.close()
            for s in scheds:
                s.stop()
            for w in workers:
                w.stop()
    assert all(code == 0 and took_s < GRACE_S for code, took_s in exits), exits
    assert progress[-1] < 80, f"the load ended before the last restart: finished {progress}"
    run.check()
    logs = "".join(p.read_text() for p in tmp_path.glob("scheduler-*.log"))
    assert "lost" not in logs and drain_moved_text(logs) > 0, logs[-3000:]
