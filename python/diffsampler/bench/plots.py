"""PNG plots of the timing benchmarks (step, loop, resample) from their JSON payloads: written by each bench
after its JSON, and again from committed results by `python -m diffsampler.bench report --plots`; `pyplot` and
`save` serve the other benchmarks' plots too."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display): every bench plot goes through it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, groups: list[str], series: dict[str, list[float]]) -> None:
    """Grouped bars: one group per label, one bar per series (log scale)."""
    width = 0.8 / max(len(series), 1)
    for j, (name, values) in enumerate(series.items()):
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.legend(fontsize=8)


def plot_step(payload: dict, path: Path) -> Path:
    """Per size and dtype: each solver's update time per implementation, and the copy floor."""
    plt = pyplot()
    panels = defaultdict(lambda: defaultdict(dict))
    for r in payload["rows"]:
        panels[(tuple(r["size"]), r["dtype"])][r["solver"]][r["impl"]] = r
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax, ((size, dtype), solvers) in zip(axes.flat, sorted(panels.items(), key=lambda kv: (kv[0][1], kv[0][0]))):
        names = list(solvers)
        impls = sorted({i for s in solvers.values() for i in s})
        series = {i: [solvers[s][i]["seconds"] * 1e6 if i in solvers[s] else 0.0 for s in names] for i in impls}
        series["copy floor"] = [next(iter(solvers[s].values()))["floor_seconds"] * 1e6 for s in names]
        _bars(ax, names, series)
        ax.set_ylabel("µs per step")
        ax.set_title(f"{size} {dtype}")
    fig.suptitle(f"solver update alone: {payload['machine']['device']}, {payload['machine']['date'][:10]}")
    return save(fig, path)


def save(fig, path: Path) -> Path:
    """Lay out, write at 110 dpi, close; returns path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _grouped(rows, group, series, value, ylabel: str, title: str, path: Path, width: float) -> Path:
    """One grouped bar chart: a group per group(row), a bar per series(row), height value(row)."""
    plt = pyplot()
    table = defaultdict(dict)
    for r in rows:
        table[group(r)][series(r)] = value(r)
    names = list(dict.fromkeys(series(r) for r in rows))
    fig, ax = plt.subplots(figsize=(width, 4.6))
    _bars(ax, list(table), {n: [table[key].get(n, 0.0) for key in table] for n in names})
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save(fig, path)


def plot_loop(payload: dict, path: Path) -> Path:
    """Per solver: per-step time of each variant of the whole loop."""
    return _grouped(payload["rows"], lambda r: r["solver"], lambda r: r["variant"],
                    lambda r: r["per_step_seconds"] * 1e6, "µs per step (model included)",
                    f"{payload['steps']}-step loops at {tuple(payload['size'])} {payload['dtype']}: "
                    f"{payload['machine']['device']}", path, 7)


def plot_resample(payload: dict, path: Path) -> Path:
    """Per case (K, particle shape, weight spread): each resampler's best time."""
    return _grouped(payload["rows"], lambda r: f"K={r['K']} {tuple(r['particle_shape'])}\n{r['level']}",
                    lambda r: r["impl"], lambda r: r["best_seconds"] * 1e6, "µs (best of 5 batches)",
                    f"resampling, one group: {payload['machine']['device']}, {payload['machine']['date'][:10]}",
                    path, 11)
