"""Stage 7c — virtual-population selection by re-weighting. Consumes a trial arm (a trial
file, the mechanistic parameter values and a seed); produces a :class:`Cohort`: a *plausible*
virtual cohort simulated once, classified by RECIST 1.1 / SITC, whose per-patient outcome
indicators are then re-weighted to any *target* population distribution without
simulating again.

The idea is the virtual-population selection of Allen, Rieger & Musante (2016): sample
patients broadly from a plausible density ``q(θ)``, simulate each once, and represent a
population with density ``p(θ | φ)`` (population means, CVs and covariate effects ``φ``) by
the importance weights ``w_i ∝ p(θ_i | φ) / q(θ_i)`` (self-normalised, so constant factors
and the truncation of ``p`` to the support of ``q`` cancel).  A statistic that is a ratio of
patient indicators, e.g. the share of responders who later progress, is then
``Σ w_i·num_i / Σ w_i·den_i``.  Changing ``φ`` costs one weighted sum; only a change of a
mechanistic parameter (the same for every patient) needs a new simulation.  The effective
sample size ``ESS = 1/Σ w_i²`` says how many plausible patients carry a target population.

References
----------
Allen RJ, Rieger TR, Musante CJ. Efficient generation and selection of virtual populations
in quantitative systems pharmacology models. CPT Pharmacometrics Syst Pharmacol.
2016;5(3):140-146. https://doi.org/10.1002/psp4.12063
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
from scipy import special

from .targets import Target

__all__ = ["STATISTICS", "Cohort", "VariableModel", "PopulationModel", "plausible_logpdf",
           "indicators", "weighted_rates"]

_RESPONDER = ("CR", "PR")


# --------------------------------------------------------------------------- statistics
def _landmark(t: Target) -> float:
    if t.landmark_days is None:
        raise ValueError(f"target {t.id!r}: statistic {t.statistic!r} needs 'landmark_days'")
    return float(t.landmark_days)


def _orr(o, t):
    ev = o["evaluable"]
    return ev & np.isin(o["bor"], _RESPONDER), ev


def _dcr(o, t):
    ev = o["evaluable"]
    return ev & np.isin(o["bor"], ("CR", "PR", "SD")), ev


def _bor_pd(o, t):
    ev = o["evaluable"]
    return ev & (o["bor"] == "PD"), ev


def _sitc(label):
    def f(o, t):
        ev = o["evaluable"]
        return ev & (o["sitc"] == label), ev
    return f


def _ar_of_responders(o, t):
    den = o["evaluable"] & np.isin(o["bor"], _RESPONDER)
    pd_t = np.where(o["progressed"], o["pd_time"], np.inf)
    return den & (pd_t <= _landmark(t)), den


def _ar_timing(o, t):
    if t.window is None:
        raise ValueError(f"target {t.id!r}: statistic 'ar_timing' needs 'window_days'")
    a, b = t.window
    den = o["evaluable"] & np.isin(o["bor"], _RESPONDER) & o["progressed"]
    pd_t = np.where(o["progressed"], o["pd_time"], np.inf)
    return den & (pd_t >= a) & (pd_t < b), den


def _pfs_rate(o, t):
    ev = o["evaluable"]
    event = o["pfs_event"] & (o["pfs_time"] <= _landmark(t))
    return ev & ~event, ev


#: statistic name -> (outcomes, target) -> (numerator, denominator) boolean arrays over patients
STATISTICS: dict[str, Callable] = {
    "orr": _orr,
    "dcr": _dcr,
    "bor_pd": _bor_pd,
    "sitc_primary": _sitc("primary"),
    "sitc_secondary": _sitc("secondary"),
    "ar_of_responders": _ar_of_responders,
    "ar_timing": _ar_timing,
    "pfs_rate": _pfs_rate,
}
#: statistics whose definition needs follow-up to the landmark / window start
_NEEDS_FOLLOW_UP = {"ar_of_responders": "landmark", "pfs_rate": "landmark", "ar_timing": "window"}


def required_follow_up(t: Target) -> float:
    """[day] Follow-up an arm needs for target ``t`` to be computed without censoring."""
    kind = _NEEDS_FOLLOW_UP.get(t.statistic)
    if kind == "landmark":
        return _landmark(t)
    if kind == "window" and t.window is not None:
        return t.window[0] if math.isinf(t.window[1]) else t.window[1]
    return 0.0


def indicators(outcomes: Mapping[str, np.ndarray], targets: list[Target]):
    """``(num, den)`` float matrices (target × patient) of the targets' statistics."""
    num = np.zeros((len(targets), outcomes["evaluable"].size))
    den = np.zeros_like(num)
    for j, t in enumerate(targets):
        if t.statistic not in STATISTICS:
            raise KeyError(t.statistic)
        a, b = STATISTICS[t.statistic](outcomes, t)
        num[j], den[j] = a, b
    return num, den


