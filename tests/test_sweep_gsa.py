"""GSA (Morris / Sobol through SALib) and schedule optimisation, on the hand-built model of
test_sweep_policy (lesion growth independent of the drugs)."""

from __future__ import annotations

import numpy as np
import pytest

from immunoode.sweep.gsa import optimize_schedule, run_gsa
from immunoode.sweep.run import run_sweep
from immunoode.sweep.spec import SweepError, load_sweep

from .test_sweep_policy import MODEL, REG_A, REG_B, SWEEP

BASE = SWEEP.split("[policies.rt]")[0].replace("n = 4", "n = 3")


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "model.toml").write_text(MODEL)
    (tmp_path / "a.toml").write_text(REG_A)
    (tmp_path / "b.toml").write_text(REG_B)
    return tmp_path


def test_morris_finds_the_growth_rate_and_not_the_drug_clearance(folder):
    text = BASE.replace('block = 4', 'block = 4\ndesign = "gsa"').replace(
        'first_line = "a"', 'first_line = "a"\npolicy = "until_progression"') + """
[gsa]
method = "morris"
n = 3
outcome = "time_on_treatment"
parameters = { k = [0.002, 0.006], kel = [0.05, 0.5] }
"""
    (folder / "gsa.toml").write_text(text)
    res = run_gsa(folder / "gsa.toml")
    assert res.samples.shape == (3 * 3, 2)
    # treatment stops at the first progression, whose day depends on k only
    assert res.indices.loc["kel", "mu_star"] == 0.0
    assert res.indices.loc["k", "mu_star"] > 0.0
    assert res.indices.index[0] == "k"
    assert "mu_star" in res.report() and res.to_dataset()["index_mu_star"].sizes["parameter"] == 2


def test_gsa_refuses_population_parameters(folder):
    text = BASE.replace('block = 4', 'block = 4\ndesign = "gsa"') + """
[gsa]
parameters = { D0 = [10, 30] }
"""
    (folder / "bad.toml").write_text(text)
    with pytest.raises(SweepError, match=r"bad\.toml.*\[gsa\.parameters\].*'D0'.*sampled per patient"):
        run_gsa(folder / "bad.toml")


def test_compass_search_reaches_the_grid_optimum_under_a_dose_cap(folder):
    text = BASE.replace('block = 4', 'block = 4\ndesign = "optimize"').replace(
        'first_line = "a"', 'first_line = "a"\nrt_fractions = 1\nrt_dose_gy = 0.5') + """
[optimize]
objective = "median_PFS"
variables = { rt_dose_gy = [0.5, 6.0, 0.5], duration = [42, 336, 42] }
max_mean_dose = { drug = "drug_a", value = 1000 }
max_iterations = 12
"""
    (folder / "opt.toml").write_text(text)
    res = optimize_schedule(folder / "opt.toml")
    # exhaustive grid over the same lattice, same patients
    grid = text.replace('design = "optimize"', 'design = "grid"') + """
[factors]
rt_dose_gy = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0]
duration = [42, 84, 126, 168, 210, 252, 294, 336]
"""
    (folder / "grid.toml").write_text(grid)
    ds = run_sweep(folder / "grid.toml")
    feas = ds["mean_cumulative_dose"].sel(drug="drug_a").values <= 1000
    val = np.where(feas, ds["summary"].sel(metric="median_PFS").values, -np.inf)
    assert res.history["objective"][res.history["feasible"]].max() == pytest.approx(np.nanmax(val))
    best = res.history[res.history["feasible"]].sort_values("objective").iloc[-1]
    assert best["duration"] <= 126  # 100 mg q3w: at most 10 doses (doses at 0..126 = 7)
    assert res.n_evaluations < feas.size
    assert "best:" in res.report()


def test_sobol_total_index_of_an_inert_parameter_is_zero_and_cli_writes_netcdf(folder, tmp_path):
    import xarray as xr
    from immunoode.cli import main
    text = BASE.replace('block = 4', 'block = 4\ndesign = "gsa"').replace(
        'first_line = "a"', 'first_line = "a"\npolicy = "until_progression"') + """
[gsa]
method = "sobol"
n = 8
outcome = "time_on_treatment"
parameters = { k = [0.002, 0.006], kel = [0.05, 0.5] }
"""
    (folder / "sobol.toml").write_text(text)
    out = tmp_path / "sobol.nc"
    assert main(["sweep", str(folder / "sobol.toml"), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    ds = xr.open_dataset(out)
    assert ds.sizes["point"] == 8 * (2 + 2)
    st = dict(zip(ds["parameter"].values, ds["index_ST"].values))
    assert st["kel"] == 0.0 and st["k"] > 0.0   # all variance comes from k (n = 8: a coarse estimate)
    assert ds.attrs["method"] == "sobol" and "model_hash" in ds.attrs
