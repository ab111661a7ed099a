"""Report directory: ``summary.json``, ``summary.md`` and PNG plots."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes() -> tuple[Any, Any]:
    """A new 8×4 figure and its axes (headless backend)."""
    fig, ax = _plt().subplots(figsize=(8, 4))
    return fig, ax


def _save(fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str,
          legend: bool = True) -> Path:  # fmt: skip
    """Label, lay out, write ``path`` as PNG and free the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_states(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Devices by state (coordinator view) over time."""
    fig, ax = _axes()
    t = [r["t"] for r in rows]
    for key in ("offline", "idle", "training"):
        ax.plot(t, [r.get(key, 0) for r in rows], label=key)
    if rows and "connected" in rows[0]:
        ax.plot(t, [r.get("connected", 0) for r in rows], "--", label="connected (agents)")
    return _save(fig, ax, path, xlabel="wall time (s)", ylabel="devices", title=title)


def plot_rate(rows: list[dict[str, Any]], key: str, path: Path, title: str, ylabel: str,
              group: str | None = None) -> Path:  # fmt: skip
    """Per-second rate of a cumulative counter, optionally one line per ``group`` value."""
    fig, ax = _axes()
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(group, "")) if group else "", []).append(r)
    for name, rs in groups.items():
        xs, ys = [], []
        for a, b in itertools.pairwise(rs):
            dt = b["t"] - a["t"]
            if dt > 0 and key in a and key in b:
                xs.append(b["t"])
                ys.append(max(0.0, (b[key] - a[key]) / dt))
        ax.plot(xs, ys, label=name or key)
    return _save(fig, ax, path, xlabel="wall time (s)", ylabel=ylabel, title=title,
                 legend=bool(group))  # fmt: skip


def plot_accuracy(
    curves: dict[str, list[tuple[float, float]]], target: float, path: Path,
    *, fed: dict[str, list[tuple[float, float]]] | None = None,
) -> Path:  # fmt: skip
    """Central held-out accuracy per strategy (solid) and, where the coordinator served
    federated evaluations, the federated accuracy in the same colour (dashed, markers)."""
    fig, ax = _axes()
    for name, pts in curves.items():
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{name} held-out")
        fpts = (fed or {}).get(name) or []
        if fpts:
            ax.plot([p[0] for p in fpts], [p[1] for p in fpts], "--o", markersize=3,
                    color=line.get_color(), label=f"{name} federated")  # fmt: skip
    ax.axhline(target, color="grey", linestyle=":", label=f"target {target:g}")
    return _save(fig, ax, path, xlabel="wall time since job start (s)",
                 ylabel="accuracy", title="Accuracy vs wall time per strategy")  # fmt: skip


def plot_hist(hists: dict[str, list[tuple[str, int]]], path: Path, title: str,
              xlabel: str) -> Path:  # fmt: skip
    fig, ax = _axes()
    n = max(1, len(hists))
    width = 0.8 / n
    for j, (name, hist) in enumerate(hists.items()):
        xs = [i + j * width for i in range(len(hist))]
        ax.bar(xs, [c for _, c in hist], width=width, label=name)
        ax.set_xticks(range(len(hist)), [f"≤{le}" for le, _ in hist], rotation=45)
    return _save(fig, ax, path, xlabel=xlabel, ylabel="count", title=title)


def plot_lag_hist(lags: list[float], path: Path) -> Path:
    fig, ax = _axes()
    ax.hist([x * 1000 for x in lags], bins=50, log=True)
    return _save(
        fig,
        ax,
        path,
        xlabel="telemetry lag (ms): publish → stored by the coordinator",
        ylabel="messages (log)",
        title="Telemetry lag, steady phase",
        legend=False,
    )


def clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


_MD_SKIP = {"timeline", "curve", "fleet_stats"}  # in summary.json only


def _md(obj: Any, depth: int = 0) -> list[str]:
    lines: list[str] = []
    pad = "  " * depth
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _MD_SKIP:
                continue
            if isinstance(v, dict | list) and v and not _flat_list(v):
                lines.append(f"{pad}- **{k}**")
                lines.extend(_md(v, depth + 1))
            else:
                lines.append(f"{pad}- {k}: {json.dumps(v) if isinstance(v, list) else v}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            lines.append(f"{pad}- [{i}]")
            lines.extend(_md(v, depth + 1))
    return lines


def _flat_list(v: Any) -> bool:
    return isinstance(v, list) and all(not isinstance(x, dict | list) for x in v)


def write(out_dir: Path, summary: dict[str, Any], headline: list[str], plots: list[Path]) -> None:
    """Write ``summary.json`` and ``summary.md`` (headline lines, plots, every figure)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = clean(summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = [f"# fedfleet load test: {summary.get('scenario')}", ""]
    md += [f"- {line.strip()}" for line in headline] + [""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md += ["", "## All figures", "", *_md(summary), ""]
    (out_dir / "summary.md").write_text("\n".join(md))