def weighted_rates(num: np.ndarray, den: np.ndarray, w: np.ndarray, *, se: bool = True):
    """Weighted ratio statistics ``Σ w·num / Σ w·den`` and their Monte-Carlo standard errors
    (delta method: ``sqrt(Σ w²·(num − rate·den)²) / Σ w·den``).

    Returns ``(rate, se, weight_of_denominator)``; a statistic whose denominator has no
    weight is NaN; ``se=False`` skips the standard errors (``None``).
    """
    sn, sd = num @ w, den @ w
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(sd > 0, sn / np.where(sd > 0, sd, 1.0), np.nan)
        if not se:
            return rate, None, sd
        resid = num - rate[:, None] * den
        err = np.sqrt((resid ** 2) @ (w ** 2)) / np.where(sd > 0, sd, np.nan)
    return rate, err, sd


# --------------------------------------------------------------------------- densities
def plausible_logpdf(name: str, spec: Mapping, x: np.ndarray) -> np.ndarray:
    """Log density (up to a constant) of a sampling-spec distribution at ``x``.

    Supports the continuous distributions of :mod:`immunoode.sampling` (``uniform``,
    ``loguniform``, ``lognormal``, ``normal``, with optional ``lower``/``upper``); constant
    factors (truncation mass, normalisation) are dropped because self-normalised weights
    cancel them.  A zero-inflated spec (``zero``) keeps them: its atom at 0 and its continuous
    part must keep their exact relative mass.
    """
    if float(spec.get("zero") or 0.0) > 0:
        # zero-inflated: the atom and the continuous part need their exact relative mass
        from .adapt import normalized_logpdf
        return normalized_logpdf(name, spec, x)
    dist = spec.get("dist", "lognormal")
    x = np.asarray(x, float)
    if dist == "uniform":
        out = np.zeros_like(x)
    elif dist == "loguniform":
        out = -np.log(x)
    elif dist == "lognormal":
        if "cv" in spec:
            s = math.sqrt(math.log1p(float(spec["cv"]) ** 2))
        else:
            s = float(spec["sigma"])
        mu = (math.log(float(spec["median"])) if "median" in spec
              else math.log(float(spec["mean"])) - 0.5 * s * s)
        out = -np.log(x) - 0.5 * ((np.log(x) - mu) / s) ** 2
    elif dist == "normal":
        sd = float(spec["sd"]) if "sd" in spec else float(spec["cv"]) * abs(float(spec["mean"]))
        out = -0.5 * ((x - float(spec["mean"])) / sd) ** 2
    else:
        raise ValueError(f"{name!r}: a re-weighted variable needs a continuous plausible "
                         f"distribution (uniform, loguniform, lognormal, normal); got {dist!r}")
    lo, hi = spec.get("lower", spec.get("low")), spec.get("upper", spec.get("high"))
    bad = np.zeros(x.shape, bool)
    if lo is not None:
        bad |= x < float(lo)
    if hi is not None:
        bad |= x > float(hi)
    return np.where(bad, -np.inf, out)


def log_truncation_mass(za, zb):
    """log(Φ(zb) − Φ(za)) elementwise, accurate in either tail (standard-normal mass of a
    truncation interval in z units)."""
    za, zb = np.asarray(za, float), np.asarray(zb, float)
    with np.errstate(divide="ignore"):
        return np.log(np.where(za > 0, special.ndtr(-za) - special.ndtr(-zb),
                               special.ndtr(zb) - special.ndtr(za)))


def plausible_support(spec: Mapping) -> tuple:
    """``(lower, upper)`` of a sampling spec's continuous part (``None`` = open): the
    truncation bounds, or ``low``/``high`` of a (log)uniform."""
    lo, hi = spec.get("lower", spec.get("low")), spec.get("upper", spec.get("high"))
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


