"""Time-course fitting: data reader, error models, least-squares fits, fit files."""

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import least_squares, minimize

import immunoode as im
from immunoode.calibrate.errormodel import (ErrorModel, fixed_residuals, minus2_log_likelihood,
                                            profiled_residuals)
from immunoode.calibrate.nmdata import DataError, read_timecourse_data
from immunoode.calibrate.timecourse import (FitFileError, FitParameter, IndividualFits,
                                            TimecourseProblem, _fd_jacobian, _lmfit_parameters,
                                            load_fit_file,
                                            _Objective, _solvers, fit_timecourse, run_fit_file)
from immunoode.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
TRUTH = {"CL": 0.22, "V1": 3.48, "Q": 0.795, "V2": 4.06}
TIMES = np.array([0.05, 0.5, 2, 5, 10, 20.9, 21.05, 22, 28, 35, 42, 56])
HEADER = "id,time,dv,observable,evid,amt,cmt,rate\n"


@pytest.fixture(scope="session")
def pk_model():
    return im.load_model(ROOT / "models" / "two_compartment_pk.toml")


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory, pk_model):
    """4 individuals (2 bolus, 2 infusion) from TRUTH, proportional 10 % noise, seed 7."""
    cm = im.compile_model(pk_model)
    rng = np.random.default_rng(7)
    lines = [HEADER]
    for i in range(1, 5):
        dur = 0.05 if i % 2 == 0 else None
        reg = im.Regimen((im.Dose("A1", 200, every=21, count=2, duration=dur),))
        ds = im.simulate(cm, reg, t_eval=np.concatenate([[0], TIMES]), parameters=TRUTH,
                         rtol=1e-10, atol=1e-12, outputs=["concentration"])
        f = ds["concentration"].values[1:]
        dv = f * (1 + 0.1 * rng.standard_normal(len(f)))
        for s in (0, 21):
            lines.append(f"{i},{s},,,1,200,A1,{200 / dur if dur else ''}\n")
        lines += [f"{i},{t},{y:.6g},concentration,0,,,\n" for t, y in zip(TIMES, dv)]
    path = tmp_path_factory.mktemp("tc") / "pk.csv"
    path.write_text("".join(lines))
    return path


def _fit_params():
    return (FitParameter("CL", 0.4, 0.01, 10), FitParameter("V1", 6.0, 0.1, 100),
            FitParameter("Q", 0.4, 0.01, 10), FitParameter("V2", 8.0, 0.1, 100))


def _problem(model, data, **kw):
    em = kw.pop("error", ErrorModel("proportional", proportional=0.2))
    return TimecourseProblem(model, data, _fit_params(), {"concentration": em}, **kw)


# ------------------------------------------------------------------ error models
def _fd(fun, x, h=1e-6):
    x = np.asarray(x, float)
    cols = []
    for k in range(len(x)):
        up, dn = x.copy(), x.copy()
        up[k] += h * max(1, abs(x[k]))
        dn[k] -= h * max(1, abs(x[k]))
        cols.append((fun(up) - fun(dn)) / (up[k] - dn[k]))
    return np.column_stack(cols)


def _toy(theta, t):
    """f = θ0·exp(−θ1·t) and its derivatives."""
    f = theta[0] * np.exp(-theta[1] * t)
    return f, np.column_stack([f / theta[0], -t * f])


@pytest.mark.parametrize("kind", ["additive", "proportional", "combined"])
def test_profiled_residual_jacobian_matches_finite_differences(kind):
    t = np.linspace(0.1, 5, 12)
    y = _toy([10.0, 0.5], t)[0] * (1 + 0.1 * np.sin(7 * t)) + 0.05 * np.cos(3 * t)

    def e_of(x):
        f, df = _toy(x[:2], t)
        return profiled_residuals(y, f, df, kind, x[2])[0]

    x = np.array([9.0, 0.6, 0.7])
    f, df = _toy(x[:2], t)
    _, J, Jl, _ = profiled_residuals(y, f, df, kind, x[2])
    np.testing.assert_allclose(np.column_stack([J, Jl]), _fd(e_of, x), rtol=1e-6, atol=1e-8)


