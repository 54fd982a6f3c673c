"""Agents composed from library parts.

models/nsclc_io_novel_agents.toml (a PD-1 x VEGF bispecific and an anti-TIGIT antibody next to
pembrolizumab):

* the typical-IgG1 PK of both new antibodies against the closed-form two-compartment solution;
* the bispecific's VEGF arm (vascular normalization on vs off) raises CD8+ density, lowers TAMs
  and improves tumor control over its PD-1 arm alone;
* anti-TIGIT added to pembrolizumab improves the response, and does nothing alone when there is
  no effector killing to release (e_TIGIT = 0 control).

models/nsclc_io_ctla4_agents.toml (tremelimumab, durvalumab, a PD-1 x CTLA-4 bispecific, pembrolizumab)
and models/nsclc_io_tme_modulators.toml (MDM2 inhibitor, anti-SEMA4D, HDAC inhibitor, anti-CEACAM5
ADC, pembrolizumab):

* every new agent's PK against its closed form (IgG two-compartment bolus; oral one-compartment
  first-order absorption, the Bateman function), with the values read from the model files;
* the hooks: durvalumab + tremelimumab fill occ_PDL1 and occ_CTLA4 together; the bispecific fills
  occ_PD1 and occ_CTLA4 from one PK;
* directions of effect, each against a control that differs in one thing, with a margin:
  tremelimumab added to durvalumab (Tregs down, primed T cells up, deeper nadir); the bispecific
  beats pembrolizumab and its own PD-1 arm on priming; the MDM2 inhibitor shrinks a TP53-wild-type
  tumor and leaves the same tumor TP53-mutant untouched; the ADC kills more in a CEACAM5-high
  tumor and nothing without CEACAM5 and bystander; anti-SEMA4D raises M1/M2, DC and CD8+ density;
  the HDAC inhibitor restores HLA-I presentation (not beyond the HLA/B2M genotype) and lowers Tregs;
* both assembled models pass `immunoode check` (unit check) and keep every state finite and
  non-negative for 2 years of all their agents; with no new agent dosed the TME model reproduces
  nsclc_io.toml.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import immunoode as im

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "nsclc_io_novel_agents.toml"
PEMBRO = ROOT / "models" / "regimens" / "nsclc_pembrolizumab_200mg_q3w.toml"


@pytest.fixture(scope="session")
def cm():
    return im.compile_model(im.load_model(MODEL))


def _q3w(target, amount, unit="mg"):
    return im.Regimen((im.Dose(target, amount, every=21.0, count=35, duration=0.0416667, unit=unit,
                               label=target),))


# ivonescimab-like 20 mg/kg q3w and tiragolumab-like 600 mg q3w (doses recalled, not in shared/)
BSAB = _q3w("A_bsab_c", 1500.0)
TIRA = _q3w("A_tira_c", 600.0)


def test_new_antibody_pk_matches_closed_form(cm):
    reg = im.Regimen((im.Dose("A_bsab_c", 1500.0), im.Dose("A_tira_c", 600.0)))
    t = np.linspace(0.0, 42.0, 85)
    ds = im.simulate(cm, reg, t_eval=t, outputs=["conc_bsab", "conc_tira"], rtol=1e-9, atol=1e-12)
    CL, V1, Q, V2 = 0.2, 3.28, 0.546, 3.63
    k10, k12, k21 = CL / V1, Q / V1, Q / V2
    s = k10 + k12 + k21
    a = (s + math.sqrt(s * s - 4 * k10 * k21)) / 2
    b = (s - math.sqrt(s * s - 4 * k10 * k21)) / 2
    shape = ((a - k21) / (a - b) * np.exp(-a * t) + (k21 - b) / (a - b) * np.exp(-b * t)) / V1
    np.testing.assert_allclose(ds["conc_bsab"].values, 1500.0 * shape, rtol=1e-6)
    np.testing.assert_allclose(ds["conc_tira"].values, 600.0 * shape, rtol=1e-6)


def test_bispecific_vegf_arm_adds_to_its_pd1_arm(cm):
    outs = ["tumor_diameter", "cd8_tumor", "tumor_cells", "tam_total", "vascular_normalization"]
    both = im.simulate(cm, BSAB, t_end=365.0, outputs=outs)
    pd1_only = im.simulate(cm, BSAB, t_end=365.0, outputs=outs, parameters={"f_norm": 0.0})
    assert both["vascular_normalization"].values[42] > 0.8
    dens = lambda ds: ds["cd8_tumor"].values[42] / ds["tumor_cells"].values[42]  # noqa: E731
    assert dens(both) > 1.2 * dens(pd1_only)
    assert both["tam_total"].values[42] < 0.85 * pd1_only["tam_total"].values[42]
    assert both["tumor_diameter"].values.min() < 0.95 * pd1_only["tumor_diameter"].values.min()  # 8% in diameter


def test_anti_tigit_adds_to_anti_pd1(cm):
    pembro = im.load_regimen(PEMBRO)
    d = lambda reg, **p: im.simulate(cm, reg, t_end=365.0, outputs=["tumor_diameter"],  # noqa: E731
                                     parameters=p)["tumor_diameter"].values
    alone, combo = d(pembro), d(pembro + TIRA)
    assert combo.min() < 0.95 * alone.min()  # ~10% in diameter (~25% in volume)
    np.testing.assert_allclose(d(pembro + TIRA, e_TIGIT=0.0), alone, rtol=1e-6)


# ============================================================ CTLA-4 agents, TME modulators, ADC
CTLA4_MODEL = ROOT / "models" / "nsclc_io_ctla4_agents.toml"
TME_MODEL = ROOT / "models" / "nsclc_io_tme_modulators.toml"
REG = ROOT / "models" / "regimens"


@pytest.fixture(scope="session")
def ctla4():
    return im.compile_model(im.load_model(CTLA4_MODEL))


@pytest.fixture(scope="session")
def tme():
    return im.compile_model(im.load_model(TME_MODEL))


def _reg(name):
    return im.load_regimen(REG / name)


def _value(cm, name):
    return cm.model.parameters[name].value


def _two_cpt_shape(t, CL, V1, Q, V2):
    """Concentration per mg of an IV bolus at t = 0 (closed form, mg/L per mg)."""
    k10, k12, k21 = CL / V1, Q / V1, Q / V2
    s = k10 + k12 + k21
    a = (s + math.sqrt(s * s - 4 * k10 * k21)) / 2
    b = (s - math.sqrt(s * s - 4 * k10 * k21)) / 2
    return ((a - k21) / (a - b) * np.exp(-a * t) + (k21 - b) / (a - b) * np.exp(-b * t)) / V1


@pytest.mark.parametrize("which,tag,obs,dose", [
    ("ctla4", "treme", "conc_treme", 75.0),
    ("ctla4", "cado", "conc_cado", 750.0),
    ("tme", "sema", "conc_sema", 750.0),
    ("tme", "adc", "conc_adc", 185.0),
])
def test_antibody_pk_matches_two_compartment_closed_form(request, which, tag, obs, dose):
    cm = request.getfixturevalue(which)
    t = np.linspace(0.0, 56.0, 113)
    ds = im.simulate(cm, im.Regimen((im.Dose(f"A_{tag}_c", dose),)), t_eval=t, outputs=[obs],
                     rtol=1e-10, atol=1e-12)
    ref = dose * _two_cpt_shape(t, *(_value(cm, f"{k}_{tag}") for k in ("CL", "V1", "Q", "V2")))
    np.testing.assert_allclose(ds[obs].values, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("tag,dose", [("mdm2", 240.0), ("hdac", 5.0)])
def test_oral_pk_matches_bateman_function(tme, tag, dose):
    t = np.linspace(0.0, 10.0, 241)
    ds = im.simulate(tme, im.Regimen((im.Dose(f"A_{tag}_gut", dose),)), t_eval=t,
                     outputs=[f"conc_{tag}"], rtol=1e-10, atol=1e-12)
    ka, CL, V = (_value(tme, f"{k}_{tag}") for k in ("ka", "CL", "V"))
    k = CL / V
    ref = dose * ka / (V * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))
    np.testing.assert_allclose(ds[f"conc_{tag}"].values, ref, rtol=1e-6, atol=1e-12)
    assert ds[f"conc_{tag}"].values.max() > 0.0


def test_durvalumab_tremelimumab_fill_both_hooks_and_add_to_durvalumab(ctla4):
    outs = ["tumor_diameter", "occupancy_ctla4", "occupancy_pd1", "Treg", "Tp", "priming_rate"]
    dt = im.simulate(ctla4, _reg("durvalumab_tremelimumab_poseidon.toml"), t_end=365.0, outputs=outs)
    durva = im.simulate(ctla4, _reg("durvalumab_1500mg_q4w.toml"), t_end=365.0, outputs=outs)
    assert dt["occupancy_ctla4"].values[42] > 0.5 and durva["occupancy_ctla4"].values.max() == 0.0
    assert dt["occupancy_pd1"].values.max() == 0.0                   # neither blocks PD-1
    assert dt["Treg"].values[42] < 0.6 * durva["Treg"].values[42]     # CTLA-4 ADCC of Tregs
    assert dt["Tp"].values[42] > 1.3 * durva["Tp"].values[42]         # CTLA-4 brake released
    assert dt["tumor_diameter"].values.min() < 0.9 * durva["tumor_diameter"].values.min()


def test_pd1_ctla4_bispecific_beats_anti_pd1_on_priming(ctla4):
    outs = ["tumor_diameter", "priming_rate", "occupancy_ctla4", "occupancy_pd1", "Tp"]
    cado = _reg("cadonilimab_10mgkg_q3w.toml")
    bs = im.simulate(ctla4, cado, t_end=182.0, outputs=outs)
    pd1_arm = im.simulate(ctla4, cado, t_end=182.0, outputs=outs, parameters={"Kd_cado_ctla4": 1e9})
    pembro = im.simulate(ctla4, im.load_regimen(PEMBRO), t_end=182.0, outputs=outs)
    # one PK, two occupancies
    assert bs["occupancy_pd1"].values[42] > 0.9 and bs["occupancy_ctla4"].values[42] > 0.9
    assert pd1_arm["occupancy_ctla4"].values.max() < 1e-6
    prim = lambda ds: ds["priming_rate"].values[14:85].mean()  # noqa: E731  weeks 2-12
    assert prim(bs) > 1.15 * prim(pembro)
    assert prim(bs) > 1.15 * prim(pd1_arm)
    assert bs["Tp"].values[42] > 1.3 * pembro["Tp"].values[42]
    assert bs["tumor_diameter"].values[84] < 0.8 * pembro["tumor_diameter"].values[84]


def test_mdm2_inhibitor_acts_in_tp53_wild_type_only(tme):
    mdm2 = _reg("navtemadlin_240mg_d1_7_q4w.toml")
    outs = ["tumor_diameter", "danger_signal"]
    ratio, damp = {}, {}
    for tp53 in (0.0, 1.0):
        on = im.simulate(tme, mdm2, t_end=182.0, outputs=outs, parameters={"tp53": tp53})
        off = im.simulate(tme, None, t_end=182.0, outputs=outs, parameters={"tp53": tp53})
        ratio[tp53] = on["tumor_diameter"].values[182] / off["tumor_diameter"].values[182]
        damp[tp53] = on["danger_signal"].values[:8].max()
        if tp53 == 1.0:
            np.testing.assert_allclose(on["tumor_diameter"].values, off["tumor_diameter"].values, rtol=1e-6)
    assert ratio[0.0] < 0.75          # TP53-wt: > 25% smaller in diameter at 6 months
    assert ratio[1.0] == pytest.approx(1.0, abs=1e-6)
    assert damp[0.0] > 0.05 and damp[1.0] == 0.0   # immunogenic death only where p53 acts


def test_adc_kills_more_in_ceacam5_high_tumors(tme):
    adc = _reg("tusamitamab_100mgm2_q2w.toml")
    cells = lambda **p: im.simulate(tme, adc, t_end=84.0, outputs=["tumor_cells"],  # noqa: E731
                                    parameters=p)["tumor_cells"].values
    high, low = cells(ceacam5_expr=1.0), cells(ceacam5_expr=0.1)
    untreated = im.simulate(tme, None, t_end=84.0, outputs=["tumor_cells"])["tumor_cells"].values
    assert high[84] < 0.6 * low[84]
    assert low[84] < untreated[84]
    np.testing.assert_allclose(cells(ceacam5_expr=0.0, f_bystander=0.0), untreated, rtol=1e-6)


def test_anti_sema4d_lowers_suppression_and_raises_dc_and_infiltration(tme):
    outs = ["tumor_diameter", "tumor_cells", "cd8_tumor", "m1_m2_ratio", "DC"]
    pembro = im.load_regimen(PEMBRO)
    sema = _reg("pepinemab_10mgkg_q3w.toml")
    on, off = im.simulate(tme, sema, t_end=365.0, outputs=outs), im.simulate(tme, None, t_end=365.0, outputs=outs)
    assert on["m1_m2_ratio"].values[42] > 1.5 * off["m1_m2_ratio"].values[42]
    assert on["DC"].values[42] > 1.2 * off["DC"].values[42]
    dens = lambda ds: ds["cd8_tumor"].values[42] / ds["tumor_cells"].values[42]  # noqa: E731
    assert dens(on) > 1.2 * dens(off)
    combo = im.simulate(tme, pembro + sema, t_end=365.0, outputs=outs)
    alone = im.simulate(tme, pembro, t_end=365.0, outputs=outs)
    assert combo["tumor_diameter"].values.min() < 0.92 * alone["tumor_diameter"].values.min()


def test_hdac_inhibitor_restores_hla_within_genotype_and_lowers_tregs(tme):
    outs = ["tumor_diameter", "Treg", "hla_class_I", "hla_with_hdac"]
    combo = _reg("entinostat_5mg_weekly_pembrolizumab.toml")
    pembro = im.load_regimen(PEMBRO)
    low_hla = {"hla_base": 0.1, "jak_stat": 0.0}   # HLA-I silenced, no IFN-gamma rescue
    c = im.simulate(tme, combo, t_end=365.0, outputs=outs, parameters=low_hla)
    a = im.simulate(tme, pembro, t_end=365.0, outputs=outs, parameters=low_hla)
    assert c["hla_with_hdac"].values[42] > c["hla_class_I"].values[42] + 0.1
    assert c["Treg"].values[42] < 0.8 * a["Treg"].values[42]
    assert c["tumor_diameter"].values[182] < 0.7 * a["tumor_diameter"].values[182]
    # B2M loss: the ceiling is 5% presentation, and the drug cannot lift HLA-I above it
    b2m = im.simulate(tme, combo, t_end=120.0, outputs=outs, parameters={**low_hla, "b2m_loss": 1.0})
    assert b2m["hla_with_hdac"].values.max() <= 1.0 - 0.95 + 1e-9


@pytest.mark.parametrize("path", [CTLA4_MODEL, TME_MODEL], ids=lambda p: p.name)
def test_new_assembled_models_pass_check(path, capsys):
    from immunoode.cli import main as cli_main
    assert cli_main(["check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("which,regimens", [
    ("ctla4", ["durvalumab_tremelimumab_poseidon.toml", "cadonilimab_10mgkg_q3w.toml"]),
    ("tme", ["navtemadlin_240mg_d1_7_q4w.toml", "pepinemab_10mgkg_q3w.toml",
             "entinostat_5mg_weekly_pembrolizumab.toml", "tusamitamab_100mgm2_q2w.toml"]),
])
def test_all_agents_two_years_states_finite_and_nonnegative(request, which, regimens):
    cm = request.getfixturevalue(which)
    reg = _reg(regimens[0])
    for r in regimens[1:]:
        reg = reg + _reg(r)
    ds = im.simulate(cm, reg, t_end=730.0, dt=1.0)
    for s in cm.state_names:
        v = ds[s].values
        assert np.all(np.isfinite(v)), s
        assert v.min() >= -1e-8 * max(1.0, np.abs(v).max()), f"{s} went negative: {v.min()}"


def test_tme_model_without_new_agents_reproduces_nsclc_io(tme):
    io = im.compile_model(im.load_model(ROOT / "models" / "nsclc_io.toml"))
    pembro = im.load_regimen(PEMBRO)
    a = im.simulate(tme, pembro, t_end=365.0, outputs=["tumor_diameter"])["tumor_diameter"].values
    b = im.simulate(io, pembro, t_end=365.0, outputs=["tumor_diameter"])["tumor_diameter"].values
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("name", ["pk_tremelimumab.toml", "pk_pd1_ctla4_bispecific.toml"])
def test_new_pk_modules_load_alone(name):
    m = im.load_model(ROOT / "models" / "nsclc" / name)
    assert len(m.states) == 2
    for p in m.parameters.values():
        assert p.unit and p.source.strip(), p.name
        if p.lower is not None:
            assert p.lower <= p.value <= p.upper, p.name
