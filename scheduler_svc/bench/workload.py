"""Benchmark workloads: seeded, pure lists of requests, from public traces or synthetic.

RT requests replay the Azure conversation trace: its inter-arrival gaps, stretched so the
mean rate is the one asked for (the burstiness stays), and its lengths. BE requests are
either the paper's synthetic lengths (prompt U[512, 1024], output U[32, 128]) or lengths
sampled from the arXiv summarization trace, arriving as a Poisson stream or all at t=0.

The traces directory is found in one place, `traces_dir()`.
"""
from __future__ import annotations

import csv
import itertools
import math
import os
import random
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from scheduler_svc.planner import BE, RT

AZURE_CONV = "azure_conv_2023.csv"
ARXIV = "arxiv_summarization_lengths.csv"
# The paper's synthetic BE lengths (PAPER.md, "The paper's evaluation").
PAPER_BE_PROMPT = (512, 1024)
PAPER_BE_OUTPUT = (32, 128)


@dataclass(frozen=True)
class Request:
    request_id: str
    service_class: int      # RT or BE
    arrival_ms: float       # virtual time, from the start of the run
    prompt_len: int         # tokens
    output_len: int         # tokens generated (the sim never stops early)
    ttft_ms: float = 0.0    # RT target; 0 for BE
    tpot_ms: float = 0.0    # RT target; 0 for BE


def traces_dir() -> Path:
    """$BROS_TRACES, else ../shared/traces beside the repository."""
    env = os.environ.get("BROS_TRACES")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "traces"


