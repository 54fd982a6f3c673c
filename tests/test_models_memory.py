"""The memory / stem-like CD8+ module (models/nsclc/tcell_memory.toml).

* switched off (k_mem = 0, the default), every output of the anti-PD-1 model equals that of the
  same model without the module (tight tolerances on both, so solver step choice cannot hide a
  change);
* the memory pool's own equation: exponential decay at d_Tmem without formation (closed form),
  and with formation the convolution of k_mem*Tp with that decay (independent quadrature);
* with memory on, a deep responder stays controlled longer after anti-PD-1 stops at 2 years;
* no state goes negative; units and parameter metadata check.
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
MEMORY = NSCLC / "tcell_memory.toml"
PEMBRO = MODELS / "regimens" / "nsclc_pembrolizumab_200mg_q3w.toml"

HOT = {"tmb": 20.0, "pdl1_tps": 0.8}          # responsive patient of tests/test_models.py
# deep responder: HOT with a rare immunoediting rate (the calibration before the escape-clone
# share, fits/nsclc_icis, now fixes it at 0), a small resistant clone with partial escape
DEEP = dict(HOT, mu_edit=4.2e-6, f_res0=1e-3, eps_R=0.3)
K_MEM_ON = 0.02                                # 1/day, ~9% of primed effectors become memory
T_STOP = 735.0                                 # 35 cycles q3w: last dose on day 714


@pytest.fixture(scope="session")
def io_model():
    return im.compile_model(im.load_model(MODELS / "nsclc_io.toml"))


@pytest.fixture(scope="session")
def pembro():
    return im.load_regimen(PEMBRO)


@pytest.fixture(scope="session")
def io_without_memory(tmp_path_factory):
    """models/nsclc_io.toml with the memory module removed from its include list."""
    text = (MODELS / "nsclc_io.toml").read_text()
    line = '  "nsclc/tcell_memory.toml",\n'
    assert line in text, "nsclc_io.toml no longer includes the memory module"
    text = text.replace(line, "").replace('"nsclc/', f'"{NSCLC.as_posix()}/')
    p = tmp_path_factory.mktemp("nomem") / "nsclc_io_nomem.toml"
    p.write_text(text)
    return im.compile_model(im.load_model(p))


def _progression_day(d: np.ndarray, after: float) -> float:
    """First day (after ``after``) with RECIST PD: +20% and +0.5 cm over the running nadir; inf if none."""
    nadir = np.minimum.accumulate(d)
    pd_ = (d >= 1.2 * nadir) & (d - nadir >= 0.5)
    idx = np.nonzero(pd_ & (np.arange(d.size) > after))[0]
    return float(idx[0]) if idx.size else math.inf


# ------------------------------------------------------------------------- metadata / units
def test_module_parameters_have_units_sources_ranges_and_default_off():
    m = im.load_model(MODELS / "nsclc_io.toml")           # load_model checks units
    names = ["k_mem", "d_Tmem", "k_recall", "K_mem", "n_mem"]
    for n in names:
        p = m.parameters[n]
        assert p.unit and p.source.strip(), n
        assert p.lower is not None and p.lower <= p.value <= p.upper, n
    assert m.parameters["k_mem"].value == 0.0
    half_life_years = math.log(2) / m.parameters["d_Tmem"].value / 365.25
    assert 0.5 <= half_life_years <= 10.0
    assert m.parameters["K_mem"].value < m.parameters["K_rec"].value  # low-antigen recall


def test_every_composed_model_with_priming_includes_memory():
    for f in MODELS.glob("*.toml"):
        try:
            m = im.load_model(f)
        except im.errors.ModelError:
            continue
        if "Tp" in m.states and "Te" in m.states:
            assert "Tmem" in m.states, f.name


# ------------------------------------------------------------------------------ off = unchanged
def test_memory_off_leaves_every_output_unchanged(io_model, io_without_memory, pembro):
    common = [s for s in io_without_memory.state_names]
    obs = [o for o in ("tumor_diameter", "PD1_inh", "infiltration", "kill_CTL")
           if o not in common]
    kw = dict(t_end=1460.0, dt=5.0, rtol=1e-11, atol=1e-13)
    for pars in ({}, DEEP):
        a = im.simulate(io_model, pembro, parameters=pars, outputs=common + obs + ["Tmem"], **kw)
        b = im.simulate(io_without_memory, pembro, parameters=pars, outputs=common + obs, **kw)
        for v in common + obs:
            x, y = a[v].values, b[v].values
            scale = max(1.0, float(np.abs(y).max()))
            assert np.max(np.abs(x - y)) <= 1e-9 * scale, v
        assert np.all(a["Tmem"].values == 0.0)


# --------------------------------------------------------------------- memory pool equation
def test_memory_pool_decays_with_its_half_life_without_formation(io_model):
    d = io_model.model.parameters["d_Tmem"].value
    ds = im.simulate(io_model, None, t_end=1000.0, dt=10.0, initial={"Tmem": 1.0},
                     rtol=1e-10, atol=1e-12, outputs=["Tmem"])
    t = ds["time"].values
    np.testing.assert_allclose(ds["Tmem"].values, np.exp(-d * t), rtol=1e-7)


def test_memory_pool_is_the_decayed_integral_of_formation(io_model, pembro):
    """Tmem(t) = ∫ k_mem K_Tex/(K_Tex + T(s)) Tp(s) exp(-d_Tmem (t - s)) ds (trapezoid, 0.05-day grid)."""
    d = io_model.model.parameters["d_Tmem"].value
    k_tex = io_model.model.parameters["K_Tex"].value
    ds = im.simulate(io_model, pembro, t_end=400.0, dt=0.05, parameters=dict(DEEP, k_mem=K_MEM_ON),
                     rtol=1e-10, atol=1e-12, outputs=["Tmem", "Tp", "T_total"])
    t, tp, tt = ds["time"].values, ds["Tp"].values, ds["T_total"].values
    g = K_MEM_ON * k_tex / (k_tex + tt) * tp * np.exp(d * t)
    integral = np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(t))])
    expected = integral * np.exp(-d * t)
    sel = t >= 10.0
    np.testing.assert_allclose(ds["Tmem"].values[sel], expected[sel], rtol=2e-4)


# ------------------------------------------------------------------------------ behaviour
@pytest.fixture(scope="session")
def deep_runs(io_model, pembro):
    out = {}
    for km in (0.0, K_MEM_ON):
        out[km] = im.simulate(io_model, pembro, t_end=2190.0, dt=1.0,
                              parameters=dict(DEEP, k_mem=km))
    return out


def test_memory_keeps_a_deep_responder_controlled_longer_after_stopping(deep_runs):
    off, on = (deep_runs[k]["tumor_diameter"].values for k in (0.0, K_MEM_ON))
    # a deep responder at 2 years in both cases (>= 30% shrinkage, no progression on treatment)
    for d in (off, on):
        assert d[int(T_STOP)] <= 0.7 * d[0]
        assert _progression_day(d, 0.0) > T_STOP
    p_off, p_on = _progression_day(off, T_STOP), _progression_day(on, T_STOP)
    assert p_off < 2190.0, "without memory the tumor should regrow after stopping"
    assert p_on >= p_off + 180.0, (p_off, p_on)
    # and the memory pool persists after antigen and treatment are gone
    tm = deep_runs[K_MEM_ON]["Tmem"].values
    assert tm[int(T_STOP) + 365] >= 0.3 * tm[int(T_STOP)] > 0.0


def test_no_state_negative_with_memory_on(deep_runs, io_model):
    ds = deep_runs[K_MEM_ON]
    for s in io_model.state_names:
        v = ds[s].values
        assert np.all(np.isfinite(v)), s
        assert v.min() >= -1e-8 * max(1.0, np.abs(v).max()), f"{s} went negative: {v.min()}"


# ------------------------------------------------------------------------- escape clones
NIVO_UNTIL_PD = MODELS / "regimens" / "nivolumab_240mg_q2w_until_progression.toml"
# second-line-like responder on nivolumab until progression (fits/trials/2l_ici.toml design)
RESPONDER = {"T0": 5.5, "k_grow": 0.022, "pdl1_tps": 0.5, "eps_R": 0.03, "mu_edit": 0.0}


@pytest.fixture(scope="session")
def nivo_model():
    return im.compile_model(im.load_model(MODELS / "nsclc_io_nivo_ipi.toml"))


@pytest.mark.parametrize("k_CTL", [0.3, 1.0])
def test_without_an_escape_clone_memory_keeps_a_response_for_four_years(nivo_model, k_CTL):
    """The calibration's durable responders: no pre-existing escape clone (f_res0 = 0), no
    editing flux, memory on, therapy continued: no progression in 4 years.  The same patient
    with a 1 % escape clone progresses within 2 years (the resistant clone regrows)."""
    reg = im.load_regimen(NIVO_UNTIL_PD)
    for k_mem in (0.01, 0.03):
        out = {}
        for f in (0.0, 0.01):
            ds = im.simulate(nivo_model, reg, t_end=1460, dt=7,
                             parameters=dict(RESPONDER, k_CTL=k_CTL, f_res0=f, k_mem=k_mem),
                             outputs=["tumor_diameter", "Tr", "Ts"])
            d = ds.tumor_diameter.values
            assert d.min() < 0.7 * d[0], (k_CTL, k_mem, f)      # a partial response first
            out[f] = (_progression_day(d, 0) * 7, ds)
        assert out[0.0][0] == math.inf, (k_CTL, k_mem)
        assert float(out[0.0][1].Tr.max()) == 0.0               # no clone appears
        pd_day, ds = out[0.01]
        assert pd_day <= 730, (k_CTL, k_mem)
        i = int(pd_day // 7)
        assert float(ds.Tr[i]) > float(ds.Ts[i])                # the escape clone regrew


def test_without_memory_a_strong_killer_rebounds_even_without_a_clone(nivo_model):
    """The contrast: k_mem = 0 and the same clone-free strong responder progresses (the
    sensitive clone regrows once antigen, priming and recruitment have fallen)."""
    reg = im.load_regimen(NIVO_UNTIL_PD)
    ds = im.simulate(nivo_model, reg, t_end=1460, dt=7,
                     parameters=dict(RESPONDER, k_CTL=1.0, f_res0=0.0, k_mem=0.0),
                     outputs=["tumor_diameter", "Tr"])
    assert _progression_day(ds.tumor_diameter.values, 0) * 7 <= 730
    assert float(ds.Tr.max()) == 0.0


# ------------------------------------------------------------------------- shipped calibration
def test_fitted_model_carries_the_fitted_memory_rate():
    """models/nsclc_io_fitted.toml matches fits/nsclc_icis/fitted_parameters.toml (regenerated together)."""
    import tomllib
    fitted = tomllib.loads((ROOT / "fits" / "nsclc_icis" / "fitted_parameters.toml").read_text())
    m = im.load_model(MODELS / "nsclc_io_fitted.toml")
    for name in ("k_mem", "mu_edit"):
        assert fitted[name]["kind"] == "mechanistic"
        assert m.parameters[name].value == pytest.approx(fitted[name]["value"], rel=1e-12), name
    assert m.parameters["k_mem"].value > 0.0
