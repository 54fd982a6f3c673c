"""State-triggered events, variable compartments, rateOf, quotient/rem (immunoode.triggered,
immunoode.sbml.read_sbml_triggered), checked against closed forms and libRoadRunner.

The SBML files are written by Antimony at test time (a C library, no Python
evaluation).  Most tests use the numpy backend (no numba compile); one runs the
compiled (numba) right-hand side and checks both backends agree.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

import immunoode as im
from immunoode.sbml import read_sbml, read_sbml_triggered
from immunoode.triggered import Event, TriggeredModel, simulate_triggered

roadrunner = pytest.importorskip("roadrunner")
antimony = pytest.importorskip("antimony")
libsbml = pytest.importorskip("libsbml")

TIGHT = dict(rtol=1e-10, atol=1e-12)


def _sbml(code: str, path) -> str:
    antimony.clearPreviousLoads()
    if antimony.loadAntimonyString(code) < 0:
        raise RuntimeError(antimony.getLastError())
    text = antimony.getSBMLString(antimony.getMainModuleName())
    path.write_text(text)
    return path


def _rr(path, t_end, n, sel):
    rr = roadrunner.RoadRunner(str(path))
    rr.integrator.relative_tolerance = 1e-10
    rr.integrator.absolute_tolerance = 1e-12
    rr.timeCourseSelections = ["time"] + sel
    res = rr.simulate(0, t_end, n)
    return np.asarray(res[:, 0]), np.asarray(res[:, 1:])


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # antimony files carry no units
        return read_sbml_triggered(path)


def _assert_close(got, ref, what, rtol=1e-6, atol=1e-9):
    err = np.abs(got - ref) / (atol + rtol * np.abs(ref))
    assert np.all(err <= 1), f"{what}: worst {err.max():.3g} tolerance units"


SAW = """
model saw
  compartment C = 1
  species S in C = 1
  k = 0.5
  J: S -> ; k*S
  E1: at (S < 0.5): S = 1
end
"""


@pytest.fixture(scope="module")
def saw(tmp_path_factory):
    return _read(_sbml(SAW, tmp_path_factory.mktemp("saw") / "saw.xml"))


def test_sawtooth_matches_closed_form(saw):
    """S decays as exp(-k t) and is reset to 1 whenever it falls below 1/2: period ln2/k."""
    k = 0.5
    period = math.log(2) / k
    t = np.linspace(0, 10, 401)
    t = t[(t == 0) | (np.abs((t / period) - np.round(t / period)) > 1e-6)]  # not at a reset
    ds = simulate_triggered(saw, t_eval=t, backend="numpy", **TIGHT)
    exact = np.exp(-k * np.mod(t, period))
    _assert_close(ds["S"].values, exact, "S", rtol=1e-7)
    assert ds.attrs["n_events"] == int(10 // period)
    assert ds.attrs["n_roots"] >= ds.attrs["n_events"]


def test_sawtooth_compiled_backend_agrees(saw):
    t = np.linspace(0, 6, 61)
    a = simulate_triggered(saw, t_eval=t, backend="numpy", **TIGHT)
    b = simulate_triggered(saw, t_eval=t, backend="numba", **TIGHT)
    np.testing.assert_allclose(b["S"].values, a["S"].values, rtol=1e-9, atol=1e-12)
    assert b.attrs["backend"] == "numba" and b.attrs["immunoode_version"] == im.__version__
    assert "model_hash" in b.attrs and b.attrs["seed"] == 0


def test_sawtooth_matches_roadrunner(saw, tmp_path):
    p = _sbml(SAW, tmp_path / "saw.xml")
    t, ref = _rr(p, 10, 101, ["[S]"])
    ds = simulate_triggered(saw, t_eval=t, backend="numpy", **TIGHT)
    _assert_close(ds["S"].values, ref[:, 0], "S")


DELAYS = """
model delays
  compartment C = 1
  species A in C = 0
  species B in C = 0
  k1 = 1; k2 = 0.3; x = 0; y = 0
  J1: -> A; k1
  J2: A -> B; k2*A
  // delay, values at trigger time
  E1: at 0.7 after (A > 1), priority = 1: x = A, k1 = 0
  // delay, values at execution time; non-persistent: cancelled if A <= 0.9 by then
  E2: at 1.5 after (A > 0.9), persistent = false, fromTrigger = false: y = A
  // two events at the same instant: priority decides the order (E4 first, then E3, which
  // reads B when it executes)
  E3: at (time >= 4), priority = 1, fromTrigger = false: B = B + 1
  E4: at (time >= 4), priority = 5: B = 2*B
  // fires at t0 (initialValue false) and sets k2 through a boolean-valued trigger
  E5: at (time >= 0 && A < 1), t0 = false: k2 = 0.25