@lru_cache(maxsize=None)
def _azure_conv(path: Path) -> tuple[tuple[float, ...], tuple[tuple[int, int], ...]]:
    """(arrival seconds from the first request, (prompt, output) lengths), in trace order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    t0 = _seconds(rows[0]["TIMESTAMP"])
    times = tuple(_seconds(r["TIMESTAMP"]) - t0 for r in rows)
    lengths = tuple((int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in rows)
    return times, lengths


def _seconds(stamp: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than fromisoformat's
    # microseconds on Python 3.11, so the fraction is parsed apart.
    whole, _, frac = stamp.partition(".")
    return datetime.fromisoformat(whole).timestamp() + float("0." + (frac or "0"))


@lru_cache(maxsize=None)
def _arxiv_lengths(path: Path) -> tuple[tuple[int, int], ...]:
    with open(path, newline="") as f:
        return tuple((int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f))


def clip_lengths(prompt_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Fit prompt + output into max_model_len: the output keeps its length (up to half the
    context), because it is what the metrics count; the prompt gives up the rest, and a
    long prompt is still long at max_model_len - output."""
    output_len = max(1, min(output_len, max_model_len // 2))
    prompt_len = max(1, min(prompt_len, max_model_len - output_len))
    return prompt_len, output_len


def rt_azure(rate_req_s: float, duration_s: float, seed: int, max_model_len: int,
             ttft_ms: float, tpot_ms: float) -> list[Request]:
    """RT requests from the Azure conversation trace at a mean of rate_req_s, for
    duration_s, starting at a seeded position in the trace (wrapping at its end)."""
    times, lengths = _azure_conv(traces_dir() / AZURE_CONV)
    trace_rate = (len(times) - 1) / times[-1]
    stretch = trace_rate / rate_req_s  # gap scale that makes the mean rate rate_req_s
    start = random.Random(seed).randrange(len(times))
    out: list[Request] = []
    t_s = 0.0
    for i in itertools.count(start):
        k = i % len(times)
        prompt_len, output_len = clip_lengths(*lengths[k], max_model_len)
        out.append(Request(f"rt-{len(out):05d}", RT, t_s * 1e3, prompt_len, output_len, ttft_ms, tpot_ms))
        gap = times[k + 1] - times[k] if k + 1 < len(times) else 1 / trace_rate
        t_s += gap * stretch
        if t_s >= duration_s:
            break
    return out


def be_lengths_paper(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(rng.randint(*PAPER_BE_PROMPT), rng.randint(*PAPER_BE_OUTPUT)) for _ in range(n)]


def be_lengths_arxiv(rng: random.Random, n: int) -> list[tuple[int, int]]:
    rows = _arxiv_lengths(traces_dir() / ARXIV)
    return [rows[rng.randrange(len(rows))] for _ in range(n)]


BE_LENGTHS = {"paper": be_lengths_paper, "arxiv": be_lengths_arxiv}


def be_requests(arrival: str, lengths: str, rate_req_s: float, duration_s: float, seed: int,
                max_model_len: int) -> list[Request]:
    """BE requests. arrival "poisson": a Poisson stream at rate_req_s for duration_s;
    "backlog": as many requests as that stream would bring on average, all at t=0."""
    rng = random.Random(seed * 7919 + 1)  # independent of the RT stream's seed use
    if arrival == "poisson":
        arrivals = _poisson_ms(rng, rate_req_s, duration_s)
    elif arrival == "backlog":
        arrivals = [0.0] * round(rate_req_s * duration_s)
    else:
        raise ValueError(f"BE arrival must be 'poisson' or 'backlog', got {arrival!r}")
    sizes = BE_LENGTHS[lengths](rng, len(arrivals))
    return [Request(f"be-{i:05d}", BE, t, *clip_lengths(p, o, max_model_len))
            for i, (t, (p, o)) in enumerate(zip(arrivals, sizes))]


def _poisson_ms(rng: random.Random, rate_req_s: float, duration_s: float) -> list[float]:
    out, t_s = [], rng.expovariate(rate_req_s)
    while t_s < duration_s:
        out.append(t_s * 1e3)
        t_s += rng.expovariate(rate_req_s)
    return out


def merge(*streams: list[Request]) -> list[Request]:
    """One workload in arrival order; ties keep RT before BE (stable on class order)."""
    return sorted((r for s in streams for r in s), key=lambda r: (r.arrival_ms, r.service_class))


def mean_lengths(requests: list[Request]) -> tuple[float, float]:
    n = max(1, len(requests))
    return sum(r.prompt_len for r in requests) / n, sum(r.output_len for r in requests) / n


def azure_mean_lengths(max_model_len: int) -> tuple[float, float]:
    """Mean (prompt, output) over the whole RT trace, after clipping."""
    _, lengths = _azure_conv(traces_dir() / AZURE_CONV)
    clipped = [clip_lengths(p, o, max_model_len) for p, o in lengths]
    return sum(p for p, _ in clipped) / len(clipped), sum(o for _, o in clipped) / len(clipped)


def be_mean_lengths(lengths: str, max_model_len: int) -> tuple[float, float]:
    """Mean (prompt, output) of a BE length source: exact for "paper", over the trace for "arxiv"."""
    if lengths == "paper":
        return sum(PAPER_BE_PROMPT) / 2, sum(PAPER_BE_OUTPUT) / 2
    clipped = [clip_lengths(p, o, max_model_len) for p, o in _arxiv_lengths(traces_dir() / ARXIV)]
    return sum(p for p, _ in clipped) / len(clipped), sum(o for _, o in clipped) / len(clipped)


def capacity_req_s(cost_model, mean_prompt: float, mean_output: float, max_batch: int) -> float:
    """Rough requests/s one worker sustains on requests of these mean lengths, alone.

    The estimate: the worker keeps max_batch requests running (the caller bounds it by
    max_num_seqs and by how many mean-sized requests the KV pool holds). Each request
    costs its prompt's prefill work without the per-iteration constant (with chunked
    prefill the chunk rides in a decode iteration that pays it), plus a 1/max_batch share
    of mean_output decode iterations at a context of prompt + output/2. It ignores
    queueing, preemption and the spread of lengths around the mean: good for expressing
    rates as fractions of capacity, not for predicting latency. Checked against FCFS on
    the default sim worker (OPT-13B/A100, 15,728-token pool, 512-token budget) serving a
    backlog: paper-synthetic BE estimated 4.66 req/s, served 4.13; Azure-conv RT
    estimated 1.46 req/s, served 1.70 (short requests pack tighter than the mean).
    """
    prompt, output, batch = round(mean_prompt), max(1.0, mean_output), max(1, max_batch)
    prefill_ms = cost_model.iteration_ms([prompt], []) - cost_model.prefill_base_ms
    decode_iteration_ms = cost_model.iteration_ms([], [round(mean_prompt + output / 2)] * batch)
    per_request_ms = prefill_ms + output * decode_iteration_ms / batch
    return 1e3 / per_request_ms


def max_batch_for_pool(pool_tokens: int, mean_prompt: float, mean_output: float, max_num_seqs: int) -> int:
    """Requests of mean size that fit the KV pool at once, at most max_num_seqs."""
    return max(1, min(max_num_seqs, math.floor(pool_tokens / (mean_prompt + mean_output))))
