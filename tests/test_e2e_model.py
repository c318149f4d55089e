"""The real model through the whole stack, driven by the `bros` CLI as a user would."""
import os
import subprocess
import sys

import pytest

from bros.redis_server import EmbeddedRedis
from stack import Scheduler, Worker


@pytest.mark.model
def test_cli_chat_answer_names_paris(tmp_path):
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp_path, "--backend", "torch", "--kv-cache-mb", "64").start(timeout=300)
        sched = Scheduler(tmp_path, redis_server.url, [worker.address]).start()
        try:
            out = subprocess.run(
                [sys.executable, "-m", "bros.cli", "generate", "--class", "rt", "--chat", "--max-tokens", "24",
                 "What is the capital of France?"],
                capture_output=True, text=True, timeout=120, env={**os.environ, "BROS_TARGET": sched.address})
        finally:
            sched.stop()
            worker.stop()
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "TTFT" in out.stderr and "TPOT" in out.stderr  # the timings line