def test_fixed_residual_jacobian_matches_finite_differences():
    t = np.linspace(0.1, 5, 9)
    y = _toy([10.0, 0.5], t)[0] + 0.3
    em = ErrorModel("combined", additive=0.4, proportional=0.15, estimate=False)

    def e_of(x):
        f, df = _toy(x, t)
        return fixed_residuals(y, f, df, em)[0]

    f, df = _toy([9.0, 0.6], t)
    np.testing.assert_allclose(fixed_residuals(y, f, df, em)[1], _fd(e_of, [9.0, 0.6]),
                               rtol=1e-6, atol=1e-9)


def test_minus2_log_likelihood_hand_computed():
    # y = (1, 3), f = (2, 2), σ = (1, 2): Σ log(2πσ²) + r²/σ² = 2 log 2π + log 4 + 1 + 1/4
    got = minus2_log_likelihood([1, 3], [2, 2], [1, 2])
    assert got == pytest.approx(2 * math.log(2 * math.pi) + math.log(4) + 1.25, rel=1e-14)


@pytest.mark.parametrize("kind", ["proportional", "combined"])
def test_profiled_least_squares_is_the_maximum_likelihood(kind):
    """Least squares on the profiled residuals gives the same estimate as minimising the
    full -2 log-likelihood over the structural and all error parameters."""
    t = np.linspace(0.2, 6, 15)
    rng = np.random.default_rng(3)
    f0 = _toy([10.0, 0.5], t)[0]
    y = f0 + np.sqrt(0.3 ** 2 + (0.1 * f0) ** 2) * rng.standard_normal(len(t))

    def res(x):
        f, df = _toy(np.exp(x[:2]), t)
        return profiled_residuals(y, f, df, kind, math.exp(x[2]) if kind == "combined" else None)[0]

    x0 = [math.log(8), math.log(0.4)] + ([math.log(2.0)] if kind == "combined" else [0.0])
    ls = least_squares(res, x0, xtol=1e-14, ftol=1e-14, gtol=1e-14)
    f, _ = _toy(np.exp(ls.x[:2]), t)

    def m2ll(z):
        f, _ = _toy(np.exp(z[:2]), t)
        a = math.exp(z[2]) if kind == "combined" else 0.0
        return minus2_log_likelihood(y, f, np.sqrt(a ** 2 + (math.exp(z[-1]) * f) ** 2))

    z0 = list(ls.x[:2] + 0.05) + ([math.log(0.5)] if kind == "combined" else []) + [math.log(0.2)]
    ml = minimize(m2ll, z0, method="Nelder-Mead",
                  options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "maxfev": 20000})
    np.testing.assert_allclose(ls.x[:2], ml.x[:2], atol=2e-5)
    scale = profiled_residuals(y, f, np.zeros((len(t), 0)), kind,
                               math.exp(ls.x[2]) if kind == "combined" else None)[3]
    assert scale == pytest.approx(math.exp(ml.x[-1]), rel=1e-4)


def test_error_model_validation():
    with pytest.raises(ModelError, match="unknown error model 'poisson'"):
        ErrorModel("poisson")
    with pytest.raises(ModelError, match="'proportional' must be a positive number"):
        ErrorModel("proportional", proportional=-0.1)
    with pytest.raises(ModelError, match="fixed|needs a value for 'additive'"):
        ErrorModel("additive", estimate=False)
    with pytest.raises(ModelError, match="'additive' is not a parameter of the proportional"):
        ErrorModel("proportional", additive=1.0, proportional=0.1)


