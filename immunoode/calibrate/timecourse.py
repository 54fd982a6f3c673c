"""Time-course fitting: individual and naive-pooled least squares with lmfit.

Stage 6c — consumes a :class:`~immunoode.model.Model`, long-format data
(:mod:`.nmdata`) and error models (:mod:`.errormodel`); produces a :class:`TimecourseFit`
(estimates, SE/RSE, covariance and profile-likelihood intervals, correlation,
predictions, provenance) per fit, and the files of ``immunoode fit FILE --out DIR``
(:func:`run_fit_file`).

The residual Jacobian comes from forward sensitivities derived symbolically from the
model (:mod:`immunoode.sensitivity`; one compiled augmented model per set of fitted
parameters) — ``jacobian="finite-difference"`` lets scipy difference the residuals
instead.  Parameters that are positive are fitted on the log scale by default
(``θ = exp(x)``); intervals are then computed on that scale and transformed back
(asymmetric on the natural scale).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .._version import __version__
from ..errors import ModelError, SimulationError
from ..model import Model, _suggest
from ..regimen import Regimen
from .errormodel import (ErrorModel, estimated_parameters, fisher_information,
                         fixed_residuals, minus2_log_likelihood, profiled_residuals)
from .nmdata import Individual, TimecourseData

__all__ = ["FitParameter", "TimecourseProblem", "TimecourseFit", "IndividualFits",
           "fit_timecourse", "run_fit_file", "load_fit_file", "write_parameters_toml",
           "plot_fit", "FitFileError", "POOLING", "JACOBIANS"]

log = logging.getLogger(__name__)

POOLING = ("pooled", "individual")
JACOBIANS = ("sensitivity", "finite-difference")
_Z95 = 1.959963984540054


class FitFileError(ModelError):
    """A fit file is invalid (names the file, the section and the item)."""


@dataclass(frozen=True)
class FitParameter:
    """A parameter to estimate.

    Parameters
    ----------
    name : model parameter name.
    value : [parameter unit] initial value.
    lower, upper : [parameter unit] bounds (``None``: unbounded; on the log scale a
        missing lower bound is 0).
    log : fit ``log(θ)`` (default: when ``value > 0`` and ``lower`` is ``None`` or ``>= 0``).
    """

    name: str
    value: float
    lower: float | None = None
    upper: float | None = None
    log: bool | None = None

    def __post_init__(self):
        for n in ("value", "lower", "upper"):
            v = getattr(self, n)
            if v is None and n != "value":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ModelError(f"{n} must be a finite number (got {v!r})", section="parameters",
                                 item=self.name)
        lo, hi = self.lower, self.upper
        if lo is not None and hi is not None and lo >= hi:
            raise ModelError(f"lower bound {lo:g} is not below upper bound {hi:g}",
                             section="parameters", item=self.name)
        if (lo is not None and self.value < lo) or (hi is not None and self.value > hi):
            raise ModelError(f"initial value {self.value:g} is outside its bounds "
                             f"[{lo}, {hi}]", section="parameters", item=self.name)
        use_log = self.log
        if use_log is None:
            use_log = self.value > 0 and (lo is None or lo >= 0)
        if use_log and self.value <= 0:
            raise ModelError(f"log scale needs a positive initial value (got {self.value:g})",
                             section="parameters", item=self.name)
        if use_log and hi is not None and hi <= 0:
            raise ModelError("log scale needs a positive upper bound", section="parameters",
                             item=self.name)
        object.__setattr__(self, "log", bool(use_log))

    @property
    def internal_name(self) -> str:
        return f"log_{self.name}" if self.log else self.name

    def to_internal(self, v: float) -> float:
        return math.log(v) if self.log else float(v)

    def to_natural(self, x: float) -> float:
        return math.exp(x) if self.log else float(x)

    def internal_bounds(self) -> tuple[float, float]:
        lo = -np.inf if self.lower is None or (self.log and self.lower <= 0) else \
            self.to_internal(self.lower)
        hi = np.inf if self.upper is None else self.to_internal(self.upper)
        return lo, hi


@dataclass(frozen=True)
class TimecourseProblem:
    """What to fit.

    Parameters
    ----------
    model : the model.
    data : observations (and doses) per individual.
    parameters : parameters to estimate.
    error_models : observable -> :class:`ErrorModel` (every observable in the data).
    pooling : ``"pooled"`` (naive pooled: one parameter set for all individuals) or
        ``"individual"`` (one fit per individual).
    jacobian : ``"sensitivity"`` (forward sensitivities, default) or ``"finite-difference"``.
    fixed : [parameter units] values of other model parameters (overrides).
    rtol, atol : integrator tolerances.
    """

    model: Model
    data: TimecourseData
    parameters: tuple[FitParameter, ...]
    error_models: Mapping[str, ErrorModel]
    pooling: str = "pooled"
    jacobian: str = "sensitivity"
    fixed: Mapping[str, float] = field(default_factory=dict)
    rtol: float = 1e-8
    atol: float = 1e-10

    def __post_init__(self):
        m = self.model
        params = tuple(self.parameters)
        object.__setattr__(self, "parameters", params)
        if not params:
            raise ModelError("no parameters to fit", section="parameters")
        names = [p.name for p in params]
        for n in names:
            if n not in m.parameters:
                raise ModelError(f"unknown parameter{_suggest(n, m.parameters)}",
                                 section="parameters", item=n)
        if len(set(names)) != len(names):
            raise ModelError("a parameter is listed twice", section="parameters")
        for n in self.fixed:
            if n not in m.parameters:
                raise ModelError(f"unknown parameter{_suggest(n, m.parameters)}",
                                 section="fixed", item=n)
            if n in names:
                raise ModelError("parameter is both fitted and fixed", section="fixed", item=n)
        for ind in self.data.individuals:
            for c in ind.covariates:
                if c in names:
                    raise ModelError(f"parameter is fitted but also a covariate column of the "
                                     f"data (individual {ind.id!r})", section="parameters",
                                     item=c)
        for o in self.data.observables:
            if o not in self.error_models:
                raise ModelError(f"no error model for observable {o!r} of the data",
                                 section="error", item=o)
        for o in self.error_models:
            if o not in self.data.observables:
                raise ModelError(f"error model for an observable the data does not "
                                 f"contain{_suggest(o, self.data.observables)}",
                                 section="error", item=o)
        if self.pooling not in POOLING:
            raise ModelError(f"pooling must be one of {', '.join(POOLING)}", item=self.pooling)
        if self.jacobian not in JACOBIANS:
            raise ModelError(f"jacobian must be one of {', '.join(JACOBIANS)}", item=self.jacobian)


# ----------------------------------------------------------------- objective
@dataclass
class _Block:
    """Observations of one individual on a shared time grid."""

    ind: Individual
    t_eval: np.ndarray
    obs_row: np.ndarray   # row into the solver's observable list, per observation
    t_idx: np.ndarray     # index into t_eval, per observation
    values: dict


def _make_block(ind: Individual, obs_names: Sequence[str], base: Mapping[str, float]) -> _Block:
    starts = [d.start for d in ind.regimen.doses] if ind.regimen is not None else []
    t0 = min([0.0, float(ind.time[0])] + starts)
    t_eval = np.unique(np.concatenate([[t0], ind.time]))
    vals = dict(base)
    vals.update(ind.covariates)
    return _Block(ind, t_eval, np.array([obs_names.index(o) for o in ind.observable]),
                  np.searchsorted(t_eval, ind.time), vals)


class _Objective:
    """Residuals and their Jacobian for a set of individuals sharing parameters."""

    def __init__(self, problem: TimecourseProblem, individuals: Sequence[Individual], solvers):
        self.problem = problem
        self.fp = problem.parameters
        self.obs_names = list(problem.data.observables)
        base = dict(problem.fixed)
        self.blocks = [_make_block(i, self.obs_names, base) for i in individuals]
        self.y = np.concatenate([b.ind.dv for b in self.blocks])
        obs = np.concatenate([[self.obs_names.index(o) for o in b.ind.observable]
                              for b in self.blocks])
        self.groups = {o: np.flatnonzero(obs == k) for k, o in enumerate(self.obs_names)
                       if np.any(obs == k)}
        self.em = problem.error_models
        self.ratio = [o for o in self.groups if self.em[o].kind == "combined" and
                      self.em[o].estimate]
        self.weights = {o: 1.0 for o in self.groups}
        self.sens, self.plain = solvers
        from ..sensitivity import _Integrator
        self._plain_run = _Integrator(self.plain, problem.rtol, problem.atol)
        self.names = [p.internal_name for p in self.fp] + [f"log_ratio_{o}" for o in self.ratio]
        self._last = None
        self.n_res = 0
        self.n_jac = 0
        self.n_solves = 0        # ODE solves (one per individual and evaluation)
        self.n_sens_solves = 0   # of which with sensitivities

    # lmfit Parameters -> natural values
    def natural(self, params) -> tuple[dict, dict]:
        theta = {p.name: p.to_natural(params[p.internal_name].value) for p in self.fp}
        lam = {o: math.exp(params[f"log_ratio_{o}"].value) for o in self.ratio}
        return theta, lam

    def predict(self, theta: Mapping[str, float], want_jac: bool):
        """Predictions (N,) and, if wanted, d(prediction)/d(internal x) (N, P)."""
        fs, dfs = [], []
        self.n_solves += len(self.blocks)
        self.n_sens_solves += len(self.blocks) if want_jac else 0
        for b in self.blocks:
            vals = dict(b.values)
            vals.update(theta)
            if want_jac:
                F, dF = self.sens.solve(b.t_eval, b.ind.regimen, vals, self.obs_names)
                dfs.append(dF[b.obs_row, b.t_idx, :])
            else:
                F = self._plain(b, vals)
            fs.append(F[b.obs_row, b.t_idx])
        f = np.concatenate(fs)
        if not want_jac:
            return f, None
        df = np.concatenate(dfs, axis=0)
        for k, p in enumerate(self.fp):
            if p.log:
                df[:, k] *= theta[p.name]
        return f, df

    def _plain(self, b: _Block, vals):
        return self._plain_run.run(b.ind.regimen, b.t_eval, vals, self.obs_names)

    def evaluate(self, params, want_jac: bool):
        theta, lam = self.natural(params)
        key = (tuple(sorted(theta.items())), tuple(sorted(lam.items())),
               tuple(sorted(self.weights.items())))
        if self._last is not None and self._last[0] == key and \
                (self._last[1][1] is not None or not want_jac):
            return self._last[1]
        want_jac = want_jac or self.problem.jacobian == "sensitivity"
        f, df = self.predict(theta, want_jac)
        e = np.empty_like(self.y)
        P = len(self.fp)
        J = np.zeros((len(self.y), len(self.names))) if want_jac else None
        dummy = np.zeros((len(self.y), P)) if df is None else df
        for o, idx in self.groups.items():
            em = self.em[o]
            w = math.sqrt(self.weights[o])
            if em.estimate:
                eo, Jo, Jl, _ = profiled_residuals(self.y[idx], f[idx], dummy[idx], em.kind,
                                                   lam.get(o))
                e[idx] = w * eo
                if J is not None:
                    J[np.ix_(idx, range(P))] = w * Jo
                    if o in lam:
                        J[idx, P + self.ratio.index(o)] = w * Jl * lam[o]
            else:
                eo, Jo = fixed_residuals(self.y[idx], f[idx], dummy[idx], em)
                e[idx] = eo
                if J is not None:
                    J[np.ix_(idx, range(P))] = Jo
        out = (e, J, f)
        self._last = (key, out)
        return out

    def residual(self, params):
        self.n_res += 1
        return self.evaluate(params, False)[0]

    def jacobian(self, params):
        self.n_jac += 1
        J = self.evaluate(params, True)[1]
        cols = [k for k, n in enumerate(self.names) if params[n].vary]
        return J[:, cols]

    def sums_of_squares(self, params) -> dict:
        """Unweighted profiled sum of squares per estimated observable block."""
        theta, lam = self.natural(params)
        f, _ = self.predict(theta, False)
        out = {}
        for o, idx in self.groups.items():
            em = self.em[o]
            if em.estimate:
                eo, _, _, scale = profiled_residuals(self.y[idx], f[idx],
                                                     np.zeros((len(idx), 0)), em.kind, lam.get(o))
                out[o] = (float(np.sum(eo ** 2)), scale)
        return out


# ----------------------------------------------------------------- results
@dataclass
class TimecourseFit:
    """The result of one time-course fit (every field always present).

    Attributes
    ----------
    ids : individuals in this fit.
    parameters : fitted parameter names.
    units : their units.
    estimate, se, rse : [parameter unit] estimates, standard errors (delta method on
        the natural scale), relative SE in %.
    ci_low, ci_high : 95 % covariance-based interval (on the fitting scale, transformed).
    profile_low, profile_high : 95 % profile-likelihood interval (lmfit ``conf_interval``;
        NaN where not computed).
    correlation : correlation matrix of the estimates (fitting scale).
    error_models : observable -> fitted/fixed :class:`ErrorModel`.
    minus2ll, aic, bic : -2 log-likelihood (normal residuals), AIC, BIC.
    predictions : table with ``id, time, observable, dv, pred, res, iwres``.
    success, message : status of the optimiser (and of the simulation).
    nfev, njev : residual and Jacobian evaluations; ``fit_time`` [s].
    error_se : ``(observable, "additive" | "proportional") -> SE`` of the estimated error
        parameters (from the expected Fisher information of the full likelihood).
    n_solves, n_sens_solves : ODE solves (one per individual and evaluation), and how many
        of them integrated the sensitivities too.
    lmfit_result : the lmfit ``MinimizerResult`` (``None`` when the fit failed to run).
    provenance : model hash, data file, solver settings, immunoode version.
    """

    ids: tuple[str, ...]
    parameters: tuple[str, ...]
    units: tuple[str, ...]
    estimate: np.ndarray
    se: np.ndarray
    rse: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    profile_low: np.ndarray
    profile_high: np.ndarray
    correlation: np.ndarray
    error_models: dict
    minus2ll: float
    aic: float
    bic: float
    predictions: object
    success: bool
    message: str
    nfev: int
    njev: int
    fit_time: float
    lmfit_result: object
    provenance: dict
    initial: np.ndarray = None
    at_bound: tuple = ()
    n_solves: int = 0
    n_sens_solves: int = 0
    error_se: dict = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """Estimates, name -> value."""
        return dict(zip(self.parameters, self.estimate.tolist()))

    def table(self, *, error_parameters: bool = False):
        """One row per parameter: estimate, SE, RSE %, intervals, unit.

        ``error_parameters=True`` appends rows ``<observable>.a`` / ``<observable>.b`` for the
        estimated error parameters (estimate and SE only).
        """
        import pandas as pd
        t = pd.DataFrame({
            "parameter": list(self.parameters), "unit": list(self.units),
            "initial": self.initial, "estimate": self.estimate, "se": self.se,
            "rse_percent": self.rse, "ci95_low": self.ci_low, "ci95_high": self.ci_high,
            "profile95_low": self.profile_low, "profile95_high": self.profile_high})
        if not error_parameters or not self.error_se:
            return t
        rows = []
        for (o, which), se in self.error_se.items():
            em = self.error_models[o]
            v = em.a if which == "additive" else em.b
            rows.append({"parameter": f"{o}.{'a' if which == 'additive' else 'b'}",
                         "unit": f"unit of {o}" if which == "additive" else "1",
                         "estimate": v, "se": se, "rse_percent": 100 * se / v})
        return pd.concat([t, pd.DataFrame(rows)], ignore_index=True)

    def report(self) -> str:
        """A text report in the manner of lmfit's ``fit_report``."""
        lines = ["[[Time-course fit]]",
                 f"    individuals        = {len(self.ids)}",
                 f"    observations       = {len(self.predictions)}",
                 f"    parameters         = {len(self.parameters)}",
                 f"    success            = {self.success}",
                 f"    message            = {self.message}",
                 f"    -2 log-likelihood  = {self.minus2ll:.6g}",
                 f"    AIC                = {self.aic:.6g}",
                 f"    BIC                = {self.bic:.6g}",
                 f"    evaluations        = {self.nfev} residual, {self.njev} Jacobian "
                 f"({self.n_solves} ODE solves, {self.n_sens_solves} with sensitivities)",
                 f"    fit time           = {self.fit_time:.3g} s",
                 "[[Estimates]]  value +/- SE (RSE %); 95 % CI: covariance-based on the "
                 "fitting scale; profile: lmfit conf_interval"]
        w = max(len(p) for p in self.parameters)
        for k, p in enumerate(self.parameters):
            pr = ""
            if np.isfinite(self.profile_low[k]) or np.isfinite(self.profile_high[k]):
                pr = f"  profile [{self.profile_low[k]:.5g}, {self.profile_high[k]:.5g}]"
            lines.append(f"    {p:<{w}} = {self.estimate[k]:<11.5g} +/- {self.se[k]:<10.4g} "
                         f"({self.rse[k]:.3g} %)  CI [{self.ci_low[k]:.5g}, "
                         f"{self.ci_high[k]:.5g}]{pr}  [{self.units[k]}]  "
                         f"(init = {self.initial[k]:.5g})")
        lines.append("[[Error model]]  (SE from the expected Fisher information)")
        for o, em in self.error_models.items():
            ses = [f"SE({'a' if k[1] == 'additive' else 'b'}) = {v:.4g} "
                   f"(RSE {100 * v / (em.a if k[1] == 'additive' else em.b):.3g} %)"
                   for k, v in self.error_se.items() if k[0] == o]
            lines.append(f"    {o}: {em.describe()}" + (f"; {', '.join(ses)}" if ses else ""))
        lines.append("[[Correlations]]  (|r| > 0.1)")
        n = len(self.parameters)
        pairs = [(abs(self.correlation[i, j]), i, j) for i in range(n) for j in range(i + 1, n)
                 if np.isfinite(self.correlation[i, j]) and abs(self.correlation[i, j]) > 0.1]
        for _, i, j in sorted(pairs, reverse=True):
            lines.append(f"    C({self.parameters[i]}, {self.parameters[j]}) = "
                         f"{self.correlation[i, j]:+.4f}")
        warn = []
        for k, p in enumerate(self.parameters):
            if p in self.at_bound:
                warn.append(f"    {p} is at a bound")
            if not np.isfinite(self.se[k]):
                warn.append(f"    {p}: could not estimate its standard error")
            elif self.rse[k] > 50:
                warn.append(f"    {p}: RSE {self.rse[k]:.3g} % — poorly identified by these data")
        if warn:
            lines.append("[[Warnings]]")
            lines += warn
        return "\n".join(lines)


