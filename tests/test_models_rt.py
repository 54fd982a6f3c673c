"""Radiotherapy and the two-lesion model: radiotherapy.toml, icd.toml, lesion2.toml,
nsclc_io_rt_2lesion.toml.

* the radiotherapy kill of one fraction equals the LQ closed form exp(-alpha d - beta d^2) and the
  engine's multiplicative [[scale]] LQ event, with the killed cells kept in the Dead pool;
* two identical lesions give identical trajectories (lesion 2 is the same mechanism as lesion 1);
* behaviour test 8 (first part): radiotherapy to lesion 1 shrinks the non-irradiated lesion 2
  more with anti-PD-1 than without; RT raises PD-L1 and CD8+ infiltration in the irradiated lesion;
* behaviour test 14: in an oligo-progressing patient (lesion 2 progresses on pembrolizumab),
  removing lesion 2 (surgery, a [[scale]] event) or irradiating it restores disease control
  while pembrolizumab continues.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import immunoode as im

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
NSCLC = MODELS / "nsclc"
REGIMENS = MODELS / "regimens"


@pytest.fixture(scope="session")
def two_lesion():
    return im.compile_model(im.load_model(MODELS / "nsclc_io_rt_2lesion.toml"))


@pytest.fixture(scope="session")
def regs():
    pembro_d7 = im.Regimen((im.Dose("A_pembro_c", 200.0, start=7.0, every=21.0, count=35,
                                    duration=0.0208333, label="pembrolizumab"),))
    return {"rt": im.load_regimen(REGIMENS / "sbrt_3x8gy.toml"),
            "rt_pembro": im.load_regimen(REGIMENS / "sbrt_3x8gy_pembrolizumab.toml"),
            "pembro_d7": pembro_d7,
            "pembro": im.load_regimen(REGIMENS / "nsclc_pembrolizumab_200mg_q3w.toml")}


# --------------------------------------------------------------------- LQ closed form
_STUB = """
[model]
name = "stub_rt_env"
time_unit = "day"
[states.DAMP]
initial = 0.0
unit = "1"
[states.PDL1]
initial = 0.5
unit = "1"
[states.Tp]
initial = 1.0
unit = "1"
[states.Te]
initial = 1.0
unit = "1"
[parameters]
k_DAMP_kill = { value = 1.0, unit = "1/(1e9 cell)", source = "test stub" }
k_pdl1 = { value = 1.0, unit = "1/day", source = "test stub" }
k_stub = { value = 0.1, unit = "1/day", source = "test stub" }
[assignments]
infiltration = { expr = "k_stub*Tp", unit = "1/day" }
[odes]
DAMP = "0"
PDL1 = "0"
Tp = "0"
Te = "0"
"""

FROZEN = {"k_grow": 0.0, "k_death": 0.0, "mu_edit": 0.0, "k_clear": 0.0}


@pytest.mark.parametrize("dose_gy", [2.0, 8.0])
def test_one_fraction_matches_lq_closed_form_and_scale_event(tmp_path, dose_gy):
    (tmp_path / "stub.toml").write_text(_STUB)
    inc = ", ".join(f'"{f.as_posix()}"' for f in
                    [NSCLC / "tumor.toml", NSCLC / "radiotherapy.toml", tmp_path / "stub.toml"])
    (tmp_path / "m.toml").write_text(f'[model]\nname = "rt_only"\ntime_unit = "day"\ninclude = [{inc}]\n')
    model = im.load_model(tmp_path / "m.toml")
    fx = tmp_path / "fx.toml"
    fx.write_text(f'[[dose]]\ntarget = "RT_gy"\namount = {dose_gy}\nunit = "Gy"\nstart = 1\n')
    t = np.array([0.0, 3.0])
    ds = im.simulate(model, im.load_regimen(fx), t_eval=t, parameters=FROZEN,
                     outputs=["Ts", "Tr", "Dead"], method="LSODA", rtol=1e-10, atol=1e-14)
    alpha, beta = 0.3, 0.3 / 10.0
    sf = math.exp(-alpha * dose_gy - beta * dose_gy**2)
    assert ds["Ts"].values[-1] / ds["Ts"].values[0] == pytest.approx(sf, rel=1e-6)
    assert ds["Tr"].values[-1] / ds["Tr"].values[0] == pytest.approx(sf, rel=1e-6)
    total = ds["Ts"].values + ds["Tr"].values + ds["Dead"].values
    assert total[-1] == pytest.approx(total[0], rel=1e-9)  # killed cells stay as dead cells
    # the engine's own LQ event on the tumor module alone gives the same survivors
    sc = tmp_path / "scale.toml"
    sc.write_text(f'[[scale]]\ntarget = ["Ts", "Tr"]\nalpha = {alpha}\nbeta = {beta}\n'
                  f'dose_gy = {dose_gy}\nstart = 1\n')
    ref = im.simulate(im.load_model(NSCLC / "tumor.toml"), im.load_regimen(sc), t_eval=t,
                      parameters=FROZEN, outputs=["Ts"], method="LSODA", rtol=1e-10, atol=1e-14)
    assert ds["Ts"].values[-1] == pytest.approx(ref["Ts"].values[-1], rel=1e-6)


# ------------------------------------------------------------------- two-lesion model
def test_two_identical_lesions_have_identical_trajectories(two_lesion, regs):
    p = {"T0_2": 5.5, "f_res0_2": 0.005}
    ds = im.simulate(two_lesion, regs["pembro"], t_end=365.0, parameters=p,
                     outputs=["tumor_diameter", "tumor_diameter2", "Te", "Te2", "PDL1", "PDL1_2"])
    for a, b in [("tumor_diameter", "tumor_diameter2"), ("Te", "Te2"), ("PDL1", "PDL1_2")]:
        np.testing.assert_allclose(ds[a].values, ds[b].values, rtol=1e-5, err_msg=a)


def test_two_lesion_model_states_nonnegative_two_years(two_lesion, regs):
    ds = im.simulate(two_lesion, regs["rt_pembro"], t_end=730.0)
    for s in two_lesion.state_names:
        v = ds[s].values
        assert np.all(np.isfinite(v)), s
        assert v.min() >= -1e-8 * max(1.0, np.abs(v).max()), f"{s} went negative: {v.min()}"


def test_rt_raises_pdl1_and_cd8_infiltration_in_irradiated_lesion(two_lesion):
    # 5 x 2 Gy from day 60 (after the initial immune transient of the library model)
    fx = im.Regimen((im.Dose("RT_gy", 2.0, start=60.0, every=1.0, count=5, label="RT 2 Gy"),))
    outs = ["PDL1", "PDL1_2", "Te", "Te2", "radiation_inflammation"]
    t = np.arange(55.0, 71.0)
    none = im.simulate(two_lesion, None, t_eval=t, outputs=outs)
    rt = im.simulate(two_lesion, fx, t_eval=t, outputs=outs)
    i = 65 - 55
    assert rt["radiation_inflammation"].values[i] > 0.5
    assert rt["PDL1"].values[i] > none["PDL1"].values[i] + 0.2
    assert rt["Te"].values[i] > 1.15 * none["Te"].values[i]
    # the other lesion's PD-L1 is not raised by the field (local effect)
    assert rt["PDL1_2"].values[i] < none["PDL1_2"].values[i] + 0.05


def test_abscopal_effect_on_lesion2_is_larger_with_anti_pd1(two_lesion, regs):
    d2 = {k: im.simulate(two_lesion, regs[k], t_end=182.0, outputs=["tumor_diameter2"])
          ["tumor_diameter2"].values for k in ("rt", "rt_pembro", "pembro_d7")}
    untreated = im.simulate(two_lesion, None, t_end=182.0, outputs=["tumor_diameter2"])["tumor_diameter2"].values
    # RT alone: some out-of-field effect; RT + anti-PD-1: much more (12-week PEMBRO-RT endpoint)
    assert d2["rt"][84] < 0.95 * untreated[84]
    assert d2["rt_pembro"][84] < 0.75 * d2["rt"][84]
    assert d2["rt_pembro"][84] < 0.85 * d2["pembro_d7"][84]  # and more than anti-PD-1 alone


# -------------------------------------------------------------- oligoprogression (14)
OLIGO = {"f_res0_2": 0.3, "tmb": 20.0, "pdl1_tps": 0.8}
T_LOCAL = 273.0


def _local(tmp_path, kind):
    p = tmp_path / f"{kind}.toml"
    if kind == "surgery":
        p.write_text(f'[[scale]]\ntarget = ["Ts2", "Tr2", "Dead2"]\nfactor = 1e-9\nstart = {T_LOCAL}\n'
                     'label = "resection of lesion 2"\n')
    else:
        p.write_text(f'[[dose]]\ntarget = "RT_gy2"\namount = 8\nunit = "Gy"\nstart = {T_LOCAL}\n'
                     'every = 1\ncount = 3\nlabel = "SBRT lesion 2"\n')
    return im.load_regimen(p)


@pytest.mark.parametrize("kind", ["surgery", "sbrt"])
def test_local_therapy_of_oligoprogressing_lesion_restores_control(two_lesion, regs, tmp_path, kind):
    outs = ["tumor_diameter", "tumor_diameter2", "sum_of_diameters"]
    ici = im.simulate(two_lesion, regs["pembro"], t_end=455.0, parameters=OLIGO, outputs=outs)
    both = im.simulate(two_lesion, regs["pembro"] + _local(tmp_path, kind), t_end=455.0,
                       parameters=OLIGO, outputs=outs)
    d1, d2, sod = (ici[k].values for k in outs)
    # oligo-progression on pembrolizumab: lesion 2 grows >= 20% over its nadir while lesion 1 is
    # still below its baseline
    k = int(T_LOCAL) - 1
    assert d2[k] >= 1.2 * d2[:k].min() and d1[k] < 0.6 * d1[0]
    after = both["sum_of_diameters"].values
    assert after[455] < 0.8 * sod[k]          # disease control restored (sum below pre-intervention)
    assert after[455] < 0.6 * sod[455]        # far below continuing the ICI alone
    assert both["tumor_diameter"].values[455] == pytest.approx(d1[455], rel=0.1)  # lesion 1 unaffected
