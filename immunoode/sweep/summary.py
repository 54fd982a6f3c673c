"""Stage 7 — sweep summaries.  Consumes the per-patient sweep Dataset; produces per-scenario
metrics with confidence intervals (``summary``, ``summary_lower``, ``summary_upper``,
``summary_k``, ``summary_n`` over ``scenario`` × ``metric``) and a ranking table.

Rates use the evaluable patients of the scenario (in its subgroup, simulated, measurable
at baseline) with exact Clopper–Pearson intervals; PFS medians and 1-/2-year PFS come from
Kaplan–Meier with log(−log) bands (:mod:`immunoode.trialstats`); means (time on treatment,
cumulative dose) carry normal-approximation intervals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..trialstats import clopper_pearson, kaplan_meier

__all__ = ["summarize_sweep", "ranking", "METRICS", "HIGHER_IS_BETTER"]

#: metric -> (description, unit)
METRICS = {
    "ORR": ("objective response rate (CR+PR)", "1"),
    "DCR": ("disease control rate (CR+PR+SD)", "1"),
    "primary_resistance": ("SITC primary resistance", "1"),
    "secondary_resistance": ("SITC secondary resistance", "1"),
    "oligo_progression": ("oligo-progression share of progressions", "1"),
    "systemic_progression": ("systemic-progression share of progressions", "1"),
    "median_PFS": ("median progression-free survival (Kaplan-Meier)", "day"),
    "PFS_1y": ("progression-free at 1 year (Kaplan-Meier)", "1"),
    "PFS_2y": ("progression-free at 2 years (Kaplan-Meier; last scan if earlier)", "1"),
    "median_PFS2": ("median time to second progression", "day"),
    "time_on_treatment": ("mean time on treatment", "day"),
    "tox_discontinuation": ("discontinued for toxicity", "1"),
    "tox_any": ("at least one grade >= 3 adverse event", "1"),
    "failed": ("patients whose simulation failed (excluded from the rates)", "1"),
}
HIGHER_IS_BETTER = {"ORR": True, "DCR": True, "primary_resistance": False,
                    "secondary_resistance": False, "median_PFS": True, "PFS_1y": True,
                    "PFS_2y": True, "median_PFS2": True, "tox_discontinuation": False,
                    "tox_any": False}


def _km_at(km, t):
    i = np.searchsorted(km.time, t, side="right") - 1
    i = max(int(i), 0)
    return float(km.survival[i]), float(km.lower[i]), float(km.upper[i])


def _scenario_rows(ds: xr.Dataset, s: int, alpha: float) -> dict:
    sub = ds.isel(scenario=s)
    ran = sub["in_subgroup"].values
    failed = ran & (sub["status"].values != 0)
    ok = ran & ~failed
    ev = ok & sub["measurable"].values
    bor = sub["bor"].values
    sitc = sub["sitc"].values
    pat = sub["pattern"].values
    rows = {}

    def rate(name, num, den):
        k, n = int((num & den).sum()), int(den.sum())
        lo, hi = clopper_pearson(k, n, alpha) if n else (np.nan, np.nan)
        rows[name] = (k / n if n else np.nan, lo, hi, k, n)
    rate("ORR", np.isin(bor, ("CR", "PR")), ev)
    rate("DCR", np.isin(bor, ("CR", "PR", "SD")), ev)
    rate("primary_resistance", sitc == "primary", ev)
    rate("secondary_resistance", sitc == "secondary", ev)
    rate("oligo_progression", pat == "oligo", ev & (pat != "none"))
    rate("systemic_progression", pat == "systemic", ev & (pat != "none"))
    last = float(ds["scan_day"].values[-1])
    if ev.sum():
        km = kaplan_meier(sub["pfs_time"].values[ev], sub["pfs_event"].values[ev], alpha)
        k, n = int(sub["pfs_event"].values[ev].sum()), int(ev.sum())
        rows["median_PFS"] = (km.median, km.median_ci[0], km.median_ci[1], k, n)
        rows["PFS_1y"] = _km_at(km, min(365.25, last)) + (k, n)
        rows["PFS_2y"] = _km_at(km, min(730.5, last)) + (k, n)
        km2 = kaplan_meier(sub["pfs2_time"].values[ev], sub["pfs2_event"].values[ev], alpha)
        rows["median_PFS2"] = (km2.median, km2.median_ci[0], km2.median_ci[1],
                               int(sub["pfs2_event"].values[ev].sum()), n)
    else:
        for m in ("median_PFS", "PFS_1y", "PFS_2y", "median_PFS2"):
            rows[m] = (np.nan, np.nan, np.nan, 0, 0)
    tot = sub["time_on_treatment"].values[ok]
    if tot.size:
        se = tot.std(ddof=1) / np.sqrt(tot.size) if tot.size > 1 else np.nan
        z = 1.959963984540054
        rows["time_on_treatment"] = (tot.mean(), tot.mean() - z * se, tot.mean() + z * se, 0, tot.size)
    else:
        rows["time_on_treatment"] = (np.nan, np.nan, np.nan, 0, 0)
    rate("tox_discontinuation", sub["tox_discontinued"].values, ok)
    rate("tox_any", sub["tox_events"].values > 0, ok)
    rate("failed", failed, ran)
    return rows


def summarize_sweep(ds: xr.Dataset, alpha: float = 0.05) -> xr.Dataset:
    """Add per-scenario metrics (``summary*`` over scenario × metric) and the mean
    cumulative dose per drug (``mean_cumulative_dose`` over scenario × drug)."""
    S = ds.sizes["scenario"]
    names = list(METRICS)
    est = np.full((S, len(names)), np.nan)
    lo, hi = est.copy(), est.copy()
    kk = np.zeros((S, len(names)), np.int64)
    nn = kk.copy()
    for s in range(S):
        rows = _scenario_rows(ds, s, alpha)
        for j, m in enumerate(names):
            est[s, j], lo[s, j], hi[s, j], kk[s, j], nn[s, j] = rows[m]
    ds = ds.assign_coords(metric=names)
    ds["summary"] = (("scenario", "metric"), est)
    ds["summary_lower"] = (("scenario", "metric"), lo)
    ds["summary_upper"] = (("scenario", "metric"), hi)
    ds["summary_k"] = (("scenario", "metric"), kk)
    ds["summary_n"] = (("scenario", "metric"), nn)
    ds["summary"].attrs.update(long_name="per-scenario metric (see metric_description)",
                               confidence=1 - alpha)
    ds["metric_unit"] = (("metric",), [METRICS[m][1] for m in names])
    ds["metric_description"] = (("metric",), [METRICS[m][0] for m in names])
    ok = ds["in_subgroup"] & ~ds["failed"]
    ds["mean_cumulative_dose"] = ds["cumulative_dose"].where(ok).mean("patient")
    ds["mean_cumulative_dose"].attrs.update(long_name="mean cumulative dose per patient",
                                            units=ds["cumulative_dose"].attrs.get("units", ""))
    return ds


def ranking(ds: xr.Dataset, by: str = "PFS_2y", *, ascending: bool | None = None) -> pd.DataFrame:
    """Scenarios ranked by a metric (best first), with the main metrics and intervals.

    A median that is not reached (NaN) ranks as longer than any reached median.
    """
    if by not in ds["metric"].values:
        raise KeyError(f"unknown metric {by!r}; choose one of {', '.join(ds['metric'].values)}")
    asc = (not HIGHER_IS_BETTER.get(by, True)) if ascending is None else ascending
    cols = {}
    for m in ("ORR", "DCR", "median_PFS", "PFS_2y", "median_PFS2", "secondary_resistance",
              "time_on_treatment", "tox_discontinuation"):
        cols[m] = ds["summary"].sel(metric=m).values
    cols[f"{by}_lower"] = ds["summary_lower"].sel(metric=by).values
    cols[f"{by}_upper"] = ds["summary_upper"].sel(metric=by).values
    cols["n"] = ds["summary_n"].sel(metric="ORR").values
    df = pd.DataFrame(cols, index=pd.Index(ds["scenario_name"].values, name="scenario"))
    key = df[by]
    if by.startswith("median_"):  # NaN = median not reached: longer than any reached one
        key = key.fillna(np.inf)
    df = df.iloc[np.argsort(key.values if asc else -key.values, kind="stable")]
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df