@dataclass
class IndividualFits:
    """One :class:`TimecourseFit` per individual; failures are kept (``success=False``)."""

    fits: dict
    provenance: dict

    def table(self):
        """Long table: one row per individual and parameter."""
        import pandas as pd
        rows = []
        for id_, f in self.fits.items():
            t = f.table()
            t.insert(0, "id", id_)
            t["success"] = f.success
            t["message"] = f.message
            rows.append(t)
        return pd.concat(rows, ignore_index=True)

    def report(self) -> str:
        ok = sum(f.success for f in self.fits.values())
        out = [f"[[Individual fits]] {ok} of {len(self.fits)} succeeded"]
        for id_, f in self.fits.items():
            out.append(f"\n==== id {id_} ====")
            out.append(f.report())
        return "\n".join(out)


# ----------------------------------------------------------------- fitting
def _solvers(problem: TimecourseProblem):
    from ..compile import compile_model
    plain = compile_model(problem.model)
    sens = None
    if problem.jacobian == "sensitivity":
        from ..sensitivity import SensitivitySolver
        regs = [i.regimen for i in problem.data.individuals if i.regimen is not None]
        reg = sum(regs, Regimen()) if regs else None
        sens = SensitivitySolver(problem.model, [p.name for p in problem.parameters],
                                 observables=problem.data.observables, regimen=reg,
                                 rtol=problem.rtol, atol=problem.atol)
    return sens, plain


