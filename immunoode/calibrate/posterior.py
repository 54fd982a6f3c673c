"""Optional posterior sampling of the population parameters (lmfit's ``Minimizer.emcee``).

The rate fit's residual vector squares to ``χ² = 2·(NLL − NLL_saturated)`` (targets, priors,
ESS floors), so ``log p(φ | targets) = −χ²/2 + const`` inside the parameter bounds (flat
there unless a parameter declares a prior, which is already one of the residuals).  lmfit's
``emcee`` with ``is_weighted=True`` uses exactly ``−½·Σ r²`` as the log-probability, so the
residual function of :class:`~immunoode.calibrate.fit.RateFit` is passed unchanged.

Sampling runs on the cohorts simulated at the best mechanistic values (re-weighting only:
each step costs a few weighted sums); mechanistic parameters stay at their fitted values, so
the posterior is conditional on them.  Switched on by ``[stages] emcee_steps > 0``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

__all__ = ["Posterior", "sample_posterior"]


@dataclass
class Posterior:
    """Posterior samples of the varied population parameters.

    Attributes
    ----------
    samples
        pandas DataFrame, one column per varied population parameter, one row per kept
        sample (after burn-in and thinning, all walkers).
    acceptance
        Mean acceptance fraction of the walkers (0.2–0.5 is healthy).
    autocorr
        ``{name: integrated autocorrelation time (steps)}`` (emcee's estimate; NaN where
        the chain is too short to estimate it).
    settings
        Steps, walkers, burn-in, thinning and seed.
    """

    samples: object
    acceptance: float
    autocorr: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def summary(self, q=(0.025, 0.5, 0.975)) -> dict:
        """``{name: {"q2.5": .., "q50": .., "q97.5": .., "mean": .., "sd": ..}}``."""
        out = {}
        for name in self.samples.columns:
            x = np.asarray(self.samples[name], float)
            qs = np.quantile(x, q)
            row = {f"q{100 * p:g}": float(v) for p, v in zip(q, qs)}
            row["mean"] = float(x.mean())
            row["sd"] = float(x.std(ddof=1)) if x.size > 1 else float("nan")
            out[name] = row
        return out


def sample_posterior(rf, values: Mapping[str, float], data, *, steps: int, walkers: int = 0,
                     burn: int | None = None, thin: int = 1, seed: int = 0) -> Posterior:
    """Sample the population parameters' posterior with lmfit's emcee on fixed cohorts.

    Parameters
    ----------
    rf
        The fit's :class:`~immunoode.calibrate.fit.RateFit` (its ``residual``).
    values
        Start (best-fit) values of every parameter; walkers start in a small ball around it.
    data
        Simulated cohorts at the best mechanistic values (``rf.cohorts(...)``).
    steps, walkers, burn, thin
        emcee settings; ``walkers = 0`` means ``max(4·k, 16)`` for ``k`` varied parameters
        (even), ``burn = None`` discards the first quarter of the steps.
    seed
        Seed of the walkers' start and of the sampler (reproducible chains).
    """
    import lmfit
    if steps <= 0:
        raise ValueError("emcee steps must be positive")
    ps = rf.parameters(values)
    for name, p in rf.spec.parameters.items():
        if p.kind == "mechanistic":
            ps[name].vary = False
    varied = [k for k, p in ps.items() if p.vary]
    if not varied:
        raise ValueError("no varied population parameter to sample")
    k = len(varied)
    nw = int(walkers) if walkers else max(4 * k, 16)
    nw += nw % 2
    burn = steps // 4 if burn is None else int(burn)
    if not 0 <= burn < steps:
        raise ValueError(f"emcee burn-in {burn} must lie in [0, steps = {steps})")
    # walkers start in a ball of 1e-3 of each parameter's range around the optimum (clipped)
    rng = np.random.default_rng(seed)
    p0 = np.empty((nw, k))
    for j, name in enumerate(varied):
        p = ps[name]
        width = 1e-3 * (p.max - p.min)
        p0[:, j] = np.clip(p.value + width * rng.standard_normal(nw), p.min + 1e-12 * width,
                           p.max - 1e-12 * width)
    mini = lmfit.Minimizer(rf.residual, copy.deepcopy(ps), fcn_args=(data,), nan_policy="omit")
    # lmfit prints emcee's short-chain warning on stdout; the report flags short chains itself
    with contextlib.redirect_stdout(io.StringIO()):
        res = mini.emcee(params=ps, steps=int(steps), nwalkers=nw, burn=burn, thin=int(thin),
                         pos=p0, is_weighted=True, progress=False, seed=int(seed))
    samples = res.flatchain[varied].reset_index(drop=True)
    acc = float(np.mean(res.acceptance_fraction))
    tau = getattr(res, "acor", None)
    autocorr = ({n: float(t) for n, t in zip(varied, tau)} if tau is not None
                else {n: float("nan") for n in varied})
    return Posterior(samples, acc, autocorr,
                     {"steps": int(steps), "walkers": nw, "burn": burn, "thin": int(thin),
                      "seed": int(seed)})
