"""A scheduler killed with SIGKILL in the middle of a hybrid run of 200 requests (RT
streams and BE submits) and started again: every request completes and every client sees
every token exactly once."""
import time

import pytest

from bros.client import Client, RetryPolicy
from bros.redis_server import EmbeddedRedis
from hybrid import HybridRun
from stack import Scheduler, Worker, free_port

NUM_REQUESTS = 200
MAX_TOKENS = 40


@pytest.mark.parametrize("depth", [0, 1], ids=["serial", "pipelined"])
def test_sigkill_scheduler_mid_run_loses_nothing(tmp_path, depth):
    retry = RetryPolicy(max_attempts=40, initial_backoff_s=0.1, max_backoff_s=0.5)
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp_path, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "1024").start()
        port = free_port()
        args = ("--lease-ttl-ms", "1500", "--max-num-batched-tokens", "512", "--pipeline-depth", str(depth))
        sched = Scheduler(tmp_path, redis_server.url, [worker.address], *args, port=port).start()
        client = Client(f"127.0.0.1:{port}", retry=retry)
        try:
            run = HybridRun(client, NUM_REQUESTS, MAX_TOKENS).start()
            # Let many requests get going, then kill the replica mid-stream.
            progressed_before_kill = run.wait_progress(NUM_REQUESTS // 4)
            sched.kill()
            time.sleep(0.5)
            sched = Scheduler(tmp_path, redis_server.url, [worker.address], *args, port=port).start()
            run.join(timeout=120)
        finally:
            client.close()
            sched.stop()
            worker.stop()
    assert progressed_before_kill >= NUM_REQUESTS // 4
    assert progressed_before_kill < NUM_REQUESTS, "everything had started: the kill proved nothing"
    run.check()