def _lmfit_parameters(problem: TimecourseProblem, obj: _Objective, start: Mapping[str, float]):
    import lmfit
    params = lmfit.Parameters()
    for p in problem.parameters:
        lo, hi = p.internal_bounds()
        params.add(p.internal_name, value=p.to_internal(start[p.name]), min=lo, max=hi)
    for o in obj.ratio:
        em = problem.error_models[o]
        params.add(f"log_ratio_{o}", value=math.log(em.a / em.b))
    return params


def _fit_one(problem: TimecourseProblem, individuals, solvers, *, start=None, n_starts: int = 1,
             seed: int | None = None, profiles: bool = False, max_outer: int = 10) -> TimecourseFit:
    import lmfit
    t_start = time.perf_counter()
    obj = _Objective(problem, individuals, solvers)
    start = dict(start or {p.name: p.value for p in problem.parameters})
    ids = tuple(i.id for i in individuals)
    kws = {"Dfun": obj.jacobian} if problem.jacobian == "sensitivity" else {}

    def minimise(params):
        mini = lmfit.Minimizer(obj.residual, params, scale_covar=False, nan_policy="raise", **kws)
        with np.errstate(divide="ignore", invalid="ignore"):  # scipy's trust-region internals
            res = mini.least_squares(x_scale="jac", max_nfev=2000)
        return mini, res

    def sse(res):
        return float(np.sum(res.residual ** 2))

    try:
        params = _lmfit_parameters(problem, obj, start)
        _update_weights(obj, params)
        mini, res = minimise(params)
        if n_starts > 1:  # multistart: extra starts drawn within the bounds
            rng = np.random.default_rng(seed)
            for _ in range(n_starts - 1):
                p2 = params.copy()
                for p in problem.parameters:
                    lo, hi = p.internal_bounds()
                    x0 = p2[p.internal_name].value
                    lo = lo if np.isfinite(lo) else x0 - 2.0
                    hi = hi if np.isfinite(hi) else x0 + 2.0
                    p2[p.internal_name].value = rng.uniform(lo, hi)
                try:
                    m2, r2 = minimise(p2)
                except (SimulationError, FloatingPointError, ValueError):
                    continue
                if sse(r2) < sse(res):
                    mini, res = m2, r2
        for _ in range(max_outer):  # re-weight estimated error blocks until stationary
            if not _update_weights(obj, res.params):
                break
            mini, res = minimise(res.params)
        # the result's residuals and chi-square with the final weights (profiles compare to it)
        res.residual = obj.evaluate(res.params, False)[0]
        res.chisqr = float(np.sum(res.residual ** 2))
        res.redchi = res.chisqr / max(res.nfree, 1)
        success, message = bool(res.success), str(res.message)
    except (SimulationError, FloatingPointError, ValueError, np.linalg.LinAlgError) as e:
        return _failed_fit(problem, ids, f"{type(e).__name__}: {e}", obj,
                           time.perf_counter() - t_start)
    fit = _summarise(problem, obj, mini, res, ids, success, message, start, profiles)
    fit.fit_time = time.perf_counter() - t_start
    fit.nfev, fit.njev = obj.n_res, obj.n_jac
    fit.n_solves, fit.n_sens_solves = obj.n_solves, obj.n_sens_solves
    return fit


