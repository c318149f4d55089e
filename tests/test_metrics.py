"""Prometheus metrics of a real scheduler and a real sim worker after a known workload,
scraped over HTTP and parsed with prometheus_client's own parser."""
from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bros.client import Chunk, Client, Final
from bros.redis_server import EmbeddedRedis
from stack import Scheduler, Worker, free_port

NUM_BLOCKS, BLOCK_SIZE = 64, 16
POOL_SLOTS = NUM_BLOCKS * BLOCK_SIZE
NUM_RT = NUM_BE = 6
MAX_TOKENS = 6
PROMPT = list(range(10, 30))

SCHEDULER_METRICS = {
    "bros_queue_depth": "gauge", "bros_queued_tokens": "gauge", "bros_kv_slots": "gauge",
    "bros_kv_utilization": "gauge", "bros_running_sequences": "gauge", "bros_batch_cap": "gauge",
    "bros_ttft_seconds": "histogram", "bros_tpot_seconds": "histogram", "bros_iteration_seconds": "histogram",
    "bros_target_attained": "counter", "bros_target_missed": "counter", "bros_preemptions": "counter",
    "bros_requests": "counter",
}
WORKER_METRICS = {
    "bros_kv_slots": "gauge", "bros_kv_utilization": "gauge", "bros_running_sequences": "gauge",
    "bros_iteration_seconds": "histogram", "bros_preemptions": "counter", "bros_checkpointed_bytes": "counter",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    with EmbeddedRedis() as redis_server:
        worker = Worker(tmp, "--backend", "sim", "--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE),
                        "--no-warmup", "--metrics-port", str(free_port())).start()
        # Two seats per worker, so a third request waits in the queue on cue.
        scheduler = Scheduler(tmp, redis_server.url, [worker.address], "--max-num-seqs", "2",
                              "--max-num-batched-tokens", "64", "--metrics-port", str(free_port())).start()
        try:
            yield worker, scheduler
        finally:
            scheduler.stop()
            worker.stop()


def metrics_port(proc) -> int:
    return int(proc.args[proc.args.index("--metrics-port") + 1])


def scrape(proc) -> tuple[dict, dict]:
    """({family name: family}, {(sample name, sorted label items): value})."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(proc)}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("bros_")}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    return families, samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape_when_pool_free(proc, worker_label: str, timeout: float = 10.0) -> tuple[dict, dict]:
    """A scrape taken once the worker's pool reads all free (the levels trail the last
    report slightly), or the last one after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        families, samples = scrape(proc)
        if value(samples, "bros_kv_slots", worker=worker_label, end="free") == POOL_SLOTS:
            return families, samples
        if time.monotonic() > deadline:
            return families, samples
        time.sleep(0.1)


def run_to_end(client: Client, cls: str, max_tokens: int = MAX_TOKENS, prompt=PROMPT) -> tuple[int, Final]:
    events = list(client.generate(prompt, service_class=cls, max_tokens=max_tokens, temperature=0.0))
    tokens = sum(len(e.token_ids) for e in events if isinstance(e, Chunk))
    return tokens, events[-1]


def first_token(client: Client, request_id: str) -> None:
    deadline = time.monotonic() + 20
    while not any(isinstance(e, Chunk) and e.token_ids for e in client.watch(request_id, wait=False)):
        assert time.monotonic() < deadline, f"{request_id} produced no token"
        time.sleep(0.02)