@dataclass(frozen=True)
class VariableModel:
    """Target distribution of one re-weighted patient variable.

    ``location`` and ``spread`` are parameter names (strings) or numbers.  For
    ``dist = "lognormal"`` the location is the median and the spread the CV
    (``sigma = sqrt(log(1 + cv²))``); for ``"normal"`` the mean and the sd.  ``effects`` maps
    a covariate (an arm covariate or a numeric patient variable) to a parameter: the log
    median (lognormal) or the mean (normal) shifts by ``effect × covariate``.  ``zero`` (a
    parameter name or number, optional) makes the variable zero-inflated: that share of
    patients is exactly 0 and the rest follow the distribution above, truncated to the
    cohort's plausible support (e.g. patients without a pre-existing resistant subclone).
    """

    name: str
    dist: str
    location: str | float
    spread: str | float
    effects: tuple[tuple[str, str | float], ...] = ()
    zero: str | float | None = None

    def refs(self) -> list[str]:
        """Parameter names this variable depends on."""
        vals = [self.location, self.spread, self.zero] + [e for _, e in self.effects]
        return [v for v in vals if isinstance(v, str)]


def _val(ref, values: Mapping[str, float]) -> float:
    return float(values[ref]) if isinstance(ref, str) else float(ref)


@dataclass(frozen=True)
class PopulationModel:
    """The target population: one :class:`VariableModel` per re-weighted variable."""

    variables: tuple[VariableModel, ...]

    @property
    def names(self) -> list[str]:
        """Re-weighted variable names."""
        return [v.name for v in self.variables]

    def logpdf(self, cohort: "Cohort", values: Mapping[str, float]) -> np.ndarray:
        """Per-patient log target density (up to a constant) of the cohort's variables."""
        total = np.zeros(cohort.size)
        for v in self.variables:
            x = cohort.x[v.name]
            loc, spr = _val(v.location, values), _val(v.spread, values)
            shift = 0.0
            for cov, eff in v.effects:
                shift = shift + _val(eff, values) * cohort.covariate(cov)
            if v.zero is not None:
                total += _zero_inflated_logpdf(v, x, loc, spr, shift, _val(v.zero, values),
                                               cohort.support.get(v.name))
                continue
            if v.dist == "lognormal":
                if loc <= 0 or spr <= 0:
                    return np.full(cohort.size, -np.inf)
                s = math.sqrt(math.log1p(spr * spr))
                lx = cohort.logx[v.name]
                z = (lx - math.log(loc) - shift) / s
                total += -0.5 * z * z - math.log(s) - lx  # density in x: Jacobian 1/x
            else:
                if spr <= 0:
                    return np.full(cohort.size, -np.inf)
                z = (x - loc - shift) / spr
                total += -0.5 * z * z - math.log(spr)
        return total