def _update_weights(obj: _Objective, params) -> bool:
    """Weights ``N_o / SS_o`` of estimated error blocks; True if they changed (> 1e-4 rel.)."""
    ss = obj.sums_of_squares(params)
    changed = False
    for o, (s, _) in ss.items():
        new = len(obj.groups[o]) / s if s > 0 else 1.0
        if abs(new - obj.weights[o]) > 1e-4 * new:
            # a single block (no other observable): the optimum does not depend on its weight
            changed = changed or len(obj.groups) > 1
        obj.weights[o] = new
    obj._last = None
    return changed


def _summarise(problem, obj, mini, res, ids, success, message, start, profiles) -> TimecourseFit:
    import pandas as pd
    fp = problem.parameters
    P = len(fp)
    params = res.params
    theta, lam = obj.natural(params)
    # covariance on the fitting scale from the sensitivity (or FD) Jacobian at the optimum
    if problem.jacobian == "sensitivity":
        J = obj.evaluate(params, True)[1]
    else:
        J = _fd_jacobian(obj, params)
    cov = None
    try:
        cov = np.linalg.inv(J.T @ J)
        if not np.all(np.isfinite(cov)) or np.any(np.diag(cov) < 0):
            cov = None
    except np.linalg.LinAlgError:
        cov = None
    nn = len(obj.names)
    sd_int = np.sqrt(np.diag(cov)) if cov is not None else np.full(nn, np.nan)
    corr = cov / np.outer(sd_int, sd_int) if cov is not None else np.full((nn, nn), np.nan)
    for k, n in enumerate(obj.names):
        params[n].stderr = float(sd_int[k])
        for j, m in enumerate(obj.names):
            if j != k:
                params[n].correl = params[n].correl or {}
                params[n].correl[m] = float(corr[k, j])
    res.errorbars = cov is not None
    res.covar = cov
    est = np.array([theta[p.name] for p in fp])
    x = np.array([params[p.internal_name].value for p in fp])
    se = np.array([est[k] * sd_int[k] if p.log else sd_int[k] for k, p in enumerate(fp)])
    lo = np.array([p.to_natural(x[k] - _Z95 * sd_int[k]) for k, p in enumerate(fp)])
    hi = np.array([p.to_natural(x[k] + _Z95 * sd_int[k]) for k, p in enumerate(fp)])
    plo = np.full(P, np.nan)
    phi = np.full(P, np.nan)
    if profiles and cov is not None and nn >= 2:
        import lmfit
        try:
            ci = lmfit.conf_interval(mini, res, p_names=[p.internal_name for p in fp],
                                     sigmas=[0.95])
            for k, p in enumerate(fp):
                rows = ci[p.internal_name]
                plo[k] = p.to_natural(rows[0][1])
                phi[k] = p.to_natural(rows[-1][1])
        except (lmfit.minimizer.MinimizerException, SimulationError, FloatingPointError,
                ValueError) as e:
            log.warning("profile-likelihood intervals failed: %s", e)
    f = obj.evaluate(params, False)[2]
    ems = {}
    sds = np.empty_like(f)
    for o, idx in obj.groups.items():
        em = problem.error_models[o]
        if em.estimate:
            _, _, _, scale = profiled_residuals(obj.y[idx], f[idx], np.zeros((len(idx), 0)),
                                                em.kind, lam.get(o))
            a, b = estimated_parameters(em.kind, scale, lam.get(o))
            em = ErrorModel(em.kind, a, b, estimate=True)
        ems[o] = em
        sds[idx] = em.sd(f[idx])
    m2ll = minus2_log_likelihood(obj.y, f, sds)
    error_se = _error_parameter_se(problem, obj, params, theta, f, ems)
    n_err = sum(1 for o in ems if problem.error_models[o].estimate) + len(obj.ratio)
    k_all = P + n_err
    N = len(obj.y)
    pred = pd.DataFrame({
        "id": np.concatenate([[b.ind.id] * b.ind.n_obs for b in obj.blocks]),
        "time": np.concatenate([b.ind.time for b in obj.blocks]),
        "observable": np.concatenate([list(b.ind.observable) for b in obj.blocks]),
        "dv": obj.y, "pred": f, "res": obj.y - f, "iwres": (obj.y - f) / sds})
    at_bound = tuple(p.name for p in fp if any(
        np.isfinite(bd) and abs(params[p.internal_name].value - bd) < 1e-6 * max(1, abs(bd))
        for bd in p.internal_bounds()))
    return TimecourseFit(
        ids=ids, parameters=tuple(p.name for p in fp),
        units=tuple(problem.model.parameters[p.name].unit for p in fp), estimate=est, se=se,
        rse=100 * np.abs(se / est), ci_low=lo, ci_high=hi, profile_low=plo, profile_high=phi,
        correlation=corr[:P, :P], error_models=ems, minus2ll=m2ll, aic=m2ll + 2 * k_all,
        bic=m2ll + k_all * math.log(N), predictions=pred, success=success, message=message,
        nfev=0, njev=0, fit_time=0.0, lmfit_result=res,
        provenance=_provenance(problem, ids), initial=np.array([start[p.name] for p in fp]),
        at_bound=at_bound, error_se=error_se)


