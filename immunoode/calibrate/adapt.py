"""Stage 7c' — adaptive plausible cohorts (iterated importance sampling). Consumes a fit's
population model, an arm's broad plausible distributions and fitted population values;
produces a :class:`MixtureProposal`: the sampling specs of a *defensive mixture* cohort and
its exact per-patient log density ``log q(θ)``, which replaces the broad ``q`` in the
importance weights of :mod:`.vpop`.

Why: with a broad plausible cohort only a few percent of the patients carry the fitted
population (effective sample size ~100 of 3000), so each weighted rate has a Monte-Carlo
error of several percentage points and an optimiser fits that noise.  Redrawing the cohort
from a density close to the fitted population raises the effective sample size to a large
share of ``n``.  The mixture (Hesterberg 1995, "defensive importance sampling")::

    q(θ) = (1 − δ) · g(θ | φ̂) + δ · q₀(θ)

draws ``n − m`` patients from ``g`` (the fitted population of each re-weighted variable,
centred on the fitted median with the spread inflated by ``inflation`` and truncated to the
broad support) and ``m = round(δ n)`` from the broad density ``q₀``.  With both counts
fixed, ``p/q`` with this ``q`` (the balance heuristic of multiple importance sampling, Veach
& Guibas 1995) keeps the self-normalised weights consistent; the broad share bounds every
weight by ``p/(δ q₀)``, so a population far from ``φ̂`` is still represented.  Both densities
must be *normalised* here (unlike :func:`.vpop.plausible_logpdf`, which drops constants).

A re-weighted variable whose target distribution depends on a *patient* covariate (e.g.
PD-L1 TPS) is proposed from its marginal: the log-median is shifted by the effect times the
covariate's cohort mean and the spread widened by the effect times the covariate's sd.

References
----------
Hesterberg T. Weighted average importance sampling and defensive mixture distributions.
Technometrics. 1995;37(2):185-194. https://doi.org/10.1080/00401706.1995.10484303
Veach E, Guibas LJ. Optimally combining sampling techniques for Monte Carlo rendering.
SIGGRAPH 1995:419-428. https://doi.org/10.1145/218380.218498
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .vpop import PopulationModel, log_truncation_mass, plausible_support

__all__ = ["normalized_logpdf", "fitted_component", "MixtureProposal", "round_seed"]


def normalized_logpdf(name: str, spec: Mapping, x) -> np.ndarray:
    """Exact (normalised, truncation included) log density of a sampling-spec distribution.

    ``uniform`` (``low``/``high``), ``loguniform`` (``low``/``high``), ``lognormal``
    (``median`` or ``mean``; ``cv`` or ``sigma``) and ``normal`` (``mean``; ``sd`` or ``cv``),
    each optionally truncated by ``lower``/``upper``; ``-inf`` outside the support.  A
    zero-inflated spec (``zero = p``) has the atom ``log p`` at exactly 0 and ``log(1 − p)``
    plus the continuous density elsewhere (density with respect to counting measure at 0 plus
    Lebesgue measure, the same reference for every density compared with it).
    """
    z = float(spec.get("zero") or 0.0)
    if z > 0:
        x = np.asarray(x, float)
        rest = {k: v for k, v in spec.items() if k != "zero"}
        with np.errstate(divide="ignore", invalid="ignore"):
            cont = math.log1p(-z) + normalized_logpdf(name, rest, np.where(x == 0, np.nan, x))
        return np.where(x == 0, math.log(z), cont)
    dist = spec.get("dist", "lognormal")
    x = np.asarray(x, float)
    lo, hi = plausible_support(spec)
    with np.errstate(divide="ignore", invalid="ignore"):
        if dist == "uniform":
            a, b = float(spec["low"]), float(spec["high"])
            lo, hi = max(a, lo if lo is not None else a), min(b, hi if hi is not None else b)
            out = np.full(x.shape, -math.log(hi - lo))
        elif dist == "loguniform":
            a, b = float(spec["low"]), float(spec["high"])
            lo, hi = max(a, lo if lo is not None else a), min(b, hi if hi is not None else b)
            out = -np.log(x) - math.log(math.log(hi / lo))
        elif dist == "lognormal":
            s = (math.sqrt(math.log1p(float(spec["cv"]) ** 2)) if "cv" in spec
                 else float(spec["sigma"]))
            mu = (math.log(float(spec["median"])) if "median" in spec
                  else math.log(float(spec["mean"])) - 0.5 * s * s)
            z = (np.log(x) - mu) / s
            out = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - math.log(s) - np.log(x)
            za = -np.inf if lo is None or lo <= 0 else (math.log(lo) - mu) / s
            zb = np.inf if hi is None else (math.log(hi) - mu) / s
            out = out - float(log_truncation_mass(za, zb))
        elif dist == "normal":
            m = float(spec["mean"])
            sd = float(spec["sd"]) if "sd" in spec else float(spec["cv"]) * abs(m)
            z = (x - m) / sd
            out = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - math.log(sd)
            za = -np.inf if lo is None else (lo - m) / sd
            zb = np.inf if hi is None else (hi - m) / sd
            out = out - float(log_truncation_mass(za, zb))
        else:
            raise ValueError(f"{name!r}: an adaptive cohort needs a continuous distribution "
                             f"(uniform, loguniform, lognormal, normal); got {dist!r}")
    bad = ~np.isfinite(x)
    if lo is not None:
        bad |= x < lo
    if hi is not None:
        bad |= x > hi
    return np.where(bad, -np.inf, out)


def _val(ref, values):
    return float(values[ref]) if isinstance(ref, str) else float(ref)


def fitted_component(population: PopulationModel, values: Mapping[str, float],
                     plausible: Mapping[str, Mapping], arm_covariates: Mapping[str, float],
                     patient_covariates: Mapping[str, np.ndarray], *,
                     inflation: float = 1.0) -> dict[str, dict]:
    """Sampling specs of the fitted population's marginals, one per re-weighted variable.

    Lognormal variables: median ``= loc · exp(Σ effect · covariate)`` with arm covariates at
    their value and patient covariates at their mean; ``σ = inflation · sqrt(σ_fit² +
    Σ effect² · var(covariate))``.  Normal variables likewise on the natural scale.  Each is
    truncated to the broad plausible support (``plausible[name]``) so the proposal never
    leaves the support of the target (the target is the fitted population truncated there).
    """
    out = {}
    for v in population.variables:
        loc, spr = _val(v.location, values), _val(v.spread, values)
        shift, var_shift = 0.0, 0.0
        for cov, eff in v.effects:
            e = _val(eff, values)
            if cov in arm_covariates:
                shift += e * float(arm_covariates[cov])
            else:
                c = np.asarray(patient_covariates[cov], float)
                shift += e * float(np.mean(c))
                var_shift += e * e * float(np.var(c))
        lo, hi = plausible_support(plausible[v.name])
        zero = None
        if v.zero is not None:
            # the atom's share, kept away from 0 and 1 so both parts stay represented
            zero = min(max(_val(v.zero, values), 0.05), 0.95)
        if v.dist == "lognormal":
            s = math.sqrt(math.log1p(spr * spr) + var_shift) * inflation
            spec = {"dist": "lognormal", "median": loc * math.exp(shift), "sigma": s}
        else:
            s = math.sqrt(spr * spr + var_shift) * inflation
            spec = {"dist": "normal", "mean": loc + shift, "sd": s}
        if lo is not None:
            spec["lower"] = lo
        if hi is not None:
            spec["upper"] = hi
        if zero is not None:
            spec["zero"] = zero
        out[v.name] = spec
    return out


def round_seed(seed: int, round_: int, part: int) -> int:
    """Deterministic seed of one sub-cohort: ``part`` 0 = fitted component, 1 = broad
    component, 2 = validation cohort, of adaptation round ``round_`` of a fit with ``seed``."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(round_), int(part), 0x1A5])
    return int(ss.generate_state(1, np.uint64)[0] % (2 ** 63))