def test_metrics_after_a_known_workload(stack):
    worker, scheduler = stack
    with Client(scheduler.address, timeout=60) as client:
        # 1. Six RT and six BE requests at once, each to max_tokens.
        with ThreadPoolExecutor(NUM_RT + NUM_BE) as pool:
            runs = list(pool.map(lambda cls: run_to_end(client, cls), ["rt"] * NUM_RT + ["be"] * NUM_BE))
        assert all(tokens == MAX_TOKENS and final.finish_reason == "length" for tokens, final in runs)
        # 2. Aborts: two long BE requests take both seats, a third waits; abort all three.
        running = [client.submit(PROMPT, service_class="be", max_tokens=900) for _ in range(2)]
        for rid in running:
            first_token(client, rid)
        queued = client.submit(PROMPT, service_class="be", max_tokens=900)
        assert client.load()["classes"][1]["queued_requests"] == 1
        for rid in [queued, *running]:
            assert client.abort(rid)
        for rid in [queued, *running]:
            assert list(client.watch(rid))[-1].finish_reason == "abort"

    families, s = scrape_when_pool_free(scheduler, worker.address)
    check_conventions(families, SCHEDULER_METRICS)
    # Requests by class and status; the three aborts were counted where they happened
    # (the queued one by the Abort call, the two running ones by the worker loop).
    assert value(s, "bros_requests_total", **{"class": "rt", "status": "length"}) == NUM_RT
    assert value(s, "bros_requests_total", **{"class": "be", "status": "length"}) == NUM_BE
    assert value(s, "bros_requests_total", **{"class": "be", "status": "error"}) is None
    assert value(s, "bros_requests_total", **{"class": "be", "status": "abort"}) == 3
    # TTFT once per request that produced a token; TPOT and targets per finished request.
    assert value(s, "bros_ttft_seconds_count", **{"class": "rt"}) == NUM_RT
    assert value(s, "bros_ttft_seconds_count", **{"class": "be"}) == NUM_BE + 2
    assert value(s, "bros_tpot_seconds_count", **{"class": "rt"}) == NUM_RT
    assert value(s, "bros_tpot_seconds_count", **{"class": "be"}) == NUM_BE
    rt_ttft = sum(final.ttft_ms for _, final in runs[:NUM_RT]) / 1e3
    assert value(s, "bros_ttft_seconds_sum", **{"class": "rt"}) == pytest.approx(rt_ttft, rel=0.05, abs=0.02)
    for target in ("ttft", "tpot"):
        met = sum(getattr(final, f"{target}_met") for _, final in runs[:NUM_RT])
        labels = {"class": "rt", "target": target}
        assert value(s, "bros_target_attained_total", **labels) == met
        assert (value(s, "bros_target_missed_total", **labels) or 0) == NUM_RT - met
        assert value(s, "bros_target_attained_total", **{"class": "be", "target": target}) is None  # no BE target
    # Levels once everything finished: empty queues, an empty pool, nothing running.
    for cls in ("rt", "be"):
        assert value(s, "bros_queue_depth", **{"class": cls}) == 0
        assert value(s, "bros_queued_tokens", **{"class": cls}) == 0
        assert value(s, "bros_running_sequences", worker=worker.address, **{"class": cls}) == 0
    assert value(s, "bros_kv_slots", worker=worker.address, end="rt") == 0
    assert value(s, "bros_kv_slots", worker=worker.address, end="be") == 0
    assert value(s, "bros_kv_utilization", worker=worker.address) == 0
    assert 0 < value(s, "bros_batch_cap", worker=worker.address) <= 64
    assert value(s, "bros_iteration_seconds_count", worker=worker.address) > 0
    assert value(s, "bros_preemptions_total", worker=worker.address) >= 0

    # The worker's own view, under the same names.
    wid = f"127.0.0.1:{worker.port}"
    families, w = scrape_when_pool_free(worker, wid)
    check_conventions(families, WORKER_METRICS)
    assert value(w, "bros_kv_utilization", worker=wid) == 0
    assert value(w, "bros_running_sequences", worker=wid, **{"class": "rt"}) == 0
    assert value(w, "bros_running_sequences", worker=wid, **{"class": "be"}) == 0
    assert value(w, "bros_iteration_seconds_count", worker=wid) >= value(s, "bros_iteration_seconds_count",
                                                                         worker=worker.address)
    assert value(w, "bros_preemptions_total", worker=wid) == value(s, "bros_preemptions_total", worker=worker.address)
    assert value(w, "bros_checkpointed_bytes_total", worker=wid) >= 0