end
"""


def test_delays_priority_persistence_match_roadrunner(tmp_path):
    p = _sbml(DELAYS, tmp_path / "delays.xml")
    tm = _read(p)
    assert [e.name for e in tm.events] == ["E1", "E2", "E3", "E4", "E5"]
    e1, e2 = tm.events[0], tm.events[1]
    assert e1.use_values_from_trigger_time and not e2.use_values_from_trigger_time
    assert not e2.persistent and float(e1.delay) == pytest.approx(0.7)
    t, ref = _rr(p, 8, 161, ["[A]", "[B]", "x", "y", "k1", "k2"])
    keep = ~np.isin(np.round(t, 9), [4.0])
    ds = simulate_triggered(tm, t_eval=t, backend="numpy", **TIGHT)
    for j, nm in enumerate(["A", "B", "x", "y", "k1", "k2"]):
        _assert_close(ds[nm].values[keep], ref[keep, j], nm)
    # priorities: just after t = 4, B = 2*B(4-) + 1 (the other order would give 2*B(4-) + 2,
    # which the comparison above would catch); check the jump at t = 4 directly
    t4 = np.array([0.0, 4.0 - 1e-7, 4.0])
    d4 = simulate_triggered(tm, t_eval=t4, backend="numpy", **TIGHT)
    assert d4["B"].values[2] == pytest.approx(2 * d4["B"].values[1] + 1, rel=1e-6)


VARYING = """
model varying
  compartment V = 1
  V' = 0.2
  species S in V = 2
  species A in V = 1
  k = 0.3
  J: S -> A; k*S*V
  r := rateOf(S)
  q := quotient(time*3, 2)
  m := rem(-7, 2) + rem(time*3, 2)
  E2: at (time > 3): V = V*2