@dataclass(frozen=True)
class MixtureProposal:
    """A defensive-mixture plausible cohort of one arm (see the module docstring).

    Attributes
    ----------
    fitted
        Sampling specs of the fitted component ``g`` (variable -> spec).
    broad
        Sampling specs of the broad plausible density ``q₀`` (the trial file's).
    n_fitted, n_broad
        Patients drawn from each component (fixed counts).
    seeds
        ``(seed of the fitted part, seed of the broad part)``.
    round
        Adaptation round (1, 2, ...); 0 is reserved for the broad cohort.
    """

    fitted: Mapping[str, Mapping]
    broad: Mapping[str, Mapping]
    n_fitted: int
    n_broad: int
    seeds: tuple[int, int]
    round: int = 1
    info: dict = field(default_factory=dict, compare=False)

    @property
    def n(self) -> int:
        """Cohort size."""
        return self.n_fitted + self.n_broad

    @classmethod
    def build(cls, population: PopulationModel, values: Mapping[str, float],
              broad: Mapping[str, Mapping], arm_covariates: Mapping[str, float],
              patient_covariates: Mapping[str, np.ndarray], *, n: int, defensive: float,
              inflation: float, seed: int, round_: int) -> "MixtureProposal":
        """Proposal of round ``round_`` centred on ``values`` (``defensive`` = share δ drawn
        from the broad density, ``inflation`` = factor on the fitted spread)."""
        if not 0.0 <= defensive < 1.0:
            raise ValueError(f"defensive share must be in [0, 1); got {defensive}")
        m = int(round(defensive * n))
        g = fitted_component(population, values, broad, arm_covariates, patient_covariates,
                             inflation=inflation)
        return cls(g, {k: dict(broad[k]) for k in g}, n - m, m,
                   (round_seed(seed, round_, 0), round_seed(seed, round_, 1)), round_)

    def log_q(self, x: Mapping[str, np.ndarray]) -> np.ndarray:
        """[log density] Exact mixture density of the re-weighted variables per patient."""
        n = self.n
        lg = sum(normalized_logpdf(k, s, x[k]) for k, s in self.fitted.items())
        lb = sum(normalized_logpdf(k, s, x[k]) for k, s in self.broad.items())
        terms = []
        if self.n_fitted:
            terms.append(math.log(self.n_fitted / n) + lg)
        if self.n_broad:
            terms.append(math.log(self.n_broad / n) + lb)
        return np.logaddexp.reduce(np.stack(terms), axis=0) if len(terms) > 1 else terms[0]

    def describe(self) -> dict:
        """JSON-able summary (provenance)."""
        return {"round": self.round, "n_fitted": self.n_fitted, "n_broad": self.n_broad,
                "seeds": list(self.seeds),
                "fitted": {k: {kk: (float(vv) if isinstance(vv, (int, float)) else vv)
                               for kk, vv in s.items()} for k, s in self.fitted.items()}}


