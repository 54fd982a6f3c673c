"""Chemotherapy in the NSCLC library: pk_chemo.toml, chemo_pd.toml, icd.toml, nsclc_io_chemo.toml.

* PK against closed forms (carboplatin 2-compartment bolus, pemetrexed 1-compartment, docetaxel
  AUC = dose/CL from the 3-compartment model);
* the kill with acquired chemoresistance against its closed form
  ln(Ts/Ts0) = -(1 - exp(-lam*E))/lam, E = e_kill*AUC, on a tumor-only composition;
* behaviour test 7: adding carboplatin/pemetrexed to pembrolizumab raises antigen release and
  lowers SITC primary resistance in a small deterministic cohort; lymphodepletion lowers the
  circulating primed T cells; without chemo doses the model equals nsclc_io.toml.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import immunoode as im
from immunoode.response import assess_response

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
NSCLC = MODELS / "nsclc"
REGIMENS = MODELS / "regimens"


@pytest.fixture(scope="session")
def chemo_model():
    return im.compile_model(im.load_model(MODELS / "nsclc_io_chemo.toml"))


@pytest.fixture(scope="session")
def regimens():
    names = {"pembro": "nsclc_pembrolizumab_200mg_q3w.toml",
             "combo": "pembrolizumab_carboplatin_pemetrexed_q3w.toml",
             "chemo": "carboplatin_pemetrexed_q3w.toml",
             "doc": "docetaxel_75mgm2_q3w.toml"}
    return {k: im.load_regimen(REGIMENS / v) for k, v in names.items()}


def _bolus(tmp_path, target, amount, name="bolus.toml"):
    p = tmp_path / name
    p.write_text(f'[[dose]]\ntarget = "{target}"\namount = {amount}\nunit = "mg"\nstart = 0\n')
    return im.load_regimen(p)


# ------------------------------------------------------------------------------ files
def test_chemo_pk_module_loads_alone_with_sources():
    m = im.load_model(NSCLC / "pk_chemo.toml")
    assert set(m.states) == {"A_carbo_c", "A_carbo_p", "A_pem_c", "A_doc_c", "A_doc_p1", "A_doc_p2"}
    for p in m.parameters.values():
        assert p.source.strip() and p.lower is not None and p.lower <= p.value <= p.upper, p.name


def test_chemo_composed_model_has_sources_units_and_ranges():
    m = im.load_model(MODELS / "nsclc_io_chemo.toml")
    new = {"pk_chemo.toml", "chemo_pd.toml", "icd.toml"}
    assert new <= {Path(s).name for s in m.sources}
    for p in m.parameters.values():
        assert p.unit and p.source.strip(), p.name
        if p.lower is not None:
            assert p.lower <= p.value <= p.upper, p.name


def test_kn189_regimen_schedule():
    reg = im.load_regimen(REGIMENS / "pembrolizumab_carboplatin_pemetrexed_q3w.toml")
    m = im.load_model(MODELS / "nsclc_io_chemo.toml")
    ev = reg.events(state_units={s: m.states[s].unit for s in m.states},
                    parameters={"BSA": 1.85, "WT": 75.0}, t_end=730.0)
    targets = {it.target: it for it in reg.items}
    assert targets["A_carbo_c"].count == 4 and targets["A_pem_c"].count == 35
    assert targets["A_pembro_c"].count == 35
    assert ev is not None


# -------------------------------------------------------------------------------- PK
def test_chemo_pk_matches_closed_forms(chemo_model, tmp_path):
    t = np.linspace(0.0, 2.0, 193)
    # carboplatin 625 mg bolus: two-compartment closed form
    ds = im.simulate(chemo_model, _bolus(tmp_path, "A_carbo_c", 625.0), t_eval=t,
                     outputs=["conc_carbo"], rtol=1e-9, atol=1e-12)
    CL, V1, Q, V2 = 201.12, 15.4, 49.9, 9.67
    k10, k12, k21 = CL / V1, Q / V1, Q / V2
    s = k10 + k12 + k21
    a = (s + math.sqrt(s * s - 4 * k10 * k21)) / 2
    b = (s - math.sqrt(s * s - 4 * k10 * k21)) / 2
    exp_c = 625.0 / V1 * ((a - k21) / (a - b) * np.exp(-a * t) + (k21 - b) / (a - b) * np.exp(-b * t))
    np.testing.assert_allclose(ds["conc_carbo"].values, exp_c, rtol=1e-5, atol=1e-9)
    # pemetrexed 925 mg bolus: one compartment
    ds = im.simulate(chemo_model, _bolus(tmp_path, "A_pem_c", 925.0, "p.toml"), t_eval=t,
                     outputs=["conc_pem"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ds["conc_pem"].values, 925.0 / 16.1 * np.exp(-132.19 / 16.1 * t),
                               rtol=1e-5, atol=1e-9)


def test_docetaxel_auc_equals_dose_over_clearance(chemo_model, tmp_path):
    # AUC of C_doc over 0..60 days by the trapezoid rule on a fine grid vs dose/CL
    t = np.concatenate([np.linspace(0, 1, 2001), np.linspace(1.0005, 60, 6000)])
    ds = im.simulate(chemo_model, _bolus(tmp_path, "A_doc_c", 138.75), t_eval=t,
                     outputs=["conc_doc"], rtol=1e-10, atol=1e-13)
    auc = np.trapezoid(ds["conc_doc"].values, t)
    assert auc == pytest.approx(138.75 / 856.8, rel=2e-3)


# ------------------------------------------------------------- kill with chemoresistance
_STUB = """
[model]
name = "stub_immune"
time_unit = "day"
[states.DAMP]
initial = 0.0
unit = "1"
[states.Tp]
initial = 1.0
unit = "1"
[states.Te]
initial = 1.0
unit = "1"
[parameters]
k_DAMP_kill = { value = 1.0, unit = "1/(1e9 cell)", source = "test stub" }
[odes]
DAMP = "0"
Tp = "0"
Te = "0"
"""


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_chemo_kill_matches_closed_form_with_acquired_resistance(tmp_path, lam):
    (tmp_path / "stub.toml").write_text(_STUB)
    files = [NSCLC / "tumor.toml", NSCLC / "pk_chemo.toml", NSCLC / "chemo_pd.toml", tmp_path / "stub.toml"]
    inc = ", ".join(f'"{f.as_posix()}"' for f in files)
    (tmp_path / "m.toml").write_text(f'[model]\nname = "chemo_only"\ntime_unit = "day"\ninclude = [{inc}]\n')
    m = im.load_model(tmp_path / "m.toml")
    dose = 925.0
    ds = im.simulate(m, _bolus(tmp_path, "A_pem_c", dose), t_eval=np.array([0.0, 5.0]),
                     parameters={"k_grow": 0.0, "k_death": 0.0, "mu_edit": 0.0, "k_clear": 0.0,
                                 "lam_chemo_res": lam, "k_chemo_rec": 0.0},
                     outputs=["Ts", "Tr", "Dead", "Tp", "chemo_exposure"], method="LSODA",
                     rtol=1e-10, atol=1e-12)
    E = 0.015 * dose / 132.19
    assert ds["chemo_exposure"].values[-1] == pytest.approx(E, rel=1e-6)
    logkill = E if lam == 0 else (1 - math.exp(-lam * E)) / lam
    ts = ds["Ts"].values
    assert math.log(ts[-1] / ts[0]) == pytest.approx(-logkill, rel=1e-5)
    # killed cells go to the dead pool (mass conserved); lymphodepletion of Tp = l_pem*AUC
    total = ds["Ts"].values + ds["Tr"].values + ds["Dead"].values
    assert total[-1] == pytest.approx(total[0], rel=1e-8)
    assert math.log(ds["Tp"].values[-1]) == pytest.approx(-0.015 * dose / 132.19, rel=1e-5)


# ---------------------------------------------------------------------- behaviour (7)
def test_without_chemo_doses_model_equals_nsclc_io(chemo_model, regimens):
    base = im.compile_model(im.load_model(MODELS / "nsclc_io.toml"))
    a = im.simulate(chemo_model, regimens["pembro"], t_end=365.0, outputs=["tumor_diameter", "Te"])
    b = im.simulate(base, regimens["pembro"], t_end=365.0, outputs=["tumor_diameter", "Te"])
    np.testing.assert_allclose(a["tumor_diameter"].values, b["tumor_diameter"].values, rtol=1e-6)
    np.testing.assert_allclose(a["Te"].values, b["Te"].values, rtol=1e-6)


def test_chemo_added_to_anti_pd1_raises_antigen_release_and_danger_signal(chemo_model, regimens):
    outs = ["antigen_release_rate", "danger_signal", "DC", "Tp", "tumor_diameter"]
    p1 = im.simulate(chemo_model, regimens["pembro"], t_end=84.0, outputs=outs)
    pc = im.simulate(chemo_model, regimens["combo"], t_end=84.0, outputs=outs)
    # the burst of antigen from chemo-killed cells in the first week, and more over cycle 1
    rel_c, rel_p = pc["antigen_release_rate"].values, p1["antigen_release_rate"].values
    assert rel_c[1:8].mean() > 1.3 * rel_p[1:8].mean()
    assert rel_c[:22].sum() > 1.05 * rel_p[:22].sum()
    assert pc["danger_signal"].values.max() > 0.1 and p1["danger_signal"].values.max() == 0.0
    dc_c, dc_p = pc["DC"].values, p1["DC"].values
    assert dc_c[1:8].mean() > 1.1 * dc_p[1:8].mean()     # faster maturation in cycle 1
    assert dc_c[22:27].mean() > 1.05 * dc_p[22:27].mean()  # and again in cycle 2
    assert pc["tumor_diameter"].values[84] < 0.9 * p1["tumor_diameter"].values[84]


def test_lymphodepletion_lowers_primed_t_cells_under_chemo_alone(chemo_model, tmp_path):
    # one doublet cycle on day 120, when the initial immune transient is over; compare 12 h
    # later (afterwards chemo-released antigen raises priming again)
    p = tmp_path / "one_cycle.toml"
    p.write_text('[[dose]]\ntarget = "A_carbo_c"\namount = 625\nunit = "mg"\nstart = 120\n'
                 '[[dose]]\ntarget = "A_pem_c"\namount = 925\nunit = "mg"\nstart = 120\n')
    t = np.array([0.0, 119.0, 120.5])
    none = im.simulate(chemo_model, None, t_eval=t, outputs=["Tp", "Te"])
    chemo = im.simulate(chemo_model, im.load_regimen(p), t_eval=t, outputs=["Tp", "Te"])
    assert chemo["Tp"].values[1] == pytest.approx(none["Tp"].values[1], rel=1e-9)
    assert chemo["Tp"].values[-1] < 0.9 * none["Tp"].values[-1]
    assert chemo["Te"].values[-1] < 0.9 * none["Te"].values[-1]


def _cohort():
    grid = itertools.product([2.0, 5.0], [0.0, 0.5], [0.0, 1.0], [0.012, 0.02])
    return pd.DataFrame([dict(tmb=t, pdl1_tps=p, kras=k, stk11=k, k_grow=g) for t, p, k, g in grid])


def test_chemo_added_to_anti_pd1_lowers_primary_resistance(chemo_model, regimens):
    times = np.arange(0.0, 365.1, 42.0)
    df = _cohort()
    primary = {}
    for arm in ("pembro", "combo"):
        sim = im.simulate_population(chemo_model, df, regimens[arm], t_eval=times,
                                     outputs=["tumor_diameter"], n_jobs=1, progress=False)
        assert (sim["status"].values == 0).all()
        mm = sim["tumor_diameter"].values * 10.0
        ds = assess_response(mm[:, None, :], times, is_node=[False], organ=[0])
        primary[arm] = (ds["sitc"].values == "primary")
    # fewer primary-resistant patients, and none made primary-resistant by adding chemo
    assert primary["combo"].sum() <= primary["pembro"].sum() - 2
    assert not np.any(primary["combo"] & ~primary["pembro"])


def test_docetaxel_shrinks_tumor_less_than_kn189_combination(chemo_model, regimens):
    doc = im.simulate(chemo_model, regimens["doc"], t_end=126.0, outputs=["tumor_diameter"])
    none = im.simulate(chemo_model, None, t_end=126.0, outputs=["tumor_diameter"])
    combo = im.simulate(chemo_model, regimens["combo"], t_end=126.0, outputs=["tumor_diameter"])
    d = [x["tumor_diameter"].values[-1] for x in (none, doc, combo)]
    assert d[0] > 1.1 * d[1] and d[1] > 1.1 * d[2]
