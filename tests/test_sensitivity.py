"""Forward sensitivities (immunoode.sensitivity) against independent references:
central finite differences of the plain simulation at tight tolerance, and closed forms."""

from pathlib import Path

import numpy as np
import pytest

import immunoode as im
from immunoode.errors import ModelError
from immunoode.sensitivity import (SensitivitySolver, finite_difference_sensitivities,
                                   sensitivity_model, simulate_sensitivities)

ROOT = Path(__file__).resolve().parents[1]
PK_PARAMS = ["CL", "V1", "Q", "V2"]

# Nonlinear: drug in mg/kg (depends on WT), Hill effect on a logistic tumor whose initial
# size is a parameter, radiotherapy-like Scale events on the tumor.
NONLINEAR = """
[model]
name = "sens_nonlinear_test"
time_unit = "day"
[states.A]
initial = 0.0
unit = "mg"
[states.T]
initial = "T0"
unit = "mL"
[parameters]
WT = { value = 70.0, unit = "kg" }
CL = { value = 0.3, unit = "L/day" }
V = { value = 5.0, unit = "L" }
T0 = { value = 10.0, unit = "mL" }
r = { value = 0.03, unit = "1/day" }
K = { value = 200.0, unit = "mL" }
kmax = { value = 0.08, unit = "1/day" }
EC50 = { value = 20.0, unit = "mg/L" }
n = { value = 2.0, unit = "1" }
[assignments]
C = { expr = "A / V", unit = "mg/L" }
[odes]
A = "-CL * C"
T = "r * T * (1 - T / K) - kmax * hill(C, EC50, n) * T"
[observables]
tumor = { expr = "T", unit = "mL" }
conc = { expr = "C", unit = "mg/L" }
"""
NL_PARAMS = ["WT", "CL", "T0", "r", "kmax", "EC50", "n"]


@pytest.fixture(scope="session")
def pk_model():
    return im.load_model(ROOT / "models" / "two_compartment_pk.toml")


@pytest.fixture(scope="session")
def pk_sens(pk_model):
    return SensitivitySolver(pk_model, PK_PARAMS, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="session")
def nl_model():
    return im.loads_model(NONLINEAR)


@pytest.fixture(scope="session")
def nl_regimen():
    return im.Regimen((
        im.Dose("A", 3.0, unit="mg/kg", every=14, count=4, start=5),   # no drug before t=5
        im.Dose("A", 2.0, unit="mg/kg", start=60, duration=1.0),
        im.Scale("T", factor=0.7, start=30, every=15, count=2),
    ))


@pytest.fixture(scope="session")
def nl_sens(nl_model, nl_regimen):
    return SensitivitySolver(nl_model, NL_PARAMS, regimen=nl_regimen, rtol=1e-10, atol=1e-12)


def _rel_err(a, ref, pvals):
    """Error of normalised sensitivities ``p_k·∂g/∂p_k`` per (observable, parameter), relative
    to the observable's largest normalised sensitivity (an exactly zero sensitivity is then
    compared with the finite differences' round-off on the same scale)."""
    pv = np.abs(np.asarray(pvals, float))
    scale = np.max(np.abs(ref) * pv, axis=(1, 2))[:, None]
    return np.max(np.abs(a - ref) * pv, axis=1) / scale


def test_pk_sensitivities_match_central_differences_bolus_and_infusion(pk_sens):
    reg = im.Regimen((im.Dose("A1", 200, every=21, count=3),
                      im.Dose("A1", 100, start=50, duration=0.5, unit="mg")))
    t = np.linspace(0, 84, 169)
    F, dF = pk_sens.solve(t, reg)
    cm = im.compile_model(pk_sens.sm.model)
    F_ref, dF_ref = finite_difference_sensitivities(cm, PK_PARAMS, reg, t, rel_step=1e-4)
    assert np.max(np.abs(F - F_ref)) < 1e-8 * np.max(F_ref)
    err = _rel_err(dF, dF_ref, [pk_sens.sm.model.parameters[p].value for p in PK_PARAMS])
    assert err.shape == (1, 4)
    assert np.all(err < 1e-6), err
    # every parameter matters for the concentration: no vacuous comparison
    assert np.all(np.max(np.abs(dF_ref), axis=1) > 1e-3)


