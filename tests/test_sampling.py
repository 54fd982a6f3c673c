"""Population sampling: marginals, correlations, LHS strata, reproducibility, spec errors."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from immunoode.errors import ModelError
from immunoode.sampling import SpecError, load_population_spec, sample_population, validate_spec

SPEC = {
    "parameters": {
        "k_grow": {"dist": "lognormal", "median": 0.02, "cv": 0.5},
        "k_kill": {"dist": "normal", "mean": 1.0, "sd": 0.3, "lower": 0.5, "upper": 2.0},
        "f_pen": {"dist": "uniform", "low": 0.2, "high": 0.8},
        "V0": {"dist": "lognormal", "mean": 50.0, "cv": 0.4},
        "arm": {"dist": "categorical", "categories": {"A": 0.25, "B": 0.75}},
        "dose": {"dist": "fixed", "value": 200.0},
    },
    "covariates": {
        "pdl1": {"prevalence": {"<1%": 0.3, "1-49%": 0.4, ">=50%": 0.3}},
        "tmb": {"median": 8.0, "cv": 1.0},
        "driver": {"prevalence": {"none": 0.6, "EGFR": 0.15, "ALK": 0.05, "KRAS": 0.2}},
    },
}


def ks_ok(x, cdf):
    return stats.kstest(x, cdf).pvalue > 1e-3


@pytest.mark.parametrize("method", ["random", "lhs", "sobol"])
def test_marginals(method):
    n = 8192
    ds = sample_population(SPEC, n, seed=11, method=method)
    s = math.sqrt(math.log1p(0.5 ** 2))
    assert ks_ok(ds.k_grow.values, stats.lognorm(s=s, scale=0.02).cdf)
    tn = stats.truncnorm((0.5 - 1) / 0.3, (2 - 1) / 0.3, loc=1, scale=0.3)
    assert ks_ok(ds.k_kill.values, tn.cdf)
    assert ds.k_kill.values.min() >= 0.5 and ds.k_kill.values.max() <= 2.0
    assert ks_ok(ds.f_pen.values, stats.uniform(0.2, 0.6).cdf)
    assert ds.V0.values.mean() == pytest.approx(50.0, rel=0.02)           # mean-parameterised
    assert ds.V0.values.std() / ds.V0.values.mean() == pytest.approx(0.4, rel=0.06)
    assert np.all(ds.dose.values == 200.0)
    for var, probs in (("arm", {"A": 0.25, "B": 0.75}),
                       ("driver", SPEC["covariates"]["driver"]["prevalence"]),
                       ("pdl1_category", SPEC["covariates"]["pdl1"]["prevalence"])):
        for lab, p in probs.items():
            f = np.mean(ds[var].values == lab)
            assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (var, lab, f)
    assert ks_ok(ds.tmb.values, stats.lognorm(s=math.sqrt(math.log(2.0)), scale=8.0).cdf)


def test_pdl1_tps_lies_in_its_category():
    ds = sample_population(SPEC, 5000, seed=3)
    cat, tps = ds.pdl1_category.values, ds.pdl1_tps.values
    assert np.all(tps[cat == "<1%"] < 1) and np.all(tps[cat == "<1%"] >= 0)
    assert np.all((tps[cat == "1-49%"] >= 1) & (tps[cat == "1-49%"] < 50))
    assert np.all((tps[cat == ">=50%"] >= 50) & (tps[cat == ">=50%"] <= 100))
    # uniform within the category
    x = tps[cat == "1-49%"]
    assert ks_ok(x, stats.uniform(1, 49).cdf)


@pytest.mark.parametrize("method", ["random", "lhs", "sobol"])
def test_correlations_via_gaussian_copula(method):
    spec = dict(SPEC, correlation={"names": ["k_grow", "k_kill", "f_pen"],
                                   "matrix": [[1, -0.6, 0.3], [-0.6, 1, 0.0], [0.3, 0.0, 1]]})
    ds = sample_population(spec, 16384, seed=5, method=method)
    z = {k: stats.norm.ppf(stats.rankdata(ds[k].values) / (ds.sizes["patient"] + 1))
         for k in ("k_grow", "k_kill", "f_pen", "V0")}
    r = lambda a, b: np.corrcoef(z[a], z[b])[0, 1]  # noqa: E731
    assert r("k_grow", "k_kill") == pytest.approx(-0.6, abs=0.03)
    assert r("k_grow", "f_pen") == pytest.approx(0.3, abs=0.03)
    assert abs(r("k_kill", "f_pen")) < 0.03 and abs(r("k_grow", "V0")) < 0.03
    # the marginal is unchanged by the copula
    s = math.sqrt(math.log1p(0.25))
    assert ks_ok(ds.k_grow.values, stats.lognorm(s=s, scale=0.02).cdf)


def test_correlation_with_a_covariate_via_pairs():
    spec = dict(SPEC, correlation={"pairs": [["pdl1", "tmb", 0.5]]})
    ds = sample_population(spec, 20000, seed=2)
    rho = stats.spearmanr(ds.pdl1_tps.values, ds.tmb.values)[0]
    assert rho > 0.4
    assert abs(stats.spearmanr(ds.pdl1_tps.values, ds.k_grow.values)[0]) < 0.03


def test_lhs_stratification():
    n = 200
    ds = sample_population(SPEC, n, seed=9, method="lhs")
    # every one of n equal-probability strata holds exactly one patient, for each variable
    u_fpen = (ds.f_pen.values - 0.2) / 0.6
    s = math.sqrt(math.log1p(0.25))
    u_k = stats.lognorm(s=s, scale=0.02).cdf(ds.k_grow.values)
    for u in (u_fpen, u_k):
        np.testing.assert_array_equal(np.sort(np.floor(u * n).astype(int)), np.arange(n))
    # plain random draws are not stratified
    r = sample_population(SPEC, n, seed=9, method="random")
    assert len(np.unique(np.floor((r.f_pen.values - 0.2) / 0.6 * n))) < n


@pytest.mark.parametrize("method", ["random", "lhs", "sobol"])
def test_same_seed_same_population(method):
    a = sample_population(SPEC, 300, seed=42, method=method)
    b = sample_population(SPEC, 300, seed=42, method=method)
    c = sample_population(SPEC, 300, seed=43, method=method)
    for k in a.data_vars:
        np.testing.assert_array_equal(a[k].values, b[k].values)
    assert not np.array_equal(a.k_grow.values, c.k_grow.values)
    assert a.attrs["seed"] == 42 and a.attrs["method"] == method
    assert json.loads(a.attrs["spec"]) == json.loads(json.dumps(SPEC))


def test_seed_none_is_recorded_and_reproduces():
    a = sample_population(SPEC, 50)
    b = sample_population(SPEC, 50, seed=a.attrs["seed"])
    np.testing.assert_array_equal(a.k_grow.values, b.k_grow.values)
    assert a.sizes["patient"] == 50 and list(a.patient.values) == list(range(50))


def test_toml_spec(tmp_path):
    p = tmp_path / "pop.toml"
    p.write_text("""
