"""Zero-inflated patient variables: a share of patients exactly at 0 (e.g. no pre-existing
resistant subclone, f_res0 = 0), in the sampler, the exact densities, the re-weighting of
plausible cohorts and the fit file.  Checked against closed forms and direct draws."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from scipy import integrate, stats

from immunoode.calibrate.adapt import MixtureProposal, concat_cohorts, normalized_logpdf
from immunoode.calibrate.fit import FitFileError, load_fit
from immunoode.calibrate.vpop import (Cohort, PopulationModel, VariableModel,
                                      plausible_logpdf, weighted_rates)
from immunoode.sampling import SpecError, rescale_at_quantile, sample_population

from .synthetic_fit import EXAMPLE

BROAD = {"dist": "loguniform", "low": 1e-4, "high": 0.3, "zero": 0.5}


# --------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("method", ["random", "lhs", "sobol"])
def test_sampler_gives_the_share_of_zeros_and_the_marginal_elsewhere(method):
    n = 4096
    x = sample_population({"parameters": {"f": dict(BROAD, zero=0.3)}}, n, seed=4,
                          method=method)["f"].values
    zeros = np.mean(x == 0)
    if method == "random":
        assert abs(zeros - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    else:                                   # stratified: the share is exact to one patient
        assert abs(zeros - 0.3) <= 1.0 / n + 1e-12
    pos = x[x > 0]
    assert pos.min() >= 1e-4 and pos.max() <= 0.3
    assert stats.kstest(pos, stats.loguniform(1e-4, 0.3).cdf).pvalue > 1e-3


def test_zero_share_zero_is_the_plain_distribution():
    spec = {"dist": "lognormal", "median": 0.05, "cv": 1.0, "lower": 1e-4, "upper": 0.3}
    a = sample_population({"parameters": {"f": spec}}, 500, seed=9)["f"].values
    b = sample_population({"parameters": {"f": dict(spec, zero=0.0)}}, 500, seed=9)["f"].values
    assert np.array_equal(a, b)


@pytest.mark.parametrize("spec, match", [
    (dict(BROAD, zero=1.0), r"'zero'.*\[0, 1\)"),
    (dict(BROAD, zero=-0.1), r"'zero'.*\[0, 1\)"),
    (dict(BROAD, zero="half"), r"'zero'.*number"),
    ({"dist": "categorical", "categories": {"a": 1.0}, "zero": 0.2}, r"'zero' does not apply"),
    ({"dist": "fixed", "value": 1.0, "zero": 0.2}, r"'zero' does not apply"),
])
def test_bad_zero_share_is_a_clear_error(spec, match):
    with pytest.raises(SpecError, match=match) as exc:
        sample_population({"parameters": {"f_res0": spec}}, 10, seed=1)
    assert "f_res0" in str(exc.value)


def test_covariate_rescaling_keeps_zeros_and_ranks():
    spec = {"dist": "lognormal", "median": 0.05, "cv": 1.0, "lower": 1e-4, "upper": 0.3,
            "zero": 0.4}
    x = sample_population({"parameters": {"f": spec}}, 2000, seed=3)["f"].values
    y = rescale_at_quantile("f", spec, x, 2.0)
    assert np.array_equal(y == 0, x == 0)
    pos = x > 0
    assert np.all(np.diff(y[pos][np.argsort(x[pos])]) >= 0)
    # the continuous part is the shifted, truncated marginal (direct draw of the same)
    ref = sample_population({"parameters": {"f": dict(spec, median=0.1)}}, 2000, seed=8)["f"]
    assert stats.ks_2samp(y[pos], ref.values[ref.values > 0]).pvalue > 1e-3


# --------------------------------------------------------------------------- densities
@pytest.mark.parametrize("cont", [
    {"dist": "loguniform", "low": 1e-4, "high": 0.3},
    {"dist": "lognormal", "median": 0.05, "cv": 1.31, "lower": 1e-4, "upper": 0.3},
])
def test_zero_inflated_density_has_total_mass_one(cont):
    spec = dict(cont, zero=0.35)
    atom = math.exp(normalized_logpdf("f", spec, np.array([0.0]))[0])
    f = lambda u: float(np.exp(normalized_logpdf("f", spec, np.array([math.exp(u)]))[0])
                        * math.exp(u))  # noqa: E731
    cont_mass = integrate.quad(f, math.log(1e-4), math.log(0.3), limit=200)[0]
    assert atom == pytest.approx(0.35, rel=1e-12)
    assert atom + cont_mass == pytest.approx(1.0, rel=1e-6)
    # the plausible density used by the weights keeps the same relative masses
    x = np.array([0.0, 0.01, 0.1])
    d = plausible_logpdf("f", spec, x) - normalized_logpdf("f", spec, x)
    assert np.allclose(d, d[0])


def _cohort_from(spec, n, seed):
    x = sample_population({"parameters": {"f": spec}}, n, seed=seed, method="lhs")["f"].values
    c = Cohort("a", {"f": x}, plausible_logpdf("f", spec, x),
               {"evaluable": np.ones(n, bool)},
               attrs={"support": {"f": (spec.get("lower", spec.get("low")),
                                        spec.get("upper", spec.get("high")))}})
    return c


POP = PopulationModel((VariableModel("f", "lognormal", "m", 1.31, (), "p0"),))


def _truth(m, p0, c_cut, lo=1e-4, hi=0.3):
    """Closed forms of the target: P(f = 0), P(0 < f < c_cut), E[f]."""
    s = math.sqrt(math.log1p(1.31 ** 2))
    d = stats.lognorm(s=s, scale=m)
    mass = d.cdf(hi) - d.cdf(lo)
    below = (d.cdf(c_cut) - d.cdf(lo)) / mass
    mean = integrate.quad(lambda t: t * d.pdf(t), lo, hi, limit=200)[0] / mass
    return p0, (1 - p0) * below, (1 - p0) * mean


@pytest.mark.parametrize("vals", [{"m": 0.05, "p0": 0.2}, {"m": 0.01, "p0": 0.7},
                                  {"m": 0.05, "p0": 0.0}])
def test_reweighting_a_broad_cohort_reproduces_the_zero_inflated_target(vals):
    c = _cohort_from(BROAD, 40_000, 5)
    w = c.weights(POP, vals)
    x = c.x["f"]
    p_zero, p_below, mean = _truth(vals["m"], vals["p0"], 0.02)
    ind = np.stack([(x == 0), (x > 0) & (x < 0.02)]).astype(float)
    rate, se, _ = weighted_rates(ind, np.ones_like(ind), w)
    assert abs(rate[0] - p_zero) <= 4 * se[0] + 1e-12
    assert abs(rate[1] - p_below) < 4 * se[1]
    se_mean = math.sqrt(np.sum(w ** 2 * (x - np.sum(w * x)) ** 2))
    assert abs(np.sum(w * x) - mean) < 4 * se_mean


def test_mixture_proposal_with_zeros_is_exact_and_raises_the_ess():
    vals = {"m": 0.02, "p0": 0.6}
    prop = MixtureProposal.build(POP, vals, {"f": BROAD}, {}, {}, n=20_000, defensive=0.2,
                                 inflation=1.3, seed=3, round_=1)
    assert prop.fitted["f"]["zero"] == pytest.approx(0.6)
    parts = []
    for specs, n, seed in ((prop.fitted, prop.n_fitted, prop.seeds[0]),
                           (prop.broad, prop.n_broad, prop.seeds[1])):
        parts.append(_cohort_from(specs["f"], n, seed))
    c = concat_cohorts(parts)
    c.log_q = prop.log_q(c.x)
    x = c.x["f"]
    for target in (vals, {"m": 0.05, "p0": 0.3}):
        w = c.weights(POP, target)
        p_zero, p_below, _ = _truth(target["m"], target["p0"], 0.02)
        ind = np.stack([(x == 0), (x > 0) & (x < 0.02)]).astype(float)
        rate, se, _ = weighted_rates(ind, np.ones_like(ind), w)
        assert abs(rate[0] - p_zero) < 4 * se[0]
        assert abs(rate[1] - p_below) < 4 * se[1]
    broad = _cohort_from(BROAD, 20_000, 5)
    ess = lambda w: 1 / np.sum(w ** 2)  # noqa: E731
    ess_mix, ess_broad = ess(c.weights(POP, vals)), ess(broad.weights(POP, vals))
    assert ess_mix > 0.85 * c.size
    assert ess_mix > 1.25 * ess_broad


# --------------------------------------------------------------------------- fit file
def _zero_share_example(tmp_path, ref: str):
    """The example fit with its first population variable made zero-inflated (zero = ref);
    returns (fit file, variable)."""
    d = tmp_path / "ex"
    shutil.copytree(EXAMPLE, d)
    f = d / "two_clone_fit.toml"
    text = f.read_text()
    var = next(line.split(".")[1].rstrip("]") for line in text.splitlines()
               if line.startswith("[population."))
    f.write_text(text.replace(f"[population.{var}]", f"[population.{var}]\nzero = \"{ref}\"", 1)
                 + '\n[parameters.p_zero]\nkind = "population"\nvalue = 0.3\nmin = 0.0\n'
                   'max = 0.9\n')
    return f, var


def test_fit_file_zero_share_needs_zeros_in_the_plausible_cohort(tmp_path):
    from immunoode.calibrate.fit import RateFit
    f, var = _zero_share_example(tmp_path, "p_zero")
    spec = load_fit(f)
    assert next(v for v in spec.population.variables if v.name == var).zero == "p_zero"
    with pytest.raises(FitFileError, match=rf"{var}.*zero-inflated.*no share of zeros") as exc:
        RateFit(spec)
    assert "two_clone_fit.toml" in str(exc.value)


def test_fit_file_zero_share_must_be_a_declared_parameter(tmp_path):
    f, _ = _zero_share_example(tmp_path, "p_zer")
    with pytest.raises(FitFileError, match=r"unknown parameter 'p_zer'"):
        load_fit(f)


# --------------------------------------------------------------------------- shipped calibration
def test_shipped_nsclc_fit_declares_the_escape_clone_share_consistently():
    """fits/nsclc_icis.toml: f_res0 is zero-inflated in the fit file and in every arm's
    plausible cohort (RateFit checks both), and the editing flux is off."""
    from pathlib import Path
    from immunoode.calibrate.fit import RateFit
    spec = load_fit(Path(__file__).resolve().parents[1] / "fits" / "nsclc_icis.toml")
    v = next(v for v in spec.population.variables if v.name == "f_res0")
    assert v.zero == "p_no_clone" and spec.parameters["p_no_clone"].vary
    assert spec.parameters["mu_edit"].value == 0.0 and not spec.parameters["mu_edit"].vary
    rf = RateFit(spec)
    for arm in spec.arms:
        assert 0 < rf.broad(arm)["f_res0"]["zero"] < 1