# ------------------------------------------------------------------ data reader
def test_reader_reads_doses_observations_and_covariates(tmp_path, pk_model):
    p = tmp_path / "d.csv"
    p.write_text("ID,TIME,DV,OBSERVABLE,EVID,AMT,CMT,RATE,V1\n"
                 "a,0,,,1,100,1,,3.0\n"
                 "a,1,20.5,concentration,0,,,,3.0\n"
                 "a,0.5,25,concentration,0,,,,\n"
                 "b,0,,,1,50,A1,100,\n"
                 "b,2,4,concentration,0,,,,\n")
    d = read_timecourse_data(p, pk_model)
    assert d.ids == ("a", "b") and d.n_obs == 3 and d.observables == ("concentration",)
    a = d["a"]
    np.testing.assert_array_equal(a.time, [0.5, 1.0])        # sorted
    np.testing.assert_array_equal(a.line, [4, 3])            # file lines kept
    assert a.covariates == {"V1": 3.0}
    (dose,) = a.regimen.doses
    assert (dose.target, dose.amount, dose.start, dose.duration) == ("A1", 100, 0, None)
    (inf,) = d["b"].regimen.doses
    assert inf.duration == pytest.approx(0.5)                # amt / rate


@pytest.mark.parametrize("text, match", [
    ("id,time,value,observable\n1,0,1,concentration\n",
     r"d\.csv, line 1, column 'value': unknown column"),
    ("id,time,observable\n1,0,concentration\n", r"line 1: missing required column\(s\) 'dv'"),
    ("id,time,dv,observable\n1,0,1,concentation\n",
     r"line 2, column 'observable': unknown observable 'concentation'.*did you mean"),
    ("id,time,dv,observable\n1,0,1,concentration\n1,x,2,concentration\n",
     r"line 3, column 'time': expected a number, got 'x'"),
    ("id,time,dv,observable,evid,amt,cmt\n1,0,,,1,10,5\n1,1,2,concentration,0,,\n",
     r"line 2, column 'cmt': cmt '5' is out of range"),
    ("id,time,dv,observable,evid,amt,cmt\n1,0,,,1,,A1\n",
     r"line 2, column 'amt': dose record \(evid = 1\) without an amount"),
    ("id,time,dv,observable,evid\n1,0,1,concentration,2\n", r"line 2.*evid '2' is not supported"),
    ("id,time,dv,observable,V1\n1,0,1,concentration,3\n1,1,1,concentration,4\n",
     r"line 3, column 'V1': covariate changes within individual '1'"),
    ("id,time,dv,observable\n1,0,1\n", r"line 2: has 3 fields, the header has 4"),
    ("id,time,dv,observable\n", r"no observation records"),
])
def test_reader_errors_name_file_line_and_column(tmp_path, pk_model, text, match):
    p = tmp_path / "d.csv"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        read_timecourse_data(p, pk_model)


def test_dose_records_and_regimen_together_are_refused(synthetic_csv, pk_model):
    d = read_timecourse_data(synthetic_csv, pk_model)
    with pytest.raises(DataError, match="dose records .* and a regimen"):
        d.with_regimen(im.Regimen((im.Dose("A1", 200),)))


# ------------------------------------------------------------------ fitting
def test_residual_jacobian_from_sensitivities_matches_finite_differences(synthetic_csv,
                                                                         pk_model):
    data = read_timecourse_data(synthetic_csv, pk_model)
    for em in (ErrorModel("combined", 0.5, 0.2), ErrorModel("proportional", proportional=0.2,
                                                               estimate=False)):
        pr = _problem(pk_model, data, error=em)
        obj = _Objective(pr, data.individuals, _solvers(pr))
        params = _lmfit_parameters(pr, obj, {p.name: p.value for p in pr.parameters})
        J = obj.jacobian(params)
        assert J.shape == (data.n_obs, len(obj.names))
        np.testing.assert_allclose(J, _fd_jacobian(obj, params, rel=1e-6), rtol=2e-5,
                                   atol=1e-6 * np.max(np.abs(J)))


