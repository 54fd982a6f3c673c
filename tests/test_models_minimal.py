"""The teaching model models/nsclc_minimal.toml: loads, compiles fast, and shows the library's
main directions (untreated growth, anti-PD-1 response, relapse through the resistant clone,
PD-L1 dependence); pembrolizumab PK against the closed-form two-compartment solution."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import immunoode as im

ROOT = Path(__file__).resolve().parents[1]
MIN = ROOT / "models" / "nsclc_minimal.toml"
PEMBRO = ROOT / "models" / "regimens" / "nsclc_pembrolizumab_200mg_q3w.toml"


@pytest.fixture(scope="session")
def cm():
    return im.compile_model(im.load_model(MIN))


def _d(cm, reg, **p):
    return im.simulate(cm, reg, t_end=730.0, parameters=p, outputs=["tumor_diameter"])["tumor_diameter"].values


def test_minimal_model_has_five_states_and_sources():
    m = im.load_model(MIN)
    assert len(m.states) == 5
    for p in m.parameters.values():
        assert p.unit and p.source.strip(), p.name
        if p.lower is not None:
            assert p.lower <= p.value <= p.upper, p.name


def test_minimal_untreated_grows_and_anti_pd1_shrinks_then_relapses(cm):
    reg = im.load_regimen(PEMBRO)
    untreated, treated = _d(cm, None), _d(cm, reg)
    assert untreated[365] > 1.3 * untreated[0]
    k = int(treated.argmin())
    assert treated[k] <= 0.7 * treated[0]
    assert treated[-1] > 1.2 * treated[k]            # relapse through the resistant clone
    no_clone = _d(cm, reg, f_res0=0.0)
    assert no_clone[-1] < 0.5 * treated[-1]


def test_minimal_pdl1_high_tumor_responds_more_than_pdl1_low_relative_to_untreated(cm):
    reg = im.load_regimen(PEMBRO)
    benefit = {x: _d(cm, None, pdl1=x)[182] - _d(cm, reg, pdl1=x)[182] for x in (0.1, 1.0)}
    assert benefit[1.0] > 1.5 * benefit[0.1]


def test_minimal_pk_matches_closed_form(cm, tmp_path):
    p = tmp_path / "bolus.toml"
    p.write_text('[[dose]]\ntarget = "A_pembro_c"\namount = 200\nunit = "mg"\nstart = 0\n')
    t = np.linspace(0.0, 42.0, 85)
    ds = im.simulate(cm, im.load_regimen(p), t_eval=t, outputs=["A_pembro_c"], rtol=1e-9, atol=1e-12)
    CL, V1, Q, V2 = 0.22, 3.48, 0.795, 4.06
    k10, k12, k21 = CL / V1, Q / V1, Q / V2
    s = k10 + k12 + k21
    a = (s + math.sqrt(s * s - 4 * k10 * k21)) / 2
    b = (s - math.sqrt(s * s - 4 * k10 * k21)) / 2
    amt = 200.0 * ((a - k21) / (a - b) * np.exp(-a * t) + (k21 - b) / (a - b) * np.exp(-b * t))
    np.testing.assert_allclose(ds["A_pembro_c"].values, amt, rtol=1e-6)
