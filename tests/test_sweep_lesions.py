"""Multi-lesion sweeps on a hand-built model whose scans can be worked out on paper.

Single-lesion model: a lesion of diameter D grows as dD/dt = k D (D is the measured
diameter, mm); drug A is plain PK.  [lesions] makes D, D0 and k per lesion: a lung index
lesion, a liver lesion and a brain lesion (prevalence 0.5).  With factors the lesions can be
static (k factor 0), growing as D0 * 1.3**(t/84), or seeded below the 5-mm detection limit.
Scans every 42 days.  RECIST progression on the sum of diameters (+20 % and +5 mm over the
nadir), new lesions and the oligo/systemic pattern can then be computed by hand.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from immunoode.sweep.block import simulate_block
from immunoode.sweep.engines import DaskEngine, SerialEngine
from immunoode.sweep.policy import ACTION_CODES, AbstractPolicy, Action
from immunoode.sweep.run import lesion_presence, prepare_sweep, run_sweep
from immunoode.sweep.spec import SweepError, load_sweep

from .test_sweep_policy import REG_A

MODEL = """
[model]
name = "lesion_test_tumor"
time_unit = "day"

[states.D]
initial = "D0"
unit = "mm"

[states.A]
initial = 0.0
unit = "mg"

[parameters]
D0 = { value = 20.0, unit = "mm" }
k = { value = 0.0031233840954, unit = "1/day" }   # ln(1.3) / 84
kel = { value = 0.1, unit = "1/day" }

[odes]
D = "k * D"
A = "-kel * A"

[observables]
diameter = { expr = "D", unit = "mm" }
"""

# the drug-A regimen of the policy tests (same toy drug)


SWEEP = """
[sweep]
name = "lesion test"
model = "model.toml"
n = 8
seed = 3
block = 4
follow_up = 336
lesion_observable = "diameter"
diameter_unit = "mm"

[scans]
every = 42
until = 336

[population.parameters.kel]
dist = "fixed"
value = 0.1

[treatments.a]
regimen = "a.toml"
class = "ICI"

[radiotherapy]
targets = ["D"]
alpha = 0.34657359027997264   # ln 2 / 2: one 2-Gy fraction halves the lesion
beta = 0.0
hypoxic_fraction = 0.0        # pure LQ

[lesions]
local_states = ["D"]
local_parameters = ["D0", "k"]

[[lesions.lesion]]            # lung index lesion
site = "lung"
factors = { k = 0.0 }         # LESION1

[[lesions.lesion]]            # liver: grows as 20 mm * 1.3**(t/84)
site = "liver"

[[lesions.lesion]]            # brain: 2 mm, below the detection limit
site = "brain"
prevalence = 0.5
factors = { D0 = 0.1, k = 0.0 }   # LESION3

[base]
first_line = "a"

[policies.rt]
on_progression = { action = "radiotherapy", dose_gy = 2, fractions = 1, then = "continue" }

[policies.resect]
on_progression = { action = "resect", then = "continue" }

