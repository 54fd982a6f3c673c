"""Virtual trial arms: closed-form response rates, failures kept, reproducibility, plots, CLI.

The fast tests use a one-state tumor whose diameter grows or shrinks exponentially,
``D(t) = D0 exp(k t)``, with ``k ~ Normal(mu, sd)`` per patient, so every patient's
RECIST best response is known in closed form.  A categorical covariate mapped to the
flag ``blow`` adds ``blow * D^2`` (a finite-time blow-up): those patients fail.
"""

import argparse
import math

import numpy as np
import pytest
import xarray as xr
from scipy import stats

import immunoode as im
from immunoode.trial import TrialError, add_trial_command, load_trial, run_trial, scan_times, summary_table
from immunoode.trialstats import clopper_pearson

MODEL_TOML = """
[model]
name = "exp_tumor_trial_test"
time_unit = "day"

[states.D]
initial = "D0"
unit = "mm"

[parameters]
D0 = { value = 50.0, unit = "mm" }
k = { value = 0.0, unit = "1/day" }
blow = { value = 0.0, unit = "1/(mm*day)" }

[odes]
D = "k * D + blow * D * D"

[observables]
diameter = { expr = "D", unit = "mm" }
"""

MU, SD = -0.003, 0.004


def _spec(model, n=400, seed=1, follow_up=84, p_blow=0.0, **extra):
    spec = {
        "trial": {"name": "exp test", "model": model, "regimen": "none", "n": n, "seed": seed,
                  "method": "random", "follow_up": follow_up, "lesion_observable": "diameter",
                  "diameter_unit": "mm"},
        "scans": {"every": 42, "until": 365, "then_every": 84},
        "population": {"parameters": {"k": {"dist": "normal", "mean": MU, "sd": SD}},
                       "covariates": {"arm": {"dist": "categorical",
                                              "categories": {"ok": 1 - p_blow, "blow": p_blow}}}},
        "map": {"arm": {"categories": {"blow": "blow"}}},
    }
    for k, v in extra.items():
        spec.setdefault(k, {}).update(v)
    return spec


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("trial_model") / "exp_tumor.toml"
    p.write_text(MODEL_TOML)
    return p


@pytest.fixture(scope="module")
def cm(model_file):
    return im.compile_model(im.load_model(model_file))


@pytest.fixture(scope="module")
def arm(cm):
    return run_trial(_spec(cm, n=400, seed=1))


def test_scan_schedule():
    spec = {"trial": {"model": "x", "follow_up": 730},
            "population": {"parameters": {"k": {"dist": "fixed", "value": 0.0}}}}
    t = scan_times(load_trial(spec))
    np.testing.assert_array_equal(t, [0, 42, 84, 126, 168, 210, 252, 294, 336, 420, 504, 588, 672])
    spec["scans"] = {"then_every": 63}
    assert scan_times(load_trial(spec))[9:].tolist() == [399, 462, 525, 588, 651, 714]


def test_orr_and_dcr_match_closed_form(arm):
    t_last = 84.0
    # PR (or CR): D(84) <= 0.7 D0; no PD is possible while shrinking
    p_orr = stats.norm.cdf((math.log(0.7) / t_last - MU) / SD)
    # disease control: not PD at day 42, i.e. D(42) < 1.2 D0 (+10 mm >= 5 mm holds then too)
    p_dcr = stats.norm.cdf((math.log(1.2) / 42.0 - MU) / SD)
    ev = arm["evaluable"].values
    assert ev.all() and arm.attrs["n_failed"] == 0
    bor = arm["bor"].values
    n = ev.sum()
    k_orr = int(np.isin(bor, ["CR", "PR"]).sum())
    k_dcr = int(np.isin(bor, ["CR", "PR", "SD"]).sum())
    lo, hi = clopper_pearson(k_orr, n, alpha=0.01)
    assert lo <= p_orr <= hi, (k_orr / n, p_orr)
    lo, hi = clopper_pearson(k_dcr, n, alpha=0.01)
    assert lo <= p_dcr <= hi, (k_dcr / n, p_dcr)
    # patient by patient (away from the thresholds): the classification is exact
    k = arm["k"].values
    far = np.abs(np.exp(k * t_last) - 0.7) > 1e-3
    assert np.array_equal(np.isin(bor, ["CR", "PR"])[far], (np.exp(k * t_last) <= 0.7)[far])
    assert np.all(bor[np.exp(42 * k) >= 1.2 + 1e-3] == "PD")
    # simulated sizes are the closed form
    np.testing.assert_allclose(arm["simulated_size"].values, 50 * np.exp(np.outer(k, arm["scan_time"].values[0])),
                               rtol=1e-5)
    # the summary table agrees
    s = summary_table(arm)
    assert "objective response" in s and f"{k_orr:>6}/{n}" in s and "median PFS" in s


