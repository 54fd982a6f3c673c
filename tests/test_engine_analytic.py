"""The compiled integrator against independent truths: closed forms and superposition."""

import numpy as np
import pytest
from scipy.linalg import expm

import immunoode as im
from immunoode import Dose, Regimen

RTOL = 1e-8
ATOL = 1e-12


def one_cpt():
    b = im.ModelBuilder("one_cpt", time_unit="day")
    b.add_parameter("k", 0.15, "1/day").add_parameter("V", 3.0, "L")
    b.add_state("A", 0.0, "mg").add_ode("A", "-k*A")
    b.add_observable("C", "A/V", "mg/L")
    return im.compile_model(b.build())


@pytest.fixture(scope="module")
def one():
    return one_cpt()


def rel_err(x, ref):
    return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


def two_cpt_matrix(CL=0.22, V1=3.48, Q=0.795, V2=4.06):
    return np.array([[-(CL + Q) / V1, Q / V2], [Q / V1, -Q / V2]])


def test_one_compartment_repeated_bolus(one):
    reg = Regimen((Dose("A", 100.0, start=0, every=7, count=6),))
    t = np.linspace(0, 60, 601)
    ds = im.simulate(one, reg, t_eval=t, rtol=RTOL, atol=ATOL)
    ref = sum(100 * np.exp(-0.15 * (t - td)) * (t >= td) for td in range(0, 42, 7))
    assert rel_err(ds["A"].values, ref) < 1e-6
    assert rel_err(ds["C"].values, ref / 3.0) < 1e-6


@pytest.mark.parametrize("method", ["rodas5p", "rodas4", "LSODA", "Radau"])
def test_two_compartment_repeated_bolus(two_cpt, method):
    reg = Regimen((Dose("A1", 200.0, start=0, every=21, count=5),))
    t = np.arange(0, 140.0, 0.5)
    ds = im.simulate(two_cpt, reg, t_eval=t, rtol=RTOL, atol=ATOL, method=method)
    K = two_cpt_matrix()
    ref = np.zeros((2, len(t)))
    for td in range(0, 105, 21):
        for j, tt in enumerate(t):
            if tt >= td:
                ref[:, j] += expm(K * (tt - td)) @ np.array([200.0, 0.0])
    tol = 1e-6 if method.startswith("rodas") else 1e-5  # scipy's paths are the reference, not the target
    assert rel_err(ds["A1"].values, ref[0]) < tol
    assert rel_err(ds["A2"].values, ref[1]) < tol


def test_two_compartment_infusion(two_cpt):
    # 200 mg over 30 min every 21 days, 4 cycles: analytic convolution of a zero-order input
    D, dur = 200.0, 30 / 1440
    reg = Regimen((Dose("A1", D, start=0, every=21, count=4, duration=dur),))
    t = np.concatenate([np.linspace(0, 0.05, 51), np.linspace(0.05, 90, 400)[1:]])
    ds = im.simulate(two_cpt, reg, t_eval=t, rtol=RTOL, atol=ATOL)
    K = two_cpt_matrix()
    Kinv = np.linalg.inv(K)
    e1 = np.array([D / dur, 0.0])
    ref = np.zeros((2, len(t)))
    for ts in range(0, 84, 21):
        for j, tt in enumerate(t):
            if ts <= tt <= ts + dur:
                ref[:, j] += Kinv @ (expm(K * (tt - ts)) - np.eye(2)) @ e1
            elif tt > ts + dur:
                x_end = Kinv @ (expm(K * dur) - np.eye(2)) @ e1
                ref[:, j] += expm(K * (tt - ts - dur)) @ x_end
    assert rel_err(ds["A1"].values, ref[0]) < 1e-6
    assert rel_err(ds["A2"].values, ref[1]) < 1e-6


def test_values_straddling_a_dose(one):
    td, eps = 10.0, 1e-7
    reg = Regimen((Dose("A", 50.0, start=0), Dose("A", 80.0, start=td)))
    t = np.array([0.0, td - eps, td, td + eps, 20.0])
    ds = im.simulate(one, reg, t_eval=t, rtol=RTOL, atol=ATOL)
    before = 50 * np.exp(-0.15 * (td - eps))
    at = 50 * np.exp(-0.15 * td) + 80.0  # an output at a dose time reports the post-dose value
    after = 50 * np.exp(-0.15 * (td + eps)) + 80 * np.exp(-0.15 * eps)
    got = ds["A"].values
    assert got[0] == pytest.approx(50.0, rel=1e-12)
    assert got[1] == pytest.approx(before, rel=1e-7)
    assert got[2] == pytest.approx(at, rel=1e-7)
    assert got[3] == pytest.approx(after, rel=1e-7)
    assert got[2] - got[1] == pytest.approx(80.0, rel=1e-5)  # a jump, not smoothed


