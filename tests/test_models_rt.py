"""Radiotherapy and the two-lesion model: radiotherapy.toml, icd.toml, lesion2.toml,
nsclc_io_rt_2lesion.toml.

* the radiotherapy kill of one fraction equals the LQ closed form exp(-alpha d - beta d^2) and the
  engine's multiplicative [[scale]] LQ event, with the killed cells kept in the Dead pool;
* two identical lesions give identical trajectories (lesion 2 is the same mechanism as lesion 1);
* radiotherapy is symmetric between the lesions: RT to lesion 1 and the same RT to lesion 2 give
  mirrored trajectories (lesion 2 has its own radiation inflammation RT_infl2 with every effect
  that RT_infl has on lesion 1, and the in-situ vaccination route is driven by both), and RT_infl2
  is exactly zero unless lesion 2 is irradiated;
* behaviour test 8 (first part): radiotherapy to lesion 1 shrinks the non-irradiated lesion 2
  more with anti-PD-1 than without; RT raises PD-L1 and CD8+ infiltration in the irradiated lesion;
* behaviour test 8 (second half): RT adds more benefit in a PD-L1-negative, non-inflamed tumor than
  in a PD-L1-high, inflamed one, through the in-situ vaccination route of rt_dc_activation.toml
  (checked against its closed form, and exactly off without radiotherapy);
* behaviour test 14: in an oligo-progressing patient (lesion 2 progresses on pembrolizumab),
  removing lesion 2 (surgery, a [[scale]] event) or irradiating it restores disease control
  while pembrolizumab continues.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

import immunoode as im
from immunoode.cli import main as cli_main

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
PURE_LQ = {**FROZEN, "f_hyp_RT": 0.0}


def _rt_only_model(tmp_path):
    (tmp_path / "stub.toml").write_text(_STUB)
    inc = ", ".join(f'"{f.as_posix()}"' for f in
                    [NSCLC / "tumor.toml", NSCLC / "radiotherapy.toml", tmp_path / "stub.toml"])
    (tmp_path / "m.toml").write_text(f'[model]\nname = "rt_only"\ntime_unit = "day"\ninclude = [{inc}]\n')
    return im.load_model(tmp_path / "m.toml")


@pytest.mark.parametrize("dose_gy", [2.0, 8.0])
def test_one_fraction_matches_lq_closed_form_and_scale_event(tmp_path, dose_gy):
    # f_hyp_RT = 0: the survival rule reduces to pure LQ
    model = _rt_only_model(tmp_path)
    fx = tmp_path / "fx.toml"
    fx.write_text(f'[[dose]]\ntarget = "RT_gy"\namount = {dose_gy}\nunit = "Gy"\nstart = 1\n')
    t = np.array([0.0, 3.0])
    ds = im.simulate(model, im.load_regimen(fx), t_eval=t, parameters=PURE_LQ,
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


def _sf_hypoxic_lq(d, n, alpha, ab, f_hyp, oer):
    """Closed form of the library's survival rule for n fractions of d Gy (reoxygenation between)."""
    beta = alpha / ab
    per_fx = ((1 - f_hyp) * math.exp(-alpha * d - beta * d * d)
              + f_hyp * math.exp(-alpha * d / oer - beta * d * d / oer**2))
    return per_fx**n


_RT_NAMES = [("alpha", "alpha_RT"), ("ab", "ab_RT"), ("f_hyp", "f_hyp_RT"), ("oer", "oer_RT")]


def _rt_values(model=None):
    """The survival-rule parameters of a loaded model, or of radiotherapy.toml's file."""
    if model is not None:
        return {k: model.parameters[n].value for k, n in _RT_NAMES}
    params = tomllib.loads((NSCLC / "radiotherapy.toml").read_text())["parameters"]
    return {k: params[n]["value"] for k, n in _RT_NAMES}


@pytest.mark.parametrize("dose_gy,n", [(2.0, 5), (8.0, 3), (12.0, 5), (12.5, 4)],
                         ids=["5x2Gy", "3x8Gy", "5x12Gy", "4x12.5Gy"])