def effective_sample_size(w: np.ndarray) -> float:
    """Kish effective sample size ``(Σw)²/Σw²`` of importance weights."""
    w = np.asarray(w, float)
    s = w.sum()
    return float(s * s / np.sum(w * w)) if s > 0 else 0.0


def concat_cohorts(parts: list) -> "Cohort":
    """One :class:`~.vpop.Cohort` from sub-cohorts of the same arm (patients stacked in
    order; ``log_q`` stacked too — the caller replaces it by the mixture density)."""
    from .vpop import Cohort
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    cat = lambda dicts, k: np.concatenate([d[k] for d in dicts])  # noqa: E731
    x = {k: cat([p.x for p in parts], k) for k in first.x}
    outcomes = {k: cat([p.outcomes for p in parts], k) for k in first.outcomes}
    pc = {k: cat([p.patient_covariates for p in parts], k) for k in first.patient_covariates}
    attrs = dict(first.attrs)
    attrs["seed"] = [p.attrs.get("seed") for p in parts]
    for k in ("n_failed", "n_evaluable", "simulation_wall_time_s"):
        if all(k in p.attrs for p in parts):
            attrs[k] = sum(p.attrs[k] for p in parts)
    return Cohort(first.arm, x, np.concatenate([p.log_q for p in parts]), outcomes,
                  dict(first.arm_covariates), pc, attrs)
