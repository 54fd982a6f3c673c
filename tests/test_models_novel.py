"""Agents composed from library parts: models/nsclc_io_novel_agents.toml (a PD-1 x VEGF
bispecific and an anti-TIGIT antibody next to pembrolizumab).

* the typical-IgG1 PK of both new antibodies against the closed-form two-compartment solution;
* the bispecific's VEGF arm (vascular normalization on vs off) raises CD8+ density, lowers TAMs
  and improves tumor control over its PD-1 arm alone;
* anti-TIGIT added to pembrolizumab improves the response, and does nothing alone when there is
  no effector killing to release (e_TIGIT = 0 control).
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