def _error_parameter_se(problem, obj, params, theta, f, ems) -> dict:
    """SEs of the estimated error parameters from the full expected Fisher information."""
    if not any(problem.error_models[o].estimate for o in obj.groups):
        return {}
    if problem.jacobian == "sensitivity":
        df = obj.predict(theta, True)[1]
    else:  # central differences of the predictions on the fitting scale
        cols = []
        for p in problem.parameters:
            x = p.to_internal(theta[p.name])
            h = 1e-6 * max(1.0, abs(x))
            up, dn = dict(theta), dict(theta)
            up[p.name], dn[p.name] = p.to_natural(x + h), p.to_natural(x - h)
            cols.append((obj.predict(up, False)[0] - obj.predict(dn, False)[0]) / (2 * h))
        df = np.column_stack(cols)
    blocks = [(o, idx, ems[o]) for o, idx in obj.groups.items()]
    info, labels = fisher_information(f, df, blocks)
    try:
        cov = np.linalg.inv(info)
    except np.linalg.LinAlgError:
        return {lab: math.nan for lab in labels}
    P = df.shape[1]
    out = {}
    for k, lab in enumerate(labels):
        em = ems[lab[0]]
        v = em.a if lab[1] == "additive" else em.b
        var = cov[P + k, P + k]
        out[lab] = v * math.sqrt(var) if var >= 0 else math.nan
    return out


