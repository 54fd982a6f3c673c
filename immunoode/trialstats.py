"""Summary statistics of a classified virtual-trial arm.

* :func:`clopper_pearson` — exact binomial confidence interval;
* :func:`kaplan_meier` — Kaplan–Meier estimate with Greenwood variance and
  log(−log) ("exponential Greenwood", as lifelines / R ``conf.type="log-log"``) or
  plain confidence bands, median with its confidence interval (Brookmeyer–Crowley
  style: where the bands cross 0.5).  Own implementation (numpy only, vectorised),
  checked against lifelines' ``KaplanMeierFitter`` in the tests;
* :func:`summarize` — ORR, DCR, BOR = PD share, SITC primary / secondary
  resistance, durable benefit, oligo-/systemic-progression shares, median PFS;
* :func:`bootstrap_summary` — the same metrics for trials of size ``n`` drawn
  from the simulated arm (seeded), with percentile intervals: the spread a real
  trial of that size would show.

Times are in the unit of the classified Dataset (days).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

__all__ = ["clopper_pearson", "kaplan_meier", "KaplanMeier", "summarize", "bootstrap_summary",
           "RATES"]


def clopper_pearson(k, n, alpha: float = 0.05):
    """Exact (Clopper–Pearson) two-sided ``1 − alpha`` interval for ``k`` successes of ``n``.

    Vectorised over ``k``, ``n``; returns ``(lower, upper)`` (NaN where n = 0).
    """
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    if np.any((k < 0) | (k > n)):
        raise ValueError("need 0 <= k <= n")
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    bad = n <= 0
    lo, hi = np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


@dataclass
class KaplanMeier:
    """Kaplan–Meier table: one row at time 0 and at every distinct observed time."""

    time: np.ndarray
    n_risk: np.ndarray
    n_event: np.ndarray
    n_censored: np.ndarray
    survival: np.ndarray
    se: np.ndarray          # Greenwood standard error of S
    lower: np.ndarray
    upper: np.ndarray
    alpha: float
    median: float           # NaN = not reached
    median_ci: tuple[float, float]

    def survival_at(self, t):
        """S(t) (right-continuous step function)."""
        i = np.searchsorted(self.time, np.asarray(t, dtype=float), side="right") - 1
        return self.survival[np.clip(i, 0, None)]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"time": self.time, "n_risk": self.n_risk, "n_event": self.n_event,
                             "n_censored": self.n_censored, "survival": self.survival,
                             "se": self.se, "lower": self.lower, "upper": self.upper})

    def to_dataset(self) -> xr.Dataset:
        ds = xr.Dataset.from_dataframe(self.to_frame().set_index("time"))
        ds.attrs.update(alpha=self.alpha, median=self.median, median_lower=self.median_ci[0],
                        median_upper=self.median_ci[1])
        return ds


def _km_core(time, event):
    order = np.argsort(time, kind="stable")
    t, e = time[order], event[order]
    ut, first = np.unique(t, return_index=True)
    d = np.add.reduceat(e.astype(np.int64), first) if t.size else np.zeros(0, np.int64)
    cnt = np.diff(np.append(first, t.size))
    n = t.size - first
    with np.errstate(divide="ignore", invalid="ignore"):
        S = np.cumprod(1.0 - d / n)
    return ut, n, d, cnt - d, S


def _first_below(t, y, level=0.5):
    hit = y <= level + 1e-12
    return float(t[np.argmax(hit)]) if hit.any() else float("nan")


def kaplan_meier(time, event, alpha: float = 0.05, ci: str = "log-log") -> KaplanMeier:
    """Kaplan–Meier estimate of ``time`` with ``event`` (True = event, False = censored).

    ``ci`` = ``"log-log"`` (default) or ``"plain"`` (S ± z·se, clipped to [0, 1]).
    The median is the first time with S ≤ 0.5; its CI runs from the first time the
    lower band is ≤ 0.5 to the first time the upper band is ≤ 0.5 (NaN = not reached).
    """
    time = np.asarray(time, dtype=float).ravel()
    event = np.asarray(event, dtype=bool).ravel()
    if time.shape != event.shape:
        raise ValueError("time and event must have the same length")
    if np.any(~np.isfinite(time)) or np.any(time < 0):
        raise ValueError("times must be finite and >= 0")
    if ci not in ("log-log", "plain"):
        raise ValueError("ci must be 'log-log' or 'plain'")
    ut, n, d, c, S = _km_core(time, event)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.cumsum(np.where(n > d, d / (n * (n - d)), np.inf * (d > 0)))
        se = S * np.sqrt(g)
        z = stats.norm.ppf(1 - alpha / 2)
        if ci == "plain":
            lo, hi = np.clip(S - z * se, 0, 1), np.clip(S + z * se, 0, 1)
        else:
            th = np.sqrt(g) / np.abs(np.log(S))
            lo = S ** np.exp(z * th)
            hi = S ** np.exp(-z * th)
            one = S >= 1.0
            lo, hi = np.where(one, 1.0, lo), np.where(one, 1.0, hi)
            zero = S <= 0.0
            lo, hi = np.where(zero, 0.0, lo), np.where(zero, 0.0, hi)
    se = np.where(S <= 0, 0.0, se)
    T = np.concatenate([[0.0], ut]) if (ut.size == 0 or ut[0] > 0) else ut
    pad = T.size - ut.size

    def p(a, v):
        return np.concatenate([np.full(pad, v, dtype=float), np.asarray(a, dtype=float)])

    Sv, lov, hiv = p(S, 1.0), p(lo, 1.0), p(hi, 1.0)
    nr = np.concatenate([np.full(pad, time.size), n]).astype(np.int64)
    return KaplanMeier(time=T, n_risk=nr, n_event=np.concatenate([np.zeros(pad, np.int64), d]),
                       n_censored=np.concatenate([np.zeros(pad, np.int64), c]), survival=Sv,
                       se=p(se, 0.0), lower=lov, upper=hiv, alpha=alpha,
                       median=_first_below(T, Sv), median_ci=(_first_below(T, lov), _first_below(T, hiv)))


def _median_km(time, event):
    ut, n, d, c, S = _km_core(time, event)
    return _first_below(ut, S)


# --------------------------------------------------------------------------- arm summary
#: rate name -> (numerator rule, denominator rule); evaluated by :func:`_indicators`
RATES = ("ORR", "DCR", "BOR_PD", "primary_resistance", "secondary_resistance",
         "progression_after_stop", "durable_benefit", "oligo_progression", "systemic_progression")


def _indicators(ds: xr.Dataset):
    """numerator and denominator indicator arrays (patient,) per rate."""
    meas = ds["measurable"].values if "measurable" in ds else np.ones(ds.sizes["patient"], bool)
    bor = ds["bor"].values
    out = {
        "ORR": (np.isin(bor, ("CR", "PR")), meas),
        "DCR": (np.isin(bor, ("CR", "PR", "SD")), meas),
        "BOR_PD": (bor == "PD", meas),
    }
    if "sitc" in ds:
        s = ds["sitc"].values
        out["primary_resistance"] = (s == "primary", meas)
        out["secondary_resistance"] = (s == "secondary", meas)
        out["progression_after_stop"] = (s == "progression_after_stop", meas)
        out["durable_benefit"] = (s == "durable_benefit", meas)
    if "pattern" in ds:
        pt = ds["pattern"].values
        pdm = meas & (pt != "none")
        out["oligo_progression"] = (pt == "oligo", pdm)
        out["systemic_progression"] = (pt == "systemic", pdm)
    return {k: (num & den, den) for k, (num, den) in out.items()}


def summarize(ds: xr.Dataset, alpha: float = 0.05) -> pd.DataFrame:
    """Arm summary table (index = metric; columns estimate, lower, upper, k, n).

    Rates use patients with measurable disease as denominator (oligo/systemic:
    those who progressed) with Clopper–Pearson intervals; ``median_PFS`` comes from
    :func:`kaplan_meier` on ``pfs_time``/``pfs_event`` (k = events, n = patients).
    """
    rows = {}
    for name, (num, den) in _indicators(ds).items():
        k, n = int(num.sum()), int(den.sum())
        lo, hi = clopper_pearson(k, n, alpha)
        rows[name] = (k / n if n else np.nan, lo, hi, k, n)
    if "pfs_time" in ds:
        meas = ds["measurable"].values if "measurable" in ds else slice(None)
        km = kaplan_meier(ds["pfs_time"].values[meas], ds["pfs_event"].values[meas], alpha)
        rows["median_PFS"] = (km.median, km.median_ci[0], km.median_ci[1],
                              int(ds["pfs_event"].values[meas].sum()), int(np.size(ds["pfs_time"].values[meas])))
    df = pd.DataFrame.from_dict(rows, orient="index", columns=["estimate", "lower", "upper", "k", "n"])
    df.index.name = "metric"
    return df


def bootstrap_summary(ds: xr.Dataset, n: int, n_boot: int = 1000, seed: int | None = None,
                      alpha: float = 0.05, replace: bool = False,
                      return_samples: bool = False):
    """Metrics of ``n_boot`` virtual trials of ``n`` patients drawn from the arm.

    Patients are drawn from those with measurable disease, without replacement
    by default (``replace=True``: a classical bootstrap).  Returns a DataFrame with
    ``estimate`` (whole arm), ``mean``, ``lower``/``upper`` (percentile
    ``alpha/2``, ``1 − alpha/2`` over trials); with ``return_samples=True`` also the
    (n_boot, metric) DataFrame of per-trial values.
    """
    meas = ds["measurable"].values if "measurable" in ds else np.ones(ds.sizes["patient"], bool)
    pool = np.flatnonzero(meas)
    if n < 1 or (not replace and n > pool.size):
        raise ValueError(f"n must be in 1..{pool.size} (patients with measurable disease)"
                         + ("" if replace else "; use replace=True for larger n"))
    rng = np.random.default_rng(seed)
    if replace:
        idx = pool[rng.integers(0, pool.size, size=(n_boot, n))]
    else:
        idx = np.stack([rng.choice(pool, size=n, replace=False) for _ in range(n_boot)])
    ind = _indicators(ds)
    samples = {}
    for name, (num, den) in ind.items():
        k = num[idx].sum(axis=1)
        m = den[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            samples[name] = np.where(m > 0, k / np.maximum(m, 1), np.nan)
    if "pfs_time" in ds:
        t, e = ds["pfs_time"].values, ds["pfs_event"].values.astype(bool)
        samples["median_PFS"] = np.array([_median_km(t[r], e[r]) for r in idx])
    S = pd.DataFrame(samples)
    full = summarize(ds, alpha)["estimate"]
    q = S.quantile([alpha / 2, 1 - alpha / 2])
    df = pd.DataFrame({"estimate": full.reindex(S.columns), "mean": S.mean(),
                       "lower": q.iloc[0], "upper": q.iloc[1]})
    df.index.name = "metric"
    df.attrs.update(n=n, n_boot=n_boot, seed=seed, replace=replace)
    return (df, S) if return_samples else df
