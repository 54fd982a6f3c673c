"""Optional emcee posterior sampling of the population parameters ([stages] emcee_steps):
the sampled quantiles against a posterior integrated on a fine grid (exp(−χ²/2), flat prior
inside the bounds), the fit-file switches and errors, the report and output files, and
reproducibility for a fixed seed.  Tiny case: the two-clone example with small cohorts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from immunoode.calibrate.fit import FitFileError, RateFit, load_fit, run_fit

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "fits" / "examples"


def _example(d: Path, *, n: int = 400, stages: str = "") -> Path:
    for f in EXAMPLE.iterdir():
        if f.suffix in (".toml", ".csv"):
            shutil.copy(f, d / f.name)
    f = d / "two_clone_fit.toml"
    text = f.read_text().replace("n = 1500", f"n = {n}")
    # only the prior-therapy effect and the kill-rate median vary; the mechanistic rate is fixed
    text = re.sub(r"(\[parameters\.(e_cv|f_median)\]\n)", r"\1vary = false\n", text)
    text = text.replace('kind = "mechanistic"', 'kind = "mechanistic"\nvary = false')
    text = text.replace("global_maxiter = 25", "global_maxiter = 6")
    if stages:
        text = text.replace("[stages]\n", "[stages]\n" + stages)
    f.write_text(text)
    return f


@pytest.fixture(scope="module")
def one_parameter(tmp_path_factory):
    """A fit with a single varied population parameter (e_prior) on fixed cohorts."""
    d = tmp_path_factory.mktemp("post1")
    f = _example(d)
    text = f.read_text().replace("[parameters.e_median]\n", "[parameters.e_median]\nvary = false\n")
    f.write_text(text)
    spec = load_fit(f)
    rf = RateFit(spec)
    data = rf.cohorts({m: spec.parameters[m].value for m in spec.mechanistic})
    return spec, rf, data


def test_posterior_quantiles_match_grid_integration(one_parameter):
    from immunoode.calibrate.posterior import sample_posterior
    spec, rf, data = one_parameter
    values = {k: p.value for k, p in spec.parameters.items()}
    p = spec.parameters["e_prior"]
    # independent reference: the normalised density exp(-chi2/2) on a fine grid (flat prior)
    x = np.linspace(p.min, p.max, 1201)
    chi = np.array([rf.chisqr(dict(values, e_prior=float(v)), data) for v in x])
    dens = np.exp(-0.5 * (chi - chi.min()))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(x))])
    cdf /= cdf[-1]
    ref = np.interp([0.025, 0.5, 0.975], cdf, x)
    assert ref[2] - ref[0] < 0.5 * (p.max - p.min)       # the targets do inform e_prior
    start = dict(values, e_prior=float(x[np.argmin(chi)]))
    post = sample_posterior(rf, start, data, steps=700, walkers=20, burn=150, seed=3)
    q = post.summary()["e_prior"]
    width = ref[2] - ref[0]
    assert q["q50"] == pytest.approx(ref[1], abs=0.1 * width)
    assert q["q2.5"] == pytest.approx(ref[0], abs=0.15 * width)
    assert q["q97.5"] == pytest.approx(ref[2], abs=0.15 * width)
    assert 0.2 < post.acceptance < 0.9
    assert list(post.samples.columns) == ["e_prior"]
    assert len(post.samples) == 20 * (700 - 150)
    assert post.samples["e_prior"].between(p.min, p.max).all()


def test_posterior_is_reproducible_for_a_seed_and_checks_its_settings(one_parameter):
    from immunoode.calibrate.posterior import sample_posterior
    spec, rf, data = one_parameter
    values = {k: p.value for k, p in spec.parameters.items()}
    a = sample_posterior(rf, values, data, steps=40, walkers=8, seed=5)
    b = sample_posterior(rf, values, data, steps=40, walkers=8, seed=5)
    c = sample_posterior(rf, values, data, steps=40, walkers=8, seed=6)
    assert a.samples.equals(b.samples)
    assert not a.samples.equals(c.samples)
    assert a.settings["burn"] == 10                        # default: a quarter of the steps
    with pytest.raises(ValueError, match="burn-in"):
        sample_posterior(rf, values, data, steps=40, burn=40)
    with pytest.raises(ValueError, match="steps must be positive"):
        sample_posterior(rf, values, data, steps=0)


def test_emcee_stage_in_run_fit_report_and_outputs(tmp_path):
    from immunoode.calibrate.report import fit_report, write_fit_outputs
    f = _example(tmp_path, stages="emcee_steps = 60\nemcee_walkers = 12\n")
    result = run_fit(f, profiles=False)
    post = result.posterior
    assert post is not None and set(post.samples.columns) == {"e_median", "e_prior"}
    assert len(post.samples) == 12 * (60 - 15)
    assert "posterior (emcee)" in result.stages
    assert result.counts["posterior_evaluations"] >= 12 * 60
    text = fit_report(result)
    assert "[[Posterior]]" in text and "e_prior" in text.split("[[Posterior]]")[1]
    files = {p.name for p in write_fit_outputs(result, tmp_path / "out")}
    assert "posterior.csv" in files
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    q = summary["posterior"]["summary"]["e_prior"]
    assert q["q2.5"] <= q["q50"] <= q["q97.5"]
    # default: off
    (tmp_path / "off").mkdir()
    assert load_fit(_example(tmp_path / "off")).stages["emcee_steps"] == 0


@pytest.mark.parametrize("stages, match", [
    ("emcee_steps = -5\n", "'emcee_steps' must be >= 0"),
    ("emcee_steps = 10\nemcee_burn = 10\n", "'emcee_burn' .* must be smaller"),
    ("emcee_steps = 2.5\n", "whole number"),
])
def test_bad_emcee_settings_are_clear_errors(tmp_path, stages, match):
    f = _example(tmp_path, stages=stages)
    with pytest.raises(FitFileError, match=match) as exc:
        load_fit(f)
    assert "two_clone_fit.toml" in str(exc.value)
