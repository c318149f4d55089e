"""Shared fixtures. TRITON_INTERPRET must be set before any @triton.jit is defined."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


POISON = 1e4  # finite: decode attention reads whole blocks and masks what is not its own


def poison(cache):
    """Fill the pool with a value that wrecks any result that reads a slot nobody wrote."""
    cache.k.fill_(POISON)
    cache.v.fill_(POISON)
    cache.host.clear()


@pytest.fixture(scope="session")
def model_dir():
    """The default model (SmolLM2-135M-Instruct from its GGUF), converted once per cache."""
    from worker_svc.model.checkpoint import resolve_model
    return resolve_model(None)


@pytest.fixture(scope="session")
def torch_runner(model_dir):
    """One fp32 TorchRunner for the session; tests build engines (fresh pools) around it."""
    from worker_svc.torch_runner import TorchRunner
    runner = TorchRunner(str(model_dir), "float32", "cpu")
    runner.allocate_cache(256, 16)
    return runner


@pytest.fixture
def torch_engine(torch_runner):
    from worker_svc.engine import Engine, EngineLimits
    poison(torch_runner.cache)
    return Engine(torch_runner, EngineLimits(num_blocks=256, block_size=16, max_num_host_slots=1024,
                                             max_num_seqs=64, max_num_batched_tokens=2048))
