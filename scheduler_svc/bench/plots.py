"""Plots shared by the benchmark's scenarios (matplotlib, imported by the caller first)."""
from __future__ import annotations

from pathlib import Path


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
