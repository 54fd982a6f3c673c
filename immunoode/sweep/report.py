"""Stage 9 — sweep report.  Consumes a sweep Dataset (or its store); produces a text report
(ranking, summaries with intervals, failures) and figures: heatmaps of a metric over two
factors, PFS Kaplan–Meier curves per scenario, and a forest plot of differences from a
reference scenario.  Every plot function takes ``ax=None`` and returns ``(fig, ax)``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from ..trialstats import kaplan_meier
from .summary import ranking

__all__ = ["report", "heatmap", "pfs_curves", "forest", "effects_vs_reference"]


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _ax(ax, size=(6, 4)):
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=size)
    return ax.figure, ax


def heatmap(ds: xr.Dataset, x: str, y: str, metric: str = "PFS_2y", ax=None):
    """Metric over two factors (other factors: mean over their scenarios)."""
    fig, ax = _ax(ax)
    xs = list(dict.fromkeys(ds[x].values.tolist()))
    ys = list(dict.fromkeys(ds[y].values.tolist()))
    grid = np.full((len(ys), len(xs)), np.nan)
    val = ds["summary"].sel(metric=metric).values
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            m = (ds[x].values == xv) & (ds[y].values == yv)
            if m.any():
                grid[i, j] = np.nanmean(val[m])
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    for i in range(len(ys)):
        for j in range(len(xs)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(metric)
    fig.colorbar(im, ax=ax)
    return fig, ax


def pfs_curves(ds: xr.Dataset, scenarios=None, ax=None, *, max_curves: int = 8):
    """Kaplan–Meier PFS curve per scenario (months on the x axis)."""
    fig, ax = _ax(ax)
    idx = list(range(ds.sizes["scenario"])) if scenarios is None else list(scenarios)
    for s in idx[:max_curves]:
        sub = ds.isel(scenario=s)
        ev = (sub["in_subgroup"] & ~sub["failed"] & sub["measurable"]).values
        if not ev.any():
            continue
        km = kaplan_meier(sub["pfs_time"].values[ev], sub["pfs_event"].values[ev])
        ax.step(km.time / 30.4375, km.survival, where="post", label=str(sub["scenario_name"].values))
    ax.set_xlabel("months")
    ax.set_ylabel("progression-free")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    return fig, ax


def effects_vs_reference(ds: xr.Dataset, reference: int = 0, metric: str = "PFS_2y"):
    """Difference of ``metric`` from the reference scenario, with an approximate 95 % interval.

    Each scenario's standard error is read from its own interval (half-width / 1.96) and the
    two are combined as if independent.  The scenarios share their patients (common random
    numbers), which correlates them positively, so this interval is conservative.
    Returns arrays (difference, lower, upper) over scenario.
    """
    est = ds["summary"].sel(metric=metric).values
    lo = ds["summary_lower"].sel(metric=metric).values
    hi = ds["summary_upper"].sel(metric=metric).values
    se = (hi - lo) / (2 * 1.959963984540054)
    d = est - est[reference]
    half = 1.959963984540054 * np.sqrt(se ** 2 + se[reference] ** 2)
    return d, d - half, d + half


def forest(ds: xr.Dataset, reference: int = 0, metric: str = "PFS_2y", ax=None):
    """Forest plot: each scenario's ``metric`` minus the reference's, with intervals."""
    fig, ax = _ax(ax, (6, 0.4 * ds.sizes["scenario"] + 1.5))
    d, lo, hi = effects_vs_reference(ds, reference, metric)
    y = np.arange(ds.sizes["scenario"])[::-1]
    ax.errorbar(d, y, xerr=[d - lo, hi - d], fmt="o", color="k", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, [str(n) for n in ds["scenario_name"].values])
    ax.set_xlabel(f"{metric} difference vs {ds['scenario_name'].values[reference]}")
    fig.tight_layout()
    return fig, ax


def report(results, *, plots=None, by: str = "PFS_2y", reference: int = 0):
    """Text report of a sweep (Dataset or store path) and, with ``plots``, figure files."""
    from .run import open_sweep
    ds = results if isinstance(results, xr.Dataset) else open_sweep(results)
    a = ds.attrs
    st = ds["chunk_status"].values
    lines = [f"sweep {a.get('sweep_name')}: {ds.sizes['scenario']} scenarios x "
             f"{ds.sizes['patient']} patients (model {a.get('model_name')}, hash "
             f"{str(a.get('model_hash'))[:12]}, seed {a.get('seed')}, immunoode {a.get('immunoode_version')})",
             f"chunks: {int((st == 1).sum())} done, {int((st == 2).sum())} failed, "
             f"{int((st == 0).sum())} not run; failed patients (kept, excluded from rates): "
             f"{int(ds['failed'].sum())}", ""]
    import pandas as pd
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        lines.append(ranking(ds, by=by).to_string(float_format=lambda x: f"{x:.3g}"))
    failed = json.loads(a.get("failed_chunks", "{}") or "{}")
    for k, msg in failed.items():
        lines.append(f"failed chunk (scenario, block) = ({k}): {msg}")
    files = []
    if plots:
        plt = _plt()
        out = Path(plots)
        out.mkdir(parents=True, exist_ok=True)
        varied = json.loads(a.get("varied_factors", "[]"))
        if len(varied) >= 2:
            fig, _ = heatmap(ds, varied[0], varied[1], by)
            files.append(out / f"heatmap_{varied[0]}_{varied[1]}.png")
            fig.savefig(files[-1], dpi=120)
            plt.close(fig)
        fig, _ = pfs_curves(ds)
        files.append(out / "pfs_curves.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
        fig, _ = forest(ds, reference, by)
        files.append(out / "forest.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return "\n".join(lines), files
