"""A scheduler killed with SIGKILL in the middle of 50 requests and started again: every
request completes and every client sees every token exactly once."""
import threading
import time

from bros.client import Chunk, Client, Final, RetryPolicy
from bros.redis_server import EmbeddedRedis
from stack import Scheduler, Worker, free_port

NUM_REQUESTS = 50
MAX_TOKENS = 40


def consume(events, seen: list, done: dict, key):
    """Record every chunk (index, tokens); the client library resumes across the restart."""
    for ev in events:
        if isinstance(ev, Chunk):
            seen.append((ev.index, list(ev.token_ids)))
        elif isinstance(ev, Final):
            done[key] = ev


def test_sigkill_scheduler_mid_run_loses_nothing(tmp_path):
    retry = RetryPolicy(max_attempts=40, initial_backoff_s=0.1, max_backoff_s=0.5)
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp_path, "--backend", "sim", "--sim-clock", "real", "--num-blocks", "512").start()
        port = free_port()
        args = ("--lease-ttl-ms", "1500", "--max-num-batched-tokens", "512")
        sched = Scheduler(tmp_path, redis_server.url, [worker.address], *args, port=port).start()
        client = Client(f"127.0.0.1:{port}", retry=retry)
        seen = {i: [] for i in range(NUM_REQUESTS)}
        done: dict = {}
        threads = []
        try:
            for i in range(NUM_REQUESTS):
                prompt = [100 + i] * (8 + i % 13)
                if i % 2:  # RT: a live stream
                    events = client.generate(prompt, service_class="rt", max_tokens=MAX_TOKENS, temperature=0.0,
                                             request_id=f"rt-{i}")
                else:      # BE: submitted, then watched
                    rid = client.submit(prompt, service_class="be", max_tokens=MAX_TOKENS, temperature=0.0,
                                        request_id=f"be-{i}")
                    events = client.watch(rid)
                t = threading.Thread(target=consume, args=(events, seen[i], done, i), daemon=True)
                t.start()
                threads.append(t)
            # Let every request get going, then kill the replica mid-stream.
            deadline = time.monotonic() + 20
            while sum(len(s) > 0 for s in seen.values()) < NUM_REQUESTS // 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            progressed_before_kill = sum(len(s) > 0 for s in seen.values())
            sched.kill()
            time.sleep(0.5)
            sched = Scheduler(tmp_path, redis_server.url, [worker.address], *args, port=port).start()
            for t in threads:
                t.join(timeout=60)
        finally:
            client.close()
            sched.stop()
            worker.stop()
    assert progressed_before_kill >= NUM_REQUESTS // 2
    assert sorted(done) == list(range(NUM_REQUESTS)), f"unfinished: {sorted(set(range(NUM_REQUESTS)) - set(done))}"
    for i, chunks in seen.items():
        indices = [idx + k for idx, toks in chunks for k in range(len(toks))]
        assert indices == list(range(MAX_TOKENS)), f"request {i}: saw indices {indices}"
        assert done[i].num_output_tokens == MAX_TOKENS and done[i].finish_reason == "length"