def test_pooled_fit_recovers_truth_within_intervals(synthetic_csv, pk_model):
    data = read_timecourse_data(synthetic_csv, pk_model)
    fit = fit_timecourse(_problem(pk_model, data), profiles=True)
    assert fit.success, fit.message
    for k, p in enumerate(fit.parameters):
        assert fit.ci_low[k] < TRUTH[p] < fit.ci_high[k], (p, fit.ci_low[k], fit.ci_high[k])
        assert fit.profile_low[k] < fit.estimate[k] < fit.profile_high[k]
        assert fit.profile_low[k] < TRUTH[p] < fit.profile_high[k]
    assert 0.05 < fit.error_models["concentration"].proportional < 0.2   # truth 0.1
    assert np.allclose(np.diag(fit.correlation), 1.0)
    assert fit.njev > 0 and fit.nfev > 0
    # the same problem with finite-difference Jacobians reaches the same optimum
    fd = fit_timecourse(_problem(pk_model, data, jacobian="finite-difference"))
    np.testing.assert_allclose(fd.estimate, fit.estimate, rtol=1e-4)
    np.testing.assert_allclose(fd.se, fit.se, rtol=1e-3)
    assert fd.njev == 0
    rep = fit.report()
    for word in ("Estimates", "RSE", "Correlations", "profile", "proportional (estimated)"):
        assert word in rep
    t = fit.table()
    assert list(t["parameter"]) == ["CL", "V1", "Q", "V2"] and "rse_percent" in t
    assert set(fit.predictions.columns) >= {"id", "time", "dv", "pred", "iwres"}
    for k in ("model_hash", "data_file", "rtol", "immunoode_version", "error_models"):
        assert k in fit.provenance


def test_individual_fits_keep_a_failing_individual(synthetic_csv, pk_model, tmp_path):
    # individual "bad": an observation before its first dose -> prediction 0 ->
    # a proportional error model has σ = 0 there: that fit fails, the others run.
    text = synthetic_csv.read_text().splitlines()
    keep = [ln for ln in text[1:] if ln.split(",")[0] in ("1", "2")]
    bad = ["bad,1,,,1,200,A1,", "bad,0.5,3,concentration,0,,,", "bad,2,50,concentration,0,,,",
           "bad,5,40,concentration,0,,,"]
    p = tmp_path / "ind.csv"
    p.write_text("\n".join([text[0]] + keep + bad) + "\n")
    data = read_timecourse_data(p, pk_model)
    with pytest.warns(UserWarning, match="1 of 3 individual fits failed"):
        res = fit_timecourse(_problem(pk_model, data, pooling="individual"))
    assert isinstance(res, IndividualFits)
    assert list(res.fits) == ["1", "2", "bad"]
    assert res.fits["1"].success and res.fits["2"].success
    assert not res.fits["bad"].success and "σ = 0" in res.fits["bad"].message
    tab = res.table()
    assert len(tab) == 12 and tab["success"].sum() == 8


def test_problem_errors(synthetic_csv, pk_model):
    data = read_timecourse_data(synthetic_csv, pk_model)
    with pytest.raises(ModelError, match=r"\[parameters\] 'Vc': unknown parameter"):
        TimecourseProblem(pk_model, data, (FitParameter("Vc", 1.0),),
                          {"concentration": ErrorModel()})
    with pytest.raises(ModelError, match=r"no error model for observable 'concentration'"):
        TimecourseProblem(pk_model, data, _fit_params(), {})
    with pytest.raises(ModelError, match=r"initial value 20 is outside its bounds"):
        FitParameter("CL", 20.0, 0.01, 10)


# ------------------------------------------------------------------ fit files
def _fit_file(tmp_path, csv, **over):
    fit = {"kind": '"timecourse"', "model": f'"{ROOT / "models" / "two_compartment_pk.toml"}"',
           "data": f'"{csv}"', "profiles": "false", "seed": "3"}
    fit.update(over)
    body = "[fit]\n" + "".join(f"{k} = {v}\n" for k, v in fit.items() if v is not None)
    body += ("[parameters]\nCL = { initial = 0.4, lower = 0.01, upper = 10 }\n"
             "V1 = { initial = 6.0, lower = 0.1, upper = 100 }\n"
             "Q = { initial = 0.4 }\nV2 = { initial = 8.0 }\n"
             "[error.concentration]\nmodel = \"proportional\"\nproportional = 0.2\n")
    p = tmp_path / "fit.toml"
    p.write_text(body)
    return p