def test_schedule_survival_matches_hypoxic_lq_closed_form(tmp_path, dose_gy, n):
    """Radiotherapy over-kill fix: LQ with a hypoxic share re-established between fractions."""
    model = _rt_only_model(tmp_path)
    v = _rt_values(model)
    reg = im.Regimen((im.Dose("RT_gy", dose_gy, start=1.0, every=1.0, count=n, unit="Gy"),))
    t = np.array([0.0, n + 2.0])
    ds = im.simulate(model, reg, t_eval=t, parameters=FROZEN, outputs=["Ts", "Tr", "Dead"],
                     method="LSODA", rtol=1e-11, atol=1e-16)
    sf = _sf_hypoxic_lq(dose_gy, n, **v)
    assert ds["Ts"].values[-1] / ds["Ts"].values[0] == pytest.approx(sf, rel=1e-5)
    assert ds["Tr"].values[-1] / ds["Tr"].values[0] == pytest.approx(sf, rel=1e-5)
    total = ds["Ts"].values + ds["Tr"].values + ds["Dead"].values
    assert total[-1] == pytest.approx(total[0], rel=1e-9)
    # a different hypoxic share gives a different survival (the rule is not pure LQ in disguise)
    other = im.simulate(model, reg, t_eval=t, parameters={**FROZEN, "f_hyp_RT": 0.3, "oer_RT": 2.5},
                        outputs=["Ts"], method="LSODA", rtol=1e-11, atol=1e-16)
    sf2 = _sf_hypoxic_lq(dose_gy, n, **{**v, "f_hyp": 0.3, "oer": 2.5})
    assert other["Ts"].values[-1] / other["Ts"].values[0] == pytest.approx(sf2, rel=1e-5)


def test_default_survival_rule_is_not_certain_eradication():
    """Pure LQ (alpha 0.3/Gy) removes 13 natural logs with 3 x 8 Gy and 40 with 5 x 12 Gy; with the
    default hypoxic share 3 x 8 Gy (BED10 43 Gy) leaves 1e-5..1e-3 and the ablative 4 x 12.5 Gy
    (BED10 112 Gy) still removes > 6 log10, while no SBRT schedule removes more than 10 log10."""
    v = _rt_values()
    assert 1e-5 < _sf_hypoxic_lq(8.0, 3, **v) < 1e-3
    assert _sf_hypoxic_lq(12.5, 4, **v) < 1e-6
    for d, n in [(8.0, 3), (12.0, 5), (12.5, 4), (18.0, 3), (20.0, 3)]:
        pure = math.exp(-n * (v["alpha"] * d + v["alpha"] / v["ab"] * d * d))
        assert pure < 1e-5 and _sf_hypoxic_lq(d, n, **v) > 1e-10, (d, n)


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


# (dose target, own PD-L1, own Te, own inflammation, the other lesion's PD-L1)
LOCAL_RT = {"lesion1": ("RT_gy", "PDL1", "Te", "radiation_inflammation", "PDL1_2"),
            "lesion2": ("RT_gy2", "PDL1_2", "Te2", "radiation_inflammation2", "PDL1")}


@pytest.mark.parametrize("lesion", list(LOCAL_RT))
def test_rt_raises_pdl1_and_cd8_infiltration_in_irradiated_lesion(two_lesion, lesion):
    """5 x 2 Gy from day 60 (after the initial immune transient of the library model) to one
    lesion, at the default patient (lesion 2 smaller than lesion 1): that lesion's inflammation,
    PD-L1 and CD8+ infiltration rise; the other lesion's PD-L1 does not (a local effect)."""
    target, pdl1, te, infl, other_pdl1 = LOCAL_RT[lesion]
    fx = im.Regimen((im.Dose(target, 2.0, start=60.0, every=1.0, count=5, label="RT 2 Gy"),))
    outs = [pdl1, te, infl, other_pdl1]
    t = np.arange(55.0, 71.0)
    none = im.simulate(two_lesion, None, t_eval=t, outputs=outs)
    rt = im.simulate(two_lesion, fx, t_eval=t, outputs=outs)
    i = 65 - 55
    assert rt[infl].values[i] > 0.5
    assert rt[pdl1].values[i] > none[pdl1].values[i] + 0.2
    assert rt[te].values[i] > 1.15 * none[te].values[i]
    assert rt[other_pdl1].values[i] < none[other_pdl1].values[i] + 0.05


