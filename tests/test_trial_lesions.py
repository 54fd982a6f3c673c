"""Several lesions per patient and the pre-treatment history.

A toy tumor-immune model: lesion-local tumor ``T`` and effectors ``E``; systemic primed
effectors ``Tp`` (which infiltrate every lesion and are primed by every lesion's antigen)
and a drug amount ``A``.  The transform is checked against models written by hand:

* one lesion = the original model;
* ``n`` identical lesions = the original with the lesion-dependent terms of ``Tp``
  multiplied by ``n`` (written by hand below);
* extra empty lesions leave lesion 1 and the systemic state unchanged;
* the systemic right-hand side is the sum over lesions at an arbitrary state.

Trials use ``k_in = 0`` so that ``T' = (g - kd) T`` has a closed form per lesion.
"""

import math

import numpy as np
import pytest

import immunoode as im
from immunoode.errors import ModelError
from immunoode.history import simulate_history
from immunoode.lesions import Lesion, multi_lesion_model
from immunoode.trial import TrialError, run_trial, summary_table

TOY = """
[model]
name = "ml_toy"
time_unit = "day"

[states]
T = { initial = "T0", unit = "1" }
E = { initial = 0.0, unit = "1" }
Tp = { initial = "Tp0", unit = "1" }
A = { initial = 0.0, unit = "mg" }

[parameters]
T0 = { value = 1.0, unit = "1" }
Tp0 = { value = 0.1, unit = "1" }
g = { value = 0.02, unit = "1/day" }
kd = { value = 0.0, unit = "1/day" }
kk = { value = 0.5, unit = "1/day" }
Ke = { value = 1.0, unit = "1" }
s_p = { value = 0.05, unit = "1/day" }
d_p = { value = 0.1, unit = "1/day" }
k_in = { value = 0.3, unit = "1/day" }
K_in = { value = 0.5, unit = "1" }
d_e = { value = 0.2, unit = "1/day" }
k_pr = { value = 0.02, unit = "1/day" }
n_les = { value = 1.0, unit = "1" }
CL = { value = 0.2, unit = "1/day" }
kp = { value = 0.5, unit = "1" }
Kd = { value = 1.0, unit = "mg" }
emax = { value = 2.0, unit = "1" }
d_ref = { value = 20.0, unit = "mm" }

[assignments]
infil = { expr = "k_in*Tp*T/(K_in + T)", unit = "1/day" }
occ = { expr = "kp*A/(kp*A + Kd)", unit = "1" }
kill = { expr = "kk*E/(Ke + E)*(1 + emax*occ)", unit = "1/day" }

[odes]
T = "g*T - kd*T - kill*T"
E = "infil - d_e*E"
Tp = "s_p + n_les*k_pr*T/(1 + T) - d_p*Tp - n_les*infil"
A = "-CL*A"

[observables]
diameter = { expr = "d_ref * T^(1/3)", unit = "mm" }
blood_effectors = { expr = "Tp", unit = "1" }
"""

LOCAL = dict(local_states=["T", "E"], local_parameters=["T0", "kp", "kd"])
REG = im.Regimen((im.Dose("A", 10.0, every=21, count=20),))
TIGHT = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def toy():
    return im.loads_model(TOY)


@pytest.fixture(scope="module")
def toy_cm(toy):
    return im.compile_model(toy)


@pytest.fixture(scope="module")
def three(toy):
    """3 identical lung lesions (one compiled structure for every 3-lesion test)."""
    return multi_lesion_model(toy, ["lung", "lung", "lung"], **LOCAL)


@pytest.fixture(scope="module")
def three_cm(three):
    return im.compile_model(three.model)


def test_one_lesion_transform_is_the_original_model(toy, toy_cm):
    lm = multi_lesion_model(toy, [Lesion("lung")], **LOCAL)
    assert set(lm.local_assignments) == {"infil", "occ", "kill"}
    assert lm.local_observables == ("diameter",)
    a = im.simulate(toy_cm, REG, t_end=300, dt=5, **TIGHT)
    b = im.simulate(im.compile_model(lm.model), REG, t_end=300, dt=5, **TIGHT)
    np.testing.assert_allclose(b["T_l1"].values, a["T"].values, rtol=1e-9)
    np.testing.assert_allclose(b["Tp"].values, a["Tp"].values, rtol=1e-9)
    np.testing.assert_allclose(b["diameter_l1"].values, a["diameter"].values, rtol=1e-9)