def test_failing_patients_are_kept_marked_and_excluded(cm):
    ds = run_trial(_spec(cm, n=200, seed=3, p_blow=0.1))
    failed = ds["failed"].values
    assert ds.sizes["patient"] == 200
    assert failed.sum() == (ds["arm"].values == "blow").sum() > 0
    assert ds.attrs["n_failed"] == failed.sum()
    assert np.all(ds["status"].values[failed] < 0)
    assert all("failed" in m for m in ds["message"].values[failed])
    assert np.all(ds["bor"].values[failed] == "NE") and not ds["evaluable"].values[failed].any()
    from immunoode.trialstats import summarize
    tab = summarize(ds)
    assert tab.loc["ORR", "n"] == 200 - failed.sum()
    assert f"{failed.sum()} failed" in summary_table(ds)


def test_same_seed_identical_other_seed_differs(cm):
    extra = {"scans": {"noise_cv": 0.05, "noise_sd_mm": 1.0}}
    a = run_trial(_spec(cm, n=50, seed=11, **extra))
    b = run_trial(_spec(cm, n=50, seed=11, **extra))
    c = run_trial(_spec(cm, n=50, seed=12, **extra))
    for v in ("k", "lesion_size", "bor", "sitc", "pfs_time"):
        np.testing.assert_array_equal(a[v].values, b[v].values)
    assert not np.array_equal(a["k"].values, c["k"].values)
    # noise is applied to the measurement, not the simulation
    assert not np.allclose(a["lesion_size"].values[:, 0, :], a["simulated_size"].values)
    assert a.attrs["seed"] == 11 and a.attrs["model_hash"] == b.attrs["model_hash"]
    d = run_trial(_spec(cm, n=5, seed=None))
    assert isinstance(d.attrs["seed"], int)
    e = run_trial(_spec(cm, n=5, seed=None), seed=d.attrs["seed"])
    np.testing.assert_array_equal(d["k"].values, e["k"].values)


def test_plots_are_written(arm, tmp_path):
    from immunoode.plots import km_pfs, save_trial_plots, waterfall
    files = save_trial_plots(arm, tmp_path / "plots")
    assert {f.name for f in files} == {"waterfall.png", "spider.png", "swimmer.png", "km_pfs.png"}
    for f in files:
        assert f.exists() and f.stat().st_size > 1000
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2)
    f1, a1 = waterfall(arm, ax=axes[0])
    f2, a2 = km_pfs(arm, ax=axes[1])
    assert f1 is fig and a1 is axes[0] and a2 is axes[1]
    plt.close(fig)


def test_cli_end_to_end(model_file, tmp_path, capsys):
    trial = tmp_path / "tiny.toml"
    trial.write_text(f"""
[trial]
name = "tiny"
model = "{model_file.name}"
n = 30
seed = 5
follow_up = 168
lesion_observable = "diameter"
diameter_unit = "mm"

[population.parameters.k]
dist = "normal"
mean = {MU}
sd = {SD}
""")
    (tmp_path / model_file.name).write_text(model_file.read_text())  # relative to the trial file
    ap = argparse.ArgumentParser()
    add_trial_command(ap.add_subparsers(dest="command"))
    out = tmp_path / "arm.nc"
    args = ap.parse_args(["trial", str(trial), "--n", "20", "--seed", "9", "--out", str(out),
                          "--plots", str(tmp_path / "p"), "--quiet"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "objective response" in text and "20 simulated" in text
    back = xr.open_dataset(out)
    assert back.sizes["patient"] == 20 and back.attrs["seed"] == 9
    assert back.sizes["scan"] == 5
    back.close()
    assert (tmp_path / "p" / "waterfall.png").stat().st_size > 0


def test_cli_user_errors_are_one_line(model_file, tmp_path, capsys):
    from immunoode.cli import main
    trial = tmp_path / "bad.toml"
    (tmp_path / model_file.name).write_text(model_file.read_text())
    trial.write_text(f"""
[trial]
model = "{model_file.name}"
lesion_observable = "diameter"
diameter_unit = "mm"
[population.parameters.kk]
dist = "normal"
mean = 0
sd = 1
""")
    ap = argparse.ArgumentParser()
    add_trial_command(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["trial", str(trial), "--n", "3", "--quiet"])
    with pytest.raises(TrialError, match="did you mean 'k'"):
        args.func(args)
    with pytest.raises(TrialError, match="unknown key"):
        load_trial({"trial": {"model": "x", "modle": 1}, "population": {}})
    with pytest.raises(TrialError, match="diameter_unit"):
        load_trial({"trial": {"model": "x", "diameter_unit": "inch"}, "population": {}})


@pytest.fixture(scope="session")
def nsclc_cm():
    """The library model, compiled once for the session (30-40 s cold, then cached)."""
    from immunoode.cli import resolve_model_path
    return im.compile_model(im.load_model(resolve_model_path("nsclc_io")))


def test_shipped_nsclc_trial_file_runs(nsclc_cm):
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "models" / "trials" / "nsclc_1l_pembrolizumab.toml"
    ds = run_trial(path, n=16, seed=2, model=nsclc_cm)
    assert ds.sizes["patient"] == 16 and ds.attrs["model_name"] == "nsclc_io"
    assert ds.attrs["n_failed"] == 0
    assert np.isfinite(ds["simulated_size"].values).all()
    assert ds["pdl1_category"].dtype.kind in "UO" and ds.attrs["last_dose_day"] > 600
    assert "objective response" in summary_table(ds)
