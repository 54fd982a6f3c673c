"""Stage 7 — global sensitivity analysis and schedule optimisation, both run as sweeps.

Consume a sweep whose design is ``gsa`` or ``optimize``; produce a typed result with a
``report()`` and ``to_dataset()``.

* **GSA** (``[gsa]``): Morris elementary effects or Sobol indices (SALib) of a population
  outcome (a sweep metric such as ``PFS_2y`` or ``ORR``) over model parameters.  Each
  sample point is a scenario whose parameters replace the nominal values for every patient;
  every point sees the same virtual population (common random numbers)::

      [gsa]
      method = "morris"              # morris | sobol
      n = 4                          # Morris trajectories / Sobol base samples
      outcome = "PFS_2y"
      parameters = { k_CTL = [0.15, 0.6], k_prime = [0.02, 0.1] }

* **Schedule optimisation** (``[optimize]``): a derivative-free pattern (compass) search on
  a lattice of schedule factors (ICI interval, duration, radiotherapy day and dose, start
  of an added drug ...), all candidates of an iteration evaluated together on the engine,
  with common random numbers, an optional cap on the mean cumulative dose of a drug, and a
  check of the best schedule in every subgroup::

      [optimize]
      objective = "PFS_2y"          # any metric; sense from the metric (or sense = "max")
      variables = { interval = [21, 63, 7], duration = [180, 730, 91] }  # low, high, step
      max_mean_dose = { drug = "pembrolizumab", value = 4000 }
      max_iterations = 10
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


import numpy as np
import pandas as pd
import xarray as xr

from .run import run_sweep
from .spec import FACTORS, Scenario, SweepError, SweepSpec, load_sweep
from .summary import HIGHER_IS_BETTER, METRICS

__all__ = ["run_gsa", "GSAResult", "optimize_schedule", "OptimizationResult"]


def _spec(sweep) -> SweepSpec:
    return sweep if isinstance(sweep, SweepSpec) else load_sweep(sweep)


def _with_scenarios(spec: SweepSpec, combos: list[dict], prefix: str) -> SweepSpec:
    sc = tuple(Scenario(i, f"{prefix}[{i}]", c) for i, c in enumerate(combos))
    return dataclasses.replace(spec, scenarios=sc)


# --------------------------------------------------------------------------- GSA
@dataclass
class GSAResult:
    """Sensitivity indices of ``outcome`` over ``parameters``.

    Attributes
    ----------
    method : ``morris`` or ``sobol``.
    outcome : metric name.
    parameters : names, with ``bounds`` [low, high] each.
    samples : (n_points, n_parameters) parameter values evaluated.
    y : outcome at each point.
    indices : DataFrame (index parameter): Morris ``mu_star``, ``mu_star_conf``, ``sigma``;
        Sobol ``S1``, ``S1_conf``, ``ST``, ``ST_conf``.
    sweep : the per-point sweep Dataset.
    """

    method: str
    outcome: str
    parameters: list
    bounds: list
    samples: np.ndarray
    y: np.ndarray
    indices: pd.DataFrame
    sweep: xr.Dataset = field(repr=False)

    def report(self) -> str:
        lines = [f"global sensitivity ({self.method}) of {self.outcome} over "
                 f"{len(self.parameters)} parameters, {len(self.y)} population runs of "
                 f"{self.sweep.sizes['patient']} patients",
                 f"outcome range {np.nanmin(self.y):.4g} .. {np.nanmax(self.y):.4g}", "",
                 self.indices.to_string(float_format=lambda x: f"{x:.4g}")]
        return "\n".join(lines)

    def to_dataset(self) -> xr.Dataset:
        ds = xr.Dataset({"sample": (("point", "parameter"), self.samples),
                         "outcome": (("point",), self.y)},
                        coords={"parameter": self.parameters})
        for c in self.indices.columns:
            ds[f"index_{c}"] = (("parameter",), self.indices[c].values.astype(float))
        ds.attrs.update({k: v for k, v in self.sweep.attrs.items()
                         if k in ("model_hash", "immunoode_version", "seed", "sweep_spec", "model_name")})
        ds.attrs.update(method=self.method, outcome=self.outcome)
        return ds


def run_gsa(sweep, *, engine=None, out=None, progress: bool = False) -> GSAResult:
    """Morris or Sobol sensitivity of a population outcome (see the module docstring)."""
    spec = _spec(sweep)
    g = dict(spec.data["gsa"])
    file = spec.file
    method = g.get("method", "morris")
    if method not in ("morris", "sobol"):
        raise SweepError(f"method must be 'morris' or 'sobol', got {method!r}", file=file,
                         section="gsa", item="method")
    outcome = g.get("outcome", "PFS_2y")
    if outcome not in METRICS:
        raise SweepError(f"unknown outcome {outcome!r}; choose one of {', '.join(METRICS)}",
                         file=file, section="gsa", item="outcome")
    params = dict(g.get("parameters", {}))
    if not params:
        raise SweepError("no parameters: give parameters = { name = [low, high], ... }", file=file,
                         section="gsa", item="parameters")
    from ..sbml import load_any_model
    from pathlib import Path
    model = load_any_model(Path(spec.data["sweep"]["model"]))
    sampled = set(spec.data["trial"]["population"].get("parameters", {}))
    names, bounds = [], []
    for k, b in params.items():
        if k not in model.parameter_names:
            from .spec import _suggest
            raise SweepError(f"not a model parameter{_suggest(k, model.parameter_names)}", file=file,
                             section="gsa.parameters", item=k)
        if k in sampled:
            raise SweepError("is sampled per patient by the population; a GSA value would be "
                             "overwritten (remove it from [population.parameters])", file=file,
                             section="gsa.parameters", item=k)
        if not (isinstance(b, list) and len(b) == 2 and b[0] < b[1]):
            raise SweepError(f"bounds must be [low, high] with low < high, got {b!r}", file=file,
                             section="gsa.parameters", item=k)
        names.append(k)
        bounds.append([float(b[0]), float(b[1])])
    problem = {"num_vars": len(names), "names": names, "bounds": bounds}
    n = int(g.get("n", 4))
    seed = int(spec.data["sweep"]["seed"])
    if method == "morris":
        from SALib.sample import morris as sm
        X = sm.sample(problem, n, num_levels=int(g.get("levels", 4)), seed=seed)
    else:
        from SALib.sample import sobol as ss
        X = ss.sample(problem, n, calc_second_order=False, seed=seed)
    base = dict(spec.data["base"])
    combos = [dict(base, _parameters=dict(zip(names, map(float, x)))) for x in X]
    ds = run_sweep(_with_scenarios(spec, combos, "gsa"), out, engine=engine, progress=progress)
    y = ds["summary"].sel(metric=outcome).values.astype(float)
    if np.isnan(y).any():
        raise SweepError(f"outcome {outcome!r} is undefined at {int(np.isnan(y).sum())} points "
                         "(no evaluable patient); choose another outcome or more patients",
                         file=file, section="gsa", item="outcome")
    if method == "morris":
        from SALib.analyze import morris as am
        r = am.analyze(problem, X, y, num_levels=int(g.get("levels", 4)), seed=seed)
        idx = pd.DataFrame({"mu_star": r["mu_star"], "mu_star_conf": r["mu_star_conf"],
                            "sigma": r["sigma"], "mu": r["mu"]}, index=pd.Index(names, name="parameter"))
        idx = idx.sort_values("mu_star", ascending=False)
    else:
        from SALib.analyze import sobol as asob
        r = asob.analyze(problem, y, calc_second_order=False, seed=seed)
        idx = pd.DataFrame({"S1": r["S1"], "S1_conf": r["S1_conf"], "ST": r["ST"],
                            "ST_conf": r["ST_conf"]}, index=pd.Index(names, name="parameter"))
        idx = idx.sort_values("ST", ascending=False)
    return GSAResult(method, outcome, names, bounds, np.asarray(X), y, idx, ds)


# --------------------------------------------------------------------------- optimisation
@dataclass
class OptimizationResult:
    """Outcome of :func:`optimize_schedule`.

    Attributes
    ----------
    objective, sense : metric and ``"max"`` / ``"min"``.
    best : factor values of the best feasible schedule.
    history : DataFrame of every evaluated schedule (variables, objective, feasible, iteration).
    subgroups : DataFrame: the objective of the best schedule and of the base in each subgroup.
    """

    objective: str
    sense: str
    variables: list
    best: dict
    history: pd.DataFrame
    subgroups: pd.DataFrame
    n_evaluations: int

    def report(self, top: int = 5) -> str:
        h = self.history[self.history["feasible"]].sort_values(
            "objective", ascending=self.sense == "min", kind="stable")
        lines = [f"schedule optimisation: {self.sense}imise {self.objective} over "
                 f"{', '.join(self.variables)} ({self.n_evaluations} population runs, common random numbers)",
                 "best: " + ", ".join(f"{k} = {self.best[k]:g}" for k in self.variables), "",
                 f"top {top} schedules:", h.head(top).to_string(float_format=lambda x: f"{x:.4g}")]
        if len(self.subgroups):
            lines += ["", "robustness across subgroups (best vs base):",
                      self.subgroups.to_string(float_format=lambda x: f"{x:.4g}")]
        return "\n".join(lines)

    def to_dataset(self) -> xr.Dataset:
        ds = xr.Dataset.from_dataframe(self.history.reset_index(drop=True).rename_axis("evaluation"))
        ds.attrs.update(objective=self.objective, sense=self.sense, best=json.dumps(self.best))
        return ds


def optimize_schedule(sweep, *, engine=None, progress: bool = False) -> OptimizationResult:
    """Compass search for the best schedule (see the module docstring)."""
    spec = _spec(sweep)
    o = dict(spec.data["optimize"])
    file = spec.file
    objective = o.get("objective", "PFS_2y")
    if objective not in METRICS:
        raise SweepError(f"unknown objective {objective!r}; choose one of {', '.join(METRICS)}",
                         file=file, section="optimize", item="objective")
    sense = o.get("sense", "max" if HIGHER_IS_BETTER.get(objective, True) else "min")
    variables = dict(o.get("variables", {}))
    if not variables:
        raise SweepError("no variables: give variables = { factor = [low, high, step] }", file=file,
                         section="optimize", item="variables")
    lows, highs, steps = {}, {}, {}
    for k, v in variables.items():
        if k not in FACTORS or FACTORS[k][1] not in ("positive", "nonneg", "real", "count"):
            raise SweepError("not a numeric factor", file=file, section="optimize.variables", item=k)
        if not (isinstance(v, list) and len(v) == 3 and v[0] < v[1] and v[2] > 0):
            raise SweepError(f"expected [low, high, step] with low < high and step > 0, got {v!r}",
                             file=file, section="optimize.variables", item=k)
        lows[k], highs[k], steps[k] = map(float, v)
    cap = o.get("max_mean_dose")
    names = list(variables)
    base = dict(spec.data["base"])
    x = {k: min(max(float(base[k]) if base.get(k) is not None else (lows[k] + highs[k]) / 2, lows[k]),
                highs[k]) for k in names}
    def snap(k, v):
        v = min(max(v, lows[k]), highs[k])
        return min(lows[k] + round((v - lows[k]) / steps[k]) * steps[k], highs[k])
    x = {k: snap(k, x[k]) for k in names}
    # initial step: a quarter of the range, on the lattice; halved down to the lattice step
    step = {k: max(steps[k], round((highs[k] - lows[k]) / 4 / steps[k]) * steps[k]) for k in names}
    cache: dict[tuple, tuple] = {}
    rows = []

    def key(p):
        return tuple(round(p[k], 9) for k in names)

    def evaluate(points, it):
        uniq = list({key(p): p for p in points if key(p) not in cache}.values())
        if uniq:
            combos = [dict(base, **{k: (int(round(p[k])) if FACTORS[k][1] == "count" else p[k])
                                    for k in names}) for p in uniq]
            ds = run_sweep(_with_scenarios(spec, combos, "opt"), engine=engine, progress=progress)
            val = ds["summary"].sel(metric=objective).values
            for j, p in enumerate(uniq):
                feas = True
                if cap is not None:
                    dose = float(ds["mean_cumulative_dose"].sel(drug=cap["drug"]).values[j])
                    feas = dose <= float(cap["value"])
                cache[key(p)] = (float(val[j]), feas)
                rows.append(dict(p, objective=float(val[j]), feasible=feas, iteration=it))
        return [cache[key(p)] for p in points]

    def better(a, b):
        (va, fa), (vb, fb) = a, b
        if fa != fb:
            return fa
        if np.isnan(vb):
            return not np.isnan(va)
        return va > vb + 1e-12 if sense == "max" else va < vb - 1e-12

    cur = evaluate([x], 0)[0]
    for it in range(1, int(o.get("max_iterations", 10)) + 1):
        cand = []
        for k in names:
            for sgn in (-1, 1):
                p = dict(x, **{k: snap(k, x[k] + sgn * step[k])})
                if key(p) != key(x) and key(p) not in {key(c) for c in cand}:
                    cand.append(p)
        vals = evaluate(cand, it)
        j_best = None
        for j, v in enumerate(vals):
            if better(v, cur if j_best is None else vals[j_best]):
                j_best = j
        if j_best is not None:
            x, cur = cand[j_best], vals[j_best]
        elif all(step[k] <= steps[k] for k in names):
            break
        else:
            step = {k: max(steps[k], round(step[k] / 2 / steps[k]) * steps[k]) for k in names}
    hist = pd.DataFrame(rows)
    # robustness: best vs base schedule in every subgroup
    sub_rows = []
    groups = list(spec.data["subgroups"])
    if groups:
        combos = []
        for gname in groups:
            combos.append(dict(base, subgroup=gname))
            combos.append(dict(base, subgroup=gname, **{k: (int(round(x[k])) if FACTORS[k][1] == "count"
                                                            else x[k]) for k in names}))
        ds = run_sweep(_with_scenarios(spec, combos, "robust"), engine=engine, progress=progress)
        v = ds["summary"].sel(metric=objective).values
        nn = ds["summary_n"].sel(metric="ORR").values
        for j, gname in enumerate(groups):
            sub_rows.append({"subgroup": gname, "n": int(nn[2 * j]), "base": float(v[2 * j]),
                             "best": float(v[2 * j + 1]), "difference": float(v[2 * j + 1] - v[2 * j])})
    subs = pd.DataFrame(sub_rows).set_index("subgroup") if sub_rows else pd.DataFrame()
    return OptimizationResult(objective, sense, names, dict(x), hist, subs, len(cache))