[factors]
policy = ["none", "rt", "resect"]
"""

G = 1.3 ** (42 / 84)           # growth of a growing lesion per 6-week interval
DAYS = np.arange(0, 337, 42.0)


class Recorder(AbstractPolicy):
    """Returns ``action`` at every progression and keeps the views (same process only)."""

    def __init__(self, action: Action):
        self.action = action
        self.views = []

    def decide(self, view):
        self.views.append(view)
        return self.action


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("lesions")
    (d / "model.toml").write_text(MODEL)
    (d / "a.toml").write_text(REG_A)
    (d / "sweep.toml").write_text(SWEEP)
    return d


def variant(folder, name: str, *edits) -> str:
    text = SWEEP
    for a, b in edits:
        assert a in text
        text = text.replace(a, b)
    (folder / name).write_text(text)
    return folder / name


@pytest.fixture(scope="module")
def result(folder):
    return run_sweep(folder / "sweep.toml")


def block(folder, file, policy, scenario=0):
    spec = load_sweep(file)
    cm, pop, cols, T, masks, (lm, present) = prepare_sweep(spec, return_lesions=True)
    f = dict(spec.scenarios[scenario].factors)
    out = simulate_block(cm, spec.data, f, np.arange(8), cols, masks["all"], T, policy=policy,
                         lesion_model=lm, present=present)
    return out, present


def hand_liver(policy: str):
    """Liver lesion sizes and progression scans by hand (lung static at 20 mm)."""
    d, nadir, sizes, pd = 20.0, 40.0, [20.0], []
    for k in range(1, len(DAYS)):
        d *= G
        sod = 20.0 + d
        sizes.append(d)
        if sod >= 1.2 * nadir and sod >= nadir + 5.0:
            pd.append(k)
            if policy == "rt":
                d *= 0.5                      # the fraction is given on the scan day
            elif policy == "resect":
                d = 0.0
            nadir = sod
        else:
            nadir = min(nadir, sod)
    return np.array(sizes), pd


def test_only_lesion_2_progresses_policy_sees_oligo_and_lesion_2(folder):
    rec = Recorder(Action("radiotherapy", dose_gy=2, fractions=1))
    out, present = block(folder, folder / "sweep.toml", rec)
    assert hand_liver("none")[1] == [3, 6, 8]   # PD on days 126, 252 and 336 untreated
    assert hand_liver("rt")[1] == [3, 7]        # the halved lesion progresses again on day 294
    first = [v for v in rec.views if v.n_progressions == 0]
    assert len(first) == 8 and {v.scan for v in first} == {3}
    for v in first:
        assert v.pattern == "oligo"
        assert v.progressing_lesions == (2,)
        assert v.new_lesions == ()
        assert v.lesion_sites == ("lung", "liver", "brain")
        assert v.lesion_sizes_mm[0] == pytest.approx(20.0, rel=1e-6)
        assert v.lesion_sizes_mm[1] == pytest.approx(20 * G ** 3, rel=1e-5)
        assert v.lesion_sizes_mm[2] == 0.0                      # 2 mm: below detection
        assert v.size_mm == pytest.approx(20 + 20 * G ** 3, rel=1e-5)   # sum of diameters
        assert v.baseline_mm == pytest.approx(40.0, rel=1e-6)
    np.testing.assert_array_equal(out["lesion_rt_courses"][:, 1], 2)   # days 126 and 294
    np.testing.assert_array_equal(out["lesion_rt_courses"][:, [0, 2]], 0)
    np.testing.assert_array_equal(np.flatnonzero(out["action"][0]), [3, 7])


def test_rt_scales_only_the_progressing_lesions_states(result):
    none, rt, cut = 0, 1, 2
    ls = result["lesion_size"].values              # (scenario, patient, scan, lesion)
    present = result["lesion_present"].values[0]
    # lesion 1 (lung) and lesion 3 (brain) are untouched: identical to the run without RT
    np.testing.assert_array_equal(ls[rt, :, :, 0], ls[none, :, :, 0])
    np.testing.assert_array_equal(ls[rt, :, :, 2], ls[none, :, :, 2])
    np.testing.assert_allclose(ls[none, :, :, 0], 20.0, rtol=1e-6)
    # lesion 2 follows the hand calculation: halved on day 126 and again on day 294
    for pol, s in (("none", none), ("rt", rt), ("resect", cut)):
        sizes, pd = hand_liver(pol)
        np.testing.assert_allclose(ls[s, :, :, 1], np.broadcast_to(sizes, (8, 9)), rtol=1e-5,
                                   err_msg=pol)
        codes = np.zeros(9, int)
        codes[pd] = {"none": 0, "rt": ACTION_CODES["radiotherapy"], "resect": ACTION_CODES["resect"]}[pol]
        np.testing.assert_array_equal(result["action"].values[s], np.broadcast_to(codes, (8, 9)))
    # absent lesions are NaN, present ones are measured (0 below detection)
    p3 = present[:, 2]
    assert (~p3).any() and p3.any()
    assert np.isnan(ls[:, ~p3, :, 2]).all()
    assert (ls[:, p3, :, 2] == 0).all()
    assert result["lesion_resected"].values[cut, :, 1].all()
    assert not result["lesion_resected"].values[cut, :, [0, 2]].any()
    # final RECIST assessment over all lesions: first PD on day 126, lesion 2 progressing, oligo
    np.testing.assert_allclose(result["pfs_time"].values, 126.0)
    assert (result["pattern"].values == "oligo").all()
    np.testing.assert_array_equal(result["lesion_progressing"].values[..., 1], True)
    np.testing.assert_array_equal(result["lesion_progressing"].values[..., [0, 2]], False)
    # size = sum of diameters of the target lesions (lung + liver; the brain lesion is not seen)
    np.testing.assert_allclose(result["size"].values, ls[..., 0] + ls[..., 1], rtol=1e-12)
    np.testing.assert_allclose(result["pfs2_time"].values[[none, rt]], [[252.0] * 8, [294.0] * 8])
    assert list(result["lesion"].values) == ["lung1", "liver1", "brain1"]


def test_prevalence_draw_is_seeded_shared_by_scenarios_and_as_documented(result, folder):
    spec = load_sweep(folder / "sweep.toml")
    _, _, _, _, _, (lm, present) = prepare_sweep(spec, return_lesions=True)
    seed = int(np.random.SeedSequence([3, 2]).generate_state(1)[0])
    u = np.random.default_rng(seed).random((8, 3))
    np.testing.assert_array_equal(present[:, 1:], u[:, 1:] < np.array([1.0, 0.5]))
    assert present[:, 0].all()
    np.testing.assert_array_equal(lesion_presence(lm, 8, 3), present)
    for s in range(3):
        np.testing.assert_array_equal(result["lesion_present"].values[s], present)


def test_two_lesions_in_two_organs_is_systemic_with_oligo_max_lesions_1(folder):
    file = variant(folder, "systemic.toml", ("factors = { k = 0.0 }         # LESION1", ""),
                   ("[population.parameters.kel]", "[response]\noligo_max_lesions = 1\n\n"
                                                   "[population.parameters.kel]"))
    rec = Recorder(Action("radiotherapy", dose_gy=2, fractions=1))
    out, _ = block(folder, file, rec)
    first = [v for v in rec.views if v.n_progressions == 0]
    # both lesions grow: sum 40 -> 40 * 1.3 = 52 mm on day 84 (+30 %, +12 mm), each lesion +6 mm
    assert {v.scan for v in first} == {2}
    for v in first:
        assert v.progressing_lesions == (1, 2)
        assert v.pattern == "systemic"
    np.testing.assert_array_equal(out["pattern"], 2)                # PATTERN_CODES: systemic
    np.testing.assert_array_equal(out["lesion_rt_courses"][:, :2] >= 1, True)
    # default oligo_max_lesions = 3, oligo_max_organs = 2: the same progression is oligo
    rec2 = Recorder(Action())
    out2, _ = block(folder, variant(folder, "oligo2.toml",
                                    ("factors = { k = 0.0 }         # LESION1", "")), rec2)
    assert {v.pattern for v in rec2.views if v.n_progressions == 0} == {"oligo"}
    np.testing.assert_array_equal(out2["pattern"], 1)


def test_new_lesion_appearing_is_a_progression_of_that_lesion(folder):
    # the brain lesion grows 10x faster from 2 mm: 2 * 1.3**(10 * 42 / 84) = 7.4 mm on day 42
    file = variant(folder, "new.toml", ("factors = { D0 = 0.1, k = 0.0 }   # LESION3",
                                        "factors = { D0 = 0.1, k = 10.0 }"))
    rec = Recorder(Action())
    out, present = block(folder, file, rec)
    has3 = present[:, 2]
    first = {v.patient: v for v in rec.views if v.n_progressions == 0}
    for p in range(8):
        if has3[p]:
            assert first[p].scan == 1 and first[p].new_lesions == (3,)
            assert first[p].progressing_lesions == (3,) and first[p].pattern == "oligo"
            assert first[p].lesion_sizes_mm[2] == pytest.approx(2 * 1.3 ** 5, rel=1e-5)
        else:
            assert first[p].scan == 3 and first[p].progressing_lesions == (2,)
    np.testing.assert_allclose(out["pfs_time"], np.where(has3, 42.0, 126.0))
    assert out["lesion_progressing"][has3, 2].all()
    # after the reference moves to the PD scan, the brain lesion is followed as a non-target:
    # its next progression is its own growth (>= 20 % and >= 5 mm), not "new" again
    later = [v for v in rec.views if v.n_progressions == 1 and has3[v.patient]]
    assert later and all(v.new_lesions == () for v in later)


def test_scenario_rt_irradiates_the_chosen_lesion(folder):
    file = variant(folder, "rtlesion.toml", ('policy = ["none", "rt", "resect"]',
                                             'rt_lesion = [1, 2]\nrt_fractions = [1]\nrt_dose_gy = [2]'))
    ds = run_sweep(file)
    ls = ds["lesion_size"].values
    assert list(ds["rt_lesion"].values) == [1, 2]
    # scenario 0 irradiates the lung lesion on day 0: halved, the liver lesion untouched
    np.testing.assert_allclose(ls[0, :, 1:, 0], 10.0, rtol=1e-5)
    np.testing.assert_allclose(ls[1, :, :, 0], 20.0, rtol=1e-6)
    np.testing.assert_allclose(ls[1, :, 1, 1], 10.0 * G, rtol=1e-5)
    np.testing.assert_allclose(ls[0, :, 1, 1], 20.0 * G, rtol=1e-5)
    np.testing.assert_array_equal(ds["lesion_rt_courses"].values, np.broadcast_to([[[1, 0, 0]], [[0, 1, 0]]], (2, 8, 3)))


def test_one_lesion_declared_equals_the_single_lesion_sweep(folder):
    """The multi-lesion reading with one lesion gives the single-lesion sweep's numbers."""
    one = variant(folder, "one.toml",
                  ('[[lesions.lesion]]            # liver: grows as 20 mm * 1.3**(t/84)\n'
                   'site = "liver"\n', ''),
                  ('[[lesions.lesion]]            # brain: 2 mm, below the detection limit\n'
                   'site = "brain"\nprevalence = 0.5\nfactors = { D0 = 0.1, k = 0.0 }   # LESION3\n', ''),
                  ("factors = { k = 0.0 }         # LESION1", ""),
                  ('local_parameters = ["D0", "k"]', 'local_parameters = ["D0"]'),
                  ('[policies.resect]\non_progression = { action = "resect", then = "continue" }\n', ''),
                  ('policy = ["none", "rt", "resect"]', 'policy = ["none", "rt"]'))
    text = one.read_text()
    start, end = text.index("[lesions]"), text.index("[base]")
    single = folder / "single.toml"
    single.write_text(text[:start] + text[end:])
    a, b = run_sweep(one), run_sweep(single)
    for v in ("size", "action", "pfs_time", "pfs2_time", "bor", "sitc", "pattern",
              "cumulative_dose", "summary"):
        np.testing.assert_allclose(a[v].values, b[v].values, rtol=1e-12, err_msg=v) \
            if a[v].dtype.kind == "f" else np.testing.assert_array_equal(a[v].values, b[v].values)
    np.testing.assert_array_equal(a["lesion_size"].values[..., 0], b["lesion_size"].values[..., 0])
    assert (b["action"].values[1] == ACTION_CODES["radiotherapy"]).any()


