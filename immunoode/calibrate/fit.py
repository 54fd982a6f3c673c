"""Stage 7d — the rate fit. Consumes a fit file (arms = virtual trials, target table,
population model, fitted parameters with bounds); produces a :class:`FitResult`: fitted
parameters with profile-likelihood intervals, every target against its simulated value,
held-out predictions, stage timings and evaluation counts.

The fit is nested because the two kinds of parameter cost very different amounts:

* **population** parameters (medians, CVs, covariate effects of the re-weighted patient
  variables) only change importance weights of the simulated plausible cohorts
  (:mod:`.vpop`): one objective evaluation is a few weighted sums;
* **mechanistic** parameters (model parameters shared by every patient and arm) change the
  trajectories, so each new value re-simulates every arm's cohort (cached by value).

Stages: (1) *global*: for each point of a grid (Latin hypercube for several mechanistic
parameters) of mechanistic values, simulate the cohorts and fit the population parameters
with lmfit's differential evolution then a local least-squares fit; (2) *local*: Nelder–Mead
over the mechanistic parameters from the best grid point, each step re-fitting the
population parameters locally; (3) *profiles*: profile likelihood of every fitted parameter
(population ones re-optimise the others at each profile value; the mechanistic profile is
the inner optimum along the grid), giving 95 % intervals at Δχ² = 3.84 and flagging
parameters the targets leave unbounded.  Optional: *adaptation* rounds (``[cohort]
adapt_rounds``) redraw the cohorts from a defensive mixture centred on the optimum
(:mod:`.adapt`) and repeat a short global check and the local stage, raising the effective
sample size; *validation* (``[stages] validate_n``) draws a fresh cohort from the fitted
population with a new seed and reports every target on it.  The cohort seed is fixed (common random numbers),
so the objective and the whole fit are deterministic for a given seed.

Fit file (TOML)::

    [fit]
    name = "nsclc_icis"
    targets = "nsclc_targets.csv"     # relative to the fit file
    seed = 1
    interval_scale = 0.025            # [fraction] sd outside interval targets

    [cohort]                          # plausible cohort per arm
    n = 1500
    method = "lhs"
    n_jobs = 2
    min_ess = 50                      # penalty below this effective sample size
    adapt_rounds = 0                  # > 0: redraw cohorts from a defensive mixture centred
    adapt_defensive = 0.2             #   on the fit (module .adapt): share from the broad q
    adapt_inflation = 1.5             #   and factor on the fitted log-scale spread

    [stages]
    global_maxiter = 40
    global_popsize = 8
    mechanistic_grid = 5
    mechanistic_refine = 6
    profile_points = 9
    emcee_steps = 0                   # > 0: emcee posterior of the population parameters
                                      # (also emcee_walkers, emcee_burn, emcee_thin)
    validate_n = 0                    # > 0: fresh cohort per arm from the fitted population
    adapt_global_maxiter = 10         # DE generations of each adaptation round's global check

    [arms.1l_ici_mono]
    trial = "trials/1l_ici_mono.toml"
    covariates = { prior_chemo = 0 }

    [population.k_CTL]                # target distribution of a re-weighted variable
    dist = "lognormal"
    median = "k_CTL_median"           # a parameter name or a number
    cv = 0.5
    effects = { prior_chemo = "k_CTL_prior_chemo" }
    # zero = "p_none"                 # optional: that share of patients is exactly 0 (the
                                      #   trial's plausible spec then needs zero = ... too)

    [parameters.k_CTL_median]
    kind = "population"               # or "mechanistic" (a model parameter)
    value = 0.3
    min = 0.05
    max = 3.0
    scale = "log"                     # profile grid spacing / 'range' prior
    prior = "none"                    # none | range | {dist = "normal", mean = .., sd = ..}
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import CalibrationError, ImmunoodeError, ModelError, did_you_mean
from .likelihood import DEFAULT_INTERVAL_SCALE, Likelihood, multinomial_nll, prior_nll
from .targets import Target, TargetTable, load_targets
from .vpop import (STATISTICS, Cohort, PopulationModel, VariableModel, indicators,
                   required_follow_up, weighted_rates)

__all__ = ["FitFileError", "CalibrationError", "FitSpec", "ParameterSpec", "ArmSpec",
           "load_fit", "RateFit", "FitResult", "run_fit", "CHI2_95"]

log = logging.getLogger(__name__)

#: Δχ² (= 2·ΔNLL) of a 95 % profile-likelihood interval for one parameter
CHI2_95 = 3.841458820694124

_SECTIONS = {"fit", "cohort", "stages", "arms", "population", "parameters"}
_FIT_KEYS = {"name", "kind", "targets", "seed", "interval_scale", "description"}
_COHORT_KEYS = {"n", "method", "n_jobs", "min_ess", "adapt_rounds", "adapt_defensive",
                "adapt_inflation"}
_STAGE_KEYS = {"global_maxiter", "global_popsize", "mechanistic_grid", "mechanistic_refine",
               "profile_points", "local_max_nfev", "emcee_steps", "emcee_walkers", "emcee_burn",
               "emcee_thin", "validate_n", "adapt_global_maxiter"}
_ARM_KEYS = {"trial", "label", "covariates", "n"}
_POP_KEYS = {"dist", "median", "cv", "mean", "sd", "effects", "zero"}
_PAR_KEYS = {"kind", "value", "min", "max", "vary", "scale", "prior", "description", "unit"}
_STAGE_DEFAULTS = {"global_maxiter": 40, "global_popsize": 8, "mechanistic_grid": 5,
                   "mechanistic_refine": 6, "profile_points": 9, "local_max_nfev": 400,
                   "emcee_steps": 0, "emcee_walkers": 0, "emcee_thin": 1, "validate_n": 0}
# emcee_* may be 0 (steps 0 = no posterior sampling, walkers 0 = automatic); emcee_burn
# defaults to a quarter of the steps
_STAGE_ZERO_OK = {"emcee_steps", "emcee_walkers", "emcee_burn", "validate_n"}


class FitFileError(ModelError):
    """A fit file is invalid (the message names the file, the section and the item)."""


def _suggest(name, known) -> str:
    return did_you_mean(name, known)


# --------------------------------------------------------------------------- fit file
@dataclass(frozen=True)
class ParameterSpec:
    """One calibration parameter: bounds, start, kind and prior."""

    name: str
    kind: str
    value: float
    min: float
    max: float
    vary: bool = True
    scale: str = "linear"
    prior: Mapping | None = None
    description: str = ""


@dataclass(frozen=True)
class ArmSpec:
    """One trial arm: its trial file (loaded spec), label and arm-level covariates."""

    name: str
    trial_file: str
    trial: Mapping
    label: str = ""
    covariates: Mapping[str, float] = field(default_factory=dict)
    n: int | None = None


@dataclass(frozen=True)
class FitSpec:
    """A validated fit file."""

    name: str
    file: str
    targets: TargetTable
    seed: int
    arms: Mapping[str, ArmSpec]
    population: PopulationModel
    parameters: Mapping[str, ParameterSpec]
    cohort: Mapping
    stages: Mapping
    interval_scale: float = DEFAULT_INTERVAL_SCALE
    sha256: str = ""

    @property
    def mechanistic(self) -> list[str]:
        """Mechanistic parameter names (model parameters), in file order."""
        return [k for k, p in self.parameters.items() if p.kind == "mechanistic"]

    @property
    def population_parameters(self) -> list[str]:
        """Population parameter names, in file order."""
        return [k for k, p in self.parameters.items() if p.kind == "population"]


def _keys(d, allowed, file, section, item=None):
    if not isinstance(d, Mapping):
        raise FitFileError(f"expected a table; got {type(d).__name__}", file=file,
                           section=section, item=item)
    for k in d:
        if k not in allowed:
            raise FitFileError(f"unknown key {k!r}{_suggest(k, allowed)} (allowed: "
                               f"{', '.join(sorted(allowed))})", file=file, section=section,
                               item=item)


def _number(v, file, section, item, key, *, integer=False, positive=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FitFileError(f"{key!r} must be a finite number; got {v!r}", file=file,
                           section=section, item=item)
    if integer and int(v) != v:
        raise FitFileError(f"{key!r} must be a whole number; got {v!r}", file=file,
                           section=section, item=item)
    if positive and v <= 0:
        raise FitFileError(f"{key!r} must be > 0; got {v!r}", file=file, section=section,
                           item=item)
    return int(v) if integer else float(v)


def read_fit_kind(path) -> str:
    """``[fit] kind`` of a fit file (``"rates"`` when absent)."""
    file = Path(path)
    if not file.exists():
        raise FitFileError("no such fit file", file=file)
    try:
        with open(file, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise FitFileError(f"invalid TOML: {exc}", file=file) from None
    return str(data.get("fit", {}).get("kind", "rates"))


def load_fit(path) -> FitSpec:
    """Read and validate a rate-fit file (see the module docstring).

    Raises
    ------
    FitFileError
        Unknown sections or keys, a population variable referring to an undeclared
        parameter, a parameter no variable uses, bounds that do not hold the start value, an
        arm without a trial file, a target naming an undeclared arm or an unknown statistic,
        no fitted targets.  Mechanistic parameters and re-weighted variables are checked
        against each arm's model and trial file when the fit is prepared (:class:`RateFit`).
    """
    file = Path(path)
    if not file.exists():
        raise FitFileError("no such fit file", file=file)
    raw = file.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise FitFileError(f"invalid TOML: {exc}", file=file) from None
    _keys(data, _SECTIONS, file, "(top level)")
    fit = data.get("fit", {})
    _keys(fit, _FIT_KEYS, file, "fit")
    kind = fit.get("kind", "rates")
    if kind != "rates":
        raise FitFileError(f"kind {kind!r} is not a rate fit (time-course fits are run by "
                           f"immunoode.calibrate.timecourse)", file=file, section="fit")
    if "targets" not in fit:
        raise FitFileError("missing 'targets' (the target table CSV)", file=file, section="fit")
    base = file.resolve().parent
    tpath = base / str(fit["targets"])
    from .targets import TargetError
    try:
        targets = load_targets(tpath)
    except TargetError as exc:
        raise exc.located(file=tpath) from None
    seed = _number(fit.get("seed", 0), file, "fit", None, "seed", integer=True)
    iscale = _number(fit.get("interval_scale", DEFAULT_INTERVAL_SCALE), file, "fit", None,
                     "interval_scale", positive=True)

    cohort = dict(fit_cohort_defaults())
    c = data.get("cohort", {})
    _keys(c, _COHORT_KEYS, file, "cohort")
    cohort.update(c)
    for k in ("n", "n_jobs"):
        cohort[k] = _number(cohort[k], file, "cohort", None, k, integer=True, positive=True)
    cohort["min_ess"] = _number(cohort["min_ess"], file, "cohort", None, "min_ess")
    cohort["adapt_rounds"] = _number(cohort["adapt_rounds"], file, "cohort", None,
                                     "adapt_rounds", integer=True)
    if cohort["adapt_rounds"] < 0:
        raise FitFileError(f"'adapt_rounds' must be >= 0; got {cohort['adapt_rounds']}",
                           file=file, section="cohort")
    cohort["adapt_defensive"] = _number(cohort["adapt_defensive"], file, "cohort", None,
                                        "adapt_defensive")
    if not 0.0 <= cohort["adapt_defensive"] < 1.0:
        raise FitFileError(f"'adapt_defensive' (share drawn from the broad plausible density) "
                           f"must be in [0, 1); got {cohort['adapt_defensive']}", file=file,
                           section="cohort")
    cohort["adapt_inflation"] = _number(cohort["adapt_inflation"], file, "cohort", None,
                                        "adapt_inflation", positive=True)
    stages = dict(_STAGE_DEFAULTS)
    s = data.get("stages", {})
    _keys(s, _STAGE_KEYS, file, "stages")
    stages.update(s)
    for k in stages:
        stages[k] = _number(stages[k], file, "stages", None, k, integer=True,
                            positive=k not in _STAGE_ZERO_OK)
        if k in _STAGE_ZERO_OK and stages[k] < 0:
            raise FitFileError(f"{k!r} must be >= 0; got {stages[k]!r}", file=file,
                               section="stages")
    if stages["emcee_steps"] and stages.get("emcee_burn", 0) >= stages["emcee_steps"]:
        raise FitFileError(f"'emcee_burn' ({stages['emcee_burn']}) must be smaller than "
                           f"'emcee_steps' ({stages['emcee_steps']})", file=file,
                           section="stages")

    # parameters
    params: dict[str, ParameterSpec] = {}
    for name, p in data.get("parameters", {}).items():
        _keys(p, _PAR_KEYS, file, "parameters", name)
        kind_p = p.get("kind", "population")
        if kind_p not in ("population", "mechanistic"):
            raise FitFileError(f"'kind' must be 'population' or 'mechanistic'; got {kind_p!r}",
                               file=file, section="parameters", item=name)
        for key in ("value", "min", "max"):
            if key not in p:
                raise FitFileError(f"missing {key!r} (start value and bounds are required)",
                                   file=file, section="parameters", item=name)
        v, lo, hi = (_number(p[k], file, "parameters", name, k) for k in ("value", "min", "max"))
        if not lo <= v <= hi or lo >= hi:
            raise FitFileError(f"need min < max and min <= value <= max; got min={lo:g}, "
                               f"value={v:g}, max={hi:g}", file=file, section="parameters",
                               item=name)
        scale = p.get("scale", "linear")
        if scale not in ("linear", "log") or (scale == "log" and lo <= 0):
            raise FitFileError(f"'scale' must be 'linear' or 'log' (log needs min > 0); got "
                               f"{scale!r}", file=file, section="parameters", item=name)
        prior = p.get("prior", "none")
        if isinstance(prior, str):
            prior = {"dist": prior}
        if not isinstance(prior, Mapping) or prior.get("dist", "none") not in (
                "none", "range", "normal", "lognormal"):
            raise FitFileError(f"'prior' must be 'none', 'range' or a table with dist = "
                               f"'normal'/'lognormal'; got {prior!r}", file=file,
                               section="parameters", item=name)
        try:
            prior_nll(v, prior, bounds=(lo, hi), log_scale=scale == "log")
        except (KeyError, ValueError, TypeError) as exc:
            raise FitFileError(f"invalid prior: {exc}", file=file, section="parameters",
                               item=name) from None
        vary = p.get("vary", True)
        if not isinstance(vary, bool):
            raise FitFileError(f"'vary' must be true or false; got {vary!r}", file=file,
                               section="parameters", item=name)
        params[name] = ParameterSpec(name, kind_p, v, lo, hi, vary, scale, dict(prior),
                                     str(p.get("description", "")))
    if not any(p.vary for p in params.values()):
        raise FitFileError("no parameter has vary = true: nothing to fit", file=file,
                           section="parameters")

    # population model
    variables = []
    used: set[str] = set()
    for var, d in data.get("population", {}).items():
        _keys(d, _POP_KEYS, file, "population", var)
        dist = d.get("dist", "lognormal")
        if dist not in ("lognormal", "normal"):
            raise FitFileError(f"'dist' must be 'lognormal' or 'normal'; got {dist!r}",
                               file=file, section="population", item=var)
        lk, sk = ("median", "cv") if dist == "lognormal" else ("mean", "sd")
        for k in (lk, sk):
            if k not in d:
                raise FitFileError(f"a {dist} variable needs {lk!r} and {sk!r}", file=file,
                                   section="population", item=var)
        effects = d.get("effects", {})
        if not isinstance(effects, Mapping):
            raise FitFileError("'effects' must be a table {covariate = parameter}", file=file,
                               section="population", item=var)
        vm = VariableModel(var, dist, d[lk], d[sk], tuple(effects.items()), d.get("zero"))
        for ref in [d[lk], d[sk], *effects.values()] + ([d["zero"]] if "zero" in d else []):
            if isinstance(ref, str):
                if ref not in params:
                    raise FitFileError(f"unknown parameter {ref!r}{_suggest(ref, params)}; "
                                       f"declare it under [parameters]", file=file,
                                       section="population", item=var)
                if params[ref].kind != "population":
                    raise FitFileError(f"{ref!r} is mechanistic; a population distribution "
                                       f"can only use population parameters", file=file,
                                       section="population", item=var)
                used.add(ref)
            elif isinstance(ref, bool) or not isinstance(ref, (int, float)):
                raise FitFileError(f"expected a parameter name or a number; got {ref!r}",
                                   file=file, section="population", item=var)
        variables.append(vm)
    for name, p in params.items():
        if p.kind == "population" and name not in used:
            raise FitFileError("population parameter not used by any [population] variable; "
                               "remove it or mark it kind = 'mechanistic'", file=file,
                               section="parameters", item=name)

    # arms
    from ..trial import TrialError, load_trial
    arms: dict[str, ArmSpec] = {}
    if not data.get("arms"):
        raise FitFileError("no [arms.<name>] table: a fit needs at least one trial arm",
                           file=file)
    for arm, a in data["arms"].items():
        _keys(a, _ARM_KEYS, file, "arms", arm)
        if "trial" not in a:
            raise FitFileError("missing 'trial' (a trial file)", file=file, section="arms",
                               item=arm)
        tfile = base / str(a["trial"])
        try:
            tspec = load_trial(tfile)
        except (TrialError, ImmunoodeError) as exc:
            raise FitFileError(f"trial file {str(tfile)!r}: {exc}", file=file, section="arms",
                               item=arm) from None
        covs = dict(a.get("covariates", {}))
        for k, v in covs.items():
            _number(v, file, "arms", arm, f"covariates.{k}")
        n_arm = a.get("n")
        if n_arm is not None:
            n_arm = _number(n_arm, file, "arms", arm, "n", integer=True, positive=True)
        arms[arm] = ArmSpec(arm, str(tfile), tspec, str(a.get("label", arm)), covs, n_arm)

    # targets vs arms
    fit_rows = targets.select(role="fit")
    if not fit_rows:
        raise FitFileError(f"target table {str(tpath)!r} has no row with role = 'fit'",
                           file=file, section="fit", item="targets")
    for t in targets:
        if t.arm not in arms:
            raise FitFileError(f"target {t.id!r} names arm {t.arm!r}, which the fit file does "
                               f"not declare{_suggest(t.arm, arms)} (arms: {sorted(arms)})",
                               file=file, section="arms")
        if t.statistic not in STATISTICS:
            raise FitFileError(f"target {t.id!r}: unknown statistic {t.statistic!r}"
                               f"{_suggest(t.statistic, STATISTICS)} (known: "
                               f"{', '.join(STATISTICS)})", file=tpath)
        fu = float(arms[t.arm].trial["trial"]["follow_up"])
        need = required_follow_up(t)
        if need > fu:
            raise FitFileError(f"target {t.id!r} needs {need:g} days of follow-up but the trial "
                               f"file has follow_up = {fu:g}", file=file, section="arms",
                               item=t.arm)
    return FitSpec(str(fit.get("name", file.stem)), str(file), targets, seed, arms,
                   PopulationModel(tuple(variables)), params, cohort, stages, iscale,
                   hashlib.sha256(raw).hexdigest())


def _covariate_names(pop: Mapping) -> set[str]:
    """Numeric patient variables a trial's population spec samples besides its parameters
    (a ``pdl1_tps``-type covariate ``x`` yields ``x_tps``)."""
    out = set()
    for name, d in pop.get("covariates", {}).items():
        dist = d.get("dist", "pdl1_tps" if name == "pdl1" else "lognormal") \
            if isinstance(d, Mapping) else None
        if dist == "pdl1_tps":
            out.add(f"{name}_tps")
        elif dist not in ("categorical", None) and "prevalence" not in d:
            out.add(name)
    return out


def _covariate_draw(arm: ArmSpec, names, seed: int, n: int = 20000) -> dict:
    """[covariate units] A cheap draw (sampling only, no simulation) of an arm's patient
    covariates, for the moments of a marginal proposal."""
    from ..sampling import sample_population
    pop = sample_population(arm.trial["population"], n, seed=seed, method="random")
    return {c: np.asarray(pop[c].values, float) for c in names}


def fit_cohort_defaults() -> dict:
    """Defaults of the ``[cohort]`` section."""
    return {"n": 1000, "method": "lhs", "n_jobs": 1, "min_ess": 30.0, "adapt_rounds": 0,
            "adapt_defensive": 0.2, "adapt_inflation": 1.5}


# --------------------------------------------------------------------------- objective
@dataclass
class _ArmData:
    cohort: Cohort
    num: np.ndarray
    den: np.ndarray
    targets: list[Target]


class RateFit:
    """Objective and cohort cache of one fit (see the module docstring).

    Parameters
    ----------
    spec
        A loaded fit file (:func:`load_fit`).
    progress
        Show the simulation progress of each cohort on stderr.
    """

    def __init__(self, spec: FitSpec, *, progress: bool = False, say=None):
        self.spec = spec
        self.progress = progress
        self.say = say or (lambda stage, msg: log.info("%s: %s", stage, msg))
        self.likelihood = Likelihood(spec.targets, interval_scale=spec.interval_scale)
        self.n_eval = 0
        self.n_sim = 0
        self.sim_time = 0.0
        self.n_patients = 0
        self._cache: dict[tuple, dict[str, _ArmData]] = {}
        self._models = {}
        #: adaptation round of the current cohorts (0 = the broad plausible cohorts) and the
        #: defensive-mixture proposal of each arm in rounds >= 1 (:mod:`.adapt`)
        self.round = 0
        self.proposals: dict = {}
        self._check_arms()

    # ---- preparation
    def _check_arms(self):
        from ..cli import resolve_model_path
        from ..compile import compile_model
        from ..sbml import load_any_model
        spec = self.spec
        for arm in spec.arms.values():
            tr = arm.trial["trial"]
            base = Path(arm.trial["_base"])
            mp = Path(str(tr["model"]))
            mp = base / mp if (not mp.is_absolute() and (base / mp).exists()) else \
                resolve_model_path(str(tr["model"]))
            cm = compile_model(load_any_model(mp))
            self._models[arm.name] = cm
            for m in spec.mechanistic:
                if m not in cm.parameter_names:
                    raise FitFileError(f"mechanistic parameter {m!r} is not a parameter of model "
                                       f"{cm.model.name!r} (arm {arm.name!r})"
                                       f"{_suggest(m, cm.parameter_names)}", file=spec.file,
                                       section="parameters", item=m)
            pop_pars = arm.trial["population"].get("parameters", {})
            for v in spec.population.variables:
                if v.name not in pop_pars:
                    raise FitFileError(f"re-weighted variable {v.name!r} is not sampled in the "
                                       f"[population.parameters] of {arm.trial_file!r}"
                                       f"{_suggest(v.name, pop_pars)}", file=spec.file,
                                       section="population", item=v.name)
                zero = pop_pars[v.name].get("zero")
                if (v.zero is not None) != bool(zero):
                    why = ("is zero-inflated in the fit file (zero = ...) but its plausible "
                           "distribution has no share of zeros: add e.g. zero = 0.5 to"
                           if v.zero is not None else
                           "has a plausible share of zeros but the fit file gives it no "
                           "zero share: add zero = <parameter> to [population." + v.name +
                           "] of the fit file, or remove zero from")
                    raise FitFileError(f"re-weighted variable {v.name!r} {why} "
                                       f"[population.parameters.{v.name}] of {arm.trial_file!r}",
                                       file=spec.file, section="population", item=v.name)
                dist = pop_pars[v.name].get("dist", "lognormal")
                if dist not in ("uniform", "loguniform", "lognormal", "normal"):
                    raise FitFileError(f"re-weighted variable {v.name!r} has plausible "
                                       f"distribution {dist!r} in {arm.trial_file!r}; use "
                                       f"uniform, loguniform, lognormal or normal",
                                       file=spec.file, section="population", item=v.name)
                sampled = set(pop_pars) | _covariate_names(arm.trial["population"])
                for cov, _ in v.effects:
                    if cov not in arm.covariates and cov not in sampled:
                        raise FitFileError(f"covariate {cov!r} of {v.name!r} is neither an arm "
                                           f"covariate of {arm.name!r} nor a sampled variable",
                                           file=spec.file, section="population", item=v.name)
            corr = arm.trial["population"].get("correlation")
            if corr:
                names = set(json.dumps(corr).replace('"', " ").split())
                clash = [v for v in spec.population.names if v in names]
                if clash:
                    raise FitFileError(f"re-weighted variables {clash} are correlated in "
                                       f"{arm.trial_file!r}; the plausible density must be a "
                                       f"product of marginals", file=spec.file,
                                       section="arms", item=arm.name)

    def parameters(self, values: Mapping[str, float] | None = None):
        """lmfit :class:`~lmfit.Parameters` of the fit (start values or ``values``)."""
        import lmfit
        ps = lmfit.Parameters()
        for name, p in self.spec.parameters.items():
            v = p.value if values is None else float(values.get(name, p.value))
            ps.add(name, value=min(max(v, p.min), p.max), min=p.min, max=p.max, vary=p.vary)
        return ps

    # ---- cohorts
    def arm_size(self, arm: str) -> int:
        """Plausible patients of one arm (``[arms.X] n`` or ``[cohort] n``)."""
        return self.spec.arms[arm].n or int(self.spec.cohort["n"])

    def broad(self, arm: str) -> dict[str, dict]:
        """The broad plausible distribution (trial file) of every re-weighted variable."""
        pars = self.spec.arms[arm].trial["population"]["parameters"]
        return {v: dict(pars[v]) for v in self.spec.population.names}

    def set_proposals(self, proposals: Mapping, round_: int) -> None:
        """Draw the cohorts of adaptation round ``round_`` from ``proposals`` (arm ->
        :class:`~.adapt.MixtureProposal`) from now on; earlier rounds' cohorts are dropped
        (their χ² values are on other cohorts and must not be compared)."""
        self.proposals = dict(proposals)
        self.round = int(round_)
        self._cache.clear()

    def _simulate(self, arm, mech: Mapping[str, float], n: int, seed: int,
                  overrides: Mapping[str, Mapping] | None = None, what: str = "plausible"):
        """One simulated sub-cohort of ``arm``: ``n`` patients, the re-weighted variables'
        sampling specs replaced by ``overrides``; returns a :class:`Cohort` (its ``log_q``
        is the broad density up to a constant)."""
        from ..trial import run_trial
        tspec = copy.deepcopy(dict(arm.trial))
        pars = tspec["population"].setdefault("parameters", {})
        plaus = {v: dict(pars[v]) for v in self.spec.population.names}
        for k, v in (overrides or {}).items():
            pars[k] = dict(v)
        for k, v in mech.items():
            pars[k] = {"dist": "fixed", "value": float(v)}
        tspec["trial"] = dict(tspec["trial"], method=self.spec.cohort["method"])
        self.say("simulate", f"arm {arm.name}: {n} {what} patients at {dict(mech)}"
                             + (f" (round {self.round})" if self.round else ""))
        ds = run_trial(tspec, n=n, seed=seed, n_jobs=int(self.spec.cohort["n_jobs"]),
                       progress=self.progress, model=self._models[arm.name])
        if int(ds.attrs.get("interrupted", 0)):
            # run_trial keeps the finished patients on Ctrl-C; a fit must not go on with
            # a partial cohort, so the interrupt is passed on (no outputs are written)
            raise KeyboardInterrupt(f"cohort of arm {arm.name!r} interrupted")
        pcov = tuple(sorted({c for v in self.spec.population.variables for c, _ in v.effects
                             if c not in arm.covariates}))
        self.n_patients += n
        return Cohort.from_trial(ds, arm.name, plaus, arm_covariates=arm.covariates,
                                 patient_covariates=pcov)

    def cohorts(self, mech: Mapping[str, float]) -> dict[str, _ArmData]:
        """Simulated plausible cohorts of every arm at these mechanistic values (cached).

        Round 0: ``n`` patients from the broad plausible density, seed ``[fit] seed``.
        Round ``r >= 1``: the defensive mixture of :attr:`proposals` (two sub-cohorts with
        the round's seeds); ``log_q`` is the exact mixture density.  Within a round every
        mechanistic value uses the same seeds (common random numbers)."""
        from .adapt import concat_cohorts
        key = tuple((k, float(mech[k])) for k in self.spec.mechanistic)
        if key in self._cache:
            return self._cache[key]
        out = {}
        t0 = time.perf_counter()
        for arm in self.spec.arms.values():
            prop = self.proposals.get(arm.name) if self.round else None
            if prop is None:
                cohort = self._simulate(arm, dict(key), self.arm_size(arm.name), self.spec.seed)
            else:
                parts = []
                if prop.n_fitted:
                    parts.append(self._simulate(arm, dict(key), prop.n_fitted, prop.seeds[0],
                                                prop.fitted, "fitted-population"))
                if prop.n_broad:
                    parts.append(self._simulate(arm, dict(key), prop.n_broad, prop.seeds[1],
                                                None, "broad plausible"))
                cohort = concat_cohorts(parts)
                cohort.log_q = prop.log_q(cohort.x)
                cohort.attrs["proposal"] = prop.describe()
            rows = self.spec.targets.select(arm=arm.name)
            num, den = indicators(cohort.outcomes, rows)
            out[arm.name] = _ArmData(cohort, num, den, rows)
            self.n_sim += 1
        self.sim_time += time.perf_counter() - t0
        if all(a.cohort.outcomes["failed"].all() for a in out.values()):
            raise CalibrationError(f"every simulated patient failed at {dict(key)}; see the "
                                   f"trial 'message' variable")
        self._cache[key] = out
        return out

    def validation_cohorts(self, values: Mapping[str, float], n: int, seed: int):
        """Fresh cohorts drawn from the fitted population at ``values`` (see
        :func:`run_fit`): per arm ``n`` patients from :func:`.adapt.fitted_component`
        (inflation 1) with a new ``seed``; ``log_q`` is that exact density, so the weights
        are 1/n unless a variable depends on a patient covariate."""
        from .adapt import fitted_component, normalized_logpdf
        mech = {m: float(values[m]) for m in self.spec.mechanistic}
        out = {}
        t0 = time.perf_counter()
        for arm in self.spec.arms.values():
            pcov = sorted({c for v in self.spec.population.variables for c, _ in v.effects
                           if c not in arm.covariates})
            # patient covariates are not re-weighted: their moments come from a cheap draw
            # of the arm's population (no simulation)
            moments = _covariate_draw(arm, pcov, seed) if pcov else {}
            g = fitted_component(self.spec.population, values, self.broad(arm.name),
                                 arm.covariates, moments, inflation=1.0)
            cohort = self._simulate(arm, mech, n, seed, g, "validation")
            cohort.log_q = sum(normalized_logpdf(k, s, cohort.x[k]) for k, s in g.items())
            cohort.attrs["validation_proposal"] = {k: dict(s) for k, s in g.items()}
            rows = self.spec.targets.select(arm=arm.name)
            num, den = indicators(cohort.outcomes, rows)
            out[arm.name] = _ArmData(cohort, num, den, rows)
            self.n_sim += 1
        self.sim_time += time.perf_counter() - t0
        return out

    # ---- evaluation
    def simulate_statistics(self, values: Mapping[str, float], data: dict[str, _ArmData], *,
                            se: bool = True):
        """Weighted statistics of every target: ``{id: (rate, mc_se)}`` and ``{arm: ESS}``."""
        stats, ess = {}, {}
        for arm, d in data.items():
            w = d.cohort.weights(self.spec.population, values)
            if not np.all(np.isfinite(w)):
                ess[arm] = 0.0
                for t in d.targets:
                    stats[t.id] = (math.nan, math.nan)
                continue
            ess[arm] = float(1.0 / np.sum(w * w))
            rate, err, _ = weighted_rates(d.num, d.den, w, se=se)
            for j, t in enumerate(d.targets):
                stats[t.id] = (float(rate[j]), float(err[j]) if se else math.nan)
        return stats, ess

    def residual(self, params, data: dict[str, _ArmData], extra=None) -> np.ndarray:
        """Residual vector (sum of squares = 2·NLL): targets, priors, ESS floors, and
        ``extra(stats)`` appended if given (a function of ``{id: (rate, nan)}``, e.g. the
        forcing penalties of :mod:`.conflicts`)."""
        self.n_eval += 1
        values = params.valuesdict() if hasattr(params, "valuesdict") else dict(params)
        stats, ess = self.simulate_statistics(values, data, se=False)
        sim = {k: (0.5 if not math.isfinite(v[0]) else v[0]) for k, v in stats.items()}
        r = self.likelihood.terms(sim).residuals
        bad = [k for k, v in stats.items() if not math.isfinite(v[0])]
        if bad:
            r = r + 30.0
        pri = []
        for name, p in self.spec.parameters.items():
            if p.vary and p.prior and p.prior.get("dist", "none") != "none":
                pri.append(math.sqrt(2 * prior_nll(values[name], p.prior, bounds=(p.min, p.max),
                                                   log_scale=p.scale == "log")))
        floor = float(self.spec.cohort["min_ess"])
        pen = [max(0.0, (floor - e) / (0.25 * floor)) if floor > 0 else 0.0 for e in ess.values()]
        out = [r, np.asarray(pri, float), np.asarray(pen, float)]
        if extra is not None:
            out.append(np.asarray(extra(stats), float))
        return np.concatenate(out)

    def chisqr(self, values: Mapping[str, float], data) -> float:
        """``2·NLL`` at these values."""
        return float(np.sum(self.residual(values, data) ** 2))


# --------------------------------------------------------------------------- result
@dataclass
class FitResult:
    """Everything a rate fit produces (see :func:`run_fit`).

    Attributes
    ----------
    values
        Best parameter values (every declared parameter).
    chisqr
        ``2·NLL`` at the best fit (deviance form: 0 = every target met exactly).
    lmfit_result
        The final local lmfit ``MinimizerResult`` (population parameters).
    table
        One row per target: observed value and interval, simulated value with its
        Monte-Carlo standard error, term, whether the target is met.
    intervals
        ``{name: (low, high, flag)}`` from the profiles; ``flag`` is ``""``,
        ``"unbounded below"``, ``"unbounded above"`` or ``"not identified"``.
    profiles
        ``{name: DataFrame(value, chisqr)}``.
    stages
        Stage name -> wall-clock seconds.
    counts
        Objective evaluations, cohort simulations and derived rates.
    attrs
        Provenance (fit file hash, seed, model hashes, immunoode version, cohort sizes).
    posterior
        :class:`~immunoode.calibrate.posterior.Posterior` samples of the population
        parameters (``[stages] emcee_steps > 0``), else ``None``.
    rounds
        One record per cohort round (0 = broad plausible cohorts, then each adaptation
        round): χ², ESS per arm at the round's optimum (and at the previous optimum),
        seconds, evaluations, proposals.
    validation
        ``[stages] validate_n > 0``: the fresh-cohort check (seed, n, ESS per arm,
        ``stats`` {target id: (rate, se)}, ``table`` like :attr:`table`, ``chisqr``),
        else ``None``.
    conflicts
        One forced re-fit per fitted target the optimum misses
        (:func:`~.conflicts.forced_refits`; with profiles only).
    """

    spec: FitSpec
    values: dict
    chisqr: float
    lmfit_result: object
    table: object
    intervals: dict
    profiles: dict
    stages: dict
    counts: dict
    ess: dict
    grid: list
    attrs: dict
    posterior: object = None
    rounds: list = field(default_factory=list)
    validation: dict | None = None
    conflicts: list = field(default_factory=list)


def _grid(p: ParameterSpec, n: int) -> np.ndarray:
    if p.scale == "log":
        return np.exp(np.linspace(math.log(p.min), math.log(p.max), n))
    return np.linspace(p.min, p.max, n)


def _profile(rf: RateFit, name: str, values: Mapping[str, float], chi_best: float,
             starts: Mapping[tuple, Mapping[str, float]], st: Mapping, *, seed: int,
             stderr=None):
    """Profile of one population parameter.

    Steps out from the optimum on each side (first step from the local standard error, else
    1/20 of the range; doubling while Δχ² < 0.5) until Δχ² passes 3.84 or the bound is
    reached, then bisects the crossing once.  At each value the other population parameters
    are re-fitted on *every* simulated mechanistic point (``starts``: cohort cache key ->
    that point's optimum, used as warm start) and the lowest χ² is kept, so a population
    parameter confounded with a mechanistic one gets the wider, honest interval.
    """
    p = rf.spec.parameters[name]
    best = values[name]
    log_ = p.scale == "log"
    to = (lambda x: math.log(x)) if log_ else (lambda x: x)
    back = (lambda u: math.exp(u)) if log_ else (lambda u: u)
    lo_u, hi_u, b_u = to(p.min), to(p.max), to(best)
    h = (hi_u - lo_u) / 20.0
    if stderr is not None and math.isfinite(stderr) and stderr > 0 and (best > 0 or not log_):
        h_se = stderr / best if log_ else stderr
        h = min(max(0.75 * h_se, (hi_u - lo_u) / 400.0), (hi_u - lo_u) / 4.0)
    xs, chis = [], []
    n_max = int(st["profile_points"])

    def at(x, warm):
        best_chi, out = math.inf, dict(warm)
        for key, start in warm.items():
            mech = dict(key)
            data = rf.cohorts(mech)
            pp = rf.parameters(dict(start, **mech))
            _, pp = _fit_population(rf, pp, data, global_stage=False, stages=st, seed=seed,
                                    fixed={name: float(x)})
            v = dict(pp.valuesdict())
            out[key] = v
            chi = rf.chisqr(v, data)
            best_chi = min(best_chi, chi)
        return best_chi, out

    for sign in (-1.0, 1.0):
        warm = {k: dict(v) for k, v in starts.items()}
        step, u_prev = h, b_u
        for _ in range(n_max):
            u = min(max(u_prev + sign * step, lo_u), hi_u)
            if u == u_prev:
                break
            chi, warm = at(back(u), warm)
            xs.append(back(u))
            chis.append(chi)
            d = chi - chi_best
            if d >= CHI2_95:
                um = 0.5 * (u + u_prev)  # one bisection of the crossing
                chi_m, _ = at(back(um), warm)
                xs.append(back(um))
                chis.append(chi_m)
                break
            u_prev = u
            step *= 2.0 if d < 0.5 else 1.0
    xs.append(best)
    chis.append(chi_best)
    return xs, chis


def _refine_1d(name: str, p: ParameterSpec, grid: list, best, at_mech, n_refine: int):
    """Local stage for one mechanistic parameter: bisect the wider interval next to the best
    simulated point (on the parameter's scale), ``n_refine`` times; each point re-fits the
    population parameters locally.  Deterministic and robust to the small steps that the
    finite cohort's discrete outcomes put into the objective."""
    f = math.log if p.scale == "log" else (lambda x: x)
    fi = math.exp if p.scale == "log" else (lambda u: u)
    for _ in range(n_refine):
        pts = sorted({float(g[name]): g["chisqr"] for g in grid}.items())
        xs = [x for x, _ in pts]
        i = xs.index(min(xs, key=lambda x: abs(x - best[1][name])))
        left = f(xs[i]) - f(xs[i - 1]) if i > 0 else -1.0
        right = f(xs[i + 1]) - f(xs[i]) if i + 1 < len(xs) else -1.0
        if max(left, right) <= 1e-9:
            break
        u = f(xs[i]) - left / 2 if left >= right else f(xs[i]) + right / 2
        chi, vals = at_mech({name: fi(u)}, best[1])
        if chi < best[0]:
            best = (chi, vals, None)
    return best


def _widen_by_mechanistic_profile(spec: FitSpec, m: str, grid: list, intervals: dict) -> None:
    """Widen population-parameter intervals by their optimum along the mechanistic profile.

    Population profiles re-fit the other population parameters only on mechanistic values
    already simulated, which understates the interval of a population parameter that trades
    off against the mechanistic one.  Every point of the mechanistic profile inside its
    95 % interval carries a population optimum with Δχ² ≤ 3.84, so those optima (linearly
    interpolated between simulated points, on each parameter's scale, out to the ends of the
    mechanistic interval) belong to the population parameters' 95 % profile regions too.
    """
    pm = spec.parameters[m]
    fm = math.log if pm.scale == "log" else (lambda x: x)
    best = {}
    for g in grid:
        x = float(g[m])
        if x not in best or g["chisqr"] < best[x]["chisqr"]:
            best[x] = g
    xs = sorted(best)
    if len(xs) < 2:
        return
    lo_m, hi_m, _ = intervals[m]
    probe = [x for x in xs if lo_m <= x <= hi_m] + [lo_m, hi_m]
    u = np.array([fm(x) for x in xs])
    for name in spec.population_parameters:
        p = spec.parameters[name]
        if not p.vary or name not in intervals:
            continue
        f = math.log if p.scale == "log" else (lambda x: x)
        fi = math.exp if p.scale == "log" else (lambda x: x)
        v = np.array([f(best[x]["values"][name]) for x in xs])
        vals = [fi(float(np.interp(fm(x), u, v))) for x in probe]
        lo, hi, flag = intervals[name]
        intervals[name] = (min(lo, min(vals)), max(hi, max(vals)), flag)


def _fit_population(rf: RateFit, params, data, *, global_stage: bool, stages: Mapping,
                    seed: int, fixed: Mapping[str, float] | None = None,
                    starts: list | None = None):
    """Fit the varied population parameters (mechanistic ones fixed) on given cohorts:
    optionally lmfit differential evolution (global), then lmfit least squares (local).

    In the global stage, least squares is also started from ``params`` itself and from each
    of ``starts`` (dicts of values, e.g. the best of earlier grid points); the lowest χ² wins.
    A short differential evolution over ten or more parameters can stop in a poor basin, and
    these warm starts make the result no worse than the best known point."""
    import lmfit
    ps = copy.deepcopy(params)
    for name, p in rf.spec.parameters.items():
        if p.kind == "mechanistic":
            ps[name].vary = False
    for k, v in (fixed or {}).items():
        ps[k].set(value=v, vary=False)
    if not any(p.vary for p in ps.values()):
        return None, ps
    mini = lmfit.Minimizer(rf.residual, ps, fcn_args=(data,), nan_policy="raise")
    if global_stage:
        # lmfit takes the generation limit from max_nfev and aborts with the *last* member
        # when max_nfev evaluations are exceeded, so the evaluation cap is set out of reach
        # and the generations are counted by scipy's callback (returning True stops DE with
        # its best member)
        generations = [0]
        limit = int(stages["global_maxiter"])

        def stop_after(*_args, **_kws):
            generations[0] += 1
            return generations[0] >= limit

        warm = [copy.deepcopy(ps)]
        for st_values in starts or ():
            w = copy.deepcopy(ps)
            for k, p in w.items():
                if p.vary and k in st_values:
                    p.set(value=min(max(float(st_values[k]), p.min), p.max))
            warm.append(w)
        res = mini.minimize(method="differential_evolution", max_nfev=10 ** 8,
                            popsize=int(stages["global_popsize"]), seed=int(seed),
                            polish=False, tol=0.01, atol=0.05, callback=stop_after)
        best = None
        for start in [res.params] + warm:
            r = mini.minimize(method="least_squares", params=start,
                              max_nfev=int(stages["local_max_nfev"]))
            if best is None or r.chisqr < best.chisqr - 1e-12:
                best = r
        return best, best.params
    res = mini.minimize(method="least_squares", params=ps,
                        max_nfev=int(stages["local_max_nfev"]))
    return res, res.params


def _interval(xs, chi, best_x, best_chi, p: ParameterSpec):
    """95 % interval from a profile: where Δχ² first reaches 3.84 on each side of the optimum,
    interpolated linearly in sqrt(Δχ²) (exact for a quadratic profile) on the parameter's
    scale; a side that never reaches it is reported at the bound and flagged."""
    xs, chi = np.asarray(xs, float), np.asarray(chi, float)
    order = np.argsort(xs)
    xs, chi = xs[order], chi[order]
    r = np.sqrt(np.maximum(chi - best_chi, 0.0))
    rc = math.sqrt(CHI2_95)
    log_ = p.scale == "log"
    f = np.log if log_ else (lambda v: v)
    fi = np.exp if log_ else (lambda v: v)

    def cross(sel):
        # sel: indices ordered from the optimum outward
        x0, r0 = best_x, 0.0
        for i in sel:
            if r[i] >= rc:
                u0, u1 = f(x0), f(xs[i])
                u = u0 + (rc - r0) * (u1 - u0) / (r[i] - r0) if r[i] != r0 else u1
                return float(fi(u))
            if r[i] >= r0:
                x0, r0 = xs[i], r[i]
        return None

    lo = cross(np.flatnonzero(xs < best_x)[::-1])
    hi = cross(np.flatnonzero(xs > best_x))
    flags = []
    if lo is None:
        flags.append("unbounded below")
        lo = p.min
    if hi is None:
        flags.append("unbounded above")
        hi = p.max
    flag = "not identified" if len(flags) == 2 else (flags[0] if flags else "")
    return float(lo), float(hi), flag


def run_fit(spec_or_path, *, progress: bool = False, profiles: bool = True,
            callback=None) -> FitResult:
    """Run the nested rate fit (global, local, profile stages; see the module docstring).

    Parameters
    ----------
    spec_or_path
        A fit file path or a loaded :class:`FitSpec`.
    progress
        Show simulation progress on stderr (stage messages go to ``logging``).
    profiles
        Compute profile likelihoods and intervals (the costliest optional stage).
    callback
        Called as ``callback(stage, message)`` at each step (e.g. to print progress).
    """
    import lmfit
    spec = spec_or_path if isinstance(spec_or_path, FitSpec) else load_fit(spec_or_path)
    say = callback or (lambda stage, msg: log.info("%s: %s", stage, msg))
    stages_t: dict[str, float] = {}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    rf = RateFit(spec, progress=progress, say=say)
    stages_t["prepare (load, compile)"] = time.perf_counter() - t0
    params0 = rf.parameters()
    st = spec.stages
    mech = [m for m in spec.mechanistic if spec.parameters[m].vary]
    mech_fixed = {m: spec.parameters[m].value for m in spec.mechanistic}

    # ---- global stage: grid over mechanistic values x DE over population parameters
    t0 = time.perf_counter()
    ev0 = rf.n_eval
    if mech:
        G = int(st["mechanistic_grid"])
        if len(mech) == 1:
            points = [{mech[0]: float(x)} for x in _grid(spec.parameters[mech[0]], G)]
        else:
            from scipy.stats import qmc
            U = qmc.LatinHypercube(d=len(mech), seed=spec.seed).random(G * len(mech))
            points = []
            for u in U:
                pt = {}
                for k, m in enumerate(mech):
                    p = spec.parameters[m]
                    pt[m] = float(math.exp(math.log(p.min) + u[k] * (math.log(p.max) - math.log(p.min)))
                                  if p.scale == "log" else p.min + u[k] * (p.max - p.min))
                points.append(pt)
    else:
        points = [{}]
    grid = []
    best = None
    for i, pt in enumerate(points):
        mv = dict(mech_fixed, **pt)
        data = rf.cohorts(mv)
        ps = copy.deepcopy(params0)
        for k, v in mv.items():
            ps[k].value = v
        res, ps = _fit_population(rf, ps, data, global_stage=True, stages=st, seed=spec.seed,
                                  starts=[best[1]] if best is not None else None)
        vals = ps.valuesdict()
        chi = rf.chisqr(vals, data)
        grid.append({"point": i, **mv, "chisqr": chi, "values": dict(vals)})
        say("global", f"point {i + 1}/{len(points)} {mv}: chi2 = {chi:.3f}")
        if best is None or chi < best[0]:
            best = (chi, dict(vals), res)
    stages_t["global (grid x differential evolution)"] = time.perf_counter() - t0
    evals_global = rf.n_eval - ev0

    # ---- local stage: Nelder-Mead over mechanistic values, local population refits
    t0 = time.perf_counter()
    ev0 = rf.n_eval
    best, final, values, chi_best, data = _local_stage(rf, spec, st, grid, best, mech,
                                                        mech_fixed, say)
    stages_t["local (Nelder-Mead on mechanistic, least squares on population)"] = \
        time.perf_counter() - t0
    evals_local = rf.n_eval - ev0
    say("local", f"best chi2 = {chi_best:.3f}")
    rounds = [_round_record(rf, 0, values, chi_best, data, stages_t["global (grid x differential "
                                                                     "evolution)"]
                            + stages_t["local (Nelder-Mead on mechanistic, least squares on "
                                       "population)"], evals_global + evals_local)]
    grid_all = [dict(g, round=0) for g in grid]

    # ---- adaptive plausible cohorts (iterated importance sampling, module .adapt)
    from .adapt import MixtureProposal
    evals_adapt = 0
    for r in range(1, int(spec.cohort["adapt_rounds"]) + 1):
        t0 = time.perf_counter()
        ev0 = rf.n_eval
        props = {a: MixtureProposal.build(
                     spec.population, values, rf.broad(a), arm.covariates,
                     data[a].cohort.patient_covariates, n=rf.arm_size(a),
                     defensive=float(spec.cohort["adapt_defensive"]),
                     inflation=float(spec.cohort["adapt_inflation"]), seed=spec.seed, round_=r)
                 for a, arm in spec.arms.items()}
        say(f"adapt {r}", "new cohorts: " + "; ".join(
            f"{a} {p.n_fitted} fitted + {p.n_broad} broad" for a, p in props.items()))
        prev_grid = list(grid)
        grid.clear()
        rf.set_proposals(props, r)
        mv = {m: float(values[m]) for m in spec.mechanistic}
        data = rf.cohorts(mv)
        ess_prev = rf.simulate_statistics(values, data, se=False)[1]
        # cheap global check: a short differential evolution, warm-started at the last optimum
        st_check = dict(st, global_maxiter=int(st.get("adapt_global_maxiter",
                                                      max(3, int(st["global_maxiter"]) // 4))))
        res, ps = _fit_population(rf, rf.parameters(values), data, global_stage=True,
                                  stages=st_check, seed=spec.seed + r)
        vals = dict(ps.valuesdict())
        chi = rf.chisqr(vals, data)
        grid.append({"point": f"adapt{r}", **mv, "chisqr": chi, "values": vals})
        say(f"adapt {r}", f"ESS at the previous optimum " + ", ".join(
            f"{a} {e:.0f}" for a, e in ess_prev.items()) + f"; global check chi2 = {chi:.3f}")
        best = (chi, vals, res)
        if mech:
            _bracket(rf, spec, mech, mech_fixed, st, grid, prev_grid, best, say, f"adapt {r}")
            best = min(((g["chisqr"], g["values"], None) for g in grid), key=lambda b: b[0])
        best, final, values, chi_best, data = _local_stage(rf, spec, st, grid, best, mech,
                                                            mech_fixed, say, label=f"adapt {r}")
        secs = time.perf_counter() - t0
        stages_t[f"adapt round {r} (mixture cohorts, global check, local)"] = secs
        evals_adapt += rf.n_eval - ev0
        rounds.append(_round_record(rf, r, values, chi_best, data, secs, rf.n_eval - ev0,
                                    ess_previous=ess_prev, proposals=props))
        grid_all.extend(dict(g, round=r) for g in grid)
        say(f"adapt {r}", f"best chi2 = {chi_best:.3f}; ESS " + ", ".join(
            f"{a} {e:.0f}" for a, e in rounds[-1]["ess"].items()))

    # ---- mechanistic profile on the final cohorts (before validation and the population
    # profiles, so that a better point it finds becomes the optimum they all use)
    adopted = None
    t_mp = time.perf_counter()
    ev_mp = rf.n_eval
    if profiles and len(rounds) > 1 and len(mech) == 1:
        n0 = len(grid)
        _extend_mechanistic_profile(rf, spec, mech[0], mech_fixed, st, grid, values,
                                    chi_best, say)
        grid_all.extend(dict(g, round=len(rounds) - 1) for g in grid[n0:])
        better = min(grid, key=lambda g: g["chisqr"])
        if better["chisqr"] < chi_best - 1e-9:
            # the local stage's bisection stopped in a shallow local minimum of the (noisy)
            # mechanistic profile: the better point, on the same cohorts, is the optimum
            say("profile", f"{mech[0]} = {better[mech[0]]:.4g} has chi2 {better['chisqr']:.3f} "
                           f"< {chi_best:.3f} at {values[mech[0]]:.4g}: adopted as the optimum")
            adopted = {"parameter": mech[0], "from": float(values[mech[0]]),
                       "to": float(better[mech[0]]), "chisqr_from": float(chi_best),
                       "chisqr_to": float(better["chisqr"])}
            data = rf.cohorts({m: float(better[m]) for m in spec.mechanistic})
            res_a, ps = _fit_population(rf, rf.parameters(better["values"]), data,
                                        global_stage=False, stages=st, seed=spec.seed)
            vals = dict(ps.valuesdict())
            chi = rf.chisqr(vals, data)
            if chi <= better["chisqr"]:
                values, chi_best, final = vals, chi, (res_a if res_a is not None else final)
            else:
                values, chi_best = dict(better["values"]), float(better["chisqr"])
            adopted["chisqr_to"] = float(chi_best)
    t_mp = time.perf_counter() - t_mp
    ev_mp = rf.n_eval - ev_mp

    # ---- validation on a fresh cohort drawn from the fitted population
    validation = None
    if int(st.get("validate_n", 0)) > 0:
        t0 = time.perf_counter()
        from .adapt import round_seed
        vseed = round_seed(spec.seed, 10 ** 6, 2)
        nv = int(st["validate_n"])
        say("validate", f"fresh cohort: {nv} patients per arm from the fitted population, "
                        f"seed {vseed}")
        vdata = rf.validation_cohorts(values, nv, vseed)
        vstats, vess = rf.simulate_statistics(values, vdata)
        validation = {"seed": vseed, "n": nv, "ess": vess, "stats": vstats,
                      "table": target_table(spec, rf.likelihood, vstats),
                      "chisqr": rf.chisqr(values, vdata),
                      "arms": {a: {**d.cohort.attrs, "n": d.cohort.size}
                               for a, d in vdata.items()}}
        stages_t["validation (fresh cohort from the fitted population)"] = \
            time.perf_counter() - t0
        vt = validation["table"]
        fit_v = vt[vt.role == "fit"]
        say("validate", f"fitted targets met on the fresh cohort: {int(fit_v.met.sum())}/"
                        f"{len(fit_v)}; 2*NLL = {validation['chisqr']:.3f}")

    # ---- optional posterior sampling (population parameters, best mechanistic cohorts)
    posterior, evals_post = None, 0
    if int(st.get("emcee_steps", 0)) > 0:
        from .posterior import sample_posterior
        t0 = time.perf_counter()
        ev0 = rf.n_eval
        steps = int(st["emcee_steps"])
        say("posterior", f"emcee: {steps} steps")
        posterior = sample_posterior(rf, values, data, steps=steps,
                                     walkers=int(st.get("emcee_walkers", 0)),
                                     burn=st.get("emcee_burn"), thin=int(st.get("emcee_thin", 1)),
                                     seed=spec.seed)
        stages_t["posterior (emcee)"] = time.perf_counter() - t0
        evals_post = rf.n_eval - ev0
        say("posterior", f"acceptance {posterior.acceptance:.2f}, "
                         f"{rf.n_eval - ev0} evaluations")

    # ---- profiles (on the final round's cohorts)
    t0 = time.perf_counter()
    ev0 = rf.n_eval
    mv_best = {m: values[m] for m in spec.mechanistic}
    profs, intervals = {}, {}
    import pandas as pd
    starts = {}
    for g in grid:  # inner optimum of every simulated mechanistic point (profile warm starts)
        key = tuple((k, float(g[k])) for k in spec.mechanistic)
        if key not in starts or g["chisqr"] < starts[key][0]:
            starts[key] = (g["chisqr"], g["values"])
    # only mechanistic points that could lie inside a 95 % region help a profile
    starts = {k: v for k, (c, v) in starts.items() if c <= chi_best + 2 * CHI2_95}
    starts[tuple((k, float(values[k])) for k in spec.mechanistic)] = dict(values)
    if profiles:
        for name in spec.population_parameters:
            p = spec.parameters[name]
            if not p.vary:
                continue
            se = getattr(final.params[name], "stderr", None) if final is not None else None
            xs, chis = _profile(rf, name, values, chi_best, starts, st, seed=spec.seed, stderr=se)
            df = pd.DataFrame({"value": xs, "chisqr": chis}).sort_values("value")
            profs[name] = df.reset_index(drop=True)
            intervals[name] = _interval(xs, chis, values[name], chi_best, p)
            say("profile", f"{name}: 95% [{intervals[name][0]:.4g}, {intervals[name][1]:.4g}] "
                           f"{intervals[name][2]}")
        for m in mech:
            rows = [g for g in grid if all(abs(g[k] - mv_best[k]) < 1e-15 or k == m
                                            for k in mech)]
            xs = [g[m] for g in rows]
            chis = [g["chisqr"] for g in rows]
            df = pd.DataFrame({"value": xs, "chisqr": chis}).drop_duplicates("value")
            profs[m] = df.sort_values("value").reset_index(drop=True)
            intervals[m] = _interval(df["value"].values, df["chisqr"].values, values[m],
                                     chi_best, spec.parameters[m])
            say("profile", f"{m}: 95% [{intervals[m][0]:.4g}, {intervals[m][1]:.4g}] "
                           f"{intervals[m][2]}")
        if len(mech) == 1 and mech[0] in intervals:
            _widen_by_mechanistic_profile(spec, mech[0], grid, intervals)
    stages_t["profiles"] = time.perf_counter() - t0 + t_mp
    evals_prof = rf.n_eval - ev0 + ev_mp

    # ---- table (fitted + held-out)
    stats, ess = rf.simulate_statistics(values, data)
    table = target_table(spec, rf.likelihood, stats)

    # ---- missed targets: forced re-fits on the final cohorts (no new simulation)
    conflicts = []
    if profiles and not table[(table.role == "fit") & ~table.met].empty:
        from .conflicts import forced_refits
        t0 = time.perf_counter()
        conflicts = forced_refits(rf, values, table, grid, say=say)
        stages_t["target conflicts (forced re-fits)"] = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    stages_t["total"] = total
    attrs = {
        "fit_name": spec.name,
        "fit_file": spec.file,
        "fit_file_sha256": spec.sha256,
        "targets_file": spec.targets.path,
        "targets_sha256": hashlib.sha256(Path(spec.targets.path).read_bytes()).hexdigest(),
        "seed": spec.seed,
        "cohort": dict(spec.cohort),
        "stages_settings": dict(spec.stages),
        "arms": {a: {**d.cohort.attrs, "n": d.cohort.size,
                     "trial_file": spec.arms[a].trial_file,
                     "solver": json.loads(json.dumps(spec.arms[a].trial.get("solver", {})))}
                 for a, d in data.items()},
        "immunoode_version": _version(),
        **({"adaptation": {"rounds": len(rounds) - 1,
                           "defensive": spec.cohort["adapt_defensive"],
                           "inflation": spec.cohort["adapt_inflation"]}}
           if len(rounds) > 1 else {}),
        **({"adopted_from_profile": adopted} if adopted else {}),
        **({"validation": {"seed": validation["seed"], "n": validation["n"],
                           "arms": validation["arms"]}} if validation is not None else {}),
    }
    counts = {"objective_evaluations": rf.n_eval, "global_evaluations": evals_global,
              "local_evaluations": evals_local,
              **({"adaptation_evaluations": evals_adapt} if len(rounds) > 1 else {}),
              "profile_evaluations": evals_prof,
              **({"posterior_evaluations": evals_post} if posterior is not None else {}),
              "cohort_simulations": rf.n_sim,
              "simulated_patients": int(rf.n_patients),
              "simulation_seconds": rf.sim_time,
              "reweighting_evaluations_per_second":
                  (rf.n_eval / max(total - rf.sim_time, 1e-9))}
    return FitResult(spec, values, chi_best, final, table, intervals, profs, stages_t, counts,
                     ess, grid_all, attrs, posterior, rounds, validation, conflicts)


def _at_mech_fn(rf: RateFit, mech_fixed, st, grid: list, say, label: str):
    """A function ``(mechanistic point, warm values) -> (χ², values)``: simulate (cached) and
    re-fit the population parameters locally; every point is appended to ``grid``."""
    def at_mech(mv_point, warm):
        mv = dict(mech_fixed, **mv_point)
        data = rf.cohorts(mv)
        ps = rf.parameters(dict(warm, **mv))
        _, ps = _fit_population(rf, ps, data, global_stage=False, stages=st, seed=rf.spec.seed)
        vals = ps.valuesdict()
        chi = rf.chisqr(vals, data)
        grid.append({"point": "local", **mv, "chisqr": chi, "values": dict(vals)})
        say(label, f"{mv}: chi2 = {chi:.3f}")
        return chi, dict(vals)
    return at_mech


def _local_stage(rf: RateFit, spec: FitSpec, st, grid: list, best, mech, mech_fixed, say,
                 label: str = "local"):
    """Local stage from ``best = (χ², values, _)``: bisection (one mechanistic parameter) or
    Nelder–Mead (several) over the mechanistic values, then the final population fit.

    Returns ``(best, lmfit result, values, χ², cohorts)``."""
    import lmfit
    if mech:
        at_mech = _at_mech_fn(rf, mech_fixed, st, grid, say, label)
        if len(mech) == 1:
            best = _refine_1d(mech[0], spec.parameters[mech[0]], grid, best, at_mech,
                              int(st["mechanistic_refine"]))
        else:
            best_local = [best[0], dict(best[1])]

            def outer(ps_m):
                chi, vals = at_mech({m: ps_m[m].value for m in mech}, best_local[1])
                if chi < best_local[0]:
                    best_local[:] = [chi, vals]
                return math.sqrt(max(chi, 0.0))

            pm = lmfit.Parameters()
            for m in mech:
                p = spec.parameters[m]
                pm.add(m, value=best[1][m], min=p.min, max=p.max)
            lmfit.Minimizer(outer, pm).minimize(method="nelder",
                                                max_nfev=int(st["mechanistic_refine"]))
            best = (best_local[0], best_local[1], None)
    mv_best = {m: best[1][m] for m in spec.mechanistic}
    data = rf.cohorts(mv_best)
    ps = rf.parameters(best[1])
    final, ps = _fit_population(rf, ps, data, global_stage=False, stages=st, seed=spec.seed)
    values = dict(ps.valuesdict())
    chi_best = rf.chisqr(values, data)
    return best, final, values, chi_best, data


def _bracket(rf: RateFit, spec: FitSpec, mech, mech_fixed, st, grid, prev_grid, best, say,
             label):
    """Warm start of an adaptation round's local stage for one mechanistic parameter: the
    new cohorts are simulated at the previous optimum ± twice the previous round's nearest
    spacing (on the parameter's scale), so the bisection of :func:`_refine_1d` can move.
    Several mechanistic parameters need no bracket (Nelder–Mead starts from the optimum)."""
    if len(mech) != 1:
        return
    m = mech[0]
    p = spec.parameters[m]
    f = math.log if p.scale == "log" else (lambda x: x)
    fi = math.exp if p.scale == "log" else (lambda u: u)
    x0 = float(best[1][m])
    xs = sorted({float(g[m]) for g in prev_grid} | {x0})
    i = xs.index(x0)
    gaps = [f(xs[i]) - f(xs[i - 1])] if i > 0 else []
    gaps += [f(xs[i + 1]) - f(xs[i])] if i + 1 < len(xs) else []
    d = 2.0 * max(gaps) if gaps else (f(p.max) - f(p.min)) / 8.0
    at_mech = _at_mech_fn(rf, mech_fixed, st, grid, say, label)
    for u in (f(x0) - d, f(x0) + d):
        u = min(max(u, f(p.min)), f(p.max))
        if abs(u - f(x0)) > 1e-12:
            at_mech({m: fi(u)}, best[1])


def _extend_mechanistic_profile(rf: RateFit, spec: FitSpec, m: str, mech_fixed, st, grid,
                                values, chi_best, say, max_steps: int = 6) -> None:
    """After adaptation the final round's cohorts were simulated only near the optimum of the
    mechanistic parameter ``m``; step outward on each side until Δχ² ≥ 3.84 or the bound, so
    its profile interval rests on the final cohorts.  Each step doubles the distance from the
    optimum (fine near it, where the interval's edge is interpolated), so a bound 2^k times
    the final spacing away is reached in k re-simulations (at most ``max_steps`` per side)."""
    p = spec.parameters[m]
    f = math.log if p.scale == "log" else (lambda x: x)
    fi = math.exp if p.scale == "log" else (lambda u: u)
    x0 = float(values[m])
    at_mech = _at_mech_fn(rf, mech_fixed, st, grid, say, "profile")
    for sign in (-1.0, 1.0):
        for _ in range(max_steps):
            pts: dict[float, float] = {}
            for g in grid:
                x = float(g[m])
                pts[x] = min(pts.get(x, math.inf), g["chisqr"])
            side = [x for x in pts if (x - x0) * sign > 0]
            if any(pts[x] - chi_best >= CHI2_95 for x in side):
                break
            far = max(side, key=lambda x: abs(f(x) - f(x0))) if side else x0
            d = abs(f(far) - f(x0)) or (f(p.max) - f(p.min)) / 8.0
            u = min(max(f(x0) + sign * 2.0 * d, f(p.min)), f(p.max))
            if abs(u - f(far)) < 1e-12:
                break  # at the bound already
            at_mech({m: fi(u)}, values)


def _round_record(rf: RateFit, r: int, values, chi, data, seconds, evaluations, *,
                  ess_previous=None, proposals=None) -> dict:
    """Summary of one adaptation round (ESS per arm at its optimum, χ², cost)."""
    _, ess = rf.simulate_statistics(values, data, se=False)
    rec = {"round": r, "chisqr": float(chi), "seconds": float(seconds),
           "evaluations": int(evaluations),
           "n": {a: d.cohort.size for a, d in data.items()},
           "ess": {a: float(e) for a, e in ess.items()},
           "values": dict(values)}
    if ess_previous is not None:
        rec["ess_at_previous_optimum"] = {a: float(e) for a, e in ess_previous.items()}
    if proposals is not None:
        rec["proposals"] = {a: p.describe() for a, p in proposals.items()}
    return rec


def _version() -> str:
    try:
        from .. import __version__
        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


def target_table(spec: FitSpec, likelihood: Likelihood, stats: Mapping[str, tuple]):
    """Every target against its simulated value (pandas DataFrame, fractions)."""
    import pandas as pd
    rows = []
    groups = likelihood.groups
    for t in spec.targets:
        x, se = stats[t.id]
        lo, hi = t.bounds()
        if t.kind == "binomial":
            from scipy.stats import beta as _beta
            k = t.value * t.n
            lo = float(_beta.ppf(0.025, k, t.n - k + 1)) if k > 0 else 0.0
            hi = float(_beta.ppf(0.975, k + 1, t.n - k)) if k < t.n else 1.0
        met = bool(lo - 1e-12 <= x <= hi + 1e-12) if math.isfinite(x) else False
        if t.kind == "point" or t.kind == "multinomial":
            met = bool(abs(x - t.observed) <= 0.05) if math.isfinite(x) else False
        if t.role == "fit" and t.kind != "multinomial":
            nll = likelihood.term(t, x if math.isfinite(x) else 0.5)
        elif t.role == "fit":  # the group's term, reported on each of its rows
            g = groups[f"{t.arm}/{t.group}"]
            nll = multinomial_nll(np.array([stats[r.id][0] for r in g]), [r.value for r in g],
                                  g[0].n)
        else:
            nll = math.nan
        rows.append({"id": t.id, "arm": t.arm, "statistic": t.statistic, "role": t.role,
                     "kind": t.kind, "observed": t.observed, "low": lo, "high": hi,
                     "n": t.n, "simulated": x, "mc_se": se, "nll": nll, "met": met,
                     "source_ids": t.source_ids, "trial_or_study": t.trial_or_study})
    return pd.DataFrame(rows)