def _fd_jacobian(obj: _Objective, params, rel: float = 1e-6) -> np.ndarray:
    """Central differences of the residuals on the fitting scale (for ``jacobian='finite-difference'``)."""
    cols = []
    for n in obj.names:
        p1, p2 = params.copy(), params.copy()
        h = rel * max(1.0, abs(params[n].value))
        p1[n].value += h
        p2[n].value -= h
        cols.append((obj.evaluate(p1, False)[0] - obj.evaluate(p2, False)[0]) / (2 * h))
    obj._last = None
    return np.column_stack(cols)


def _failed_fit(problem, ids, message, obj, elapsed) -> TimecourseFit:
    import pandas as pd
    P = len(problem.parameters)
    nan = np.full(P, np.nan)
    return TimecourseFit(
        ids=ids, parameters=tuple(p.name for p in problem.parameters),
        units=tuple(problem.model.parameters[p.name].unit for p in problem.parameters),
        estimate=nan.copy(), se=nan.copy(), rse=nan.copy(), ci_low=nan.copy(),
        ci_high=nan.copy(), profile_low=nan.copy(), profile_high=nan.copy(),
        correlation=np.full((P, P), np.nan), error_models=dict(problem.error_models),
        minus2ll=math.nan, aic=math.nan, bic=math.nan,
        predictions=pd.DataFrame(columns=["id", "time", "observable", "dv", "pred", "res",
                                          "iwres"]),
        success=False, message=message, nfev=obj.n_res, njev=obj.n_jac, fit_time=elapsed,
        lmfit_result=None, provenance=_provenance(problem, ids),
        initial=np.array([p.value for p in problem.parameters]))


def _provenance(problem: TimecourseProblem, ids) -> dict:
    m = problem.model
    return {"model_name": m.name, "model_hash": m.content_hash(dict(problem.fixed)),
            "model_structure_hash": m.structure_hash(), "data_file": problem.data.file or "",
            "n_individuals": len(ids), "pooling": problem.pooling, "jacobian": problem.jacobian,
            "fixed_parameters": json.dumps(dict(problem.fixed)),
            "initial_values": json.dumps({p.name: p.value for p in problem.parameters}),
            "error_models": json.dumps({o: [e.kind, e.additive, e.proportional, e.estimate]
                                        for o, e in problem.error_models.items()}),
            "solver": "rodas5p", "rtol": problem.rtol, "atol": problem.atol,
            "optimizer": "lmfit least_squares (trf)", "immunoode_version": __version__}


def fit_timecourse(problem: TimecourseProblem, *, profiles: bool = False, n_starts: int = 1,
                   seed: int | None = None, progress: bool = False):
    """Fit ``problem``: a :class:`TimecourseFit` (pooled) or :class:`IndividualFits`.

    Parameters
    ----------
    problem : the fitting problem.
    profiles : also compute profile-likelihood intervals (lmfit ``conf_interval``; costs
        a few refits per parameter).
    n_starts : number of starts; starts after the first are drawn uniformly within the
        bounds on the fitting scale with ``seed``.
    seed : seed of the multistart draws.
    progress : log one line per individual (``logging`` INFO).

    Notes
    -----
    Individual fits record a failing individual (``success=False`` with the message) and
    continue; Ctrl-C stops after the current individual and marks the rest "not run".
    """
    if n_starts < 1:
        raise ValueError("n_starts must be >= 1")
    if n_starts > 1 and seed is None:
        raise ValueError("n_starts > 1 draws random starts: give a seed")
    solvers = _solvers(problem)
    inds = problem.data.individuals
    if problem.pooling == "pooled":
        return _fit_one(problem, inds, solvers, n_starts=n_starts, seed=seed, profiles=profiles)
    fits = {}
    interrupted = False
    seeds = np.random.SeedSequence(seed).spawn(len(inds))
    for k, ind in enumerate(inds):
        if interrupted:
            fits[ind.id] = _failed_fit(problem, (ind.id,), "not run: interrupted",
                                       _Objective(problem, [ind], solvers), 0.0)
            continue
        try:
            s = int(seeds[k].generate_state(1)[0])
            fits[ind.id] = _fit_one(problem, [ind], solvers, n_starts=n_starts, seed=s,
                                    profiles=profiles)
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: individual %s and later ones not fitted", ind.id)
            fits[ind.id] = _failed_fit(problem, (ind.id,), "not run: interrupted",
                                       _Objective(problem, [ind], solvers), 0.0)
        if progress:
            log.info("individual %s (%d/%d): %s", ind.id, k + 1, len(inds),
                     "ok" if fits[ind.id].success else fits[ind.id].message)
    failed = sum(not f.success for f in fits.values())
    if failed:
        import warnings
        warnings.warn(f"{failed} of {len(fits)} individual fits failed; see their message",
                      stacklevel=2)
    return IndividualFits(fits, _provenance(problem, tuple(fits)))


# ----------------------------------------------------------------- fit files
_FIT_KEYS = ("kind", "model", "data", "regimen", "dose_target", "pooling", "jacobian", "seed",
             "n_starts", "profiles", "rtol", "atol", "description")
_PAR_KEYS = ("initial", "lower", "upper", "log")
_ERR_KEYS = ("model", "additive", "proportional", "estimate")
_TOP_KEYS = ("fit", "parameters", "fixed", "error")


def _check_keys(table, allowed, *, file, section, item=None):
    if not isinstance(table, dict):
        raise FitFileError("must be a table", file=file, section=section, item=item)
    for k in table:
        if k not in allowed:
            hint = _suggest(k, allowed) or f" (allowed: {', '.join(allowed)})"
            raise FitFileError(f"unknown key {k!r}{hint}", file=file, section=section,
                               item=item or k)