def test_local_cluster_equals_local_for_a_multi_lesion_sweep(folder, result, tmp_path):
    pytest.importorskip("dask.distributed")
    with DaskEngine(n_workers=2) as eng:
        ds = run_sweep(folder / "sweep.toml", tmp_path / "d.zarr", engine=eng)
    for v in ("size", "lesion_size", "lesion_present", "lesion_progressing", "lesion_rt_courses",
              "action", "pfs_time", "pattern", "bor", "summary"):
        np.testing.assert_array_equal(ds[v].values, result[v].values, err_msg=v)


@pytest.mark.parametrize("edit, match", [
    (('targets = ["D"]', 'targets = ["A"]'), r"\[radiotherapy\].*'A'.*lesion-local"),
    (('policy = ["none", "rt", "resect"]', 'rt_lesion = [4]'), r"'rt_lesion'.*from 1 to 3"),
    (("[base]", '[resection]\nstates = ["X"]\n\n[base]'), r"\[resection\].*'X'.*not a lesion-local"),
])
def test_bad_lesion_items_fail_before_work(folder, edit, match):
    with pytest.raises(SweepError, match=match):
        load_sweep(variant(folder, "bad.toml", edit))


def test_resect_needs_lesions(folder):
    one = SWEEP[:SWEEP.index("[lesions]")] + SWEEP[SWEEP.index("[base]"):]
    (folder / "nolesion.toml").write_text(one)
    with pytest.raises(SweepError, match=r"policies\.resect.*'resect' needs several lesions"):
        load_sweep(folder / "nolesion.toml")
    assert math.isfinite(G)