def test_pk_sensitivities_match_one_compartment_closed_form(pk_sens):
    """With Q = 0 the central compartment is a one-compartment model:
    C = D/V1·exp(−CL·t/V1), ∂C/∂CL = −t/V1·C, ∂C/∂V1 = C·(−1/V1 + CL·t/V1²)."""
    D, CL, V1 = 200.0, 0.22, 3.48
    t = np.linspace(0, 30, 61)
    F, dF = pk_sens.solve(t, im.Regimen((im.Dose("A1", D),)), {"Q": 0.0})
    C = D / V1 * np.exp(-CL * t / V1)
    np.testing.assert_allclose(F[0], C, rtol=1e-8)
    np.testing.assert_allclose(dF[0, :, 0], -t / V1 * C, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(dF[0, :, 1], C * (-1 / V1 + CL * t / V1 ** 2), rtol=1e-7,
                               atol=1e-9)


def test_nonlinear_sensitivities_match_central_differences(nl_sens, nl_model, nl_regimen):
    """Hill effect (with its exponent n fitted, and no drug before the first dose: the
    derivatives of hill() at zero concentration), logistic growth, initial value T0,
    mg/kg doses (WT enters the dose amount: bolus jumps and infusion rate of ∂A/∂WT),
    Scale events on T."""
    t = np.linspace(0, 120, 241)
    F, dF = nl_sens.solve(t, nl_regimen)
    cm = im.compile_model(nl_model)
    F_ref, dF_ref = finite_difference_sensitivities(cm, NL_PARAMS, nl_regimen, t,
                                                    observables=["tumor", "conc"],
                                                    rel_step=1e-4)
    assert np.max(np.abs(F - F_ref) / np.max(np.abs(F_ref), axis=1, keepdims=True)) < 1e-8
    err = _rel_err(dF, dF_ref, [nl_model.parameters[p].value for p in NL_PARAMS])
    assert np.all(err < 1e-6), err
    # the WT sensitivity of the concentration is D/V·exp(...) per kg: non-zero only
    # because of the dose events
    assert np.max(np.abs(dF[1, :, 0])) > 1e-3
    # the drug concentration does not depend on the tumor parameters: exact zeros
    assert np.all(dF[1, :, 2:] == 0.0)
    # S(0) = ∂y0/∂p: the tumor's sensitivity to T0 starts at 1
    assert dF[0, 0, NL_PARAMS.index("T0")] == pytest.approx(1.0, abs=1e-12)


def test_structural_zeros_get_no_state(nl_sens):
    names = set(nl_sens.sm.augmented.state_names)
    assert "S__A__CL" in names and "S__T__CL" in names
    assert "S__A__WT" in names          # only through the mg/kg dose events
    for p in ("T0", "r", "kmax", "EC50", "n"):
        assert f"S__A__{p}" not in names  # drug PK does not depend on the tumor


def test_augmented_model_reuses_engine_and_cache(pk_sens, pk_model):
    aug = pk_sens.sm.augmented
    assert aug.state_names[:2] == pk_model.state_names
    assert len(aug.state_names) == 2 + 2 * 4
    again = im.compile_model(aug)
    assert again.cache_hit and again.key == pk_sens.compiled.key


def test_simulate_sensitivities_dataset_has_provenance(pk_model, pk_sens):
    reg = im.Regimen((im.Dose("A1", 200, every=21, count=2),))
    ds = simulate_sensitivities(pk_model, PK_PARAMS, reg, t_end=42, dt=1.0, rtol=1e-10,
                                atol=1e-12)
    assert ds["d_concentration"].dims == ("time", "parameter")
    assert list(ds["parameter"].values) == PK_PARAMS
    for k in ("model_hash", "parameters", "solver", "rtol", "immunoode_version", "regimen"):
        assert k in ds.attrs
    F, dF = pk_sens.solve(ds["time"].values, reg)
    np.testing.assert_allclose(ds["d_concentration"].values, dF[0], rtol=1e-12)


def test_unknown_parameter_and_observable_are_named(pk_model):
    with pytest.raises(ModelError, match=r"\[parameters\] 'CLL'.*did you mean 'CL'"):
        sensitivity_model(pk_model, ["CLL"])
    with pytest.raises(ModelError, match=r"'conc'.*unknown observable"):
        sensitivity_model(pk_model, ["CL"], observables=["conc"])
    with pytest.raises(ModelError, match="no sensitivity parameters"):
        sensitivity_model(pk_model, [])
