"""The kernels' edges: the worker picks them for `--attention triton`, refuses clearly
where they cannot run, and `make bench-kernels` behaves with and without CUDA."""
import json

import pytest
import torch

from kernels import bench
from worker_svc.build import build_engine
from worker_svc.config import WorkerConfig


def test_worker_runs_triton_attention_on_cpu_under_the_interpreter():
    engine = build_engine(WorkerConfig(attention="triton", num_blocks=8, host_cache_mb=1))
    assert engine.runner.attn.name == "triton"
    assert engine.runner.attn.cache is engine.runner.cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_triton_attention_without_cuda_or_interpreter_names_the_field(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^attention 'triton' needs a CUDA device.*TRITON_INTERPRET=1"):
        build_engine(WorkerConfig(attention="triton", num_blocks=8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the bench really runs")
def test_bench_without_cuda_says_so_and_exits_0(capsys, tmp_path):
    assert bench.main(["--out", str(tmp_path / "kernels.json")]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "kernels.json").exists()


def test_bench_smoke_writes_a_row_per_kernel(capsys, tmp_path):
    """Tiny shapes through the interpreter: checks the script, measures nothing."""
    out = tmp_path / "kernels.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    kernels = {r["kernel"] for r in result["rows"]}
    assert kernels == {"paged_attention", "kv_write", "checkpoint_gather", "checkpoint_scatter"}
    assert any(r["num_splits"] > 1 for r in result["rows"])      # the split-KV path is in the table
    assert all(r["triton_ms"] > 0 and r["baseline_ms"] > 0 for r in result["rows"])
    assert "device copy bandwidth" in capsys.readouterr().out
