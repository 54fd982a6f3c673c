"""Stage 7b — likelihood. Consumes a :class:`~.targets.TargetTable` and simulated statistics
(fractions keyed by target id); produces negative log-likelihood terms and the signed
residual vector that lmfit minimises.

Every term is written as a *deviance half*: it is 0 when the simulated value equals the
published one, so ``sum(residual**2) = 2 * (NLL - NLL_saturated)`` and profile-likelihood
thresholds are the usual χ² quantiles (3.84 for a 95 % interval on one parameter).

* binomial (value p̂ with n, k = p̂·n): ``k·log(p̂/p) + (n−k)·log((1−p̂)/(1−p))``
* multinomial (shares p̂_j with n events): ``Σ n·p̂_j·log(p̂_j/p_j)``
* interval [lo, hi]: 0 inside, ``½·(d/scale)²`` at distance d outside (a Gaussian
  shoulder with sd ``scale``, default 2.5 percentage points); a point value without n
  is a zero-width interval.
* priors: ``½·z²`` of a normal (or log-normal) prior; ``range`` puts a normal (log-normal for
  ``scale = "log"``) prior whose central 95 % is the parameter's bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy.special import xlogy

from .targets import Target, TargetTable

__all__ = ["binomial_nll", "binomial_loglik", "multinomial_nll", "interval_nll", "prior_nll",
           "Likelihood", "P_FLOOR", "DEFAULT_INTERVAL_SCALE", "PRIOR_KINDS"]

#: simulated probabilities are kept in [P_FLOOR, 1 - P_FLOOR] (a rate of exactly 0 or 1 in
#: a finite virtual cohort must not give an infinite likelihood)
P_FLOOR = 1e-6
#: [fraction] default sd of the Gaussian shoulder outside an interval target
DEFAULT_INTERVAL_SCALE = 0.025
PRIOR_KINDS = ("none", "normal", "lognormal", "range")


def _clip(p):
    return np.clip(np.asarray(p, dtype=float), P_FLOOR, 1.0 - P_FLOOR)


def binomial_loglik(p, k, n) -> np.ndarray:
    """Binomial log-likelihood ``log C(n,k) + k log p + (n-k) log(1-p)`` (k may be non-integer).

    Parameters
    ----------
    p
        [fraction] Simulated probability.
    k, n
        Events and trials of the published observation.
    """
    from scipy.special import gammaln
    p = _clip(p)
    k, n = np.asarray(k, float), np.asarray(n, float)
    return (gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
            + xlogy(k, p) + xlogy(n - k, 1 - p))


def binomial_nll(p, k, n) -> np.ndarray:
    """Binomial deviance half: ``loglik(p̂) − loglik(p)`` with ``p̂ = k/n`` (0 at p = p̂)."""
    p = _clip(p)
    k, n = np.asarray(k, float), np.asarray(n, float)
    ph = k / n
    return xlogy(k, ph) - xlogy(k, p) + xlogy(n - k, 1 - ph) - xlogy(n - k, 1 - p)


def multinomial_nll(p, shares, n: float) -> float:
    """Multinomial deviance half ``Σ n·p̂_j·log(p̂_j/p_j)`` over categories j.

    Parameters
    ----------
    p
        [fraction] Simulated category probabilities (renormalised to sum 1).
    shares
        [fraction] Published category shares p̂_j.
    n
        Number of events the shares come from.
    """
    p = _clip(p)
    p = p / p.sum()
    k = float(n) * np.asarray(shares, float) / np.sum(shares)
    return float(np.sum(xlogy(k, k / float(n)) - xlogy(k, p)))


def interval_nll(x, low: float, high: float, scale: float = DEFAULT_INTERVAL_SCALE):
    """Interval penalty: 0 for ``low <= x <= high``, else ``½·(distance/scale)²``.

    Parameters
    ----------
    x
        [fraction] Simulated value.
    low, high
        [fraction] Interval ends (use 0 and 1 for open ends).
    scale
        [fraction] Sd of the Gaussian shoulder outside the interval.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0; got {scale!r}")
    x = np.asarray(x, float)
    d = np.maximum(low - x, 0.0) + np.maximum(x - high, 0.0)
    return 0.5 * (d / scale) ** 2


