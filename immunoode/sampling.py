"""Virtual-patient population sampling from a declarative spec.

A *population spec* is a plain mapping (a dict, or a TOML file read with
:func:`load_population_spec`)::

    {
      "parameters": {
        "k_grow":  {"dist": "lognormal", "median": 0.01, "cv": 0.4},
        "k_kill":  {"dist": "normal", "mean": 1.0, "sd": 0.2, "lower": 0.0},
        "f_pen":   {"dist": "uniform", "low": 0.2, "high": 0.8},
        "arm":     {"dist": "categorical", "categories": {"A": 0.5, "B": 0.5}},
        "V0":      {"dist": "fixed", "value": 1.0},
      },
      "covariates": {
        "pdl1":   {"prevalence": {"<1%": 0.3, "1-49%": 0.35, ">=50%": 0.35}},
        "tmb":    {"median": 8.0, "cv": 1.0},
        "driver": {"prevalence": {"none": 0.6, "EGFR": 0.15, "ALK": 0.05, "KRAS": 0.2}},
      },
      "correlation": {"pairs": [["k_grow", "k_kill", -0.5], ["pdl1", "tmb", 0.2]]},
    }

Every non-fixed variable consumes one dimension of a uniform sample ``U`` in
``[0, 1)^d`` drawn by plain random numbers, a Latin hypercube or a scrambled
Sobol sequence (:mod:`scipy.stats.qmc`).  Correlations act through a Gaussian
copula: ``Z = Φ⁻¹(U)`` is multiplied by the Cholesky factor of the correlation
matrix and mapped back, ``U' = Φ(Z L^T)``; each variable is then ``F⁻¹(U')`` of its
marginal (truncation: ``F⁻¹(F(lo) + U'(F(hi) − F(lo)))``).  A categorical
variable takes the category whose cumulative-probability interval holds ``U'``
(so correlations with it act through the listed category order).

A continuous variable may be *zero-inflated*: ``zero = p`` gives a share ``p`` of the
patients exactly 0 (``U' < p``) and draws the rest from the (truncated) marginal at
``(U' − p)/(1 − p)``, e.g. the initial size of a resistant subclone that only some tumors
carry.  The zeros lie outside ``lower``/``upper``, which bound the continuous part only.

Covariates are ordinary variables with defaults by name: ``pdl1`` (or any
``dist = "pdl1_tps"``) yields two variables, ``<name>_category`` (``"<1%"``,
``"1-49%"``, ``">=50%"``) and ``<name>_tps`` (percent, uniform within the drawn
category); ``tmb`` defaults to a lognormal; ``driver`` to a categorical.  In the
correlation, ``pdl1``, ``pdl1_tps`` and ``pdl1_category`` all name the same
underlying dimension.

One seed reproduces the whole population (``sample_population(spec, n, seed)``).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import xarray as xr
from scipy import stats
from scipy.stats import qmc

from .errors import ModelError

__all__ = ["sample_population", "load_population_spec", "validate_spec", "SpecError",
           "TPS_CATEGORIES", "rescale_at_quantile"]

#: default PD-L1 tumor-proportion-score categories: label -> [low, high) in percent
TPS_CATEGORIES = {"<1%": (0.0, 1.0), "1-49%": (1.0, 50.0), ">=50%": (50.0, 100.0)}

METHODS = ("random", "lhs", "sobol")
_CONTINUOUS = ("lognormal", "normal", "uniform", "loguniform")
_COVARIATE_DEFAULT_DIST = {"pdl1": "pdl1_tps", "tmb": "lognormal", "driver": "categorical"}
_EPS = 1e-12


class SpecError(ModelError):
    """A population spec is invalid (the message names the variable)."""


# --------------------------------------------------------------------------- spec parsing
class _Var:
    """One sampled variable (marginal + its uniform dimension)."""

    def __init__(self, name: str, section: str, d: Mapping[str, Any]):
        self.name, self.section = name, section
        if not isinstance(d, Mapping):
            raise SpecError(f"expected a table, got {type(d).__name__}", section=section, item=name)
        d = dict(d)
        default = _COVARIATE_DEFAULT_DIST.get(name) if section == "covariates" else None
        self.dist = str(d.pop("dist", default) or "")
        if not self.dist:
            raise SpecError("missing 'dist' (lognormal, normal, uniform, loguniform, "
                            "categorical, pdl1_tps, fixed)", section=section, item=name)
        self.lower = d.pop("lower", None)
        self.upper = d.pop("upper", None)
        self.zero = d.pop("zero", None)
        self.frozen = None
        self.categories: list[str] | None = None
        self.cum: np.ndarray | None = None
        self.value = None
        try:
            self._parse(d)
        except SpecError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise SpecError(f"invalid value: {exc}", section=section, item=name) from None
        if d:
            raise SpecError(f"unknown key(s) for dist {self.dist!r}: {sorted(d)}",
                            section=section, item=name)

    def _err(self, msg):
        return SpecError(msg, section=self.section, item=self.name)

    def _num(self, d, key, *, positive=False, nonneg=False):
        v = d.pop(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._err(f"{key!r} must be a finite number, got {v!r}")
        if positive and v <= 0:
            raise self._err(f"{key!r} must be > 0, got {v!r}")
        if nonneg and v < 0:
            raise self._err(f"{key!r} must be >= 0, got {v!r}")
        return float(v)

    def _probabilities(self, d):
        key = "categories" if "categories" in d else "prevalence" if "prevalence" in d else None
        if key is None:
            raise self._err("categorical needs 'categories' (or 'prevalence'): {label: probability}")
        cats = d.pop(key)
        if not isinstance(cats, Mapping) or not cats:
            raise self._err(f"{key!r} must be a non-empty table label -> probability")
        labels = [str(k) for k in cats]
        p = []
        for k, v in cats.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0):
                raise self._err(f"probability of {k!r} must be a number >= 0, got {v!r}")
            p.append(float(v))
        p = np.asarray(p)
        if abs(p.sum() - 1.0) > 1e-6:
            raise self._err(f"probabilities must sum to 1, they sum to {p.sum():.6g}")
        return labels, p

    def _parse(self, d):
        dist = self.dist
        if dist == "fixed":
            if self.zero is not None:
                raise self._err("'zero' does not apply to dist 'fixed'")
            self.value = d.pop("value")
            return
        if dist in ("categorical", "pdl1_tps"):
            if self.lower is not None or self.upper is not None:
                raise self._err(f"'lower'/'upper' do not apply to dist {dist!r}")
            if self.zero is not None:
                raise self._err(f"'zero' does not apply to dist {dist!r}")
            if dist == "pdl1_tps":
                bounds = d.pop("bounds", None)
                bounds = dict(TPS_CATEGORIES) if bounds is None else {
                    str(k): tuple(float(x) for x in v) for k, v in bounds.items()}
                if "prevalence" not in d and "categories" not in d:
                    raise self._err("pdl1_tps needs 'prevalence' = {'<1%': p, '1-49%': p, '>=50%': p}")
                labels, p = self._probabilities(d)
                missing = [k for k in labels if k not in bounds]
                if missing:
                    raise self._err(f"no TPS bounds for categor(y/ies) {missing}; known: "
                                    f"{list(bounds)} (give 'bounds' = {{label: [low, high]}})")
                for k in labels:
                    lo, hi = bounds[k]
                    if not lo < hi:
                        raise self._err(f"TPS bounds of {k!r} must be low < high, got {[lo, hi]}")
                self.bounds = np.array([bounds[k] for k in labels], dtype=float)
            else:
                labels, p = self._probabilities(d)
            self.categories, self.cum = labels, np.cumsum(p)
            self.cum[-1] = 1.0
            return
        if dist == "lognormal":
            has_cv, has_sigma = "cv" in d, "sigma" in d
            if has_cv == has_sigma:
                raise self._err("lognormal needs exactly one of 'cv' or 'sigma' (log-scale sd)")
            sigma = (math.sqrt(math.log1p(self._num(d, "cv", nonneg=True) ** 2)) if has_cv
                     else self._num(d, "sigma", nonneg=True))
            if ("median" in d) == ("mean" in d):
                raise self._err("lognormal needs exactly one of 'median' or 'mean'")
            if "median" in d:
                mu = math.log(self._num(d, "median", positive=True))
            else:
                mu = math.log(self._num(d, "mean", positive=True)) - 0.5 * sigma ** 2
            self.frozen = stats.lognorm(s=max(sigma, 1e-300), scale=math.exp(mu))
        elif dist == "normal":
            mean = self._num(d, "mean")
            if ("sd" in d) == ("cv" in d):
                raise self._err("normal needs exactly one of 'sd' or 'cv'")
            sd = self._num(d, "sd", nonneg=True) if "sd" in d else abs(mean) * self._num(d, "cv", nonneg=True)
            self.frozen = stats.norm(loc=mean, scale=max(sd, 1e-300))
        elif dist in ("uniform", "loguniform"):
            lo, hi = self._num(d, "low"), self._num(d, "high")
            if not lo < hi:
                raise self._err(f"needs low < high, got low={lo}, high={hi}")
            if dist == "loguniform":
                if lo <= 0:
                    raise self._err("loguniform needs low > 0")
                self.frozen = stats.loguniform(lo, hi)
            else:
                self.frozen = stats.uniform(loc=lo, scale=hi - lo)
        else:
            raise self._err(f"unknown dist {dist!r}; use one of lognormal, normal, uniform, "
                            "loguniform, categorical, pdl1_tps, fixed")
        lo = -np.inf if self.lower is None else self._bound(self.lower, "lower")
        hi = np.inf if self.upper is None else self._bound(self.upper, "upper")
        if not lo < hi:
            raise self._err(f"needs lower < upper, got lower={lo}, upper={hi}")
        self.flo, self.fhi = float(self.frozen.cdf(lo)), float(self.frozen.cdf(hi))
        if self.fhi - self.flo <= 0:
            raise self._err(f"the truncation [{lo}, {hi}] holds no probability mass")
        self.lo, self.hi = lo, hi
        if self.zero is not None:       # zero-inflated: a share of patients is exactly 0
            z = self.zero
            if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0.0 <= z < 1.0:
                raise self._err(f"'zero' (share of patients at exactly 0) must be a number in "
                                f"[0, 1), got {z!r}")
            self.zero = float(z)

    def _bound(self, v, key):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise self._err(f"{key!r} must be a number, got {v!r}")
        return float(v)

    @property
    def uses_dim(self) -> bool:
        return self.dist != "fixed"

    def names(self) -> list[str]:
        if self.dist == "pdl1_tps":
            return [f"{self.name}_category", f"{self.name}_tps"]
        return [self.name]

    def transform(self, u: np.ndarray, n: int) -> dict[str, np.ndarray]:
        if self.dist == "fixed":
            return {self.name: np.full(n, self.value)}
        if self.categories is not None:
            idx = np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.categories) - 1)
            labels = np.asarray(self.categories)[idx]
            if self.dist == "pdl1_tps":
                cum0 = np.concatenate([[0.0], self.cum[:-1]])
                width = np.maximum(self.cum - cum0, _EPS)
                w = np.clip((u - cum0[idx]) / width[idx], 0.0, 1.0 - 1e-12)
                lo, hi = self.bounds[idx, 0], self.bounds[idx, 1]
                return {f"{self.name}_category": labels, f"{self.name}_tps": lo + w * (hi - lo)}
            return {self.name: labels}
        z = self.zero or 0.0
        # zero-inflated: u < zero maps to exactly 0, the rest of [0, 1) to the continuous part
        v = np.clip((u - z) / (1.0 - z), 0.0, 1.0) if z else u
        q = self.flo + v * (self.fhi - self.flo)
        x = np.clip(self.frozen.ppf(np.clip(q, _EPS, 1 - _EPS)), self.lo, self.hi)
        return {self.name: np.where(u < z, 0.0, x) if z else x}


def rescale_at_quantile(name: str, dist: Mapping[str, Any], x, factor) -> np.ndarray:
    """Per-patient values of ``factor * X`` at each patient's own quantile, truncated as X is.

    ``x`` holds draws of the continuous marginal ``dist`` (a population-spec table, with its
    ``lower``/``upper`` truncation; a ``fixed`` value is simply scaled); ``factor`` (> 0, one per patient) is e.g.
    ``exp(beta * covariate)``.  Each value is mapped to its quantile ``u`` in the truncated
    marginal and redrawn at ``u`` from the distribution of ``factor * X`` truncated to the same
    ``[lower, upper]``: a covariate effect on the log of the parameter (a shifted log-median
    for a lognormal) that keeps every patient's rank and, unlike scaling then clipping, piles
    no probability mass on a bound.
    """
    var = _Var(name, "parameters", dist)
    if var.dist == "fixed":        # one value for everyone: the effect simply scales it
        return np.asarray(x, dtype=float) * np.asarray(factor, dtype=float)
    if var.frozen is None:
        raise SpecError(f"a covariate effect needs a continuous distribution, not {var.dist!r}",
                        section="parameters", item=name)
    x = np.asarray(x, dtype=float)
    c = np.broadcast_to(np.asarray(factor, dtype=float), x.shape)
    if not np.all(np.isfinite(c) & (c > 0)):
        raise SpecError("covariate factors must be finite and > 0", section="parameters", item=name)
    if var.zero:                  # zero-inflated: patients at exactly 0 stay there
        out = np.zeros_like(x)
        pos = x != 0
        spec = {k: v for k, v in dist.items() if k != "zero"}
        out[pos] = rescale_at_quantile(name, spec, x[pos], c[pos])
        return out
    F = var.frozen.cdf
    u = np.clip((F(x) - var.flo) / (var.fhi - var.flo), 0.0, 1.0)
    flo, fhi = F(var.lo / c), F(var.hi / c)     # X's truncation seen from factor * X
    q = flo + u * (fhi - flo)
    out = c * var.frozen.ppf(np.clip(q, _EPS, 1 - _EPS))
    return np.clip(out, var.lo, var.hi)


def _parse_spec(spec: Mapping[str, Any]):
    if not isinstance(spec, Mapping):
        raise SpecError(f"a population spec must be a mapping, got {type(spec).__name__}")
    spec = dict(spec.get("population", spec)) if "population" in spec and len(spec) == 1 else dict(spec)
    unknown = set(spec) - {"parameters", "covariates", "correlation"}
    if unknown:
        raise SpecError(f"unknown section(s) {sorted(unknown)}; expected parameters, covariates, correlation")
    variables: list[_Var] = []
    for section in ("parameters", "covariates"):
        table = spec.get(section, {}) or {}
        if not isinstance(table, Mapping):
            raise SpecError("must be a table name -> distribution", section=section)
        for name, d in table.items():
            variables.append(_Var(str(name), section, d))
    if not variables:
        raise SpecError("the spec defines no parameters or covariates")
    seen: dict[str, str] = {}
    for v in variables:
        for nm in v.names():
            if nm in seen:
                raise SpecError(f"defined twice (in [{seen[nm]}] and [{v.section}])", item=nm)
            seen[nm] = v.section
    dims = [v for v in variables if v.uses_dim]
    alias = {}
    for i, v in enumerate(dims):
        for nm in {v.name, *v.names()}:
            alias[nm] = i
    R = _correlation(spec.get("correlation"), alias, dims, seen)
    return variables, dims, R


def _correlation(corr, alias, dims, all_names):
    d = len(dims)
    R = np.eye(d)
    if corr is None:
        return R
    if not isinstance(corr, Mapping):
        raise SpecError("must be a table with 'names' + 'matrix' and/or 'pairs'", section="correlation")
    extra = set(corr) - {"names", "matrix", "pairs"}
    if extra:
        raise SpecError(f"unknown key(s) {sorted(extra)}", section="correlation")

    def index(name):
        name = str(name)
        if name not in alias:
            if name in all_names:
                raise SpecError("a fixed variable cannot be correlated", section="correlation", item=name)
            raise SpecError(f"not a sampled variable (known: {sorted(alias)})",
                            section="correlation", item=name)
        return alias[name]

    def put(i, j, r, a, b):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not -1 <= r <= 1:
            raise SpecError(f"correlation of {a!r} and {b!r} must be a number in [-1, 1], got {r!r}",
                            section="correlation")
        if i == j:
            if a != b or r != 1:
                raise SpecError(f"{a!r} and {b!r} are the same variable", section="correlation")
            return
        R[i, j] = R[j, i] = r

    if "matrix" in corr or "names" in corr:
        names = list(corr.get("names", []))
        M = np.asarray(corr.get("matrix", []), dtype=float)
        if M.shape != (len(names), len(names)) or not names:
            raise SpecError(f"'matrix' must be {len(names)}x{len(names)} to match 'names', "
                            f"got shape {M.shape}", section="correlation")
        if not np.allclose(M, M.T, atol=1e-12):
            raise SpecError("'matrix' is not symmetric", section="correlation")
        if not np.allclose(np.diag(M), 1.0):
            raise SpecError("'matrix' must have ones on the diagonal", section="correlation")
        idx = [index(n) for n in names]
        if len(set(idx)) != len(idx):
            raise SpecError("'names' lists the same variable twice", section="correlation")
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                put(idx[a], idx[b], float(M[a, b]), names[a], names[b])
    for p in corr.get("pairs", []) or []:
        if not isinstance(p, (list, tuple)) or len(p) != 3:
            raise SpecError(f"each pair must be [name, name, r], got {p!r}", section="correlation")
        put(index(p[0]), index(p[1]), p[2], str(p[0]), str(p[1]))
    ev = np.linalg.eigvalsh(R)
    if ev.min() <= 1e-10:
        inv = {i: n for n, i in alias.items() if n == dims[i].name}
        involved = sorted({inv[i] for i in range(d) if np.any(R[i, np.arange(d) != i] != 0)})
        raise SpecError(f"correlation matrix over {involved} is not positive definite "
                        f"(smallest eigenvalue {ev.min():.3g})", section="correlation")
    return R


def validate_spec(spec: Mapping[str, Any]) -> None:
    """Raise :class:`SpecError` (naming the variable) if ``spec`` is invalid."""
    _parse_spec(spec)


def load_population_spec(path) -> dict:
    """Read a population spec from a TOML file (top level, or a ``[population]`` table)."""
    import tomllib
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    data = data.get("population", data)
    validate_spec(data)
    return data


# --------------------------------------------------------------------------- sampling
def _uniforms(method: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    if d == 0:
        return np.empty((n, 0))
    if method == "random":
        return rng.random((n, d))
    if method == "lhs":
        return qmc.LatinHypercube(d, scramble=True, rng=rng).random(n)
    if method == "sobol":
        with warnings.catch_warnings():  # n not a power of 2: balance is lost, still valid
            warnings.simplefilter("ignore", UserWarning)
            return qmc.Sobol(d, scramble=True, rng=rng).random(n)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def sample_population(spec: Mapping[str, Any], n: int, seed: int | None = None,
                      method: str = "random") -> xr.Dataset:
    """Draw ``n`` virtual patients from ``spec``.

    Returns an :class:`xarray.Dataset` with dimension ``patient`` (coordinate
    0..n-1), one variable per parameter/covariate (categoricals as strings), and
    attrs ``spec`` (JSON), ``seed``, ``method``.  ``seed=None`` draws a fresh seed
    and records it, so every population can be reproduced.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    variables, dims, R = _parse_spec(spec)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    rng = np.random.default_rng(seed)
    U = _uniforms(method, int(n), len(dims), rng)
    if len(dims) and not np.allclose(R, np.eye(len(dims))):
        Z = stats.norm.ppf(np.clip(U, _EPS, 1 - _EPS))
        U = stats.norm.cdf(Z @ np.linalg.cholesky(R).T)
    data = {}
    col = {id(v): i for i, v in enumerate(dims)}
    for v in variables:
        u = U[:, col[id(v)]] if v.uses_dim else None
        for k, x in v.transform(u, int(n)).items():
            data[k] = ("patient", np.asarray(x))
    ds = xr.Dataset(data, coords={"patient": np.arange(int(n))})
    ds.attrs.update(spec=json.dumps(spec, sort_keys=True, default=str), seed=int(seed), method=method)
    return ds
