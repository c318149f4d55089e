"""The real model through the whole stack (Redis, scheduler, torch worker)."""
import os
import subprocess
import sys
import time

import pytest

from bros.client import Chunk, Client, Final
from bros.redis_server import EmbeddedRedis
from stack import Scheduler, Worker

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp, "--backend", "torch", "--kv-cache-mb", "64").start(timeout=300)
        sched = Scheduler(tmp, redis_server.url, [worker.address]).start()
        try:
            yield sched.address
        finally:
            sched.stop()
            worker.stop()


def test_cli_chat_answer_names_paris(stack):
    out = subprocess.run(
        [sys.executable, "-m", "bros.cli", "generate", "--class", "rt", "--chat", "--max-tokens", "24",
         "What is the capital of France?"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "BROS_TARGET": stack})
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "TTFT" in out.stderr and "TPOT" in out.stderr  # the timings line


def test_seeded_sampling_is_reproducible_and_text_matches_tokens(stack):
    with Client(stack) as client:
        runs = []
        for _ in range(2):
            events = list(client.generate("Write a short poem about the sea.", chat=True, service_class="be",
                                          max_tokens=20, temperature=0.9, top_p=0.95, seed=1234))
            chunks = [e for e in events if isinstance(e, Chunk)]
            runs.append(([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)))
            assert isinstance(events[-1], Final) and events[-1].num_output_tokens == len(runs[-1][0])
    assert runs[0] == runs[1]
    assert runs[0][1].strip()


def test_stop_string_ends_the_stream_before_it(stack):
    with Client(stack) as client:
        events = list(client.generate("Count from 1 to 10, separated by commas.", chat=True,
                                      service_class="rt", max_tokens=40, stop=["5"]))
    text = "".join(e.text for e in events if isinstance(e, Chunk))
    assert events[-1].finish_reason == "stop" and "5" not in text and "4" in text


def test_abort_on_the_real_model_frees_its_kv(stack):
    with Client(stack) as client:
        rid = client.submit("Tell me a very long story about dragons.", chat=True, service_class="be",
                            max_tokens=500, ignore_eos=True)
        deadline = time.monotonic() + 30
        while client.load()["workers"][0]["occupancy"].get("be_slots", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.abort(rid)
        deadline = time.monotonic() + 10
        while client.load()["workers"][0]["occupancy"].get("be_slots", 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.load()["workers"][0]["occupancy"].get("be_slots", 0) == 0
        final = [e for e in client.watch(rid) if isinstance(e, Final)][0]
        assert final.finish_reason == "abort"