# Symmetry of radiotherapy between the lesions.  Lesion 2 reads the Treg, M1/M2 and NK densities
# of lesion 1's microenvironment (lesion2.toml), and those follow lesion 1's size (macrophage
# recruitment and M1 -> M2 polarisation, Treg induction) and IFN-gamma (M2 -> M1 repolarisation):
# an asymmetry outside the radiotherapy parts, which shifts lesion-2 outputs by tens of percent
# over a year when one lesion shrinks and the other does not.  To check the radiotherapy parts
# alone these couplings are held fixed (constant M1/M2, Treg independent of tumor size).
SHARED_MICROENV_FIXED = {"s_M": 0.0, "d_M": 0.0, "k_12": 0.0, "k_21": 0.0, "a_Treg_T": 0.0}
IDENTICAL_LESION2 = {"T0_2": 5.5, "f_res0_2": 0.005}   # = T0, f_res0 of lesion 1 (tumor.toml)
MIRROR_PAIRS = [("tumor_diameter", "tumor_diameter2"), ("Te", "Te2"), ("PDL1", "PDL1_2"),
                ("RT_infl", "RT_infl2")]


def _sbrt_to(target, pembro):
    rt = (im.Dose(target, 8.0, start=0.0, every=1.0, count=3, unit="Gy", label="SBRT 8 Gy"),)
    ici = (im.Dose("A_pembro_c", 200.0, start=7.0, every=21.0, count=35, duration=0.0208333,
                   label="pembrolizumab"),)
    return im.Regimen(rt + (ici if pembro else ()))


@pytest.mark.parametrize("pembro", [False, True], ids=["rt-alone", "rt+pembrolizumab"])
def test_rt_to_either_of_two_identical_lesions_gives_mirrored_trajectories(two_lesion, pembro):
    """SBRT 3 x 8 Gy to lesion 1 and the same SBRT to lesion 2 of two identical lesions: lesion-1
    outputs of one run equal lesion-2 outputs of the other and vice versa (diameter, Te, PD-L1 and
    the radiation inflammation), with and without pembrolizumab.  Without RT_infl2 (lesion 2's
    PD-L1 rise, extra infiltration, lymphodepletion and DC activation), measured with the earlier
    lesion2.toml, they differed by up to 3% (RT alone) and 7% (with pembrolizumab) in diameter and
    130-140% in Te and PD-L1."""
    p = {**IDENTICAL_LESION2, **SHARED_MICROENV_FIXED}
    outs = [o for pair in MIRROR_PAIRS for o in pair] + ["DC", "Tp"]
    a = im.simulate(two_lesion, _sbrt_to("RT_gy", pembro), t_end=365.0, parameters=p, outputs=outs)
    b = im.simulate(two_lesion, _sbrt_to("RT_gy2", pembro), t_end=365.0, parameters=p, outputs=outs)
    for x, y in MIRROR_PAIRS:
        np.testing.assert_allclose(a[x].values, b[y].values, rtol=1e-5, atol=1e-12, err_msg=f"{x} vs {y}")
        np.testing.assert_allclose(a[y].values, b[x].values, rtol=1e-5, atol=1e-12, err_msg=f"{y} vs {x}")
    for shared in ("DC", "Tp"):
        np.testing.assert_allclose(a[shared].values, b[shared].values, rtol=1e-5, err_msg=shared)
    # the mirror is not trivial: the irradiated lesion differs from the other one
    assert b["RT_infl2"].values[5] > 1.0 and b["RT_infl"].values.max() == 0.0
    assert b["PDL1_2"].values[5] > b["PDL1"].values[5] + 0.2
    assert b["tumor_diameter2"].values[84] < 0.9 * b["tumor_diameter"].values[84]


