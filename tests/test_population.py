"""Populations: per-patient error control, failures kept, threads agree with serial."""

import numpy as np
import pandas as pd
import pytest

import immunoode as im
from immunoode import Dose, Regimen


@pytest.fixture(scope="module")
def pop(tumor_pd):
    rng = np.random.default_rng(7)
    n = 40
    return pd.DataFrame({"r": 0.05 * np.exp(0.3 * rng.standard_normal(n)),
                         "kkill": 0.3 * np.exp(0.3 * rng.standard_normal(n)),
                         "T0": rng.uniform(0.5, 2.0, n)})


REG = Regimen((Dose("A", 200.0, every=21, count=5),))
T = np.linspace(0, 120, 121)


def test_population_matches_single_simulations(tumor_pd, pop):
    ds = im.simulate_population(tumor_pd, pop, REG, t_eval=T, outputs=["T", "tumor"])
    assert ds["T"].dims == ("patient", "time") and ds.sizes["patient"] == len(pop)
    assert ds.attrs["n_failed"] == 0 and np.all(ds["status"].values == 0)
    for i in (0, 17, 39):
        one = im.simulate(tumor_pd, REG, t_eval=T, parameters=pop.iloc[i].to_dict())
        np.testing.assert_allclose(ds["tumor"].values[i], one["tumor"].values, rtol=1e-13)
    # per-patient parameters are carried in the result
    np.testing.assert_allclose(ds["r"].values, pop["r"].values)


def test_threads_agree_with_serial(tumor_pd, pop):
    a = im.simulate_population(tumor_pd, pop, REG, t_eval=T, outputs=["tumor"], n_jobs=1)
    b = im.simulate_population(tumor_pd, pop, REG, t_eval=T, outputs=["tumor"], n_jobs=2,
                               chunk_size=7)
    np.testing.assert_array_equal(a["tumor"].values, b["tumor"].values)


def test_failing_patient_is_recorded_not_dropped():
    b = im.ModelBuilder("maybe_blowup")
    b.add_parameter("k", 0.0, "1/(mg*day)").add_parameter("d", 0.1, "1/day")
    b.add_state("y", 1.0, "mg").add_ode("y", "k*y*y - d*y")
    cm = im.compile_model(b.build())
    popu = {"k": np.array([0.0, 1.0, 0.01, np.nan])}
    ds = im.simulate_population(cm, popu, t_eval=np.linspace(0, 5, 11))
    st = ds["status"].values
    assert st[0] == 0 and st[2] == 0
    assert st[1] < 0 and "failed at t=" in str(ds["message"].values[1])
    assert st[3] == -12 and "invalid" in str(ds["message"].values[3])
    assert ds.attrs["n_failed"] == 2
    assert np.isnan(ds["y"].values[1, -1]) and np.isfinite(ds["y"].values[0]).all()


def test_weight_based_dose_uses_each_patients_weight():
    b = im.ModelBuilder("wt")
    b.add_parameter("WT", 70.0, "kg").add_parameter("k", 0.1, "1/day")
    b.add_state("A", 0.0, "mg").add_ode("A", "-k*A")
    cm = im.compile_model(b.build())
    reg = Regimen((Dose("A", 3.0, unit="mg/kg"),))
    ds = im.simulate_population(cm, {"WT": np.array([50.0, 100.0])}, reg, t_eval=np.array([0.0, 1.0]))
    np.testing.assert_allclose(ds["A"].values[:, 0], [150.0, 300.0])


def test_unknown_population_column(tumor_pd):
    with pytest.raises(im.ModelError, match="did you mean 'kkill'"):
        im.simulate_population(tumor_pd, {"kkil": np.ones(3)}, t_eval=T)


def test_invalid_weight_marks_only_that_patient():
    b = im.ModelBuilder("wt2")
    b.add_parameter("WT", 70.0, "kg").add_parameter("k", 0.1, "1/day")
    b.add_state("A", 0.0, "mg").add_ode("A", "-k*A")
    cm = im.compile_model(b.build())
    reg = Regimen((Dose("A", 3.0, unit="mg/kg"),))
    ds = im.simulate_population(cm, {"WT": np.array([50.0, np.nan, -5.0])}, reg,
                                t_eval=np.array([0.0, 1.0]))
    st = ds["status"].values
    assert st[0] == 0 and st[1] == -12
    assert st[2] != 0 or ds["A"].values[2, 0] < 0  # a negative weight never passes silently


def test_progress_reports_rate_and_eta(tumor_pd, pop, capsys):
    im.simulate_population(tumor_pd, pop, REG, t_eval=T, outputs=["T"], progress=True,
                           chunk_size=10)
    err = capsys.readouterr().err
    assert f"{len(pop)}/{len(pop)} patients" in err and "/s" in err and "ETA" in err