end
"""


def test_varying_compartment_rateof_quotient_rem_match_roadrunner(tmp_path):
    p = _sbml(VARYING, tmp_path / "varying.xml")
    tm = _read(p)
    # concentration species in a growing compartment are integrated as amounts
    assert set(tm.model.state_names) == {"V", "S_amount", "A_amount"}
    assert {"S", "A"} <= set(tm.model.assignments)
    t, ref = _rr(p, 6, 61, ["[S]", "[A]", "V", "r", "q", "m"])
    keep = np.abs(t - 3) > 1e-9  # the event fires just after t = 3
    ds = simulate_triggered(tm, t_eval=t, backend="numpy", **TIGHT)
    for j, nm in enumerate(["S", "A", "V", "r", "q", "m"]):
        _assert_close(ds[nm].values[keep], ref[keep, j], nm)
    # the event conserves amounts: the concentration halves when V doubles
    i = int(np.searchsorted(t, 3.1))
    assert ds["S"].values[i] * ds["V"].values[i] == pytest.approx(
        ds["S_amount"].values[i], rel=1e-12)


def test_quotient_rem_truncate_towards_zero(tmp_path):
    code = """
    model qr
      x' = 0
      x = 0
      a := quotient(-7, 2)
      b := rem(-7, 2)
      c := quotient(7, -2)
      d := rem(7.5, 2)
    end
    """
    tm = _read(_sbml(code, tmp_path / "qr.xml"))
    ds = simulate_triggered(tm, t_eval=[0.0, 1.0], backend="numpy")
    assert ds["a"].values[0] == -3 and ds["b"].values[0] == -1
    assert ds["c"].values[0] == -3 and ds["d"].values[0] == 1.5


def test_read_sbml_still_refuses_events_and_names_them(tmp_path):
    p = _sbml(SAW, tmp_path / "saw.xml")
    with pytest.raises(im.ModelError, match="E1.*read_sbml_triggered"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_sbml(p)


def test_event_to_unknown_target_refused(saw):
    bad = Event("bad", saw.model.symbol("S") > 1, (("nope", saw.model.symbol("S")),))
    with pytest.raises(im.ModelError, match="bad.*nope"):
        TriggeredModel(saw.model, (bad,))


def test_endless_events_stop_with_error(saw):
    S = saw.model.symbol("S")
    # each execution makes the trigger false, then true again at the same instant
    flip = Event("flip", S > -1, (("S", -S - 2),), initial_value=False)
    flop = Event("flop", S < -1, (("S", -S),))
    tm = TriggeredModel(saw.model, (flip, flop))
    with pytest.raises(im.SimulationError, match="event executions"):
        simulate_triggered(tm, t_eval=[0.0, 1.0], backend="numpy", max_events=50)


def test_random_order_of_equal_priorities_is_seeded(tmp_path):
    code = """
    model tie
      x' = 0
      x = 0; q = 0; r = 0
      A: at (time >= 1), priority = 1, persistent = false: q = q + 1, x = 1
      B: at (time >= 1), priority = 1, persistent = false: r = r + 1, x = 1
    end
    """
    tm = _read(_sbml(code, tmp_path / "tie.xml"))
    runs = [simulate_triggered(tm, t_eval=[0.0, 2.0], backend="numpy", seed=s) for s in range(8)]
    both = {(float(d["q"].values[-1]), float(d["r"].values[-1])) for d in runs}
    assert all(q + r == 2 for q, r in both)  # persistent=false, but nothing cancels either
    again = simulate_triggered(tm, t_eval=[0.0, 2.0], backend="numpy", seed=3)
    assert float(again["q"].values[-1]) == float(runs[3]["q"].values[-1])


def _two_cpt_bolus(t, dose, CL, V1, Q, V2):
    """Central concentration after an IV bolus, two-compartment closed form."""
    k10, k12, k21 = CL / V1, Q / V1, Q / V2
    s = k10 + k12 + k21
    disc = math.sqrt(s * s - 4 * k10 * k21)
    a, b = (s + disc) / 2, (s - disc) / 2
    return dose / V1 * ((a - k21) / (a - b) * np.exp(-a * t) + (k21 - b) / (a - b) * np.exp(-b * t))


def test_redose_below_threshold_matches_closed_form(two_cpt):
    """TOML model + a state-triggered event on the compiled (numba) path: dose 200 mg at t0
    (initial_value false) and whenever C1 falls below 10 mg/L; the event times are the roots
    of the closed-form concentration."""
    from scipy.optimize import brentq
    pk = two_cpt.model
    A1, C1 = pk.symbol("A1"), pk.symbol("C1")
    redose = Event("redose", C1 < 10, (("A1", A1 + 200),), initial_value=False)
    ds = simulate_triggered(TriggeredModel(pk, (redose,)), t_eval=np.arange(0, 60.0),
                            compiled=two_cpt, **TIGHT)
    log = json.loads(ds.attrs["event_log"])
    assert [n for _, n in log] == ["redose", "redose"] and log[0][0] == 0.0
    pv = pk.parameter_values
    t1 = brentq(lambda t: _two_cpt_bolus(t, 200, pv["CL"], pv["V1"], pv["Q"], pv["V2"]) - 10,
                1, 59, xtol=1e-14)
    assert log[1][0] == pytest.approx(t1, rel=1e-7)
    first = ds["time"].values < t1
    exact = _two_cpt_bolus(ds["time"].values[first], 200, pv["CL"], pv["V1"], pv["Q"], pv["V2"])
    _assert_close(ds["C1"].values[first], exact, "C1", rtol=1e-7)


def _stoich_model(path):
    """A -> 2.5 B with the product's stoichiometry 'nB' (a species-reference id) set by an
    initial assignment and then grown by a rate rule; C in a 0-D compartment; a rule
    without math (ignored)."""
    doc = libsbml.SBMLDocument(3, 2)
    m = doc.createModel()
    m.setId("stoich")
    for cid, dims, size in (("cell", 3, 2.0), ("point", 0, None)):
        c = m.createCompartment()
        c.setId(cid)
        c.setConstant(True)
        c.setSpatialDimensions(dims)
        if size is not None:
            c.setSize(size)
    for sid, comp, amount in (("A", "cell", 4.0), ("B", "cell", 0.0), ("C", "point", 1.0)):
        s = m.createSpecies()
        s.setId(sid)
        s.setCompartment(comp)
        s.setInitialAmount(amount)
        s.setHasOnlySubstanceUnits(False)
        s.setBoundaryCondition(False)
        s.setConstant(False)
    for pid, val in (("k", 0.4), ("g", 0.1)):
        p = m.createParameter()
        p.setId(pid)
        p.setValue(val)
        p.setConstant(True)
    r = m.createReaction()
    r.setId("J")
    r.setReversible(False)
    sr = r.createReactant()
    sr.setSpecies("A")
    sr.setStoichiometry(1)
    sr.setConstant(True)
    sr = r.createProduct()
    sr.setSpecies("B")
    sr.setId("nB")
    sr.setStoichiometry(1)
    sr.setConstant(False)
    r.createKineticLaw().setMath(libsbml.parseL3Formula("k * A * cell"))
    r2 = m.createReaction()
    r2.setId("JC")
    r2.setReversible(False)
    sr = r2.createReactant()
    sr.setSpecies("C")
    sr.setStoichiometry(1)
    sr.setConstant(True)
    r2.createKineticLaw().setMath(libsbml.parseL3Formula("k * C"))
    ia = m.createInitialAssignment()
    ia.setSymbol("nB")
    ia.setMath(libsbml.parseL3Formula("2.5"))
    rr_ = m.createRateRule()
    rr_.setVariable("nB")
    rr_.setMath(libsbml.parseL3Formula("g"))
    empty = m.createAssignmentRule()  # L3v2: no math, no effect
    empty.setVariable("g")
    assert libsbml.writeSBMLToFile(doc, str(path))
    return path


def test_variable_stoichiometry_and_0d_compartment_match_roadrunner(tmp_path):
    p = _stoich_model(tmp_path / "stoich.xml")
    tm = _read(p)
    assert "nB" in tm.model.states and "g" in tm.model.parameters
    t, ref = _rr(p, 5, 51, ["[A]", "[B]", "C", "nB"])
    ds = simulate_triggered(tm, t_eval=t, backend="numpy", **TIGHT)
    for j, nm in enumerate(["A", "B", "C", "nB"]):
        _assert_close(ds[nm].values, ref[:, j], nm)
    # closed form: nB = 2.5 + g t, d[A]/dt = -k [A], d[B]/dt = nB k [A]
    k, g = 0.4, 0.1
    A = 2.0 * np.exp(-k * t)
    B = 2.0 * (2.5 + g / k) * (1 - np.exp(-k * t)) - 2.0 * g * t * np.exp(-k * t)
    _assert_close(ds["A"].values, A, "A closed form", rtol=1e-7)
    _assert_close(ds["B"].values, B, "B closed form", rtol=1e-7)


def test_reserved_ids_renamed_and_nonfinite_constants(tmp_path):
    """SBML ids 'time'/'t' are legal (the time csymbol is another node): renamed with a
    warning; a constant parameter set to inf becomes a fixed assignment."""
    doc = libsbml.SBMLDocument(3, 2)
    m = doc.createModel()
    m.setId("names")
    for pid, val in (("time", 10.0), ("big", math.inf), ("x", 0.0)):
        p = m.createParameter()
        p.setId(pid)
        p.setValue(val)
        p.setConstant(pid != "x")
    rr_ = m.createRateRule()
    rr_.setVariable("x")
    math_ = libsbml.parseL3Formula("tp / 2")
    math_.getChild(0).setName("time")  # <ci>time</ci>: the parameter, not the csymbol
    rr_.setMath(math_)
    y = m.createParameter()
    y.setId("y")
    y.setConstant(False)
    ar = m.createAssignmentRule()
    ar.setVariable("y")
    ar.setMath(libsbml.parseL3Formula("min(big, x)"))
    path = tmp_path / "names.xml"
    libsbml.writeSBMLToFile(doc, str(path))
    with pytest.warns(UserWarning, match="'time' renamed to 'time_'"):
        tm = read_sbml_triggered(path, check_units=False)
    assert dict(tm.renamed) == {"time": "time_"}
    assert tm.model.parameters["time_"].value == 10.0 and "big" in tm.model.assignments
    ds = simulate_triggered(tm, t_eval=[0.0, 1.0, 2.0], backend="numpy")
    np.testing.assert_allclose(ds["x"].values, [0.0, 5.0, 10.0], rtol=1e-8)
    np.testing.assert_allclose(ds["y"].values, ds["x"].values)
    assert np.isinf(ds["big"].values).all()


def test_initial_and_parameter_overrides(saw):
    t = np.linspace(0, 1, 11)
    ds = simulate_triggered(saw, t_eval=t, backend="numpy", initial={"S": 0.9},
                            parameters={"k": 0.1}, **TIGHT)
    _assert_close(ds["S"].values, 0.9 * np.exp(-0.1 * t), "S", rtol=1e-7)
    assert json.loads(ds.attrs["parameters"])["k"] == 0.1
    with pytest.raises(im.ModelError, match="unknown state"):
        simulate_triggered(saw, t_eval=t, backend="numpy", initial={"nope": 1.0})
    with pytest.raises(ValueError, match="unknown method"):
        simulate_triggered(saw, t_eval=t, method="RK45")