def test_rt_infl2_matches_closed_form_and_is_exactly_zero_without_rt_to_lesion2(two_lesion, regs):
    """RT_infl2 after one fraction of d Gy to lesion 2 is q d k (exp(-m t) - exp(-k t))/(k - m), as
    RT_infl for lesion 1; without RT to lesion 2 (untreated, pembrolizumab, SBRT to lesion 1) it and
    RT_gy2 are exactly 0, so every lesion-2 RT flux is exactly 0 there."""
    for reg in (None, regs["pembro"], regs["rt_pembro"]):
        ds = im.simulate(two_lesion, reg, t_end=365.0, outputs=["RT_infl2", "RT_gy2", "RT_infl"])
        assert np.all(ds["RT_infl2"].values == 0.0) and np.all(ds["RT_gy2"].values == 0.0)
    assert ds["RT_infl"].values.max() > 1.0   # SBRT to lesion 1 did inflame lesion 1
    pv = {n: two_lesion.model.parameters[n].value for n in ("k_RT", "q_RT_infl", "d_RT_infl")}
    k, m, q, dose = pv["k_RT"], pv["d_RT_infl"], pv["q_RT_infl"], 8.0
    t = np.array([0.0, 0.5, 2.0, 7.0, 20.0])
    ds = im.simulate(two_lesion, im.Regimen((im.Dose("RT_gy2", dose, start=0.0, unit="Gy"),)), t_eval=t,
                     outputs=["RT_infl2", "RT_infl"], rtol=1e-10, atol=1e-12)
    ref = q * dose * k * (np.exp(-m * t) - np.exp(-k * t)) / (k - m)
    np.testing.assert_allclose(ds["RT_infl2"].values, ref, rtol=1e-7, atol=1e-10)
    assert np.all(ds["RT_infl"].values == 0.0)


def test_rt_to_both_lesions_with_pembrolizumab_keeps_states_nonnegative(two_lesion, regs):
    both = regs["rt_pembro"] + im.Regimen((im.Dose("RT_gy2", 8.0, start=0.0, every=1.0, count=3, unit="Gy"),))
    ds = im.simulate(two_lesion, both, t_end=730.0)
    for s in two_lesion.state_names:
        v = ds[s].values
        assert np.all(np.isfinite(v)), s
        assert v.min() >= -1e-8 * max(1.0, np.abs(v).max()), f"{s} went negative: {v.min()}"


@pytest.mark.parametrize("name", ["nsclc_io_rt_2lesion.toml", "cic_nsclc.toml"])
def test_unit_check_passes_on_models_with_both_lesions_irradiable(name, capsys):
    assert cli_main(["check", str(MODELS / name)]) == 0
    assert "RT_infl2" in capsys.readouterr().out


def test_abscopal_effect_on_lesion2_is_larger_with_anti_pd1(two_lesion, regs):
    d2 = {k: im.simulate(two_lesion, regs[k], t_end=182.0, outputs=["tumor_diameter2"])
          ["tumor_diameter2"].values for k in ("rt", "rt_pembro", "pembro_d7")}
    untreated = im.simulate(two_lesion, None, t_end=182.0, outputs=["tumor_diameter2"])["tumor_diameter2"].values
    # RT alone: some out-of-field effect; RT + anti-PD-1: much more (12-week PEMBRO-RT endpoint)
    assert d2["rt"][84] < 0.95 * untreated[84]
    assert d2["rt_pembro"][84] < 0.75 * d2["rt"][84]
    assert d2["rt_pembro"][84] < 0.85 * d2["pembro_d7"][84]  # and more than anti-PD-1 alone