def check_conventions(families: dict, expected: dict[str, str]) -> None:
    """Every expected family, typed as expected, named and labelled as Prometheus asks:
    snake_case, a unit suffix in base units, counters ending in _total, histograms with
    cumulative buckets ending in +Inf equal to _count."""
    for name, kind in expected.items():
        assert name in families, f"{name} missing"
        assert families[name].type == kind, (name, families[name].type)
    for name, family in families.items():
        assert re.fullmatch(r"bros_[a-z][a-z0-9_]*", name), name
        assert family.documentation, f"{name} has no HELP"
        assert not re.search(r"_(ms|milliseconds|kb|mb)$", name), f"{name}: use base units"
        for sample in family.samples:
            assert all(re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in sample.labels), sample
            if family.type == "counter":
                assert sample.name == f"{name}_total", sample
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
            _check_histogram(family)


def _check_histogram(family) -> None:
    series: dict[tuple, list] = {}
    counts = {}
    for sample in family.samples:
        key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        if sample.name.endswith("_bucket"):
            series.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_count"):
            counts[key] = sample.value
    for key, buckets in series.items():
        buckets.sort()
        assert buckets[-1][0] == float("inf")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), "cumulative"
        assert buckets[-1][1] == counts[key]


def test_worker_counts_preemptions_and_checkpointed_bytes():
    """The engine's own counters, through WorkerMetrics, on a real (sim, virtual clock) engine."""
    from worker_svc.block_allocator import SeqClass
    from worker_svc.build import build_engine
    from worker_svc.config import WorkerConfig
    from worker_svc.metrics import WorkerMetrics
    from worker_svc.plan import NewSeq, Plan
    from worker_svc.sampler import SamplingConfig

    engine = build_engine(WorkerConfig(backend="sim", sim_clock="virtual", num_blocks=16, block_size=4,
                                       host_cache_mb=64))
    metrics = WorkerMetrics("w0")
    get = lambda name, **labels: metrics.registry.get_sample_value(name, {"worker": "w0", **labels})  # noqa: E731
    sampling = SamplingConfig(max_tokens=50, temperature=0.0)
    new = [NewSeq("be1", SeqClass.BE, list(range(3, 13)), sampling), NewSeq("be2", SeqClass.BE, [3] * 6, sampling),
           NewSeq("rt1", SeqClass.RT, [4] * 6, sampling)]
    metrics.observe_step(engine, engine.step(Plan(1, new_sequences=new, scheduled=[("be1", 10), ("be2", 6),
                                                                                    ("rt1", 6)])))
    assert get("bros_kv_slots", end="be") == 16 and get("bros_kv_slots", end="rt") == 6
    assert get("bros_running_sequences", **{"class": "be"}) == 2 and get("bros_iteration_seconds_count") == 1
    assert get("bros_preemptions_total") == 0 and get("bros_checkpointed_bytes_total") == 0

    # One of each kind; the checkpoint moves be1's 10 computed slots to host.
    report = engine.step(Plan(2, checkpoint=["be1"], preempt=["be2"], recompute=["rt1"]))
    assert not report.errors
    metrics.observe_step(engine, report)
    assert get("bros_preemptions_total") == 3
    assert get("bros_checkpointed_bytes_total") == 10 * engine.runner.kv_bytes_per_slot
    assert get("bros_kv_slots", end="be") == 6 and get("bros_kv_slots", end="rt") == 0   # be2 paused in place
    assert get("bros_kv_slots", end="free") == 16 * 4 - 6
    assert get("bros_kv_utilization") == pytest.approx(6 / 64)
    assert get("bros_running_sequences", **{"class": "be"}) == 0      # both paused
    assert get("bros_running_sequences", **{"class": "rt"}) == 1      # waiting to recompute
    assert get("bros_iteration_seconds_count") == 1                  # a step without tokens is no iteration

    # A refused item changes nothing and counts nothing.
    report = engine.step(Plan(3, preempt=["unknown"]))
    metrics.observe_step(engine, report)
    assert report.errors and get("bros_preemptions_total") == 3