def test_logistic_growth_closed_form():
    b = im.ModelBuilder("logistic")
    b.add_parameter("r", 0.08, "1/day").add_parameter("K", 100.0, "1e9 cell")
    b.add_state("N", 0.5, "1e9 cell").add_ode("N", "r*N*(1 - N/K)")
    cm = im.compile_model(b.build())
    t = np.linspace(0, 300, 301)
    ds = im.simulate(cm, t_eval=t, rtol=RTOL, atol=ATOL)
    ref = 100 / (1 + (100 / 0.5 - 1) * np.exp(-0.08 * t))
    assert rel_err(ds["N"].values, ref) < 1e-6


def test_explicit_time_dependence():
    # time-varying clearance k(t) = k0 exp(-t/tau): A = sum_d D exp(-k0 tau (e^{-td/tau} - e^{-t/tau}))
    b = im.ModelBuilder("tv_clearance")
    b.add_parameter("k0", 0.3, "1/day").add_parameter("tau", 20.0, "day")
    b.add_state("A", 0.0, "mg").add_ode("A", "-k0*exp(-t/tau)*A")
    cm = im.compile_model(b.build())
    assert cm.numba.HAS_T
    reg = Regimen((Dose("A", 10.0, start=0, every=14, count=4),))
    t = np.linspace(0, 80, 321)
    ds = im.simulate(cm, reg, t_eval=t, rtol=RTOL, atol=ATOL)
    ref = sum(10 * np.exp(-0.3 * 20 * (np.exp(-td / 20) - np.exp(-t / 20))) * (t >= td)
              for td in (0, 14, 28, 42))
    assert rel_err(ds["A"].values, ref) < 1e-6


def test_closed_flux_model_conserves_mass():
    b = im.ModelBuilder("closed_cycle")
    for s, v in (("X", 5.0), ("Y", 1.0), ("Z", 0.0)):
        b.add_state(s, v, "mg")
    b.add_parameter("k1", 2.0, "1/day").add_parameter("k2", 1e3, "1/day")
    b.add_parameter("k3", 0.01, "1/day").add_parameter("Km", 0.5, "mg")
    b.add_flux("f1", "k1*X*Y/(Km + Y)", "X", "Y")
    b.add_flux("f2", "k2*Y", "Y", "Z")          # stiff
    b.add_flux("f3", "k3*Z*Z/Km", "Z", "X")
    cm = im.compile_model(b.build())
    ds = im.simulate(cm, t_eval=np.linspace(0, 500, 501), rtol=1e-6, atol=1e-9)
    total = ds["X"] + ds["Y"] + ds["Z"]
    assert np.max(np.abs(total.values - 6.0)) < 1e-10
    assert float(ds["Z"][-1]) > 0.05  # mass moved


def test_radiotherapy_multiplicative_event():
    b = im.ModelBuilder("rt")
    b.add_parameter("r", 0.02, "1/day").add_state("T", 1.0, "1e9 cell").add_ode("T", "r*T")
    cm = im.compile_model(b.build())
    reg = Regimen((im.Scale("T", alpha=0.3, beta=0.03, dose_gy=2.0, start=5, every=1, count=5),))
    t = np.linspace(0, 20, 81)
    ds = im.simulate(cm, reg, t_eval=t, rtol=RTOL, atol=ATOL)
    sf = np.exp(-0.3 * 2 - 0.03 * 4)
    n_fx = np.clip(np.floor(t - 5) + 1, 0, 5)
    ref = np.exp(0.02 * t) * sf ** n_fx
    assert rel_err(ds["T"].values, ref) < 1e-6


def test_finite_time_blowup_names_time_and_state():
    b = im.ModelBuilder("blowup")
    b.add_parameter("k", 1.0, "1/(mg*day)").add_state("y", 1.0, "mg").add_ode("y", "k*y*y")
    cm = im.compile_model(b.build())
    with pytest.raises(im.SimulationError) as ei:
        im.simulate(cm, t_eval=np.linspace(0, 2, 21))
    msg = str(ei.value)
    assert "'y'" in msg and "t=" in msg
    t_fail = float(msg.split("t=")[1].split()[0])
    assert 0.9 < t_fail <= 1.0 + 1e-6   # the exact solution 1/(1-t) blows up at t = 1


def test_jacobian_matches_finite_differences(tumor_pd):
    rng = np.random.default_rng(1)
    p = tumor_pd.parameter_vector()
    for _ in range(5):
        y = rng.uniform(0.1, 3.0, len(tumor_pd.state_names))
        t = rng.uniform(0, 100)
        J = tumor_pd.jacobian(t, y, p, backend="numba")
        Jfd = np.empty_like(J)
        for j in range(len(y)):
            h = 1e-6 * max(1.0, abs(y[j]))
            yp, ym = y.copy(), y.copy()
            yp[j] += h
            ym[j] -= h
            Jfd[:, j] = (tumor_pd.rhs(t, yp, p) - tumor_pd.rhs(t, ym, p)) / (2 * h)
        np.testing.assert_allclose(J, Jfd, rtol=1e-6, atol=1e-8)