def test_sub_ablative_rt_recurs_locally_and_ablative_sbrt_controls_without_eradication(two_lesion):
    """With the hypoxic share, RT alone to lesion 1 (no ICI): 3 x 8 Gy leaves ~1.6e6 viable cells
    that regrow to a measurable (>= 1 cm) lesion within 3 years; 4 x 12.5 Gy (BED10 112.5 Gy)
    keeps the lesion below 0.5 cm from month 6 to year 3; neither empties the lesion (pure LQ leaves
    ~1e-5 of a cell after 4 x 12.5 Gy)."""
    def run(d, n, **p):
        reg = im.Regimen((im.Dose("RT_gy", d, every=1.0, count=n, unit="Gy"),))
        return im.simulate(two_lesion, reg, t_end=1095.0, outputs=["tumor_cells", "tumor_diameter"],
                           parameters=p)
    sub, abl = run(8.0, 3), run(12.5, 4)
    assert sub["tumor_diameter"].values[1095] >= 1.0
    assert abl["tumor_diameter"].values[180:].max() < 0.5   # after the dead cells have cleared
    assert abl["tumor_cells"].values.min() > 1e-6          # > 1000 viable cells survive
    pure = run(12.5, 4, f_hyp_RT=0.0)
    assert pure["tumor_cells"].values.min() < 1e-12         # pure LQ: < 1 cell, certain eradication


# Behaviour 8, second half (PEMBRO-RT, Theelen JAMA Oncol 2019;5:1276: the benefit of adding SBRT
# to pembrolizumab was mainly in PD-L1-negative tumors).  The two tumors carry the background their
# PD-L1 status implies (seed review): a PD-L1-high tumor is inflamed (library defaults: activated
# DCs, a pre-existing T-cell response that also drives adaptive PD-L1); a PD-L1-negative tumor is
# non-inflamed - its DCs are seldom activated, so priming limits the anti-PD-1 response.  That is
# set by the lower bound of the plausible range of the maximal DC maturation k_DC (0.05/day
# against 0.5, antigen_dc.toml), fixed before the benefit was computed; TPS 0 against 80%.
PDL1_NEG = {"pdl1_tps": 0.0, "k_DC": 0.05}
PDL1_HIGH = {"pdl1_tps": 0.8}


def _rt_benefit_on_lesion2(two_lesion, regs, day=84, **p):
    """Benefit measure of behaviour 8 (second half): relative reduction of the non-irradiated
    lesion-2 diameter at `day` (12 weeks: the PEMBRO-RT response time point) by adding SBRT
    3 x 8 Gy to lesion 1 before pembrolizumab, against pembrolizumab alone from the same day 7."""
    d = {k: im.simulate(two_lesion, regs[k], t_end=float(day), outputs=["tumor_diameter2"],
                        parameters=p)["tumor_diameter2"].values[day] for k in ("rt_pembro", "pembro_d7")}
    return 1.0 - d["rt_pembro"] / d["pembro_d7"]


@pytest.mark.parametrize("tmb", [5.0, 10.0, 20.0])
def test_rt_adds_more_benefit_in_pdl1_negative_than_pdl1_high_tumor(two_lesion, regs, tmb):
    # asserted at every TMB with a margin of 5 percentage points
    neg = _rt_benefit_on_lesion2(two_lesion, regs, tmb=tmb, **PDL1_NEG)
    high = _rt_benefit_on_lesion2(two_lesion, regs, tmb=tmb, **PDL1_HIGH)
    assert neg > 0.1 and neg > high + 0.05, (neg, high)


@pytest.mark.parametrize("pert", [{"T0_2": 1.0}, {"T0_2": 4.0}, {"k_prime": 0.035}, {"k_prime": 0.065},
                                  {"k_CTL": 0.21}, {"k_CTL": 0.39}],
                         ids=["T0_2=1", "T0_2=4", "k_prime-30%", "k_prime+30%", "k_CTL-30%", "k_CTL+30%"])