def test_trial_with_history_is_refused(folder):
    text = SWEEP.replace('model = "model.toml"', 'model = "nsclc_io"\ntrial = "nsclc_1l_pembrolizumab_lesions"')
    (folder / "hist.toml").write_text(text)
    with pytest.raises(SweepError, match=r"\[history\].*pre-treatment growth.*not simulate"):
        load_sweep(folder / "hist.toml")


def test_fitted_parameter_file_gives_mechanistic_values_only(tmp_path):
    from immunoode.sweep.spec import _load_parameters
    p = tmp_path / "fitted.toml"
    p.write_text('[k_CTL_median]\nkind = "population"\nvalue = 0.03\n\n'
                 '[mu_edit]\nkind = "mechanistic"\nvalue = 5.6e-6\n')
    assert _load_parameters(str(p), None) == {"mu_edit": 5.6e-6}


def test_population_effects_shift_the_log_parameter_and_keep_bounds():
    import xarray as xr
    from scipy import stats
    from immunoode.sweep.run import apply_population_effects
    dist = {"dist": "lognormal", "median": 0.05, "cv": 0.8, "lower": 0.02, "upper": 1.5}
    s = math.sqrt(math.log1p(0.8 ** 2))
    base = stats.lognorm(s=s, scale=0.05)
    x = np.array([0.03, 0.03, 1.0, 0.05])
    pop = xr.Dataset({"k_CTL": ("patient", x), "pdl1_tps": ("patient", np.array([0.0, 50.0, 90.0, 50.0]))})
    out = apply_population_effects(pop, {"k_CTL": {"effects": {"pdl1_tps": 0.02}, "dist": dist}})
    v = out["k_CTL"].values
    # covariate 0: unchanged; otherwise the same truncated quantile of the shifted lognormal
    assert v[0] == pytest.approx(0.03, rel=1e-9)
    for i in (1, 2, 3):
        shifted = stats.lognorm(s=s, scale=0.05 * math.exp(0.02 * pop["pdl1_tps"].values[i]))
        u = (base.cdf(x[i]) - base.cdf(0.02)) / (base.cdf(1.5) - base.cdf(0.02))
        u_new = (shifted.cdf(v[i]) - shifted.cdf(0.02)) / (shifted.cdf(1.5) - shifted.cdf(0.02))
        assert u_new == pytest.approx(u, abs=1e-9), i
    assert v[2] < 1.5   # a patient near the bound stays inside it (scaling then clipping gave 1.5)
    np.testing.assert_array_equal(pop["k_CTL"].values, x)   # input untouched
    assert apply_population_effects(pop, {}) is pop