[population.parameters.k_grow]
dist = "lognormal"
median = 0.02
cv = 0.5

[population.covariates.pdl1]
prevalence = { "<1%" = 0.3, "1-49%" = 0.4, ">=50%" = 0.3 }

[population.correlation]
pairs = [["k_grow", "pdl1", -0.3]]
""")
    spec = load_population_spec(p)
    ds = sample_population(spec, 100, seed=1, method="sobol")
    assert set(ds.data_vars) == {"k_grow", "pdl1_category", "pdl1_tps"}


@pytest.mark.parametrize("spec, where, what", [
    ({"parameters": {"a": {"dist": "gamma", "k": 1}}}, "'a'", "unknown dist"),
    ({"parameters": {"a": {"dist": "lognormal", "median": 1}}}, "'a'", "cv"),
    ({"parameters": {"a": {"dist": "lognormal", "median": -1, "cv": 0.1}}}, "'a'", "> 0"),
    ({"parameters": {"a": {"dist": "lognormal", "median": 1, "mean": 1, "cv": 0.1}}}, "'a'", "median"),
    ({"parameters": {"a": {"dist": "normal", "mean": 1, "sd": 1, "lower": 3, "upper": 2}}}, "'a'", "lower < upper"),
    ({"parameters": {"a": {"dist": "normal", "mean": 0, "sd": 1e-3, "lower": 50}}}, "'a'", "no probability"),
    ({"parameters": {"a": {"dist": "uniform", "low": 2, "high": 1}}}, "'a'", "low < high"),
    ({"parameters": {"a": {"dist": "normal", "mean": 1, "sd": 1, "scale": 2}}}, "'a'", "unknown key"),
    ({"parameters": {"a": {"dist": "normal", "mean": "x", "sd": 1}}}, "'a'", "finite number"),
    ({"parameters": {"c": {"dist": "categorical", "categories": {"x": 0.5, "y": 0.4}}}}, "'c'", "sum to 1"),
    ({"covariates": {"driver": {"prevalence": {"EGFR": -0.1, "none": 1.1}}}}, "'driver'", ">= 0"),
    ({"covariates": {"pdl1": {"prevalence": {"low": 1.0}}}}, "'pdl1'", "TPS bounds"),
    ({"parameters": {"a": {"dist": "uniform", "low": 0, "high": 1}},
      "correlation": {"pairs": [["a", "b", 0.5]]}}, "'b'", "not a sampled variable"),
    ({"parameters": {"a": {"dist": "uniform", "low": 0, "high": 1}},
      "correlation": {"pairs": [["a", "a", 0.5]]}}, "correlation", "same variable"),
    ({"parameters": {k: {"dist": "uniform", "low": 0, "high": 1} for k in "abc"},
      "correlation": {"names": ["a", "b", "c"],
                      "matrix": [[1, 0.9, -0.9], [0.9, 1, 0.9], [-0.9, 0.9, 1]]}},
     "correlation", "not positive definite"),
    ({"parameters": {k: {"dist": "uniform", "low": 0, "high": 1} for k in "ab"},
      "correlation": {"names": ["a", "b"], "matrix": [[1, 0.5], [0.4, 1]]}}, "correlation", "symmetric"),
    ({"parameters": {"a": {"dist": "uniform", "low": 0, "high": 1}},
      "correlation": {"pairs": [["a", "a", 1.5]]}}, "correlation", "[-1, 1]"),
    ({"parameters": {"tmb": {"dist": "uniform", "low": 0, "high": 1}},
      "covariates": {"tmb": {"median": 1, "cv": 1}}}, "'tmb'", "defined twice"),
    ({"parameters": {}}, "", "no parameters"),
    ({"params": {}}, "", "unknown section"),
])
def test_invalid_specs_name_the_variable(spec, where, what):
    with pytest.raises(SpecError) as ei:
        validate_spec(spec)
    msg = str(ei.value)
    assert where in msg and what in msg, msg
    assert isinstance(ei.value, ModelError)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        sample_population(SPEC, 10, seed=1, method="halton")
    with pytest.raises(ValueError, match="positive integer"):
        sample_population(SPEC, 0, seed=1)