def test_pdl1_direction_of_rt_benefit_holds_around_the_default_patient(two_lesion, regs, pert):
    """Not a single-point result: the direction and margin hold at TMB 10 when lesion-2 size,
    priming or killing of both tumors moves by about 30% (or lesion 2 is halved / doubled)."""
    neg = _rt_benefit_on_lesion2(two_lesion, regs, tmb=10.0, **PDL1_NEG, **pert)
    high = _rt_benefit_on_lesion2(two_lesion, regs, tmb=10.0, **PDL1_HIGH, **pert)
    assert neg > 0.1 and neg > high + 0.05, (neg, high)


def test_pdl1_direction_of_rt_benefit_comes_from_in_situ_vaccination(two_lesion, regs):
    """Without the RT-driven DC activation (k_DC_RT = 0) the non-inflamed PD-L1-negative tumor gains
    less from RT than the PD-L1-high one (RT then acts only by redirecting primed effectors, which
    needs an ongoing response); and TPS alone (same inflamed background) gives no 5-point margin."""
    off = {"tmb": 10.0, "k_DC_RT": 0.0}
    assert (_rt_benefit_on_lesion2(two_lesion, regs, **off, **PDL1_NEG)
            < _rt_benefit_on_lesion2(two_lesion, regs, **off, **PDL1_HIGH))
    tps_only = _rt_benefit_on_lesion2(two_lesion, regs, tmb=10.0, pdl1_tps=0.0)
    assert tps_only < _rt_benefit_on_lesion2(two_lesion, regs, tmb=10.0, **PDL1_HIGH) + 0.05


def test_rt_in_situ_vaccination_equalises_lesion2_between_pdl1_groups(two_lesion, regs):
    """Under pembrolizumab alone lesion 2 of the non-inflamed tumor is larger at 12 weeks (priming
    limits the response); with SBRT first the two tumors end within 5% of each other."""
    d = {(g, k): im.simulate(two_lesion, regs[k], t_end=84.0, outputs=["tumor_diameter2"],
                             parameters={"tmb": 10.0, **p})["tumor_diameter2"].values[84]
         for g, p in (("neg", PDL1_NEG), ("high", PDL1_HIGH)) for k in ("pembro_d7", "rt_pembro")}
    assert d["neg", "pembro_d7"] > 1.1 * d["high", "pembro_d7"]
    assert d["neg", "rt_pembro"] == pytest.approx(d["high", "rt_pembro"], rel=0.05)


# ---------------------------------------------- RT in-situ vaccination (rt_dc_activation)
_STUB_DC = """
[model]
name = "stub_rt_dc_env"
time_unit = "day"
[states.Ag]
initial = 0.03
unit = "1"
[states.DC]
initial = 0.0
unit = "1"
[states.RT_infl2]
initial = 0.0
unit = "1"
[parameters]
K_Ag = { value = 0.02, unit = "1", source = "test stub" }
[odes]
Ag = "0"
DC = "0"
RT_infl2 = "0"
"""