def test_population_effects_match_a_direct_draw_from_the_shifted_population():
    """A large sample: the shifted values are distributed as the calibration's population model
    (log-median shifted by beta * covariate, truncated to [lower, upper]) -- KS test."""
    import xarray as xr
    from scipy import stats
    from immunoode.sampling import sample_population
    from immunoode.sweep.run import apply_population_effects
    dist = {"dist": "lognormal", "median": 0.05, "cv": 1.0, "lower": 0.01, "upper": 0.2}
    pop = sample_population({"parameters": {"k_CTL": dist}}, 4000, seed=3)
    pop["tps"] = ("patient", np.full(4000, 80.0))
    out = apply_population_effects(pop, {"k_CTL": {"effects": {"tps": 0.02}, "dist": dist}})
    s = math.sqrt(math.log1p(1.0))
    target = stats.lognorm(s=s, scale=0.05 * math.exp(1.6))
    lo, hi = target.cdf(0.01), target.cdf(0.2)
    trunc_cdf = lambda y: (target.cdf(np.clip(y, 0.01, 0.2)) - lo) / (hi - lo)
    assert stats.kstest(out["k_CTL"].values, trunc_cdf).pvalue > 0.01
    assert (out["k_CTL"].values >= 0.2 - 1e-12).mean() < 0.01     # clipping put 1/3 at the bound


