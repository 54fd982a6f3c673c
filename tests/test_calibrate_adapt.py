"""Adaptive plausible cohorts (iterated importance sampling, immunoode.calibrate.adapt) and
the fresh-cohort validation stage: normalised densities against quadrature, exactness of
the defensive-mixture weights (weighted means and rates against closed forms), the effective
sample size rising after adaptation, parameter recovery, validation against the truth,
same-seed reproducibility and fit-file errors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats

from immunoode.calibrate.adapt import (MixtureProposal, concat_cohorts, fitted_component,
                                       normalized_logpdf, round_seed)
from immunoode.calibrate.fit import FitFileError, RateFit, load_fit, run_fit
from immunoode.calibrate.vpop import Cohort, PopulationModel, VariableModel, weighted_rates
from immunoode.sampling import sample_population

from .synthetic_fit import EXAMPLE, TRUTH, synthetic_fit_file


# --------------------------------------------------------------------------- densities
@pytest.mark.parametrize("spec, support", [
    ({"dist": "uniform", "low": 0.05, "high": 0.9}, (0.05, 0.9)),
    ({"dist": "loguniform", "low": 1e-4, "high": 0.3}, (1e-4, 0.3)),
    ({"dist": "lognormal", "median": 0.02, "sigma": 1.3, "lower": 1e-4, "upper": 0.3},
     (1e-4, 0.3)),
    ({"dist": "lognormal", "median": 0.2, "cv": 0.8, "lower": 0.02, "upper": 1.5}, (0.02, 1.5)),
    ({"dist": "lognormal", "mean": 5.5, "cv": 0.8}, (0.0, math.inf)),
    ({"dist": "normal", "mean": 75.0, "sd": 15.0, "lower": 40.0, "upper": 140.0}, (40.0, 140.0)),
    ({"dist": "lognormal", "median": 3.0, "sigma": 0.5, "lower": 0.1, "upper": 0.4}, (0.1, 0.4)),
])
def test_normalized_logpdf_integrates_to_one(spec, support):
    lo, hi = support
    f = lambda t: float(np.exp(normalized_logpdf("v", spec, np.array([t]))[0]))  # noqa: E731
    if spec["dist"] in ("loguniform", "lognormal"):  # integrate in log space (wide ranges)
        a = math.log(lo) if lo > 0 else math.log(spec.get("median", 1.0)) - 40
        b = math.log(hi) if math.isfinite(hi) else math.log(spec.get("median", 5.0)) + 40
        total = integrate.quad(lambda u: f(math.exp(u)) * math.exp(u), a, b, limit=400)[0]
    else:
        total = integrate.quad(f, lo, hi, limit=200)[0]
    assert total == pytest.approx(1.0, rel=1e-6)
    # outside the support: zero density
    if lo > 0:
        assert normalized_logpdf("v", spec, np.array([0.5 * lo]))[0] == -np.inf


def test_normalized_logpdf_matches_scipy_and_the_sampler():
    spec = {"dist": "lognormal", "median": 0.02, "sigma": 1.1, "lower": 1e-3, "upper": 0.5}
    d = stats.lognorm(s=1.1, scale=0.02)
    x = np.array([0.002, 0.02, 0.3])
    ref = np.log(d.pdf(x) / (d.cdf(0.5) - d.cdf(1e-3)))
    assert np.allclose(normalized_logpdf("v", spec, x), ref, rtol=1e-12)
    # what immunoode.sampling draws from this spec has exactly this distribution
    draw = sample_population({"parameters": {"v": spec}}, 20_000, seed=1, method="random")["v"]
    trunc_cdf = lambda t: (d.cdf(t) - d.cdf(1e-3)) / (d.cdf(0.5) - d.cdf(1e-3))  # noqa: E731
    assert stats.kstest(draw.values, trunc_cdf).pvalue > 1e-3


# --------------------------------------------------------------------------- mixture weights
def _mixture_cohort(prop: MixtureProposal, extra=None):
    parts = []
    for specs, n, seed in ((prop.fitted, prop.n_fitted, prop.seeds[0]),
                           (prop.broad, prop.n_broad, prop.seeds[1])):
        pop = sample_population({"parameters": dict(specs, **(extra or {}))}, n, seed=seed,
                                method="lhs")
        x = {k: pop[k].values.astype(float) for k in specs}
        pc = {k: pop[k].values.astype(float) for k in (extra or {})}
        o = {"evaluable": np.ones(n, bool)}
        parts.append(Cohort("a", x, np.zeros(n), o, {}, pc))
    c = concat_cohorts(parts)
    c.log_q = prop.log_q(c.x)
    return c


def test_mixture_weights_reproduce_the_truncated_target_exactly():
    lo, hi = 1e-3, 1.0
    broad = {"k": {"dist": "loguniform", "low": lo, "high": hi}}
    pop = PopulationModel((VariableModel("k", "lognormal", "m", "cv"),))
    fitted = {"m": 0.05, "cv": 0.6}
    prop = MixtureProposal.build(pop, fitted, broad, {}, {}, n=40_000, defensive=0.2,
                                 inflation=1.5, seed=11, round_=1)
    assert (prop.n_fitted, prop.n_broad) == (32_000, 8_000)
    c = _mixture_cohort(prop)
    # a target away from the proposal centre: the weights must still be exact
    for vals in ({"m": 0.05, "cv": 0.6}, {"m": 0.08, "cv": 0.9}):
        w = c.weights(pop, vals)
        s = math.sqrt(math.log1p(vals["cv"] ** 2))
        d = stats.lognorm(s=s, scale=vals["m"])
        mass = d.cdf(hi) - d.cdf(lo)
        mean = integrate.quad(lambda t: t * d.pdf(t), lo, hi, limit=200)[0] / mass
        x = c.x["k"]
        assert np.sum(w) == pytest.approx(1.0)
        se_mean = math.sqrt(np.sum(w ** 2 * (x - np.sum(w * x)) ** 2))
        assert abs(np.sum(w * x) - mean) < 4 * se_mean
        ind = (x < 0.04).astype(float)[None, :]
        rate, se, _ = weighted_rates(ind, np.ones_like(ind), w)
        exact = (d.cdf(0.04) - d.cdf(lo)) / mass
        assert abs(rate[0] - exact) < 4 * se[0]
        assert se[0] < 0.005
    # the same population on a broad cohort of the same size has a far smaller ESS
    xb = np.exp(np.random.default_rng(2).uniform(math.log(lo), math.log(hi), 40_000))
    cb = Cohort("a", {"k": xb}, np.log(1 / xb), {"evaluable": np.ones(xb.size, bool)})
    wb, wm = cb.weights(pop, fitted), c.weights(pop, fitted)
    ess_b, ess_m = 1 / np.sum(wb ** 2), 1 / np.sum(wm ** 2)
    assert ess_m > 0.5 * 40_000
    assert ess_m > 2 * ess_b


def test_marginal_proposal_of_a_patient_covariate_effect_is_reweighted_to_the_conditional():
    # log k = log m + beta * tps + sigma z, tps ~ U(50, 100): the proposal is the marginal
    lo, hi = 1e-3, 10.0
    broad = {"k": {"dist": "loguniform", "low": lo, "high": hi}}
    pop = PopulationModel((VariableModel("k", "lognormal", "m", "cv", (("tps", "beta"),)),))
    vals = {"m": 0.02, "cv": 0.4, "beta": 0.03}
    tps = {"tps": np.random.default_rng(5).uniform(50, 100, 50_000)}
    g = fitted_component(pop, vals, broad, {}, tps, inflation=1.0)
    sigma = math.sqrt(math.log1p(0.4 ** 2))
    assert g["k"]["median"] == pytest.approx(0.02 * math.exp(0.03 * np.mean(tps["tps"])))
    assert g["k"]["sigma"] == pytest.approx(math.sqrt(sigma ** 2 + 0.03 ** 2 * np.var(tps["tps"])))
    prop = MixtureProposal.build(pop, vals, broad, {}, tps, n=30_000, defensive=0.1,
                                 inflation=1.3, seed=3, round_=1)
    c = _mixture_cohort(prop, extra={"tps": {"dist": "uniform", "low": 50.0, "high": 100.0}})
    w = c.weights(pop, vals)
    lx, t = np.log(c.x["k"]), c.patient_covariates["tps"]
    # weighted least squares of log k on tps recovers the conditional model
    X = np.column_stack([np.ones_like(t), t])
    beta = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * lx))
    assert beta[1] == pytest.approx(0.03, abs=0.002)
    assert beta[0] == pytest.approx(math.log(0.02), abs=0.1)
    resid = lx - X @ beta
    assert math.sqrt(np.sum(w * resid ** 2)) == pytest.approx(sigma, rel=0.05)


def test_round_seeds_are_deterministic_and_distinct():
    seeds = {round_seed(7, r, part) for r in range(4) for part in range(3)}
    assert len(seeds) == 12
    assert round_seed(7, 2, 0) == round_seed(7, 2, 0)


# --------------------------------------------------------------------------- fit files
def _example(tmp_path) -> Path:
    d = tmp_path / "ex"
    shutil.copytree(EXAMPLE, d)
    return d


def test_defaults_keep_todays_behaviour(tmp_path):
    spec = load_fit(_example(tmp_path) / "two_clone_fit.toml")
    assert spec.cohort["adapt_rounds"] == 0
    assert spec.stages["validate_n"] == 0


@pytest.mark.parametrize("line, match", [
    ("adapt_rounds = -1", r"\[cohort\].*'adapt_rounds' must be >= 0"),
    ("adapt_defensive = 1.0", r"\[cohort\].*'adapt_defensive'.*\[0, 1\)"),
    ("adapt_inflation = 0", r"\[cohort\].*'adapt_inflation' must be > 0"),
    ("adapt_roundz = 1", r"\[cohort\].*unknown key 'adapt_roundz'.*did you mean 'adapt_rounds'"),
])
def test_bad_adaptation_keys_are_clear_errors(tmp_path, line, match):
    f = _example(tmp_path) / "two_clone_fit.toml"
    f.write_text(f.read_text().replace("min_ess = 50", f"min_ess = 50\n{line}"))
    with pytest.raises(FitFileError, match=match) as exc:
        load_fit(f)
    assert "two_clone_fit.toml" in str(exc.value)


# --------------------------------------------------------------------------- fits
@pytest.fixture(scope="session")
def adapted(tmp_path_factory):
    """Synthetic targets from TRUTH (directly drawn cohorts), fitted from a perturbed start
    on a small plausible cohort with one adaptation round and a fresh validation cohort."""
    f, rates, targets = synthetic_fit_file(tmp_path_factory.mktemp("adapt"), [
        ("value = 0.015", "value = 0.02"), ("n = 1500", "n = 800\nadapt_rounds = 1"),
        ("global_maxiter = 25", "global_maxiter = 10\nvalidate_n = 1000")])
    return run_fit(f), f, rates, targets


def test_adaptation_raises_the_effective_sample_size(adapted):
    result = adapted[0]
    assert [r["round"] for r in result.rounds] == [0, 1]
    r0, r1 = result.rounds
    for arm in result.spec.arms:
        assert r1["n"][arm] == r0["n"][arm] == 800
        assert r1["ess"][arm] > 2 * r0["ess"][arm]
        assert r1["ess"][arm] > 0.35 * 800
        assert result.ess[arm] == pytest.approx(r1["ess"][arm])
    assert "adapt round 1 (mixture cohorts, global check, local)" in result.stages
    prop = r1["proposals"]["a"]
    assert (prop["n_fitted"], prop["n_broad"]) == (640, 160)
    assert prop["seeds"][0] != result.spec.seed


def test_adapted_fit_recovers_the_truth(adapted):
    result = adapted[0]
    identified = [k for k, (_, _, flag) in result.intervals.items() if not flag]
    assert set(identified) >= {"e_median", "e_cv", "e_prior"}
    for k in identified:
        lo, hi, _ = result.intervals[k]
        assert lo <= TRUTH[k] <= hi, (k, lo, TRUTH[k], hi)
    assert result.table[result.table.role == "fit"].met.all()


def test_validation_cohort_is_fresh_and_agrees_with_the_in_sample_rates(adapted):
    result = adapted[0]
    v = result.validation
    assert v["n"] == 1000 and v["seed"] not in (result.spec.seed,)
    assert v["seed"] == round_seed(result.spec.seed, 10 ** 6, 2)
    # no patient covariate effect: the fresh cohort is drawn from the fitted population
    # itself, so every weight is 1/n
    for arm, e in v["ess"].items():
        assert e == pytest.approx(1000, rel=1e-9)
    tab, vt = result.table.set_index("id"), v["table"].set_index("id")
    for tid in tab.index:
        a, b = tab.loc[tid], vt.loc[tid]
        assert abs(a["simulated"] - b["simulated"]) < 4 * math.hypot(a["mc_se"], b["mc_se"]), tid
    fit_v = vt[vt.role == "fit"]
    assert fit_v.met.sum() >= len(fit_v) - 1


def test_validation_at_the_truth_reproduces_directly_simulated_truth(adapted):
    from immunoode.calibrate.synthetic import simulate_true_rates
    result, f, _, targets = adapted
    rf = RateFit(load_fit(f))
    vdata = rf.validation_cohorts(TRUTH, 1500, seed=99)
    stats_v, ess = rf.simulate_statistics(TRUTH, vdata)
    direct = simulate_true_rates(rf.spec, TRUTH, targets, n=4000, seed=4242)
    for t in targets:
        rate, se = stats_v[t.id]
        p = direct[t.id]
        se_direct = math.sqrt(max(p * (1 - p), 1e-4) / 4000)
        assert abs(rate - p) < 4 * math.hypot(se, se_direct) + 1e-3, (t.id, rate, p, se)
    assert all(e == pytest.approx(1500) for e in ess.values())


def test_same_seed_reproduces_the_adapted_fit(adapted):
    result, f = adapted[0], adapted[1]
    again = run_fit(f, profiles=False)
    assert again.values == result.values
    assert again.chisqr == result.chisqr
    assert [r["ess"] for r in again.rounds] == [r["ess"] for r in result.rounds]
    assert again.validation["stats"] == result.validation["stats"]


def test_report_shows_rounds_and_the_fresh_cohort(adapted, tmp_path):
    import pandas as pd
    from immunoode.calibrate.report import fit_report, write_fit_outputs
    result = adapted[0]
    text = fit_report(result)
    assert "[[Cohort rounds]]" in text and "round 1:" in text
    assert "FRESH COHORT (1000 patients per arm" in text
    write_fit_outputs(result, tmp_path / "out")
    tab = pd.read_csv(tmp_path / "out" / "targets_vs_simulated.csv")
    assert {"validation_pct", "validation_se_pct", "validation_met"} <= set(tab.columns)


def test_reported_optimum_is_the_best_point_on_the_final_cohorts(adapted):
    """No mechanistic point simulated on the final round's cohorts (local stage or profile)
    has a lower χ² than the reported optimum: a better profile point is adopted."""
    result = adapted[0]
    last = result.rounds[-1]["round"]
    final = [g for g in result.grid if g.get("round") == last]
    assert len(final) >= 3
    assert min(g["chisqr"] for g in final) >= result.chisqr - 1e-9
    ad = result.attrs.get("adopted_from_profile")
    if ad:
        assert ad["chisqr_to"] < ad["chisqr_from"]
        assert result.values[ad["parameter"]] == pytest.approx(ad["to"])