def _zero_inflated_logpdf(v: VariableModel, x, loc, spr, shift, p0, support) -> np.ndarray:
    """Exact log density of a zero-inflated target: ``log p0`` at 0; elsewhere
    ``log(1 − p0)`` + the lognormal/normal density truncated to ``support`` (lower, upper)
    and renormalised there (the shift may differ per patient, so the mass does too)."""
    x = np.asarray(x, float)
    lo, hi = support if support is not None else (None, None)
    if not 0.0 <= p0 <= 1.0 or spr <= 0 or (v.dist == "lognormal" and loc <= 0):
        return np.full(x.shape, -np.inf)
    shift = np.broadcast_to(np.asarray(shift, float), x.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        if v.dist == "lognormal":
            s = math.sqrt(math.log1p(spr * spr))
            mu = math.log(loc) + shift
            lx = np.log(np.where(x > 0, x, np.nan))
            z = (lx - mu) / s
            dens = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - math.log(s) - lx
            za = (math.log(lo) - mu) / s if lo is not None and lo > 0 else np.full(x.shape, -np.inf)
            zb = (math.log(hi) - mu) / s if hi is not None else np.full(x.shape, np.inf)
        else:
            mu = loc + shift
            z = (x - mu) / spr
            dens = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - math.log(spr)
            za = (lo - mu) / spr if lo is not None else np.full(x.shape, -np.inf)
            zb = (hi - mu) / spr if hi is not None else np.full(x.shape, np.inf)
        cont = math.log1p(-p0) if p0 < 1 else -np.inf
        out = cont + dens - log_truncation_mass(za, zb)
        if lo is not None:
            out = np.where(x < lo, -np.inf, out)
        if hi is not None:
            out = np.where(x > hi, -np.inf, out)
        return np.where(x == 0, math.log(p0) if p0 > 0 else -np.inf, out)


# --------------------------------------------------------------------------- cohort
@dataclass
class Cohort:
    """A plausible virtual cohort of one arm, simulated once for one mechanistic parameter set.

    Attributes
    ----------
    arm
        Arm name.
    x
        Re-weighted variables (patient arrays) and ``logx`` their logs (positive ones).
    log_q
        Per-patient log plausible density of the re-weighted variables.
    outcomes
        Per-patient outcome arrays: ``evaluable``, ``bor``, ``progressed``, ``pd_time``,
        ``pfs_time``, ``pfs_event``, ``sitc``, ``failed``.
    arm_covariates
        Covariates constant over the arm (e.g. ``prior_chemo = 1``).
    """

    arm: str
    x: dict[str, np.ndarray]
    log_q: np.ndarray
    outcomes: dict[str, np.ndarray]
    arm_covariates: dict[str, float] = field(default_factory=dict)
    patient_covariates: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.logx = {k: np.log(np.where(v > 0, v, np.nan)) for k, v in self.x.items()}

    @property
    def support(self) -> dict[str, tuple]:
        """``{variable: (lower, upper)}`` of the plausible distributions (``None`` = open);
        the target population is truncated there (``attrs["support"]``)."""
        return {k: tuple(v) for k, v in self.attrs.get("support", {}).items()}

    @property
    def size(self) -> int:
        """Number of virtual patients."""
        return int(self.log_q.size)

    def covariate(self, name: str):
        """An arm covariate (scalar) or a numeric patient covariate (array)."""
        if name in self.arm_covariates:
            return float(self.arm_covariates[name])
        if name in self.patient_covariates:
            return self.patient_covariates[name]
        raise KeyError(name)

    def weights(self, population: PopulationModel, values: Mapping[str, float]) -> np.ndarray:
        """Self-normalised importance weights ``∝ p(θ | values) / q(θ)`` (sum 1)."""
        lw = population.logpdf(self, values) - self.log_q
        top = np.max(lw)
        if not np.isfinite(top):
            return np.full(self.size, 1.0 / self.size) * np.nan
        w = np.exp(lw - top)
        return w / w.sum()

    @classmethod
    def from_trial(cls, ds, arm: str, plausible: Mapping[str, Mapping], *,
                   arm_covariates: Mapping[str, float] | None = None,
                   patient_covariates: tuple[str, ...] = ()) -> "Cohort":
        """Build a cohort from a :func:`~immunoode.trial.run_trial` Dataset.

        ``plausible`` maps every re-weighted variable to its sampling-spec distribution
        (the ``[population.parameters]`` entry of the arm's trial file).
        """
        x = {k: np.asarray(ds[k].values, float) for k in plausible}
        log_q = np.zeros(ds.sizes["patient"])
        for k, spec in plausible.items():
            log_q = log_q + plausible_logpdf(k, spec, x[k])
        prog = np.asarray(ds["progressed"].values, bool)
        outcomes = {
            "evaluable": np.asarray(ds["evaluable"].values, bool),
            "failed": np.asarray(ds["failed"].values, bool),
            "bor": np.asarray(ds["bor"].values).astype(str),
            "progressed": prog,
            "pd_time": np.asarray(ds["pd_time"].values, float),
            "pfs_time": np.asarray(ds["pfs_time"].values, float),
            "pfs_event": np.asarray(ds["pfs_event"].values, bool),
            "sitc": np.asarray(ds["sitc"].values).astype(str),
        }
        pc = {k: np.asarray(ds[k].values, float) for k in patient_covariates}
        attrs = {k: ds.attrs[k] for k in ("model_name", "model_hash", "seed", "follow_up_days",
                                          "n_failed", "n_evaluable", "regimen_name",
                                          "simulation_wall_time_s", "immunoode_version")
                 if k in ds.attrs}
        attrs["support"] = {k: plausible_support(s) for k, s in plausible.items()}
        return cls(arm, x, log_q, outcomes, dict(arm_covariates or {}), pc, attrs)
