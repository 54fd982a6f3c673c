"""The assembled model models/cic_nsclc.toml (every module and treatment of the library).

* `immunoode check` passes; every parameter has a unit, a source and a value inside its range;
  every regimen of models/regimens/ targets a state of the assembled model; 2 years under a
  multi-drug regimen stay finite and non-negative;
* behaviour tests on the assembled model (each compares two simulations):
  5 (B cells/TLS), 9 (anti-angiogenic: CD8+ up, TAMs down), 10 (TKI kills driver-positive
  tumors only), 11 (secondary resistance through the resistant clone), 12 (rechallenge),
  15 (PD-1-edited adoptive T cells in a PD-L1-high tumor);
* the agents added from parts (tremelimumab, the PD-1 x CTLA-4 bispecific, MDM2/SEMA4D/HDAC
  modulators, the anti-CEACAM5 ADC) are wired into the assembled model: their hooks fill
  occ_CTLA4 / occ_PD1, and each regimen changes the tumor only when it is dosed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import immunoode as im
from immunoode.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
REGIMENS = MODELS / "regimens"
CIC = MODELS / "cic_nsclc.toml"
HOT = {"tmb": 20.0, "pdl1_tps": 0.8}


@pytest.fixture(scope="session")
def cic():
    return im.compile_model(im.load_model(CIC))


def _reg(name):
    return im.load_regimen(REGIMENS / name)


@pytest.fixture(scope="session")
def pembro():
    return _reg("nsclc_pembrolizumab_200mg_q3w.toml")


def _sim(cm, reg, t_end=730.0, outputs=("tumor_diameter",), **p):
    return im.simulate(cm, reg, t_end=t_end, dt=1.0, parameters=p, outputs=list(outputs))


# ------------------------------------------------------------------------- structure
def test_check_command_passes_on_assembled_model(capsys):
    assert cli_main(["check", str(CIC)]) == 0
    assert "ok" in capsys.readouterr().out


def test_assembled_model_parameters_have_units_sources_and_ranges():
    m = im.load_model(CIC)
    assert len(m.states) >= 50
    for p in m.parameters.values():
        assert p.unit and p.source.strip(), p.name
        if p.lower is not None:
            assert p.lower <= p.value <= p.upper, p.name
    used = {Path(s).name for s in m.sources}
    modules = {f.name for f in (MODELS / "nsclc").glob("*.toml")}
    assert modules <= used, f"modules not in cic_nsclc.toml: {sorted(modules - used)}"


@pytest.mark.parametrize("path", sorted(REGIMENS.glob("*.toml")), ids=lambda p: p.name)
def test_every_library_regimen_targets_the_assembled_model(path):
    if path.name == "pembrolizumab_200mg_q3w.toml":
        pytest.skip("targets A1 of two_compartment_pk.toml (not part of the NSCLC library)")
    states = set(im.load_model(CIC).states)
    reg = im.load_regimen(path)
    for it in reg.items:
        tg = it.target if isinstance(it.target, (list, tuple)) else [it.target]
        assert set(tg) <= states, f"{path.name}: {tg}"


def test_two_years_multi_drug_all_states_finite_and_nonnegative(cic):
    reg = (_reg("pembrolizumab_carboplatin_pemetrexed_q3w.toml") + _reg("bevacizumab_15mgkg_q3w.toml")
           + _reg("sbrt_3x8gy.toml") + _reg("adoptive_tcells_1e10.toml"))
    ds = im.simulate(cic, reg, t_end=730.0, dt=1.0, parameters={"egfr": 1.0})
    ev = reg  # noqa: F841  (kept for debugging output)
    for s in cic.state_names:
        v = ds[s].values
        assert np.all(np.isfinite(v)), s
        assert v.min() >= -1e-8 * max(1.0, np.abs(v).max()), f"{s} went negative: {v.min()}"


# ---------------------------------------------------------------------- behaviour
def test_anti_angiogenic_raises_cd8_density_and_lowers_tams(cic):  # behaviour test 9
    outs = ["cd8_tumor", "tumor_cells", "tam_total", "m1_m2_ratio", "vascular_normalization"]
    none = _sim(cic, None, 60.0, outs)
    bev = _sim(cic, _reg("bevacizumab_15mgkg_q3w.toml"), 60.0, outs)
    assert bev["vascular_normalization"].values[14] > 0.8
    dens = lambda ds: ds["cd8_tumor"].values[42] / ds["tumor_cells"].values[42]  # noqa: E731
    assert dens(bev) > 1.2 * dens(none)
    assert bev["tam_total"].values[42] < 0.85 * none["tam_total"].values[42]
    assert bev["m1_m2_ratio"].values[42] > none["m1_m2_ratio"].values[42]


def test_tki_kills_driver_positive_tumor_only(cic):  # behaviour test 10 (targeted therapy)
    osi = _reg("osimertinib_80mg_daily.toml")
    egfr_none, egfr_osi = _sim(cic, None, 365.0, egfr=1.0), _sim(cic, osi, 365.0, egfr=1.0)
    wt_none, wt_osi = _sim(cic, None, 365.0), _sim(cic, osi, 365.0)
    assert egfr_osi["tumor_diameter"].values[182] < 0.7 * egfr_none["tumor_diameter"].values[182]
    np.testing.assert_allclose(wt_osi["tumor_diameter"].values, wt_none["tumor_diameter"].values, rtol=1e-6)


def test_more_b_cells_tls_improve_anti_pd1_response(cic, pembro):  # behaviour test 5 (B cells)
    outs = ("tumor_diameter", "tls_maturity")
    low, high = _sim(cic, pembro, 365.0, outs, b_infil=0.0), _sim(cic, pembro, 365.0, outs, b_infil=2.0)
    assert high["tls_maturity"].values[-1] > 0.2 and low["tls_maturity"].values[-1] == 0.0
    assert high["tumor_diameter"].values.min() < 0.9 * low["tumor_diameter"].values.min()


def test_secondary_resistance_through_resistant_clone_expansion(cic, pembro):  # behaviour test 11
    outs = ("tumor_diameter", "resistant_fraction")
    ds = _sim(cic, pembro, 730.0, outs, **HOT)
    d = ds["tumor_diameter"].values
    k = int(d.argmin())
    assert d[k] <= 0.7 * d[0]                          # responds first (PR)
    assert d[-1] >= 1.2 * d[k] and d[-1] - d[k] >= 0.5  # then progresses on treatment
    assert ds["resistant_fraction"].values[-1] > 0.5    # through the resistant clone
    no_clone = _sim(cic, pembro, 730.0, outs, **HOT, f_res0=0.0, mu_edit=0.0, f_res0_2=0.0)
    dn = no_clone["tumor_diameter"].values
    assert dn[-1] < 1.2 * dn.min() or dn[-1] < 0.5 * d[-1]


def test_pd1_edited_adoptive_t_cells_kill_in_pdl1_high_tumor(cic):  # behaviour test 15
    act = _reg("adoptive_tcells_1e10.toml")
    p = {"pdl1_tps": 1.0}
    cells = lambda reg, **q: _sim(cic, reg, 90.0, ("tumor_cells",), **p, **q)["tumor_cells"].values  # noqa: E731
    none, unedited, edited = cells(None), cells(act, pd1_edited=0.0), cells(act, pd1_edited=1.0)
    assert edited[60] < 0.75 * unedited[60]                            # edited cells kill
    assert none[60] - edited[60] > 2.0 * max(none[60] - unedited[60], 0.0)  # unedited are suppressed


def test_durable_responder_progressing_off_treatment_responds_to_rechallenge(cic):  # behaviour 12
    # a tumor without a resistant clone: 1 year of pembrolizumab, stop, progression off
    # treatment, rechallenge with another year at day 700
    p = {"tmb": 10.0, "pdl1_tps": 0.8, "f_res0": 0.0, "f_res0_2": 0.0, "mu_edit": 0.0}
    first = im.Dose("A_pembro_c", 200.0, every=21.0, count=17, duration=0.0208333)
    again = im.Dose("A_pembro_c", 200.0, start=700.0, every=21.0, count=17, duration=0.0208333)
    stop = _sim(cic, im.Regimen((first,)), 1065.0, ("sum_of_diameters",), **p)["sum_of_diameters"].values
    rech = _sim(cic, im.Regimen((first, again)), 1065.0, ("sum_of_diameters",), **p)["sum_of_diameters"].values
    nadir = stop[:700].min()
    assert nadir <= 0.7 * stop[0]           # durable response (PR) on the first course
    assert stop[700] >= 1.2 * nadir         # progression (RECIST sum +20%) after stopping
    assert rech[700:].min() <= 0.8 * rech[700]      # responds again to rechallenge
    assert rech[880] < 0.8 * stop[880]


# ------------------------------------------------------- agents composed from parts
NEW_AGENT_REGIMENS = ["durvalumab_tremelimumab_poseidon.toml", "cadonilimab_10mgkg_q3w.toml",
                      "navtemadlin_240mg_d1_7_q4w.toml", "pepinemab_10mgkg_q3w.toml",
                      "entinostat_5mg_weekly_pembrolizumab.toml", "tusamitamab_100mgm2_q2w.toml"]


def test_new_agents_are_wired_into_assembled_model(cic):
    outs = ("tumor_diameter", "occupancy_treme", "occupancy_cado_ctla4", "occupancy_cado_pd1_tumor",
            "priming_rate")
    dt = _sim(cic, _reg("durvalumab_tremelimumab_poseidon.toml"), 84.0, outs)
    bs = _sim(cic, _reg("cadonilimab_10mgkg_q3w.toml"), 84.0, outs)
    none = _sim(cic, None, 84.0, outs)
    assert dt["occupancy_treme"].values[42] > 0.5 and bs["occupancy_cado_ctla4"].values[42] > 0.9
    assert bs["occupancy_cado_pd1_tumor"].values[42] > 0.9
    # CTLA-4 hook: priming up over weeks 2-12 against the untreated tumor
    prim = lambda ds: ds["priming_rate"].values[14:85].mean()  # noqa: E731
    assert prim(dt) > 1.1 * prim(none) and prim(bs) > 1.1 * prim(none)


@pytest.mark.parametrize("name", NEW_AGENT_REGIMENS)
def test_each_new_agent_changes_the_tumor_when_dosed(cic, name):
    none = _sim(cic, None, 182.0)["tumor_diameter"].values
    on = _sim(cic, _reg(name), 182.0)["tumor_diameter"].values
    assert on[182] < 0.95 * none[182], name
