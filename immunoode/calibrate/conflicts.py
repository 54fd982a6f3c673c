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
against the same at the optimum, and which other targets then leave their intervals.  A
small increase means the miss was the optimiser's or the cohort's; a large one, with named
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
    import lmfit

    from .fit import target_table

    spec = rf.spec
    mech = list(spec.mechanistic)
    # the optimum's mechanistic value and the best `n_points - 1` others simulated on the
    # final cohorts (lowest χ² first)
    ranked = sorted((g for g in grid if all(m in g for m in mech)), key=lambda g: g.get("chisqr", math.inf))
    points = [tuple(float(values[m]) for m in mech)]
    for g in ranked:
        key = tuple(float(g[m]) for m in mech)
        if len(points) >= n_points:
            break
        if key not in points:
            points.append(key)
    base = {}
    for key in points:
        base[key] = rf.cohorts(dict(zip(mech, key)))
    opt_key = tuple(float(values[m]) for m in mech)
    missed = table[(table.role == "fit") & (~table.met)]
    out = []
    for _, row in missed.iterrows():
        lo, hi = float(row["low"]), float(row["high"])
        lo_m, hi_m = lo + margin, hi - margin
        if hi_m <= lo_m:
            lo_m = hi_m = 0.5 * (lo + hi)
        tid = row["id"]
        best = None
        for key, data in base.items():
            ps = rf.parameters(dict(values, **dict(zip(mech, key))))
            for m in mech:
                ps[m].vary = False
            # continuation: a steeper penalty each pass, warm-started, until the target is in
            for w in (weight, 10 * weight, 100 * weight):
                def resid(ps, data=data, w=w):
                    r = rf.residual(ps, data)
                    st, _ = rf.simulate_statistics(ps.valuesdict(), data, se=False)
                    x = st[tid][0]
                    x = 0.5 if not math.isfinite(x) else x
                    return np.append(r, w * _outside(x, lo_m, hi_m))

                ps = lmfit.minimize(resid, ps, method="least_squares", max_nfev=max_nfev).params
                st, _ = rf.simulate_statistics(ps.valuesdict(), data, se=False)
                if _outside(st[tid][0], lo, hi) == 0.0:
                    break
            vals = dict(ps.valuesdict())
            st, _ = rf.simulate_statistics(vals, data, se=False)
            others = float(rf.chisqr(vals, data)) - _own_term(rf, tid, st)
            x = st[tid][0]
            if best is None or (_outside(x, lo, hi), others) < (best["outside"], best["others"]):
                best = {"key": key, "vals": vals, "stats": st, "others": others,
                        "outside": _outside(x, lo, hi), "data": data}
        st_opt, _ = rf.simulate_statistics(values, base[opt_key], se=False)
        others_opt = float(rf.chisqr(values, base[opt_key])) - _own_term(rf, tid, st_opt)
        stats_se, _ = rf.simulate_statistics(best["vals"], best["data"])
        tab = target_table(spec, rf.likelihood, stats_se)
        fit_rows = tab[tab.role == "fit"]
        was_met = set(table[(table.role == "fit") & table.met]["id"])
        rec = {"target": tid, "interval": (lo, hi), "at_optimum": float(row["simulated"]),
               "forced_value": float(best["stats"][tid][0]), "reached": best["outside"] == 0.0,
               "mechanistic": dict(zip(mech, best["key"])),
               "chisqr_others_optimum": others_opt, "chisqr_others_forced": best["others"],
               "newly_missed": [{"id": r["id"], "simulated": float(r["simulated"]),
                                 "low": float(r["low"]), "high": float(r["high"])}
                                for _, r in fit_rows.iterrows()
                                if r["id"] in was_met and not r["met"]],
               "values": best["vals"]}
        out.append(rec)
        if say:
            say("conflicts", f"{tid} forced to {100 * rec['forced_value']:.1f} % "
                             f"({100 * lo:.0f}-{100 * hi:.0f}): chi2 of the other terms "
                             f"{others_opt:.2f} -> {best['others']:.2f}; newly missed: "
                             + (", ".join(r["id"] for r in rec["newly_missed"]) or "none"))
    return out


def _own_term(rf, tid: str, stats) -> float:
    """χ² contribution (2 × NLL term) of target ``tid`` alone (0 for a multinomial row,
    whose group term stays among the others)."""
    t = next(t for t in rf.spec.targets if t.id == tid)
    if t.kind == "multinomial":
        return 0.0
    x = stats[tid][0]
    return 2.0 * float(rf.likelihood.term(t, x if math.isfinite(x) else 0.5))