@pytest.mark.parametrize("infl2", [0.0, 0.3], ids=["lesion2-not-irradiated", "lesion2-inflamed"])
def test_rt_dc_activation_matches_closed_form_of_one_fraction(tmp_path, infl2):
    """One fraction of d Gy: RT_gy = d exp(-k t), RT_infl = q d k (exp(-m t) - exp(-k t))/(k - m)
    (m = d_RT_infl); with antigen and lesion 2's inflammation RT_infl2 = c held fixed,
    DC(t) = int_0^t k_DC_RT (hill(RT_infl, K) + hill(c, K)) hill(Ag, K_Ag, 2): the sum of one
    licensing flux per irradiated lesion (c = 0: the lesion-1 route alone)."""
    from scipy.integrate import quad

    _rt_only_model(tmp_path)  # writes stub.toml (DAMP, PDL1, Tp, Te, infiltration)
    (tmp_path / "stub_dc.toml").write_text(_STUB_DC)
    inc = ", ".join(f'"{f.as_posix()}"' for f in
                    [NSCLC / "tumor.toml", NSCLC / "radiotherapy.toml", NSCLC / "rt_dc_activation.toml",
                     tmp_path / "stub.toml", tmp_path / "stub_dc.toml"])
    (tmp_path / "dc.toml").write_text(f'[model]\nname = "rt_dc"\ntime_unit = "day"\ninclude = [{inc}]\n')
    model = im.load_model(tmp_path / "dc.toml")
    pv = {n: model.parameters[n].value for n in ("k_RT", "q_RT_infl", "d_RT_infl", "k_DC_RT", "K_RT_DC")}
    dose, t_end = 8.0, 20.0
    reg = im.Regimen((im.Dose("RT_gy", dose, start=0.0, unit="Gy"),))
    t = np.array([0.0, 2.0, 7.0, t_end])
    ds = im.simulate(model, reg, t_eval=t, parameters=FROZEN, outputs=["DC", "RT_infl"],
                     initial={"RT_infl2": infl2}, method="LSODA", rtol=1e-11, atol=1e-14)
    k, m = pv["k_RT"], pv["d_RT_infl"]
    h2 = infl2 / (pv["K_RT_DC"] + infl2)

    def infl(s):
        return pv["q_RT_infl"] * dose * k * (math.exp(-m * s) - math.exp(-k * s)) / (k - m)

    h_ag = 0.03**2 / (0.03**2 + 0.02**2)
    for i, ti in enumerate(t):
        assert ds["RT_infl"].values[i] == pytest.approx(infl(ti), rel=1e-6, abs=1e-12)
        ref = quad(lambda s: pv["k_DC_RT"] * (infl(s) / (pv["K_RT_DC"] + infl(s)) + h2) * h_ag, 0.0, ti,
                   points=[0.1, 1.0], epsabs=1e-13, epsrel=1e-11)[0] if ti > 0 else 0.0
        assert ds["DC"].values[i] == pytest.approx(ref, rel=1e-6, abs=1e-12)
    assert ds["DC"].values[-1] > 1.0  # not a trivially zero route


def test_rt_dc_activation_is_exactly_off_without_radiotherapy(two_lesion, regs):
    """Calibrated (no-RT) dynamics are untouched: without radiotherapy the route is zero, so the
    model with it equals the model with it switched off (k_DC_RT = 0); with SBRT it is not."""
    outs = ["DC", "Tp", "tumor_diameter", "tumor_diameter2"]
    for reg in (None, regs["pembro"]):
        on = im.simulate(two_lesion, reg, t_end=365.0, outputs=outs)
        off = im.simulate(two_lesion, reg, t_end=365.0, outputs=outs, parameters={"k_DC_RT": 0.0})
        for o in outs:
            np.testing.assert_allclose(on[o].values, off[o].values, rtol=1e-9, atol=0, err_msg=o)
    on = im.simulate(two_lesion, regs["rt_pembro"], t_end=28.0, outputs=["DC"])
    off = im.simulate(two_lesion, regs["rt_pembro"], t_end=28.0, outputs=["DC"], parameters={"k_DC_RT": 0.0})
    assert on["DC"].values[14] > 1.2 * off["DC"].values[14]


def test_rt_dc_activation_leaves_cic_nsclc_without_radiotherapy_unchanged(regs):
    """The assembled model (cic_nsclc.toml) without radiotherapy: untreated and under pembrolizumab,
    every state with the route on equals the route switched off (k_DC_RT = 0) to 1e-9."""
    cic = im.compile_model(im.load_model(MODELS / "cic_nsclc.toml"))
    for reg in (None, regs["pembro"]):
        on = im.simulate(cic, reg, t_end=365.0)
        off = im.simulate(cic, reg, t_end=365.0, parameters={"k_DC_RT": 0.0})
        for s in cic.state_names:
            np.testing.assert_allclose(on[s].values, off[s].values, rtol=1e-9, atol=1e-300, err_msg=s)


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
