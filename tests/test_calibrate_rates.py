"""Calibration to clinical rates: likelihood (hand-computed cases), target and fit-file
errors, importance re-weighting against closed forms, parameter recovery on synthetic
targets, reproducibility, report files and the ``immunoode fit`` command."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats

from immunoode.calibrate.fit import FitFileError, RateFit, load_fit, run_fit
from immunoode.calibrate.likelihood import (Likelihood, binomial_loglik, binomial_nll,
                                            interval_nll, multinomial_nll, prior_nll)
from immunoode.calibrate.targets import TargetError, load_targets
from immunoode.calibrate.vpop import Cohort, PopulationModel, VariableModel, weighted_rates

ROOT = Path(__file__).resolve().parents[1]
from .synthetic_fit import EXAMPLE, TRUTH, synthetic_fit_file
HEADER = ("id,statistic,arm,kind,value,low,high,n,landmark_days,window_days,group,role,"
          "source_ids,trial_or_study,source,note\n")


# --------------------------------------------------------------------------- likelihood
def test_binomial_nll_matches_hand_computation_and_scipy():
    # 44 of 100 observed, simulated p = 0.3
    hand = 44 * math.log(0.44 / 0.3) + 56 * math.log(0.56 / 0.7)
    assert binomial_nll(0.3, 44, 100) == pytest.approx(hand, rel=1e-12)
    assert binomial_nll(0.44, 44, 100) == pytest.approx(0.0, abs=1e-12)
    assert binomial_loglik(0.3, 44, 100) == pytest.approx(stats.binom.logpmf(44, 100, 0.3))
    # deviance half = loglik(p_hat) - loglik(p)
    assert binomial_nll(0.3, 44, 100) == pytest.approx(
        stats.binom.logpmf(44, 100, 0.44) - stats.binom.logpmf(44, 100, 0.3))
    # k = 0 and k = n are finite
    assert binomial_nll(0.1, 0, 20) == pytest.approx(-20 * math.log(0.9))
    assert binomial_nll(0.9, 20, 20) == pytest.approx(-20 * math.log(0.9))


def test_multinomial_nll_matches_hand_computation_and_scipy():
    shares, p, n = [0.5, 0.3, 0.2], [0.4, 0.4, 0.2], 10
    hand = 5 * math.log(0.5 / 0.4) + 3 * math.log(0.3 / 0.4)
    assert multinomial_nll(p, shares, n) == pytest.approx(hand, rel=1e-12)
    k = [5, 3, 2]
    ref = stats.multinomial.logpmf(k, n, shares) - stats.multinomial.logpmf(k, n, p)
    assert multinomial_nll(p, shares, n) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("x, lo, hi, expected", [
    (0.24, 0.21, 0.27, 0.0),
    (0.21, 0.21, 0.27, 0.0),
    (0.15, 0.21, 0.27, 0.5 * (0.06 / 0.025) ** 2),
    (0.30, 0.21, 0.27, 0.5 * (0.03 / 0.025) ** 2),
    (0.35, 0.40, 1.00, 0.5 * (0.05 / 0.025) ** 2),   # lower bound only
], ids=["inside", "at-low-end", "below", "above", "open-upper-end"])
def test_interval_penalty_hand_values(x, lo, hi, expected):
    assert float(interval_nll(x, lo, hi)) == pytest.approx(expected, rel=1e-12)


def test_priors_hand_values():
    assert prior_nll(1.0, None) == 0.0
    assert prior_nll(2.0, {"dist": "normal", "mean": 1.0, "sd": 0.5}) == pytest.approx(2.0)
    assert prior_nll(math.e, {"dist": "lognormal", "median": 1.0, "sigma": 1.0}) == pytest.approx(0.5)
    # 'range' on the log scale: the bounds are the central 95 %
    assert prior_nll(0.1, {"dist": "range"}, bounds=(0.01, 1.0), log_scale=True) == pytest.approx(0.0)
    assert prior_nll(1.0, {"dist": "range"}, bounds=(0.01, 1.0), log_scale=True) == pytest.approx(
        0.5 * 1.959963984540054 ** 2)


def test_likelihood_residuals_square_to_twice_the_nll(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text(HEADER + "A,orr,a,binomial,40,,,50,,,,fit,,,src,\n"
                 "B,bor_pd,a,interval,,20,30,,,,,fit,,,src,\n"
                 "C,ar_timing,a,multinomial,60,,,40,,0-365,g,fit,,,src,\n"
                 "D,ar_timing,a,multinomial,40,,,40,,365-,g,fit,,,src,\n"
                 "E,orr,a,binomial,10,,,50,,,,heldout,,,src,\n")
    lk = Likelihood(load_targets(f))
    assert lk.names == ("A", "B", "a/g")          # held-out rows are not in the objective
    ts = lk.terms({"A": 0.3, "B": 0.35, "C": 0.5, "D": 0.5})
    expected = [binomial_nll(0.3, 20, 50), 0.5 * (0.05 / 0.025) ** 2,
                multinomial_nll([0.5, 0.5], [0.6, 0.4], 40)]
    np.testing.assert_allclose(ts.nll, expected, rtol=1e-12)
    assert np.sum(ts.residuals ** 2) == pytest.approx(2 * sum(expected))


# --------------------------------------------------------------------------- targets
def test_shipped_target_table_keeps_sources():
    tab = load_targets(ROOT / "fits" / "nsclc_targets.csv")
    assert set(tab.arms) == {"1l_ici_mono", "1l_ici_ici", "1l_ici_chemo", "2l_ici"}
    assert all(t.source for t in tab)
    t05 = next(t for t in tab if t.id == "T05")
    assert (t05.kind, t05.value, t05.n) == ("binomial", 0.44, 425)
    assert next(t for t in tab if t.id == "T04").bounds() == (0.40, 1.0)
    assert len(tab.select(role="heldout")) >= 3


@pytest.mark.parametrize("rows, match", [
    ("", r"empty\.csv.*no rows"),
    ("A,orr,a,binomial,40,,,,,,,fit,,,src,\n", r"'A'.*needs both 'value'.*'n'"),
    ("A,orr,a,bogus,40,,,10,,,,fit,,,src,\n", r"'A'.*column 'kind'.*'bogus'"),
    ("A,orr,a,binomial,140,,,10,,,,fit,,,src,\n", r"'A'.*\[0, 100\].*'140'"),
    ("A,orr,a,interval,,30,20,,,,,fit,,,src,\n", r"'A'.*'low'.*above 'high'"),
    ("A,orr,a,binomial,40,,,10,,,,fit,,,src,\nA,dcr,a,binomial,40,,,10,,,,fit,,,src,\n",
     r"'A'.*duplicate"),
    ("A,ar_timing,a,multinomial,60,,,10,,0-365,g,fit,,,src,\n"
     "B,ar_timing,a,multinomial,30,,,10,,365-,g,fit,,,src,\n", r"a/g.*sum to 100"),
], ids=["empty", "binomial-without-n", "unknown-kind", "percent-range", "inverted-interval",
        "duplicate-id", "multinomial-sum"])
def test_target_table_errors_name_file_row_and_column(tmp_path, rows, match):
    f = tmp_path / "empty.csv"
    f.write_text(HEADER + rows)
    with pytest.raises(TargetError, match=match):
        load_targets(f)


# --------------------------------------------------------------------------- re-weighting
def _cohort(x, lo, hi):
    logq = -np.log(x)                       # loguniform plausible density
    out = {"evaluable": np.ones(x.size, bool)}
    return Cohort("a", {"k": x}, logq, out, {"prior": 0.0})


def test_reweighted_loguniform_cohort_reproduces_truncated_lognormal():
    lo, hi = 0.001, 1.0
    rng = np.random.default_rng(3)
    x = np.exp(rng.uniform(np.log(lo), np.log(hi), 200_000))
    pop = PopulationModel((VariableModel("k", "lognormal", "m", "cv"),))
    vals = {"m": 0.05, "cv": 0.9}
    w = _cohort(x, lo, hi).weights(pop, vals)
    s = math.sqrt(math.log1p(0.9 ** 2))
    dist = stats.lognorm(s=s, scale=0.05)
    mass = dist.cdf(hi) - dist.cdf(lo)
    mean = integrate.quad(lambda t: t * dist.pdf(t), lo, hi, limit=200)[0] / mass
    assert np.sum(w) == pytest.approx(1.0)
    assert np.sum(w * x) == pytest.approx(mean, rel=0.02)
    # a rate: share below 0.03, with its Monte-Carlo standard error
    ind = (x < 0.03).astype(float)[None, :]
    rate, se, _ = weighted_rates(ind, np.ones_like(ind), w)
    exact = (dist.cdf(0.03) - dist.cdf(lo)) / mass
    assert abs(rate[0] - exact) < 4 * se[0] + 1e-3
    assert 0 < se[0] < 0.01


def test_covariate_effect_shifts_the_log_median():
    rng = np.random.default_rng(4)
    x = np.exp(rng.uniform(np.log(1e-3), np.log(1.0), 100_000))
    c = _cohort(x, 1e-3, 1.0)
    pop = PopulationModel((VariableModel("k", "lognormal", "m", 0.5, (("prior", "beta"),)),))
    c.arm_covariates["prior"] = 1.0
    w = c.weights(pop, {"m": 0.05, "beta": math.log(2.0)})
    med = x[np.argsort(x)][np.searchsorted(np.cumsum(w[np.argsort(x)]), 0.5)]
    assert med == pytest.approx(0.10, rel=0.03)


# --------------------------------------------------------------------------- fit files
def _example(tmp_path) -> Path:
    d = tmp_path / "ex"
    shutil.copytree(EXAMPLE, d)
    return d


def test_unknown_parameter_in_population_is_a_clear_error(tmp_path):
    d = _example(tmp_path)
    f = d / "two_clone_fit.toml"
    f.write_text(f.read_text().replace('median = "e_median"', 'median = "e_medain"'))
    with pytest.raises(FitFileError, match=r"two_clone_fit\.toml.*\[population\].*'e'.*"
                                           r"unknown parameter 'e_medain'.*did you mean 'e_median'"):
        load_fit(f)


def test_empty_target_table_is_a_clear_error(tmp_path):
    d = _example(tmp_path)
    (d / "two_clone_targets.csv").write_text(HEADER)
    with pytest.raises(TargetError, match=r"two_clone_targets\.csv.*no rows"):
        load_fit(d / "two_clone_fit.toml")


def test_target_for_undeclared_arm_and_unknown_key_are_errors(tmp_path):
    d = _example(tmp_path)
    t = d / "two_clone_targets.csv"
    t.write_text(t.read_text().replace(",orr,b,", ",orr,c,"))
    with pytest.raises(FitFileError, match=r"arm 'c'.*does not declare"):
        load_fit(d / "two_clone_fit.toml")
    d2 = _example(tmp_path / "2")
    f = d2 / "two_clone_fit.toml"
    f.write_text(f.read_text().replace("min_ess = 50", "min_ess = 50\nmin_es = 3"))
    with pytest.raises(FitFileError, match=r"\[cohort\].*unknown key 'min_es'.*did you mean"):
        load_fit(f)


def test_mechanistic_parameter_must_exist_in_every_arm_model(tmp_path):
    d = _example(tmp_path)
    f = d / "two_clone_fit.toml"
    f.write_text(f.read_text().replace("[parameters.g_r]", "[parameters.g_rr]"))
    with pytest.raises(FitFileError, match=r"\[parameters\] 'g_rr'.*not a parameter of model "
                                           r"'two_clone_lesion'.*did you mean 'g_r'"):
        RateFit(load_fit(f))


# --------------------------------------------------------------------------- recovery
@pytest.fixture(scope="session")
def recovery(tmp_path_factory):
    """Synthetic targets simulated from TRUTH (4000 patients per arm, n = 400 each), fitted
    from the perturbed start values of the example fit file (moved further), with a smaller
    cohort and global stage to keep the test short."""
    f, rates, _ = synthetic_fit_file(tmp_path_factory.mktemp("recovery"), [
        ("value = 0.015", "value = 0.02"), ("n = 1500", "n = 1000"),
        ("global_maxiter = 25", "global_maxiter = 15")])
    return run_fit(f), f, rates


def test_recovery_truth_inside_profile_intervals(recovery):
    result, _, _ = recovery
    spec = result.spec
    assert spec.parameters["e_median"].value == 0.02          # started away from the truth
    identified = [k for k, (_, _, flag) in result.intervals.items() if not flag]
    assert set(identified) >= {"e_median", "e_cv", "e_prior"}
    for k in identified:
        lo, hi, _ = result.intervals[k]
        assert lo <= TRUTH[k] <= hi, (k, lo, TRUTH[k], hi)
        assert lo < result.values[k] < hi
    fit_rows = result.table[result.table.role == "fit"]
    assert fit_rows.met.all()
    assert result.counts["objective_evaluations"] > 1000
    assert result.counts["cohort_simulations"] >= 2 * 5          # grid of 5, two arms


def test_same_seed_reproduces_the_fit(recovery):
    result, f, _ = recovery
    again = run_fit(f, profiles=False)
    assert again.values == result.values
    assert again.chisqr == result.chisqr


def test_report_files_and_fitted_model_loads(recovery, tmp_path):
    import immunoode as im
    from immunoode.calibrate.report import fit_report, write_fit_outputs
    result, _, _ = recovery
    files = {p.name for p in write_fit_outputs(result, tmp_path / "out")}
    assert {"report.txt", "targets_vs_simulated.csv", "fitted_parameters.toml",
            "fitted_population.toml", "fitted_model_two_clone_lesion.toml", "profiles.csv",
            "summary.json", "targets_vs_simulated.png", "profiles.png"} <= files
    m = im.load_model(tmp_path / "out" / "fitted_model_two_clone_lesion.toml")
    assert m.parameter_values["g_r"] == pytest.approx(result.values["g_r"])
    import tomllib
    pop = tomllib.loads((tmp_path / "out" / "fitted_population.toml").read_text())
    assert pop["b"]["parameters"]["e"]["median"] == pytest.approx(
        result.values["e_median"] * math.exp(result.values["e_prior"]))
    text = fit_report(result)
    assert "[[Variables]]" in text and "[[Targets]]" in text and "[[Stages]]" in text
    assert result.attrs["fit_file_sha256"] and result.attrs["immunoode_version"]
    assert set(result.attrs["arms"]) == {"a", "b"}
    assert all("model_hash" in a for a in result.attrs["arms"].values())


def test_fit_command_dispatches_timecourse_files(tmp_path, monkeypatch):
    import immunoode.calibrate.timecourse as tc
    from immunoode.cli import main
    calls = []
    monkeypatch.setattr(tc, "run_fit_file", lambda path, out: calls.append((path, out)) or 0)
    f = tmp_path / "tc.toml"
    f.write_text('[fit]\nkind = "timecourse"\n')
    assert main(["fit", str(f), "--out", str(tmp_path / "o")]) == 0
    assert calls == [(str(f), str(tmp_path / "o"))]


def test_fit_command_reports_bad_file(tmp_path, capsys):
    from immunoode.cli import main
    f = tmp_path / "bad.toml"
    f.write_text('[fit]\nkind = "rates"\n')
    assert main(["fit", str(f), "--out", str(tmp_path / "o")]) == 1
    assert "bad.toml" in capsys.readouterr().err
