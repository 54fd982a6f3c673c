"""Stage 7e — target conflicts. Consumes a finished rate fit's objective (:class:`.fit.RateFit`
with its final cohorts), the optimum and the target table; produces, for every fitted target
the optimum misses, a *forced* re-fit: the population parameters re-optimised with that
target pushed inside its published interval, at the optimum's mechanistic value and the best
others simulated on the final cohorts.  The cost on the other targets answers "can these
targets be met together, and if not, which ones pull against each other?" without any new
simulation.

Forcing works by a steep penalty: ``weight × distance`` outside the interval shrunk by
``margin`` on each side (so a forced target ends inside, not on the edge).  The result per
missed target: the value reached, the χ² of all *other* terms (and of the priors/ESS floors)
against the same at the optimum, and which other targets then leave their intervals.  When
several targets are missed, they are also forced *together* (record ``"T01+T02+..."``): can
they all be met at once?  A small increase means the miss was the optimiser's or the cohort's; a large one, with named
targets, is a structural conflict of the model (conditional on its fixed parameters).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = ["forced_refits"]


def _outside(x: float, lo: float, hi: float) -> float:
    return max(0.0, lo - x, x - hi)


def forced_refits(rf, values: Mapping[str, float], table, grid: list, *,
                  margin: float = 0.002, weight: float = 300.0, max_nfev: int = 200,
                  n_points: int = 3, say=None) -> list[dict]:
    """Forced re-fits of every fitted target the optimum misses (see the module docstring).

    Parameters
    ----------
    rf
        The fit's :class:`~.fit.RateFit`, holding the final round's cohorts.
    values
        The optimum (every parameter).
    table
        :func:`~.fit.target_table` at the optimum (``low``/``high`` as fractions, ``met``).
    grid
        Mechanistic points simulated on the final cohorts (dicts with the mechanistic
        values and ``chisqr``); the forced fit is tried at the optimum's value and at the
        ``n_points − 1`` best others, and the best result is kept.
    margin
        [fraction] Shrink of the interval the forced target must reach (each side).
    weight
        Penalty per unit fraction outside (300: 1 point outside costs χ² 9); raised 10- and
        100-fold, warm-started, while the target stays outside.
    """
    from .fit import target_table

    spec = rf.spec
    mech = list(spec.mechanistic)
    # the optimum's mechanistic value and the best `n_points - 1` others simulated on the
    # final cohorts (lowest χ² first)
    ranked = sorted((g for g in grid if all(m in g for m in mech)),
                    key=lambda g: g.get("chisqr", math.inf))
    points = [tuple(float(values[m]) for m in mech)]
    for g in ranked:
        key = tuple(float(g[m]) for m in mech)
        if len(points) >= n_points:
            break
        if key not in points:
            points.append(key)
    base = {key: rf.cohorts(dict(zip(mech, key))) for key in points}
    opt_key = points[0]
    missed = table[(table.role == "fit") & (~table.met)]
    bounds = {r["id"]: (float(r["low"]), float(r["high"])) for _, r in missed.iterrows()}
    at_opt = {r["id"]: float(r["simulated"]) for _, r in missed.iterrows()}
    was_met = set(table[(table.role == "fit") & table.met]["id"])
    groups = [[t] for t in bounds] + ([list(bounds)] if len(bounds) > 1 else [])
    out = []
    for ids in groups:
        best = None
        for key, data in base.items():
            vals, st = _forced_fit(rf, values, mech, key, data, ids, bounds, margin, weight,
                                   max_nfev)
            others = float(rf.chisqr(vals, data)) - sum(_own_term(rf, t, st) for t in ids)
            outside = sum(_outside(st[t][0], *bounds[t]) for t in ids)
            if best is None or (outside, others) < (best["outside"], best["others"]):
                best = {"key": key, "vals": vals, "stats": st, "others": others,
                        "outside": outside, "data": data}
        st_opt, _ = rf.simulate_statistics(values, base[opt_key], se=False)
        others_opt = (float(rf.chisqr(values, base[opt_key]))
                      - sum(_own_term(rf, t, st_opt) for t in ids))
        stats_se, _ = rf.simulate_statistics(best["vals"], best["data"])
        tab = target_table(spec, rf.likelihood, stats_se)
        rec = {"target": "+".join(ids), "targets": list(ids),
               "interval": bounds[ids[0]] if len(ids) == 1 else None,
               "at_optimum": at_opt[ids[0]] if len(ids) == 1 else None,
               "forced_value": float(best["stats"][ids[0]][0]) if len(ids) == 1 else None,
               "forced_values": {t: float(best["stats"][t][0]) for t in ids},
               "reached": best["outside"] == 0.0,
               "mechanistic": dict(zip(mech, best["key"])),
               "chisqr_others_optimum": others_opt, "chisqr_others_forced": best["others"],
               "newly_missed": [{"id": r["id"], "simulated": float(r["simulated"]),
                                 "low": float(r["low"]), "high": float(r["high"])}
                                for _, r in tab[tab.role == "fit"].iterrows()
                                if r["id"] in was_met and not r["met"]],
               "values": best["vals"]}
        out.append(rec)
        if say:
            say("conflicts", f"{rec['target']} forced to " + ", ".join(
                f"{100 * v:.1f} %" for v in rec["forced_values"].values())
                + f"{'' if rec['reached'] else ' (NOT reached)'}: chi2 of the other terms "
                  f"{others_opt:.2f} -> {best['others']:.2f}; newly missed: "
                + (", ".join(r["id"] for r in rec["newly_missed"]) or "none"))
    return out


def _forced_fit(rf, values, mech, key, data, ids, bounds, margin, weight, max_nfev):
    """Population re-fit at mechanistic point ``key`` with targets ``ids`` pushed inside their
    (shrunk) intervals; continuation: a steeper penalty each pass, warm-started, until all
    are in.  Returns ``(values, statistics)``."""
    import lmfit
    inner = {}
    for t in ids:
        lo, hi = bounds[t]
        lo_m, hi_m = lo + margin, hi - margin
        inner[t] = (lo_m, hi_m) if hi_m > lo_m else (0.5 * (lo + hi),) * 2
    ps = rf.parameters(dict(values, **dict(zip(mech, key))))
    for m in mech:
        ps[m].vary = False
    for w in (weight, 10 * weight, 100 * weight):
        def penalty(st, w=w):
            x = {t: (st[t][0] if math.isfinite(st[t][0]) else 0.5) for t in ids}
            return [w * _outside(x[t], *inner[t]) for t in ids]

        def resid(ps, penalty=penalty):
            return rf.residual(ps, data, extra=penalty)

        ps = lmfit.minimize(resid, ps, method="least_squares", max_nfev=max_nfev).params
        st, _ = rf.simulate_statistics(ps.valuesdict(), data, se=False)
        if all(_outside(st[t][0], *bounds[t]) == 0.0 for t in ids):
            break
    vals = dict(ps.valuesdict())
    return vals, rf.simulate_statistics(vals, data, se=False)[0]


def _own_term(rf, tid: str, stats) -> float:
    """χ² contribution (2 × NLL term) of target ``tid`` alone (0 for a multinomial row,
    whose group term stays among the others)."""
    t = next(t for t in rf.spec.targets if t.id == tid)
    if t.kind == "multinomial":
        return 0.0
    x = stats[tid][0]
    return 2.0 * float(rf.likelihood.term(t, x if math.isfinite(x) else 0.5))