def test_identical_lesions_share_systemic_state_as_summed_model(toy, toy_cm, three_cm):
    """n identical lesions == the hand-written model with lesion terms of Tp times n."""
    ref = im.compile_model(toy.with_parameters(n_les=3.0))
    a = im.simulate(ref, REG, t_end=300, dt=5, **TIGHT)
    b = im.simulate(three_cm, REG, t_end=300, dt=5, **TIGHT)
    for k in (1, 2, 3):
        np.testing.assert_allclose(b[f"T_l{k}"].values, a["T"].values, rtol=1e-7)
        np.testing.assert_allclose(b[f"E_l{k}"].values, a["E"].values, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(b["Tp"].values, a["Tp"].values, rtol=1e-7)
    np.testing.assert_allclose(b["A"].values, a["A"].values, rtol=1e-7, atol=1e-12)
    # and the sharing matters: a single lesion alone has different blood effectors
    c = im.simulate(toy_cm, REG, t_end=300, dt=5, **TIGHT)
    assert np.max(np.abs(c["Tp"].values - a["Tp"].values)) > 1e-3


def test_empty_lesions_leave_lesion_one_and_blood_unchanged(toy_cm, three_cm):
    a = im.simulate(toy_cm, REG, t_end=300, dt=5, **TIGHT)
    b = im.simulate(three_cm, REG, t_end=300, dt=5, parameters={"T0_l2": 0.0, "T0_l3": 0.0}, **TIGHT)
    np.testing.assert_allclose(b["T_l1"].values, a["T"].values, rtol=1e-8)
    np.testing.assert_allclose(b["Tp"].values, a["Tp"].values, rtol=1e-8)
    assert np.all(b["T_l2"].values == 0) and np.all(b["E_l3"].values == 0)


def test_systemic_rhs_is_the_sum_over_lesions(three, three_cm):
    rng = np.random.default_rng(0)
    cm = three_cm
    p = cm.parameter_vector()
    names = cm.parameter_names
    for nm in ("kp_l1", "kp_l2", "kp_l3"):
        p[names.index(nm)] = rng.uniform(0.1, 1.0)
    y = rng.uniform(0.1, 2.0, len(cm.state_names))
    f = cm.rhs(0.0, y, p)
    v = dict(zip(cm.state_names, y))
    P = dict(zip(names, p))
    infil = [P["k_in"] * v["Tp"] * v[f"T_l{k}"] / (P["K_in"] + v[f"T_l{k}"]) for k in (1, 2, 3)]
    prime = [P["k_pr"] * v[f"T_l{k}"] / (1 + v[f"T_l{k}"]) for k in (1, 2, 3)]
    expect_tp = P["s_p"] + sum(prime) - P["d_p"] * v["Tp"] - sum(infil)
    assert f[cm.state_names.index("Tp")] == pytest.approx(expect_tp, rel=1e-12)
    for k in (1, 2, 3):
        occ = P[f"kp_l{k}"] * v["A"] / (P[f"kp_l{k}"] * v["A"] + P["Kd"])
        kill = P["kk"] * v[f"E_l{k}"] / (P["Ke"] + v[f"E_l{k}"]) * (1 + P["emax"] * occ)
        T = v[f"T_l{k}"]
        assert f[cm.state_names.index(f"T_l{k}")] == pytest.approx(
            P["g"] * T - P[f"kd_l{k}"] * T - kill * T, rel=1e-12)
    assert three.names("diameter") == ["diameter_l1", "diameter_l2", "diameter_l3"]
    np.testing.assert_array_equal(three.factor("kp"), [1, 1, 1])


def test_site_factors_scale_local_parameters(toy):
    lm = multi_lesion_model(toy, [Lesion("lung"), Lesion("brain", {"kp": 0.1, "T0": 0.001})], **LOCAL)
    pv = lm.model.parameter_values
    assert pv["kp_l2"] == pytest.approx(0.05) and pv["T0_l2"] == pytest.approx(0.001)
    assert lm.lesion_names == ["lung1", "brain1"] and lm.sites == ["lung", "brain"]
    cols = lm.expand_columns({"kp": np.array([1.0, 2.0]), "g": np.array([0.1, 0.2])})
    np.testing.assert_allclose(cols["kp_l2"], [0.1, 0.2])
    np.testing.assert_allclose(cols["kp_l1"], [1.0, 2.0])
    assert "g" in cols and "kp" not in cols


@pytest.mark.parametrize("kwargs, match", [
    (dict(local_states=["TT"]), r"local_states.*'TT'.*did you mean 'T'"),
    (dict(local_states=["T"], local_parameters=["kpp"]), r"local_parameters.*'kpp'.*did you mean 'kp'"),
    (dict(local_states=[]), r"at least one lesion-local state"),
], ids=["unknown-state", "unknown-parameter", "no-local-state"])
def test_transform_errors_name_the_item(toy, kwargs, match):
    with pytest.raises(ModelError, match=match):
        multi_lesion_model(toy, ["lung"], **kwargs)


def test_factor_for_systemic_parameter_and_unknown_site_are_errors(toy):
    with pytest.raises(ModelError, match=r"'g'.*not a local parameter"):
        multi_lesion_model(toy, [Lesion("lung", {"g": 2.0})], **LOCAL)
    with pytest.raises(ModelError, match=r"unknown lesion site.*did you mean 'liver'"):
        multi_lesion_model(toy, ["livr"], **LOCAL)


# --------------------------------------------------------------------------- trials
def _lesion_trial(model, n=120, seed=4, **extra):
    spec = {
        "trial": {"name": "toy lesions", "model": model, "regimen": "none", "n": n, "seed": seed,
                  "follow_up": 420, "lesion_observable": "diameter", "diameter_unit": "mm"},
        "scans": {"every": 42, "until": 420},
        "population": {"parameters": {
            "k_in": {"dist": "fixed", "value": 0.0},
            "g": {"dist": "fixed", "value": 0.01},
            "kd": {"dist": "uniform", "low": 0.013, "high": 0.03}}},
        "lesions": {"local_states": ["T", "E"], "local_parameters": ["T0", "kd", "kp"],
                    "lesion": [{"site": "lung"},
                               {"site": "lymph_node", "prevalence": 0.5},
                               {"site": "brain", "factors": {"T0": 1e-3, "kd": 0.0, "kp": 0.0}}]},
    }
    for k, v in extra.items():
        spec.setdefault(k, {}).update(v)
    return spec


@pytest.fixture(scope="module")
def lesion_arm(toy, three_cm):
    return run_trial(_lesion_trial(toy))


def test_new_brain_lesion_makes_pd_at_the_closed_form_scan(lesion_arm):
    ds = lesion_arm
    assert ds.sizes["lesion"] == 3 and list(ds["lesion_site"].values) == ["lung", "lymph_node", "brain"]
    # brain: D = 2 mm * exp(g t / 3) (drug does not reach it) -> detected at 5 mm
    t_star = 3 * math.log(5.0 / 2.0) / 0.01
    scans = ds.scan_time.values[0]
    t_pd = scans[scans >= t_star][0]
    kd = ds["kd"].values
    # lung: D = 20 mm * exp((g - kd) t / 3) shrinks (kd > g), so the new lesion is the PD
    np.testing.assert_allclose(ds["simulated_size"].values[:, 0, :],
                               20 * np.exp(np.outer(0.01 - kd, scans) / 3), rtol=1e-5)
    assert np.all(ds["pd_time"].values == t_pd)
    assert np.all(ds["pd_by"].values & 2)                   # PD_NEW bit
    assert not ds["at_baseline"].values[:, 2].any()
    brain = list(ds.site.values).index("brain")
    assert ds["site_progressed"].values[:, brain].all()
    assert np.all(ds["pattern"].values == "oligo")
    # responders (lung -30 % before PD) are PR; PR then PD after 6 months: secondary resistance
    # (CR once every target is below the 5 mm detection limit before the PD scan)
    d_last = 20 * np.exp((0.01 - kd) * 252 / 3)           # last scan before PD
    cr = d_last < 5 - 1e-3
    pr = (d_last <= 14 - 1e-3) & (d_last > 5 + 1e-3)
    assert cr.any() and pr.any()
    assert np.all(ds["bor"].values[cr] == "CR") and np.all(ds["bor"].values[pr] == "PR")
    assert np.all(ds["sitc"].values[cr | pr] == "secondary")
    # lymph node present in about half of the patients; absent ones never measured
    present = ds["lesion_present"].values[:, 1]
    assert 0.3 < present.mean() < 0.7
    assert np.all(np.isnan(ds["simulated_size"].values[~present, 1, :]))
    assert np.all(ds["is_target"].values[present, 1])        # 20 mm short axis >= 15 mm
    assert ds.attrs["lesions_per_patient"] == 3
    assert "3 lesion" in summary_table(ds)


def test_trial_lesion_errors(toy):
    spec = _lesion_trial(toy, n=4)
    spec["lesions"]["lesion"][0]["site"] = "lungs"
    with pytest.raises(TrialError, match=r"lesions.lesion\[0\].*site.*lung"):
        run_trial(spec)
    spec = _lesion_trial(toy, n=4)
    spec["lesions"]["lesion"][2]["factors"] = {"g": 1.0}
    with pytest.raises(TrialError, match=r"'g' is not in local_parameters"):
        run_trial(spec)


# --------------------------------------------------------------------------- history
def test_history_reaches_baseline_at_closed_form_time(toy_cm):
    """Pure growth D(t) = 2 mm exp(g t / 3) from the seed T = 1e-3."""
    g = np.array([0.004, 0.006, 0.01, 0.02, -0.001, 0.0005, 0.2])
    target = np.array([30.0, 20.0, 40.0, 25.0, 30.0, 30.0, 30.0])
    cols = {"g": g, "k_in": np.zeros(g.size), "k_pr": np.zeros(g.size)}
    h = simulate_history(toy_cm, cols, size_records=["diameter"], size_scale_mm=1.0,
                         target_mm=target, seed_states={"T": 1e-3}, max_days=3650, min_days=90,
                         grid_days=14, equilibrate_days=2000)
    t_exact = 3 * np.log(target / 2.0) / g
    pat = np.array([True, True, True, True, False, False, False])
    assert list(h.status) == ["patient"] * 4 + ["immune_control", "too_slow", "too_fast"]
    np.testing.assert_allclose(h.t_diagnosis[pat], t_exact[pat], rtol=2e-4)
    np.testing.assert_allclose(h.size_mm[pat], target[pat], rtol=1e-4)
    np.testing.assert_allclose(h.state["T"][pat], (target[pat] / 20.0) ** 3, rtol=3e-4)
    # equilibrated host: blood effectors at s_p / d_p (the model's own start is Tp0 = 0.1)
    np.testing.assert_allclose(h.state["Tp"][pat], 0.05 / 0.1, rtol=1e-6)
    assert np.all(np.isnan(h.state["T"][~pat])) and h.screen_failure_share == pytest.approx(3 / 7)


def test_trial_with_history_starts_at_the_sampled_baseline(toy, three_cm):
    spec = _lesion_trial(toy, n=60, seed=9)
    spec["population"]["parameters"]["g"] = {"dist": "uniform", "low": -0.002, "high": 0.03}
    spec["population"]["parameters"]["kd"] = {"dist": "fixed", "value": 0.0}
    spec["population"]["parameters"]["baseline_mm"] = {"dist": "uniform", "low": 15, "high": 40}
    spec["population"]["parameters"]["k_pr"] = {"dist": "fixed", "value": 0.0}
    spec["history"] = {"seed_states": {"T": 1e-3}, "lesion_seed": [1.0, 0.5, 0.001],
                       "baseline_mm": "baseline_mm", "min_days": 200,
                       "max_days": 3000, "equilibrate_days": 1000}
    with pytest.raises(TrialError, match=r"population.parameters.*'baseline_mm'"):
        run_trial(spec)
    spec["population"]["covariates"] = {"baseline_mm": spec["population"]["parameters"].pop("baseline_mm")}
    ds = run_trial(spec)
    g, b = ds["g"].values, ds["baseline_mm"].values
    t = 3 * np.log(b / 2.0) / np.where(g > 0, g, np.nan)
    with np.errstate(invalid="ignore"):
        expect = np.where(g <= 0, "immune_control", np.where(t > 3000, "too_slow",
                          np.where(t < 200, "too_fast", "patient")))
    clear = ~np.isfinite(t) | ((np.abs(t - 3000) > 30) & (np.abs(t - 200) > 5))
    np.testing.assert_array_equal(ds["screen_status"].values[clear], expect[clear])
    pat = ds["enrolled"].values
    assert pat.any() and (~pat).any()
    np.testing.assert_allclose(ds["simulated_size"].values[pat, 0, 0], b[pat], rtol=1e-4)
    np.testing.assert_allclose(ds["t_diagnosis"].values[pat], t[pat], rtol=5e-4)
    assert np.all(ds["bor"].values[~pat] == "NE") and not ds["evaluable"].values[~pat].any()
    assert np.all(ds["status"].values[~pat] == -20)
    assert ds.attrs["screen_failure_share"] == pytest.approx(np.mean(~pat))
    assert "screen" in summary_table(ds)


def test_summary_with_bootstrap_intervals(lesion_arm):
    from immunoode.trialstats import bootstrap_summary
    text = summary_table(lesion_arm, bootstrap_n=40, n_boot=200, seed=3)
    assert "range, trials of n=40" in text
    boot = bootstrap_summary(lesion_arm, 40, n_boot=200, seed=3)
    lo, hi = boot.loc["ORR", "lower"], boot.loc["ORR", "upper"]
    line = next(x for x in text.splitlines() if x.startswith("objective response"))
    assert line.rstrip().endswith(f"{100 * lo:5.1f} – {100 * hi:5.1f}%")
    # a trial of 40 spreads more than the exact interval of the whole arm
    tab = summary_table(lesion_arm)
    assert "range" not in tab


def test_shipped_lesion_trial_file_builds_a_shared_systemic_model():
    """The library arm with lesions: validated and transformed (not compiled: ~2 min cold)."""
    from pathlib import Path

    from immunoode.cli import resolve_model_path
    from immunoode.trial import load_trial
    path = Path(__file__).resolve().parents[1] / "models" / "trials" / "nsclc_1l_pembrolizumab_lesions.toml"
    spec = load_trial(path)
    les = spec["lesions"]
    assert [x["site"] for x in les["lesion"]] == ["lung", "lymph_node", "liver", "brain"]
    assert spec["history"]["baseline_mm"] == "baseline_mm"
    base = im.load_model(resolve_model_path(spec["trial"]["model"]))
    lm = multi_lesion_model(base, [Lesion(x["site"], x["factors"], x["prevalence"]) for x in les["lesion"]],
                            local_states=les["local_states"], local_parameters=les["local_parameters"])
    m = lm.model
    assert len(m.states) == 4 * len(les["local_states"]) + (len(base.states) - len(les["local_states"]))
    for shared in ("Tn", "Tp", "A_pembro_c", "A_pembro_p"):
        assert shared in m.states and f"{shared}_l1" not in m.states
    # primed T cells in blood leave into every lesion: one infiltration term per lesion
    rhs_tp = m.rhs()["Tp"]
    assert {s.name for s in rhs_tp.free_symbols} >= {f"infiltration_l{k}" for k in (1, 2, 3, 4)}
    assert m.parameter_values["kp_tumor_pembro_l4"] == pytest.approx(
        0.1 * base.parameter_values["kp_tumor_pembro"])
    assert "tumor_diameter_l4" in m.observables and "conc_pembro" in m.observables


def test_plots_of_a_multi_lesion_arm(lesion_arm, tmp_path):
    from immunoode.plots import save_trial_plots
    files = save_trial_plots(lesion_arm, tmp_path)
    assert len(files) == 4 and all(f.stat().st_size > 1000 for f in files)
