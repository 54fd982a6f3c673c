"""Clinical-style figures of a classified virtual trial arm (matplotlib, Agg backend).

Every function takes the Dataset of :func:`immunoode.trial.run_trial` (or of
:func:`immunoode.response.assess_response`), draws on ``ax`` (a new figure when
``ax`` is None) and returns ``(fig, ax)``:

* :func:`waterfall` — best % change of the sum of diameters, one bar per patient,
  coloured by best overall response, with the −30 % (PR) and +20 % (PD) lines;
* :func:`spider` — % change from baseline over time, one line per patient;
* :func:`swimmer` — one bar per patient to first PD or last scan, with the time of
  response (triangle), progression (cross) and ongoing follow-up (arrow);
* :func:`km_pfs` — Kaplan–Meier PFS with its confidence band, censor ticks and median.

:func:`save_trial_plots` writes all four as PNG files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["waterfall", "spider", "swimmer", "km_pfs", "save_trial_plots", "BOR_COLORS"]

BOR_COLORS = {"CR": "#1a9850", "PR": "#91cf60", "SD": "#fdae61", "PD": "#d73027", "NE": "#bdbdbd"}
_MONTH = 30.4375


def _plt():
    import matplotlib
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _axes(ax, figsize):
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, dpi=120)
    else:
        fig = ax.figure
    return fig, ax


def _evaluable(ds):
    if "evaluable" in ds:
        return ds["evaluable"].values.astype(bool)
    return ds["measurable"].values.astype(bool)


def _legend_bor(ax, present):
    from matplotlib.patches import Patch
    handles = [Patch(color=BOR_COLORS[b], label=b) for b in BOR_COLORS if b in present]
    if handles:
        ax.legend(handles=handles, title="best response", fontsize=7, title_fontsize=7,
                  loc="upper right", frameon=False)


def _subset(idx, max_patients, seed=0):
    if max_patients is not None and idx.size > max_patients:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, size=max_patients, replace=False))
    return idx


def waterfall(ds, ax=None, *, clip: float = 100.0, title: str | None = None):
    """Best % change from baseline per evaluable patient, sorted, coloured by BOR."""
    fig, ax = _axes(ax, (7, 3.6))
    ok = _evaluable(ds) & np.isfinite(ds["best_pct_change"].values)
    y = ds["best_pct_change"].values[ok]
    bor = ds["bor"].values[ok].astype(str)
    order = np.argsort(-y, kind="stable")
    y, bor = y[order], bor[order]
    x = np.arange(y.size)
    ax.bar(x, np.clip(y, -100, clip), width=1.0 if y.size > 50 else 0.8,
           color=[BOR_COLORS.get(b, "#bdbdbd") for b in bor], linewidth=0)
    over = y > clip
    if over.any():
        ax.plot(x[over], np.full(over.sum(), clip), "^", color="k", ms=3, label=f"> {clip:g}%")
    ax.axhline(20, ls="--", c="k", lw=0.8)
    ax.axhline(-30, ls="--", c="k", lw=0.8)
    ax.axhline(0, c="k", lw=0.5)
    ax.text(1.0, 20, " +20%", transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.text(1.0, -30, " −30%", transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.set_xlim(-1, max(y.size, 1))
    ax.set_ylim(-105, clip + 10)
    ax.set_xticks([])
    ax.set_xlabel(f"patients (n = {y.size})")
    ax.set_ylabel("best change in sum of diameters [%]")
    ax.set_title(title or "Waterfall plot", fontsize=9)
    _legend_bor(ax, set(bor))
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return fig, ax


def spider(ds, ax=None, *, max_patients: int | None = 200, until_pd: bool = True,
           title: str | None = None, seed: int = 0):
    """% change of the sum of diameters over time (weeks), coloured by BOR.

    ``max_patients``: a seeded random subset is drawn when the arm is larger;
    ``until_pd``: stop each line at the first PD scan.
    """
    fig, ax = _axes(ax, (6, 4))
    idx = _subset(np.flatnonzero(_evaluable(ds)), max_patients, seed)
    pct = ds["pct_change"].values
    t = ds["scan_time"].values
    pd_scan = ds["pd_scan"].values
    bor = ds["bor"].values.astype(str)
    for i in idx:
        y = pct[i].copy()
        if until_pd and pd_scan[i] >= 0:
            y[pd_scan[i] + 1:] = np.nan
        m = np.isfinite(y)
        ax.plot(t[i][m] / 7.0, np.clip(y[m], -100, 200), color=BOR_COLORS.get(bor[i], "#bdbdbd"),
                lw=0.7, alpha=0.8)
    ax.axhline(20, ls="--", c="k", lw=0.8)
    ax.axhline(-30, ls="--", c="k", lw=0.8)
    ax.axhline(0, c="k", lw=0.5)
    ax.set_xlabel("weeks since start of treatment")
    ax.set_ylabel("change in sum of diameters [%]")
    ax.set_title(title or f"Spider plot ({idx.size} patients)", fontsize=9)
    _legend_bor(ax, set(bor[idx]))
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return fig, ax


def swimmer(ds, ax=None, *, max_patients: int | None = 40, title: str | None = None, seed: int = 0):
    """One bar per patient (months) to first PD or last scan; ▲ response, ✕ PD, → ongoing."""
    idx = _subset(np.flatnonzero(_evaluable(ds)), max_patients, seed)
    fig, ax = _axes(ax, (6, max(2.5, 0.14 * idx.size + 1.0)))
    t0 = ds["t_start"].values
    end = ds["pfs_time"].values[idx] / _MONTH
    order = np.argsort(end, kind="stable")
    idx, end = idx[order], end[order]
    bor = ds["bor"].values.astype(str)[idx]
    y = np.arange(idx.size)
    ax.barh(y, end, height=0.7, color=[BOR_COLORS.get(b, "#bdbdbd") for b in bor], linewidth=0)
    rt = (ds["response_time"].values[idx] - t0[idx]) / _MONTH
    m = np.isfinite(rt)
    ax.plot(rt[m], y[m], "^", color="k", ms=4, label="response (CR/PR)")
    pdm = ds["progressed"].values[idx].astype(bool)
    ax.plot(end[pdm], y[pdm], "x", color="k", ms=4, label="progression")
    ongoing = ~ds["pfs_event"].values[idx].astype(bool)
    ax.plot(end[ongoing] + 0.3, y[ongoing], ">", color="grey", ms=4, label="censored (no PD)")
    ax.set_yticks([])
    ax.set_ylim(-1, max(idx.size, 1))
    ax.set_xlabel("months since start of treatment")
    ax.set_ylabel("patients")
    ax.set_title(title or f"Swimmer plot ({idx.size} patients)", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return fig, ax


def km_pfs(ds, ax=None, *, alpha: float = 0.05, label: str | None = None, color: str = "C0",
           title: str | None = None, months: bool = True):
    """Kaplan–Meier progression-free survival with its (log−log) confidence band."""
    from .trialstats import kaplan_meier
    fig, ax = _axes(ax, (5.5, 4))
    ok = _evaluable(ds)
    time = ds["pfs_time"].values[ok]
    event = ds["pfs_event"].values[ok].astype(bool)
    km = kaplan_meier(time, event, alpha=alpha)
    sc = _MONTH if months else 1.0
    lab = label or ds.attrs.get("trial_name", "PFS")
    if km.time.size:
        tx = np.append(km.time, time.max() if time.size else km.time[-1]) / sc
        sv = np.append(km.survival, km.survival[-1])
        ax.step(tx, sv, where="post", color=color, label=f"{lab} (n = {time.size})")
        ax.fill_between(tx, np.append(km.lower, km.lower[-1]), np.append(km.upper, km.upper[-1]),
                        step="post", color=color, alpha=0.2, linewidth=0,
                        label=f"{int(round(100 * (1 - alpha)))}% CI")
        cens = time[~event]
        if cens.size:
            ax.plot(cens / sc, km.survival_at(cens), "|", color=color, ms=5)
    if np.isfinite(km.median):
        ax.axhline(0.5, ls=":", c="grey", lw=0.8)
        ax.axvline(km.median / sc, ls=":", c="grey", lw=0.8)
        ax.text(km.median / sc, 0.52, f" median {km.median / sc:.1f} {'mo' if months else 'd'}",
                fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_xlabel("months" if months else "days")
    ax.set_ylabel("progression-free survival")
    ax.set_title(title or "Kaplan–Meier PFS", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return fig, ax


def save_trial_plots(ds, directory, *, prefix: str = "", dpi: int = 150) -> list[Path]:
    """Write ``waterfall.png``, ``spider.png``, ``swimmer.png`` and ``km_pfs.png``."""
    plt = _plt()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, fn in (("waterfall", waterfall), ("spider", spider), ("swimmer", swimmer),
                     ("km_pfs", km_pfs)):
        fig, _ = fn(ds)
        fig.tight_layout()
        path = d / f"{prefix}{name}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        out.append(path)
    return out
