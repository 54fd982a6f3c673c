"""Residual error models for time-course fitting: additive, proportional, combined.

Stage 6b — consumes observations ``y`` and predictions ``f`` (with their parameter
sensitivities); produces weighted residuals, their Jacobian and the -2 log-likelihood.

The observation model is ``y = f + σ(f)·ε``, ``ε ~ N(0, 1)``, with

* additive:      ``σ = a``             (``a`` in the unit of the observable),
* proportional:  ``σ = b·|f|``         (``b`` a fraction, e.g. 0.1 = 10 % CV),
* combined:      ``σ = sqrt(a² + b²f²)``.

**Fixed** error parameters: the fit minimises the weighted sum of squares
``Σ ((y − f)/σ(f))²`` (σ evaluated at the current prediction, differentiated with it).

**Estimated** error parameters: the fit minimises the -2 log-likelihood
``Σ [log(2πσ_i²) + (y_i − f_i)²/σ_i²]``.  Write ``σ_i = s·g_i`` with a scale ``s`` and
a shape ``g_i`` (``1``; ``|f_i|``; ``sqrt(λ² + f_i²)`` with ``λ = a/b``).  The scale has the
closed-form maximum ``ŝ² = Σ (r_i/g_i)²/N`` (``r = y − f``), and the profiled objective is
``N·log(Σ e_i²) + const`` with ``e_i = r_i·G/g_i``, ``G`` the geometric mean of ``g``.  So
the maximum-likelihood estimate of the structural parameters (and of ``λ``) is the
least-squares fit of the residuals ``e`` — an exact reformulation, solved by the same
least-squares machinery with an analytic Jacobian.  Afterwards ``ŝ`` gives ``a`` (additive),
``b`` (proportional) or ``b = ŝ``, ``a = λ·ŝ`` (combined).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError

__all__ = ["ErrorModel", "KINDS", "profiled_residuals", "fixed_residuals",
           "minus2_log_likelihood", "weighted_residuals", "estimated_parameters",
           "fisher_information"]

KINDS = ("additive", "proportional", "combined")


@dataclass(frozen=True)
class ErrorModel:
    """The residual error model of one observable.

    Parameters
    ----------
    kind : ``"additive"``, ``"proportional"`` or ``"combined"``.
    additive : [unit of the observable] additive SD ``a`` (fixed value, or start value
        when estimated; needed for additive and combined).
    proportional : [-] proportional SD ``b`` (fixed value or start; proportional, combined).
    estimate : estimate the error parameters (maximum likelihood) or keep them fixed.
    """

    kind: str = "additive"
    additive: float | None = None
    proportional: float | None = None
    estimate: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ModelError(f"unknown error model {self.kind!r}; choose one of "
                             f"{', '.join(KINDS)}", item="kind")
        need = {"additive": ("additive",), "proportional": ("proportional",),
                "combined": ("additive", "proportional")}[self.kind]
        for n in ("additive", "proportional"):
            v = getattr(self, n)
            if v is None:
                if n in need and not (self.estimate and self.kind != "combined"):
                    raise ModelError(f"the {self.kind} error model needs a value for {n!r}"
                                     f"{' (start value)' if self.estimate else ''}", item=n)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise ModelError(f"{n!r} must be a positive number (got {v!r})", item=n)
            if n not in need:
                raise ModelError(f"{n!r} is not a parameter of the {self.kind} error model",
                                 item=n)

    @property
    def a(self) -> float:
        return float(self.additive) if self.additive is not None else 0.0

    @property
    def b(self) -> float:
        return float(self.proportional) if self.proportional is not None else 0.0

    def sd(self, f) -> np.ndarray:
        """σ(f) with the error parameters of this object."""
        f = np.asarray(f, float)
        return np.sqrt(self.a ** 2 + (self.b * f) ** 2)

    def dsd_df(self, f) -> np.ndarray:
        """dσ/df."""
        f = np.asarray(f, float)
        return self.b ** 2 * f / self.sd(f)

    def describe(self) -> str:
        what = {"additive": f"a = {self.a:.4g}", "proportional": f"b = {self.b:.4g}",
                "combined": f"a = {self.a:.4g}, b = {self.b:.4g}"}[self.kind]
        return f"{self.kind} ({'estimated' if self.estimate else 'fixed'}): {what}"


def weighted_residuals(y, f, sd) -> np.ndarray:
    """``(y − f)/σ`` (individual weighted residuals)."""
    return (np.asarray(y, float) - np.asarray(f, float)) / np.asarray(sd, float)


def minus2_log_likelihood(y, f, sd) -> float:
    """``Σ [log(2πσ²) + (y − f)²/σ²]`` for normal residuals."""
    sd = np.asarray(sd, float)
    r = np.asarray(y, float) - np.asarray(f, float)
    return float(np.sum(np.log(2 * np.pi * sd ** 2) + (r / sd) ** 2))


def fixed_residuals(y, f, df, em: ErrorModel):
    """Residuals ``(f − y)/σ(f)`` and their Jacobian for a fixed error model.

    Parameters
    ----------
    y, f : observations and predictions (N,).
    df : predictions' sensitivities (N, P).
    em : the (fixed) error model.

    Returns
    -------
    e : (N,) residuals (sign: prediction minus observation).
    J : (N, P) ``de/dθ``.
    """
    y = np.asarray(y, float)
    f = np.asarray(f, float)
    sd = em.sd(f)
    r = f - y
    e = r / sd
    J = df / sd[:, None] - (r / sd ** 2 * em.dsd_df(f))[:, None] * df
    return e, J


def _shape(kind: str, f, lam):
    """Shape ``g`` of σ = s·g, with ∂g/∂f and ∂g/∂λ."""
    if kind == "additive":
        return np.ones_like(f), np.zeros_like(f), np.zeros_like(f)
    if kind == "proportional":
        g = np.abs(f)
        return g, np.sign(f), np.zeros_like(f)
    g = np.sqrt(lam * lam + f * f)
    return g, f / g, lam / g


def profiled_residuals(y, f, df, kind: str, lam: float | None = None):
    """Residuals whose sum of squares is the profiled -2 log-likelihood (see module doc).

    Parameters
    ----------
    y, f : observations and predictions (N,).
    df : prediction sensitivities (N, P).
    kind : error model kind.
    lam : [unit of the observable] ``a/b`` for the combined model.

    Returns
    -------
    e : (N,) residuals ``(f − y)·G/g``.
    J : (N, P) ``de/dθ``.
    Jlam : (N,) ``de/dλ`` (zeros unless combined).
    scale : ŝ, the maximum-likelihood scale at these predictions.
    """
    y = np.asarray(y, float)
    f = np.asarray(f, float)
    g, gf, gl = _shape(kind, f, 0.0 if lam is None else float(lam))
    if np.any(g <= 0) or not np.all(np.isfinite(g)):
        bad = int(np.argmax(~(g > 0)))
        raise FloatingPointError(f"the {kind} error model has σ = 0 at observation {bad} "
                                 f"(prediction {f[bad]:g}); use a combined error model")
    n = len(y)
    G = math.exp(float(np.mean(np.log(g))))
    r = f - y
    e = r * G / g
    dg = gf[:, None] * df                        # (N, P)
    dG = G * np.mean(dg / g[:, None], axis=0)    # (P,)
    J = (df * G + r[:, None] * dG[None, :]) / g[:, None] - (r * G / g ** 2)[:, None] * dg
    dGl = G * float(np.mean(gl / g))
    Jlam = r * dGl / g - r * G / g ** 2 * gl
    scale = math.sqrt(float(np.sum((r / g) ** 2)) / n)
    return e, J, Jlam, scale


def estimated_parameters(kind: str, scale: float, lam: float | None) -> tuple[float | None,
                                                                              float | None]:
    """``(a, b)`` from the profiled scale and (combined) ratio ``λ``."""
    if kind == "additive":
        return scale, None
    if kind == "proportional":
        return None, scale
    return float(lam) * scale, scale



def fisher_information(f, df, blocks):
    """Expected Fisher information of normal residuals with prediction-dependent σ.

    ``I = Jfᵀ W Jf + 2 Jσᵀ W Jσ`` with ``W = diag(1/σ²)``, ``Jf = ∂f/∂φ``, ``Jσ = ∂σ/∂φ``, over
    ``φ`` = the structural parameters (columns of ``df``) followed by ``log a`` / ``log b`` of
    every estimated error model.

    Parameters
    ----------
    f : (N,) predictions.
    df : (N, P) their sensitivities to the structural parameters (fitting scale).
    blocks : ``[(name, idx, ErrorModel)]`` with the error models' (fitted) values.

    Returns
    -------
    info : (P + K, P + K) information matrix.
    labels : the K error parameters, ``(name, "additive" | "proportional")``.
    """
    f = np.asarray(f, float)
    N, P = df.shape
    sd = np.empty(N)
    dsd = np.empty(N)
    labels, cols = [], []
    for name, idx, em in blocks:
        fi = f[idx]
        s = em.sd(fi)
        sd[idx] = s
        dsd[idx] = em.dsd_df(fi)
        if not em.estimate:
            continue
        if em.kind in ("additive", "combined"):
            col = np.zeros(N)
            col[idx] = em.a ** 2 / s
            labels.append((name, "additive"))
            cols.append(col)
        if em.kind in ("proportional", "combined"):
            col = np.zeros(N)
            col[idx] = (em.b * fi) ** 2 / s
            labels.append((name, "proportional"))
            cols.append(col)
    K = len(cols)
    Jsig = np.column_stack([dsd[:, None] * df] + cols) if K else dsd[:, None] * df
    Jf = np.column_stack([df, np.zeros((N, K))])
    w = 1.0 / sd ** 2
    info = Jf.T @ (w[:, None] * Jf) + 2.0 * Jsig.T @ (w[:, None] * Jsig)
    return info, labels