def load_fit_file(path) -> tuple[TimecourseProblem, dict]:
    """Read a time-course fit file into a :class:`TimecourseProblem` and run options.

    The format is described in ``docs/timecourse-fitting.md``.  Paths are relative to
    the fit file; ``model`` may also name a built-in model.

    Raises
    ------
    FitFileError : unknown key, missing item, wrong type; names the file, section, item.
    ModelError : from the model, regimen or data file (names that file).
    """
    from ..cli import resolve_model_path
    from ..modelfile import load_model
    from ..regimen import load_regimen
    from .nmdata import read_timecourse_data
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FitFileError("fit file not found", file=path) from None
    except tomllib.TOMLDecodeError as e:
        raise FitFileError(f"TOML syntax error: {e}", file=path) from None
    _check_keys(doc, _TOP_KEYS, file=path, section=None)
    fit = doc.get("fit")
    if fit is None:
        raise FitFileError("missing [fit] table", file=path, section="fit")
    _check_keys(fit, _FIT_KEYS, file=path, section="fit")
    if fit.get("kind") != "timecourse":
        raise FitFileError(f"kind must be \"timecourse\" here (got {fit.get('kind')!r})",
                           file=path, section="fit", item="kind")
    for k in ("model", "data"):
        if not isinstance(fit.get(k), str):
            raise FitFileError(f"missing or non-text {k!r} (a file path)", file=path,
                               section="fit", item=k)
    base = path.parent

    def rel(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base / q

    mpath = rel(fit["model"])
    if not mpath.exists():
        mpath = resolve_model_path(fit["model"])
    if not mpath.exists():
        raise FitFileError(f"model file {fit['model']!r} not found (relative to {base})",
                           file=path, section="fit", item="model")
    model = load_model(mpath)
    data = read_timecourse_data(rel(fit["data"]), model, dose_target=fit.get("dose_target"))
    if "regimen" in fit:
        from ..cli import resolve_regimen_path
        rp = rel(fit["regimen"])
        rp = rp if rp.exists() else resolve_regimen_path(fit["regimen"])
        data = data.with_regimen(load_regimen(rp))
    pars = doc.get("parameters")
    if not pars:
        raise FitFileError("no parameters to fit: add [parameters] NAME = { initial = ... }",
                           file=path, section="parameters")
    _check_keys(pars, tuple(pars), file=path, section="parameters")
    fps = []
    for name, spec in pars.items():
        _check_keys(spec, _PAR_KEYS, file=path, section="parameters", item=name)
        if name not in model.parameters:
            raise FitFileError(f"unknown parameter{_suggest(name, model.parameters)} (model "
                               f"{model.name!r})", file=path, section="parameters", item=name)
        init = spec.get("initial", model.parameters[name].value)
        try:
            fps.append(FitParameter(name, init, spec.get("lower"), spec.get("upper"),
                                    spec.get("log")))
        except ModelError as e:
            raise FitFileError(e.message, file=path, section="parameters", item=name) from None
    fixed = doc.get("fixed", {})
    _check_keys(fixed, tuple(fixed), file=path, section="fixed")
    for k, v in fixed.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise FitFileError(f"expected a number, got {v!r}", file=path, section="fixed",
                               item=k)
    errs = doc.get("error", {})
    _check_keys(errs, tuple(errs), file=path, section="error")
    ems = {}
    for o, spec in errs.items():
        _check_keys(spec, _ERR_KEYS, file=path, section="error", item=o)
        try:
            ems[o] = ErrorModel(spec.get("model", "additive"), spec.get("additive"),
                                spec.get("proportional"), bool(spec.get("estimate", True)))
        except ModelError as e:
            raise FitFileError(e.message, file=path, section=f"error.{o}",
                               item=e.item) from None
    for o in data.observables:
        if o not in ems:
            raise FitFileError(f"the data has observable {o!r} but there is no [error.{o}]",
                               file=path, section="error", item=o)
    try:
        problem = TimecourseProblem(model, data, tuple(fps), ems,
                                    pooling=fit.get("pooling", "pooled"),
                                    jacobian=fit.get("jacobian", "sensitivity"),
                                    fixed={k: float(v) for k, v in fixed.items()},
                                    rtol=float(fit.get("rtol", 1e-8)),
                                    atol=float(fit.get("atol", 1e-10)))
    except FitFileError:
        raise
    except ModelError as e:
        raise FitFileError(e.message, file=path, section=e.section, item=e.item) from None
    seed = fit.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise FitFileError(f"seed must be an integer (got {seed!r})", file=path, section="fit",
                           item="seed")
    opts = {"seed": seed, "n_starts": int(fit.get("n_starts", 1)),
            "profiles": bool(fit.get("profiles", True)), "model_path": mpath,
            "description": str(fit.get("description", ""))}
    return problem, opts


def _toml_str(s: str) -> str:
    return json.dumps(str(s), ensure_ascii=False)


def write_parameters_toml(fit: TimecourseFit, problem: TimecourseProblem, model_path: Path,
                          out: Path, *, fit_file: str = "") -> None:
    """Write the estimates as a model file that includes the model and overrides its values."""
    try:
        inc = os.path.relpath(Path(model_path).resolve(), out.parent.resolve())
    except ValueError:
        inc = str(Path(model_path).resolve())
    m = problem.model
    lines = [f"# Fitted by immunoode {__version__} (time-course fit {fit_file}); ids: "
             f"{', '.join(fit.ids[:20])}{' ...' if len(fit.ids) > 20 else ''}",
             f"# load with immunoode.load_model({out.name!r})", "[model]",
             f"name = {_toml_str(m.name)}", f"time_unit = {_toml_str(m.time_unit)}",
             f"include = [{_toml_str(inc)}]",
             f"description = {_toml_str('fitted parameters: ' + m.name)}", "", "[parameters]"]
    for k, p in enumerate(fit.parameters):
        src = (f"time-course fit {fit_file}: SE {fit.se[k]:.4g} (RSE {fit.rse[k]:.3g} %), "
               f"95% CI [{fit.ci_low[k]:.5g}, {fit.ci_high[k]:.5g}]")
        lines.append(f"{p} = {{ value = {float(fit.estimate[k])!r}, override = true, "
                     f"source = {_toml_str(src)} }}")
    for k, v in problem.fixed.items():
        lines.append(f"{k} = {{ value = {float(v)!r}, override = true, "
                     f"source = {_toml_str('fixed in ' + fit_file)} }}")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_fit(fit: TimecourseFit, problem: TimecourseProblem, out_dir, *, max_panels: int = 12,
             values_by_id: Mapping[str, Mapping[str, float]] | None = None) -> list[Path]:
    """Goodness-of-fit plots: observed vs predicted, IWRES vs time, individual fits.

    Returns the paths written (PNG).
    """
    from ..compile import compile_model
    from ..plots import _plt
    from ..simulate import simulate
    plt = _plt()
    out_dir = Path(out_dir)
    pred = fit.predictions
    paths = []
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    for o, g in pred.groupby("observable"):
        ax.scatter(g["pred"], g["dv"], s=12, alpha=0.7, label=o)
    lo = float(min(pred["pred"].min(), pred["dv"].min()))
    hi = float(max(pred["pred"].max(), pred["dv"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("observed")
    ax.set_title("observed vs predicted")
    ax.legend(fontsize=8)
    paths.append(out_dir / "obs_vs_pred.png")
    fig.savefig(paths[-1], bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for o, g in pred.groupby("observable"):
        ax.scatter(g["time"], g["iwres"], s=12, alpha=0.7, label=o)
    ax.axhline(0, color="k", lw=1)
    for y in (-2, 2):
        ax.axhline(y, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"time [{problem.model.time_unit}]")
    ax.set_ylabel("IWRES (y − f)/σ")
    ax.set_title("weighted residuals vs time")
    paths.append(out_dir / "residuals_vs_time.png")
    fig.savefig(paths[-1], bbox_inches="tight")
    plt.close(fig)
    cm = compile_model(problem.model)
    ids = list(dict.fromkeys(pred["id"]))[:max_panels]
    nc = min(4, len(ids))
    nr = int(math.ceil(len(ids) / nc))
    fig, axes = plt.subplots(nr, nc, figsize=(3.2 * nc, 2.6 * nr), dpi=100, squeeze=False)
    for ax, id_ in zip(axes.ravel(), ids):
        ind = problem.data[id_]
        vals = dict(problem.fixed)
        vals.update(ind.covariates)
        vals.update(values_by_id[id_] if values_by_id else fit.values())
        tb = _make_block(ind, list(problem.data.observables), vals).t_eval
        tt = np.linspace(tb[0], tb[-1], 400)
        tt = np.union1d(tt, ind.time)
        try:
            ds = simulate(cm, ind.regimen, t_eval=tt, parameters=vals, rtol=problem.rtol,
                          atol=problem.atol, outputs=list(problem.data.observables))
        except SimulationError:
            ds = None
        for o in problem.data.observables:
            sel = np.array([x == o for x in ind.observable])
            if not sel.any():
                continue
            pts = ax.plot(ind.time[sel], ind.dv[sel], "o", ms=3)
            if ds is not None:
                ax.plot(tt, ds[o].values, "-", lw=1, color=pts[0].get_color(), label=o)
        ax.set_title(f"id {id_}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(ids):]:
        ax.set_visible(False)
    fig.supxlabel(f"time [{problem.model.time_unit}]", fontsize=9)
    fig.supylabel(", ".join(f"{o} [{_unit_of(problem.model, o)}]"
                            for o in problem.data.observables), fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "individual_fits.png")
    fig.savefig(paths[-1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _unit_of(model: Model, name: str) -> str:
    comp = model.observables.get(name) or model.assignments.get(name) or model.states.get(name)
    return (comp.unit if comp is not None else None) or "-"


def run_fit_file(path, out_dir) -> int:
    """Run a ``kind = "timecourse"`` fit file and write its results to ``out_dir``.

    Writes ``parameters.toml`` (a model file: includes the model, overrides the
    estimates; individual fits: ``parameters/<id>.toml``), ``report.txt`` (this report
    and lmfit's), ``estimates.csv``, ``predictions.csv``, ``provenance.json`` and the
    plots ``obs_vs_pred.png``, ``residuals_vs_time.png``, ``individual_fits.png``.

    Returns
    -------
    int
        0 when every fit succeeded, 1 otherwise (results are written either way).
    """
    import lmfit
    path = Path(path)
    problem, opts = load_fit_file(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = fit_timecourse(problem, profiles=opts["profiles"], n_starts=opts["n_starts"],
                         seed=opts["seed"], progress=True)
    prov = dict(res.provenance)
    prov.update({"fit_file": str(path), "seed": opts["seed"], "n_starts": opts["n_starts"]})
    (out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")
    if isinstance(res, IndividualFits):
        fits = res.fits
        (out / "parameters").mkdir(exist_ok=True)
        for id_, f in fits.items():
            if f.success:
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in id_)
                write_parameters_toml(f, problem, opts["model_path"],
                                      out / "parameters" / f"{safe}.toml", fit_file=path.name)
        res.table().to_csv(out / "estimates.csv", index=False)
        import pandas as pd
        preds = [f.predictions for f in fits.values() if f.success]
        if preds:
            allp = pd.concat(preds, ignore_index=True)
            allp.to_csv(out / "predictions.csv", index=False)
            merged = TimecourseFit(**{**fits[next(i for i in fits if fits[i].success)].__dict__,
                                      "predictions": allp})
            plot_fit(merged, problem, out, values_by_id={i: f.values() for i, f in fits.items()
                                                         if f.success})
        text = res.report()
        ok = all(f.success for f in fits.values())
    else:
        if res.success:
            write_parameters_toml(res, problem, opts["model_path"], out / "parameters.toml",
                                  fit_file=path.name)
        res.table(error_parameters=True).to_csv(out / "estimates.csv", index=False)
        res.predictions.to_csv(out / "predictions.csv", index=False)
        text = res.report()
        if res.lmfit_result is not None:
            text += "\n\n[[lmfit report]] (fitting scale: log_X = log(X))\n" + \
                lmfit.fit_report(res.lmfit_result)
            plot_fit(res, problem, out)
        ok = res.success
    (out / "report.txt").write_text(text + "\n", encoding="utf-8")
    log.info("time-course fit written to %s", out)
    return 0 if ok else 1