def test_run_fit_file_writes_loadable_parameters_and_plots(tmp_path, synthetic_csv):
    out = tmp_path / "out"
    rc = run_fit_file(_fit_file(tmp_path, synthetic_csv), out)
    assert rc == 0
    for f in ("parameters.toml", "report.txt", "estimates.csv", "predictions.csv",
              "provenance.json", "obs_vs_pred.png", "residuals_vs_time.png",
              "individual_fits.png"):
        assert (out / f).stat().st_size > 0, f
    fitted = im.load_model(out / "parameters.toml")
    import pandas as pd
    est = pd.read_csv(out / "estimates.csv").set_index("parameter")
    assert list(est.index) == ["CL", "V1", "Q", "V2", "concentration.b"]
    for k in ("CL", "V1", "Q", "V2"):
        assert fitted.parameters[k].value == pytest.approx(est.loc[k, "estimate"], rel=1e-12)
    assert 0 < est.loc["concentration.b", "se"] < est.loc["concentration.b", "estimate"]
    assert "[[lmfit report]]" in (out / "report.txt").read_text()


@pytest.mark.parametrize("over, edit, match", [
    ({}, ("CL = {", "CLx = {"), r"fit\.toml \[parameters\] 'CLx': unknown parameter.*'CL'"),
    ({"kind": '"rates"'}, None, r"fit\.toml \[fit\] 'kind': kind must be \"timecourse\""),
    ({"pooling": '"mixed"'}, None, r"fit\.toml.*pooling must be one of"),
    ({"solver": '"x"'}, None, r"fit\.toml \[fit\] 'solver': unknown key"),
    ({}, ("[error.concentration]", "[error.conc]"),
     r"fit\.toml \[error\] 'conc': unknown key|no \[error\.concentration\]"),
])
def test_fit_file_errors_name_file_section_item(tmp_path, synthetic_csv, over, edit, match):
    p = _fit_file(tmp_path, synthetic_csv, **over)
    if edit:
        p.write_text(p.read_text().replace(*edit))
    with pytest.raises(FitFileError, match=match):
        run_fit_file(p, tmp_path / "out")


@pytest.mark.parametrize("a2_fixed", [False, True], ids=["both-estimated", "A2-fixed"])
def test_two_observables_reach_the_joint_maximum_likelihood(tmp_path, pk_model, a2_fixed):
    """Concentration (proportional, estimated) and the peripheral amount A2 (additive,
    estimated or fixed at its true SD): the re-weighted least squares must land on the
    maximum of the full likelihood, found here independently by Nelder-Mead on -2LL."""
    cm = im.compile_model(pk_model)
    rng = np.random.default_rng(5)
    lines = [HEADER]
    regs = {}
    for i in (1, 2):
        reg = im.Regimen((im.Dose("A1", 200, every=21, count=2),))
        regs[str(i)] = reg
        ds = im.simulate(cm, reg, t_eval=np.concatenate([[0], TIMES]), parameters=TRUTH,
                         rtol=1e-10, atol=1e-12, outputs=["concentration", "A2"])
        c = ds["concentration"].values[1:] * (1 + 0.1 * rng.standard_normal(len(TIMES)))
        a2 = ds["A2"].values[1:] + 5.0 * rng.standard_normal(len(TIMES))
        lines += [f"{i},{s},,,1,200,A1,\n" for s in (0, 21)]
        lines += [f"{i},{t},{y:.8g},concentration,0,,,\n" for t, y in zip(TIMES, c)]
        lines += [f"{i},{t},{y:.8g},A2,0,,,\n" for t, y in zip(TIMES, a2)]
    p = tmp_path / "two.csv"
    p.write_text("".join(lines))
    data = read_timecourse_data(p, pk_model)
    a2_em = ErrorModel("additive", additive=5.0, estimate=False) if a2_fixed else \
        ErrorModel("additive", additive=1.0)
    pr = TimecourseProblem(pk_model, data, _fit_params(),
                           {"concentration": ErrorModel("proportional", proportional=0.3),
                            "A2": a2_em})
    fit = fit_timecourse(pr)
    assert fit.success, fit.message
    t_eval = np.concatenate([[0], TIMES])
    y = {i: data[i] for i in ("1", "2")}

    def m2ll(z):
        th = dict(zip(["CL", "V1", "Q", "V2"], np.exp(z[:4])))
        b = math.exp(z[4])
        a = 5.0 if a2_fixed else math.exp(z[5])
        tot = 0.0
        for i, ind in y.items():
            ds = im.simulate(cm, regs[i], t_eval=t_eval, parameters=th, rtol=1e-10, atol=1e-12,
                             outputs=["concentration", "A2"])
            k = np.searchsorted(t_eval, ind.time)
            is_a2 = np.array(ind.observable) == "A2"
            f = np.where(is_a2, ds["A2"].values[k], ds["concentration"].values[k])
            sd = np.where(is_a2, a, b * np.abs(f))
            tot += minus2_log_likelihood(ind.dv, f, sd)
        return tot

    em = fit.error_models
    z_fit = np.concatenate([np.log(fit.estimate), [math.log(em["concentration"].proportional)]]
                           + ([] if a2_fixed else [[math.log(em["A2"].additive)]]))
    ml = minimize(m2ll, z_fit + 0.05, method="Nelder-Mead",
                  options={"xatol": 1e-7, "fatol": 1e-9, "maxiter": 6000, "maxfev": 6000})
    assert m2ll(z_fit) <= ml.fun + 1e-6           # the fit is at least as good
    np.testing.assert_allclose(z_fit, ml.x, atol=2e-3)
    assert fit.minus2ll == pytest.approx(m2ll(z_fit), rel=1e-9)
    assert em["A2"].additive == (5.0 if a2_fixed else pytest.approx(5.0, rel=0.5))