def test_planned_rt_to_an_absent_lesion_is_not_given(folder):
    spec = load_sweep(folder / "sweep.toml")
    cm, pop, cols, T, masks, (lm, present) = prepare_sweep(spec, return_lesions=True)
    f = dict(spec.scenarios[0].factors, rt_lesion=3, rt_fractions=1, rt_dose_gy=2.0)
    out = simulate_block(cm, spec.data, f, np.arange(8), cols, masks["all"], T, lesion_model=lm,
                         present=present)
    np.testing.assert_array_equal(out["lesion_rt_courses"][:, 2], present[:, 2].astype(int))
    np.testing.assert_array_equal(out["lesion_rt_courses"][:, :2], 0)
    # the brain lesion (2 mm, static; 1 mm after RT) is below detection where present, NaN where absent
    ls = out["lesion_size"][:, :, 2]
    assert np.isnan(ls[~present[:, 2]]).all() and (ls[present[:, 2]] == 0).all()


def test_a_changed_parameter_value_in_the_model_file_refuses_resume(folder, tmp_path):
    from immunoode.errors import ImmunoodeError
    from immunoode.sweep.run import SweepStoreError, _worker_model
    d = tmp_path / "m"
    d.mkdir()
    for name in ("model.toml", "a.toml", "sweep.toml"):
        (d / name).write_text((folder / name).read_text())
    run_sweep(d / "sweep.toml", d / "r.zarr", max_chunks=1)
    spec = load_sweep(d / "sweep.toml")
    cm, *_ = prepare_sweep(spec, return_lesions=True)
    old = cm.model.content_hash()
    (d / "model.toml").write_text(MODEL.replace("kel = { value = 0.1,", "kel = { value = 0.2,"))
    with pytest.raises(SweepStoreError, match="different sweep"):
        run_sweep(d / "sweep.toml", d / "r.zarr")
    lesions = json.dumps(spec.data["trial"]["lesions"], sort_keys=True)
    _worker_model.cache_clear()          # a fresh worker reads the changed file
    with pytest.raises(ImmunoodeError, match="parameter values changed"):
        _worker_model(str(d / "model.toml"), cm.key, lesions, old)


def test_population_file_arm_and_named_effect_come_from_the_calibration_files(folder):
    (folder / "fitted_population.toml").write_text(
        '[arm_a.parameters.kel]\ndist = "fixed"\nvalue = 0.25\n\n'
        '[arm_b.parameters.kel]\ndist = "fixed"\nvalue = 0.5\n')
    (folder / "fitted_parameters.toml").write_text('[kel_slope]\nkind = "population"\nvalue = 0.5\n')
    file = variant(folder, "popfile.toml",
                   ('n = 8\n', 'n = 8\nparameters = "fitted_parameters.toml"\n'
                               'population_file = "fitted_population.toml"\npopulation_arm = "arm_b"\n'),
                   ("[base]", "[population.parameters.D0]\ndist = \"fixed\"\nvalue = 2.0\n\n"
                              "[population_effects.kel]\nD0 = \"kel_slope\"\n\n[base]"))
    spec = load_sweep(file)
    assert spec.data["trial"]["population"]["parameters"]["kel"]["value"] == 0.5
    assert spec.data["population_effects"]["kel"]["effects"] == {"D0": 0.5}
    _, pop, cols, *_ = prepare_sweep(spec)
    np.testing.assert_allclose(pop["kel"].values, 0.5 * math.e)       # 0.5 * exp(0.5 * 2)
    with pytest.raises(SweepError, match=r"population_arm 'arm_c'.*arms: arm_a, arm_b"):
        load_sweep(variant(folder, "badarm.toml", ('n = 8\n', 'n = 8\npopulation_file = '
                                                   '"fitted_population.toml"\npopulation_arm = "arm_c"\n')))