def prior_nll(value: float, prior: Mapping | None, *, bounds=(None, None), log_scale=False) -> float:
    """Negative log prior density up to a constant (``½·z²``); 0 for a flat prior.

    ``prior`` is ``None``/``{"dist": "none"}``, ``{"dist": "normal", "mean": m, "sd": s}``,
    ``{"dist": "lognormal", "median": m, "sigma": s}`` (sigma on the log scale), or
    ``{"dist": "range"}``: normal (log-normal if ``log_scale``) whose central 95 % spans
    ``bounds``.
    """
    if not prior or prior.get("dist", "none") == "none":
        return 0.0
    dist = prior["dist"]
    if dist == "normal":
        z = (value - float(prior["mean"])) / float(prior["sd"])
    elif dist == "lognormal":
        if value <= 0:
            return math.inf
        z = (math.log(value) - math.log(float(prior["median"]))) / float(prior["sigma"])
    elif dist == "range":
        lo, hi = bounds
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("a 'range' prior needs finite bounds")
        if log_scale:
            if value <= 0 or lo <= 0:
                return math.inf
            lo, hi, value = math.log(lo), math.log(hi), math.log(value)
        z = (value - 0.5 * (lo + hi)) / ((hi - lo) / (2 * 1.959963984540054))
    else:
        raise ValueError(f"unknown prior dist {dist!r}; use one of {PRIOR_KINDS}")
    return 0.5 * z * z


@dataclass(frozen=True)
class TermSet:
    """Per-term names and negative log-likelihood values (deviance halves)."""

    names: tuple[str, ...]
    nll: np.ndarray

    @property
    def residuals(self) -> np.ndarray:
        """Residuals ``sqrt(2·nll)`` per term (sum of squares = 2·NLL)."""
        return np.sqrt(2.0 * np.maximum(self.nll, 0.0))


class Likelihood:
    """The data part of the objective: one term per fitted target (one per multinomial group).

    Parameters
    ----------
    targets
        A target table; only rows with ``role == "fit"`` (or ``role``) enter.
    interval_scale
        [fraction] Sd of the shoulder outside interval and point targets.
    """

    def __init__(self, targets: TargetTable | list[Target], *, role: str = "fit",
                 interval_scale: float = DEFAULT_INTERVAL_SCALE):
        rows = [t for t in targets if t.role == role]
        self.interval_scale = float(interval_scale)
        self.single = [t for t in rows if t.kind != "multinomial"]
        groups: dict[str, list[Target]] = {}
        for t in rows:
            if t.kind == "multinomial":
                groups.setdefault(f"{t.arm}/{t.group}", []).append(t)
        self.groups = groups
        self.names = tuple([t.id for t in self.single] + list(groups))

    def __len__(self) -> int:
        return len(self.names)

    def term(self, t: Target, x: float) -> float:
        """NLL of one non-multinomial target at simulated value ``x`` [fraction]."""
        if t.kind == "binomial":
            return float(binomial_nll(x, t.value * t.n, t.n))
        lo, hi = t.bounds()
        return float(interval_nll(x, lo, hi, self.interval_scale))

    def terms(self, simulated: Mapping[str, float]) -> TermSet:
        """Every term at the simulated values (fractions keyed by target id)."""
        out = [self.term(t, simulated[t.id]) for t in self.single]
        for rows in self.groups.values():
            p = np.array([simulated[t.id] for t in rows])
            out.append(multinomial_nll(p, [t.value for t in rows], rows[0].n))
        return TermSet(self.names, np.asarray(out, float))