def test_shipped_example_data_is_reproduced_by_its_script(tmp_path, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "tc_data", ROOT / "fits" / "timecourse_two_cpt_pk_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "OUT", tmp_path / "regen.csv")
    assert mod.main().read_text() == (ROOT / "fits" / "timecourse_two_cpt_pk.csv").read_text()
    problem, opts = load_fit_file(ROOT / "fits" / "timecourse_two_cpt_pk.toml")
    assert problem.data.n_obs == 136 and len(problem.data.ids) == 8
    assert problem.error_models["concentration"].kind == "combined"
    assert opts["seed"] == 1 and opts["profiles"]


def test_multistart_is_reproducible_with_a_seed(synthetic_csv, pk_model):
    data = read_timecourse_data(synthetic_csv, pk_model)
    pr = _problem(pk_model, data)
    a = fit_timecourse(pr, n_starts=3, seed=42)
    b = fit_timecourse(pr, n_starts=3, seed=42)
    assert a.success
    np.testing.assert_array_equal(a.estimate, b.estimate)
    np.testing.assert_allclose(a.estimate, fit_timecourse(pr).estimate, rtol=1e-5)
    with pytest.raises(ValueError, match="give a seed"):
        fit_timecourse(pr, n_starts=2)


def test_fisher_information_standard_errors_match_monte_carlo():
    """SEs of θ and of the proportional error b from the expected Fisher information agree
    with the spread of maximum-likelihood estimates over 300 simulated data sets."""
    from immunoode.calibrate.errormodel import fisher_information
    t = np.linspace(0.2, 6, 40)
    theta, b = np.array([10.0, 0.5]), 0.15
    f0, df0 = _toy(theta, t)
    rng = np.random.default_rng(2024)
    est = []
    for _ in range(300):
        y = f0 * (1 + b * rng.standard_normal(len(t)))

        def res(x):
            f, df = _toy(x, t)
            return profiled_residuals(y, f, df, "proportional")[0]

        def jac(x):
            f, df = _toy(x, t)
            return profiled_residuals(y, f, df, "proportional")[1]

        x = least_squares(res, theta, jac=jac, xtol=1e-12, ftol=1e-12).x
        f, _ = _toy(x, t)
        est.append([*x, profiled_residuals(y, f, np.zeros((len(t), 0)), "proportional")[3]])
    est = np.array(est)
    info, labels = fisher_information(f0, df0, [("y", np.arange(len(t)),
                                                 ErrorModel("proportional", proportional=b))])
    assert labels == [("y", "proportional")]
    cov = np.linalg.inv(info)
    se = np.sqrt(np.diag(cov))
    se[2] *= b                                   # log b -> b
    np.testing.assert_allclose(est.std(axis=0, ddof=1), se, rtol=0.15)