def test_backends_agree(tumor_pd):
    rng = np.random.default_rng(2)
    p = tumor_pd.parameter_vector()
    Y = rng.uniform(0.0, 5.0, (len(tumor_pd.state_names), 50))
    batch = tumor_pd.rhs(3.0, Y, p[:, None])        # numpy backend, 50 points at once
    for k in range(50):
        one = tumor_pd.rhs(3.0, Y[:, k], p, backend="numba")
        np.testing.assert_allclose(batch[:, k], one, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(tumor_pd.jacobian(3.0, Y[:, k], p),
                                   tumor_pd.jacobian(3.0, Y[:, k], p, backend="numba"),
                                   rtol=1e-12, atol=1e-15)
    # whole simulations through scipy with either backend's functions
    from immunoode.scipy_path import integrate_scipy
    from immunoode.simulate import prepare_events
    reg = Regimen((Dose("A", 200.0, every=21, count=4),))
    t = np.linspace(0, 100, 101)
    ev = prepare_events(tumor_pd, reg, tumor_pd.model.parameter_values, 0.0, 100.0)
    sel = np.arange(len(tumor_pd.record_names))
    y0 = tumor_pd.initial_state(p)
    # an adaptive solver turns last-bit differences into differences of order rtol:
    # compare at a tolerance well below the 1e-9 agreement asked for
    a, _ = integrate_scipy(tumor_pd, y0, p, t, ev, sel, "LSODA", 1e-12, np.full(4, 1e-15), "numba")
    b, _ = integrate_scipy(tumor_pd, y0, p, t, ev, sel, "LSODA", 1e-12, np.full(4, 1e-15), "numpy")
    assert np.max(np.abs(a - b) / (np.abs(b) + 1e-12)) < 1e-9


def test_rodas4_matches_tight_radau_on_nonlinear_model(tumor_pd):
    reg = Regimen((Dose("A", 200.0, every=21, count=6),))
    t = np.linspace(0, 150, 151)
    fast = im.simulate(tumor_pd, reg, t_eval=t, rtol=1e-6, atol=1e-9)
    ref = im.simulate(tumor_pd, reg, t_eval=t, rtol=1e-11, atol=1e-14, method="Radau")
    for v in ("T", "E", "D", "A", "ro"):
        assert rel_err(fast[v].values, ref[v].values) < 2e-5, v


def test_hill_jacobian_is_finite_at_zero_concentration():
    # d/dx hill(x, K, n) = n x^(n-1) K^n / (K^n + x^n)^2 -> 1/K at x = 0 for n = 1
    b = im.ModelBuilder("hill0")
    b.add_parameter("K", 2.0, "mg").add_parameter("n", 1.0, "1").add_parameter("k", 0.5, "1/day")
    b.add_state("A", 0.0, "mg").add_state("E", 0.0, "1")
    b.add_ode("A", "-k*A").add_ode("E", "k*(hill(A, K, n) - E)")
    cm = im.compile_model(b.build())
    J = cm.jacobian(0.0, [0.0, 0.0], cm.parameter_vector(), backend="numba")
    assert np.all(np.isfinite(J))
    assert J[1, 0] == pytest.approx(0.5 * 1 / 2.0)
    ds = im.simulate(cm, t_eval=np.linspace(0, 10, 11))  # no drug at all: must not fail
    assert np.all(ds["E"].values == 0.0)


def test_fast_binding_next_to_slow_growth_does_not_stall():
    # receptor binding equilibrates in seconds (kon*C ~ 1e5/day) while the tumor grows over months
    b = im.ModelBuilder("binding_stiff")
    for k, v, u in (("CL", 0.2, "L/day"), ("V", 3.5, "L"), ("kon", 5e3, "L/(mg*day)"),
                    ("koff", 50.0, "1/day"), ("ksyn", 10.0, "nM/day"), ("kdeg", 10.0, "1/day"),
                    ("r", 0.01, "1/day"), ("kkill", 0.05, "1/day")):
        b.add_parameter(k, v, u)
    b.add_state("A", 0.0, "mg").add_state("R", 1.0, "nM").add_state("RC", 0.0, "nM")
    b.add_state("T", 1.0, "1e9 cell")
    b.add_assignment("C", "A/V", "mg/L")
    b.add_assignment("RO", "RC/(R + RC)", "1")
    b.add_ode("A", "-CL*C")
    b.add_ode("R", "ksyn - kdeg*R - kon*C*R + koff*RC")
    b.add_ode("RC", "kon*C*R - koff*RC - kdeg*RC")
    b.add_ode("T", "r*T - kkill*RO*T")
    cm = im.compile_model(b.build())
    reg = Regimen((Dose("A", 200.0, every=21, count=18),))
    t = np.linspace(0, 365, 366)
    fast = im.simulate(cm, reg, t_eval=t, rtol=1e-6, atol=1e-9)
    assert fast.attrs["n_steps"] < 5000
    ref = im.simulate(cm, reg, t_eval=t, rtol=1e-10, atol=1e-13, method="Radau")
    for v in ("T", "RO", "A"):
        assert rel_err(fast[v].values, ref[v].values) < 1e-5, v
    assert float(fast["RO"].sel(time=20)) > 0.99  # occupancy saturates between doses
