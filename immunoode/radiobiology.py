"""Radiobiology: the linear-quadratic survival rule with a hypoxic, radioresistant share.

One rule for every place that turns a dose into a surviving fraction: regimen ``[[scale]]``
events (:class:`immunoode.regimen.Scale`), the ``[radiotherapy]`` section of schedule sweeps,
and the closed form that tests hold ``models/nsclc/radiotherapy.toml`` to.

Per fraction of ``d`` Gy, a share ``f`` of the clonogens is hypoxic and needs ``OER`` times the
dose for the same effect (oxygen enhancement ratio)::

    S(d) = (1 - f) * exp(-alpha d - beta d^2) + f * exp(-alpha d/OER - beta d^2/OER^2)

Reoxygenation between fractions is taken as complete (the survivors are again a share ``f``
hypoxic), so ``n`` fractions leave ``S(d)**n``; there is no repopulation and no dose-rate effect.
``f = 0`` is pure LQ.
"""
from __future__ import annotations

import math

__all__ = ["lq_surviving_fraction", "biologically_effective_dose", "check_lq_parameters"]


def check_lq_parameters(alpha: float, beta: float, hypoxic_fraction: float = 0.0,
                        oer: float = 1.0) -> str | None:
    """What is wrong with LQ parameters, as one sentence, or None when they are valid."""
    for name, v in (("alpha", alpha), ("beta", beta), ("hypoxic_fraction", hypoxic_fraction),
                    ("oer", oer)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return f"{name!r} must be a finite number (got {v!r})"
    if alpha < 0 or beta < 0:
        return f"'alpha' and 'beta' must be >= 0 (got {alpha:g}, {beta:g})"
    if not 0.0 <= hypoxic_fraction < 1.0:
        return f"'hypoxic_fraction' must be in [0, 1) (got {hypoxic_fraction:g})"
    if oer < 1.0:
        return f"'oer' (oxygen enhancement ratio) must be >= 1 (got {oer:g})"
    return None


def lq_surviving_fraction(dose_gy: float, alpha: float, beta: float,
                          hypoxic_fraction: float = 0.0, oer: float = 1.0,
                          fractions: int = 1) -> float:
    """Surviving fraction after ``fractions`` fractions of ``dose_gy`` [Gy] each.

    alpha [1/Gy], beta [1/Gy^2]; hypoxic_fraction [1] in [0, 1); oer [1] >= 1.
    """
    problem = check_lq_parameters(alpha, beta, hypoxic_fraction, oer)
    if problem:
        raise ValueError(problem)
    if dose_gy < 0:
        raise ValueError(f"dose must be >= 0 Gy (got {dose_gy:g})")
    d = float(dose_gy)
    oxic = (1.0 - hypoxic_fraction) * math.exp(-alpha * d - beta * d * d)
    hypoxic = hypoxic_fraction * math.exp(-alpha * d / oer - beta * d * d / (oer * oer))
    return (oxic + hypoxic) ** int(fractions)


def biologically_effective_dose(dose_gy: float, fractions: int, alpha_beta: float) -> float:
    """BED [Gy] = n d (1 + d / (alpha/beta)) for ``fractions`` of ``dose_gy`` [Gy]."""
    if alpha_beta <= 0:
        raise ValueError(f"alpha/beta must be > 0 Gy (got {alpha_beta:g})")
    return fractions * dose_gy * (1.0 + dose_gy / alpha_beta)
