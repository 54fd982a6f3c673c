"""Rate-fit robustness: an interrupted cohort simulation stops the fit (no partial cohort is
fitted), and the global population stage is never worse than its warm starts (the fit
file's start values and earlier grid optima) even when differential evolution is cut short."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from immunoode.calibrate.fit import RateFit, _fit_population, load_fit

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "fits" / "examples"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    for f in EXAMPLE.iterdir():
        if f.suffix in (".toml", ".csv"):
            shutil.copy(f, d / f.name)
    f = d / "two_clone_fit.toml"
    f.write_text(f.read_text().replace("n = 1500", "n = 400"))
    spec = load_fit(f)
    rf = RateFit(spec)
    data = rf.cohorts({m: spec.parameters[m].value for m in spec.mechanistic})
    return spec, rf, data


def test_interrupted_cohort_raises_keyboard_interrupt(example, monkeypatch):
    import immunoode.trial as trial
    spec, _, _ = example
    real = trial.run_trial

    def interrupted(*args, **kwargs):
        ds = real(*args, **kwargs)
        ds.attrs["interrupted"] = 1          # what run_trial reports after Ctrl-C
        return ds

    monkeypatch.setattr(trial, "run_trial", interrupted)
    rf = RateFit(spec)
    with pytest.raises(KeyboardInterrupt, match="interrupted"):
        rf.cohorts({m: spec.parameters[m].value for m in spec.mechanistic})
    assert rf._cache == {}                    # nothing half-simulated is kept


def test_global_stage_is_no_worse_than_its_warm_starts(example):
    spec, rf, data = example
    stages = dict(spec.stages, global_maxiter=1, global_popsize=2, local_max_nfev=400)
    # a good point: a full global + local fit
    _, good = _fit_population(rf, rf.parameters(), data, global_stage=True,
                              stages=dict(spec.stages, local_max_nfev=400), seed=spec.seed)
    chi_good = rf.chisqr(good.valuesdict(), data)
    # a crippled differential evolution from a poor start, but with the good point as a warm start
    poor = {"e_median": 0.045, "e_cv": 2.4, "e_prior": 0.9, "f_median": 0.18}
    ps = rf.parameters(poor)
    _, cut = _fit_population(rf, ps, data, global_stage=True, stages=stages, seed=spec.seed)
    _, warm = _fit_population(rf, ps, data, global_stage=True, stages=stages, seed=spec.seed,
                              starts=[good.valuesdict()])
    chi_cut = rf.chisqr(cut.valuesdict(), data)
    chi_warm = rf.chisqr(warm.valuesdict(), data)
    assert chi_warm <= chi_good + 1e-6
    assert chi_warm <= chi_cut + 1e-6
    assert chi_warm <= rf.chisqr(poor | {"g_r": spec.parameters["g_r"].value}, data)
