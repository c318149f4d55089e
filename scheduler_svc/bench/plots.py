"""Plots shared by the benchmark's scenarios (matplotlib; call ready() first)."""
from __future__ import annotations

import math
import sys
from pathlib import Path


def ready() -> bool:
    """matplotlib is installed (it is optional); selects the file-only backend."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    return True


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def plot_ttft_cdf(path: Path, ttfts: dict[str, list[float | None]], target_ms: float, title: str) -> None:
    """Over all RT requests: one that never got a token keeps its curve below 1."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in ttfts.items():
        xs = sorted(t for t in values if t is not None)
        ax.step(xs, [(i + 1) / len(values) for i in range(len(xs))], where="post", label=name)
    ax.axvline(target_ms, color="grey", linestyle=":", label="TTFT target")
    ax.set(xscale="log", xlabel="RT TTFT (ms)", ylabel="fraction of RT requests", title=title)
    ax.legend(fontsize="small")
    save(fig, path)


def plot_planner_time(path: Path, results: dict[str, dict], title: str) -> None:
    """Planner p50 and p99 per policy (wall clock), against the 1 ms bar."""
    import matplotlib.pyplot as plt
    names = list(results)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([x - 0.2 for x in xs], [results[n]["planner_p50_ms"] for n in names], width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [results[n]["planner_p99_ms"] for n in names], width=0.4, label="p99")
    ax.axhline(1.0, color="grey", linestyle=":", label="1 ms")
    ax.set_xticks(list(xs), names, rotation=20, fontsize="small")
    ax.set(ylabel="planner time per iteration (ms)", title=title)
    ax.legend(fontsize="small")
    save(fig, path)


def plot_vs_rate(path: Path, points: list[dict], policies: list[str], name: str) -> None:
    """RT attainment (both targets) and BE throughput per policy against the RT rate."""
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rates = [pt["rt_rate"] for pt in points]
    be = [v for policy in policies for v in _series(points, policy, "be_req_s") if not math.isnan(v)]
    for policy in policies:
        left.plot(rates, _series(points, policy, "rt_attain_both"), marker="o", label=policy)
        right.plot(rates, _series(points, policy, "be_req_s"), marker="o", label=policy)
    left.set(xlabel="RT rate (req/s)", ylabel="RT attainment (TTFT and TPOT)", ylim=(0, 1.02),
             title=f"{name}: RT SLO attainment")
    right.set(xlabel="RT rate (req/s)", ylabel="BE throughput (req/s)", ylim=(0, 1.05 * max(be, default=1.0)),
              title=f"{name}: BE throughput")
    left.legend(fontsize="small")
    save(fig, path)


def _series(points: list[dict], policy: str, key: str) -> list[float]:
    return [math.nan if pt["policies"][policy][key] is None else pt["policies"][policy][key] for pt in points]
