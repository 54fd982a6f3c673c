"""Adaptive policies and toxicity on a hand-built model whose scans can be computed by hand.

The lesion grows as D(t) = D0 * 1.3**(t/84) whatever the drugs do; drugs A and B are plain
one-compartment PK.  Scans every 42 days.  Progression (RECIST: +20 % and +5 mm over the
nadir) can then be worked out on paper, and so can the policy's actions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from immunoode.sweep.block import simulate_block
from immunoode.sweep.policy import ACTION_CODES, Action, AbstractPolicy
from immunoode.sweep.run import prepare_sweep, run_sweep
from immunoode.sweep.spec import SweepError, load_sweep
from immunoode.sweep.toxicity import combined_class, hazard_per_day, load_toxicity_table, patient_draws

MODEL = """
[model]
name = "policy_test_tumor"
time_unit = "day"

[states.D]
initial = "D0"
unit = "mm"

[states.A]
initial = 0.0
unit = "mg"

[states.B]
initial = 0.0
unit = "mg"

[parameters]
D0 = { value = 20.0, unit = "mm" }
k = { value = 0.0031233840954, unit = "1/day" }   # ln(1.3) / 84
kel = { value = 0.1, unit = "1/day" }

[odes]
D = "k * D"
A = "-kel * A"
B = "-kel * B"

[observables]
diameter = { expr = "D", unit = "mm" }
"""

REG_A = """
name = "drug A q3w"
[[dose]]
target = "A"
amount = 100
unit = "mg"
every = 21
count = 40
label = "drug_a"
"""

REG_B = """
name = "drug B q3w"
[[dose]]
target = "B"
amount = 50
unit = "mg"
every = 21
count = 40
label = "drug_b"
"""

SWEEP = """
[sweep]
name = "policy test"
model = "model.toml"
n = 4
seed = 11
block = 4
follow_up = 336
lesion_observable = "diameter"
diameter_unit = "mm"

[scans]
every = 42
until = 336

[population.parameters.D0]
dist = "fixed"
value = 20.0

[treatments.a]
regimen = "a.toml"
class = "ICI"

[treatments.b]
regimen = "b.toml"
class = "chemo"

[radiotherapy]
targets = ["D"]
alpha = 0.34657359027997264   # ln 2 / 2: one 2-Gy fraction halves the lesion
beta = 0.0
hypoxic_fraction = 0.0        # pure LQ

[base]
first_line = "a"

[policies.rt]
on_progression = { action = "radiotherapy", dose_gy = 2, fractions = 1, then = "continue" }

[policies.switch_b]
on_progression = { action = "switch", to = "b" }

[policies.continue_rechallenge]
max_duration = 100
on_progression = "continue"
rechallenge = { treatment = "first_line", max_duration = 50 }

[factors]
policy = ["none", "until_progression", "rt", "switch_b", "continue_rechallenge"]
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    (d / "model.toml").write_text(MODEL)
    (d / "a.toml").write_text(REG_A)
    (d / "b.toml").write_text(REG_B)
    (d / "sweep.toml").write_text(SWEEP)
    return d


@pytest.fixture(scope="module")
def result(folder):
    return run_sweep(folder / "sweep.toml")


def hand_scans(policy: str):
    """Scan sizes and action codes worked out by hand (no immunoode code)."""
    g = 1.3 ** (42 / 84)                   # growth per 6-week interval
    times = np.arange(0, 337, 42.0)
    size, nadir, acts, sizes, on = 20.0, 20.0, [0], [20.0], True
    for _ in times[1:]:
        size *= g
        sizes.append(size)
        pd_ = size >= 1.2 * nadir and size >= nadir + 5.0
        code = 0
        if pd_:
            code = {"none": 0, "until_progression": 2, "rt": 3, "switch_b": 4}[policy] if on else 0
            on = on and policy != "until_progression"     # stopped: later PDs off treatment
            nadir = size
            if policy == "rt":
                size *= 0.5                    # the fraction is given on the scan day
        else:
            nadir = min(nadir, size)
        acts.append(code)
    return np.array(sizes), np.array(acts)


@pytest.mark.parametrize("s, policy", [(0, "none"), (1, "until_progression"), (2, "rt"), (3, "switch_b")])
def test_policy_fires_at_the_right_scans(result, s, policy):
    sizes, acts = hand_scans(policy)
    assert result["policy"].values[s] == policy
    np.testing.assert_allclose(result["size"].values[s, 0], sizes, rtol=1e-5)
    np.testing.assert_array_equal(result["action"].values[s, 0], acts)
    assert (result["action"].values[s] == result["action"].values[s, :1]).all()  # same for all 4


def test_hand_case_progressions_are_where_expected(result):
    # untreated growth: PD at day 84, then (nadir reset) at 168, 252, 336
    assert hand_scans("none")[1].tolist() == [0] * 9
    assert np.flatnonzero(hand_scans("switch_b")[1]).tolist() == [2, 4, 6, 8]
    assert np.flatnonzero(hand_scans("until_progression")[1]).tolist() == [2]
    # with RT halving the lesion at day 84, the next PD comes at day 252
    assert np.flatnonzero(hand_scans("rt")[1]).tolist() == [2, 6]
    np.testing.assert_allclose(result["pfs_time"].values[:, 0], 84.0)
    np.testing.assert_allclose(result["pfs2_time"].values[[0, 1, 3], 0], 168.0)
    np.testing.assert_allclose(result["pfs2_time"].values[2, 0], 252.0)


def test_stop_and_switch_change_the_doses(result):
    cum = result["cumulative_dose"]
    # planned: doses 0, 21, ..., 315 (16 doses) before the last scan at 336
    assert cum.sel(drug="drug_a").values[0, 0] == pytest.approx(16 * 100)
    # stop at the day-84 progression: doses 0, 21, 42, 63
    assert cum.sel(drug="drug_a").values[1, 0] == pytest.approx(4 * 100)
    assert result["time_on_treatment"].values[1, 0] == pytest.approx(84.0)
    # switch to B at day 84: A 4 doses, B at 84, 105, ..., 315 (12 doses)
    assert cum.sel(drug="drug_a").values[3, 0] == pytest.approx(4 * 100)
    assert cum.sel(drug="drug_b").values[3, 0] == pytest.approx(12 * 50)


def test_two_year_style_stop_and_rechallenge(result):
    s = 4
    acts = result["action"].values[s, 0]
    # PD at 84 on treatment -> continue; treatment capped at day 100 (doses 0..84: 5);
    # PD at 168 off treatment after the cap -> rechallenge for 50 days (168, 189, 210);
    # PD at 252 off treatment again -> rechallenge (252, 273, 294); again at the last scan
    # (336, no dose simulated after it)
    assert acts.tolist() == [0, 0, ACTION_CODES["continue"], 0, ACTION_CODES["rechallenge"], 0,
                             ACTION_CODES["rechallenge"], 0, ACTION_CODES["rechallenge"]]
    assert result["cumulative_dose"].sel(drug="drug_a").values[s, 0] == pytest.approx((5 + 3 + 3) * 100)


class GrowthCap(AbstractPolicy):
    """A Python policy: stop when the lesion passes 30 mm (progression or not)."""

    def decide(self, view):
        return Action("stop") if view.size_mm > 30 else Action()


def test_python_policy_is_called_at_every_progression_scan(folder):
    spec = load_sweep(folder / "sweep.toml", policies={"cap30": GrowthCap()})
    cm, pop, cols, T, masks = prepare_sweep(spec)
    f = dict(spec.scenarios[0].factors, policy="cap30")
    out = simulate_block(cm, spec.data, f, np.arange(4), cols, masks["all"], T, policy=GrowthCap())
    sizes, _ = hand_scans("none")
    # policies are consulted at progression scans: 84 (26 mm, no), 168 (33.8 mm -> stop)
    assert out["action"][0].tolist() == [0, 0, 0, 0, 2, 0, 0, 0, 0]
    assert sizes[4] > 30 > sizes[2]


def test_unknown_policy_treatment_is_an_error(folder, tmp_path):
    (tmp_path / "model.toml").write_text(MODEL)
    (tmp_path / "a.toml").write_text(REG_A)
    (tmp_path / "b.toml").write_text(REG_B)
    p = tmp_path / "bad.toml"
    p.write_text(SWEEP.replace('to = "b"', 'to = "c"'))
    with pytest.raises(SweepError, match=r"bad\.toml.*\[policies\].*switch_b.*unknown treatment 'c'"):
        load_sweep(p)


# --------------------------------------------------------------------------- toxicity
def test_toxicity_table_carries_sources_and_hazard_formula():
    tab = load_toxicity_table()
    assert {"ICI", "ICI+ICI", "ICI+chemo", "ICI+TKI", "ICI+anti-angiogenic"} <= set(tab)
    for row in tab.values():
        assert row["source"] and row["verification"]
    h, q = hazard_per_day(tab["ICI"])
    assert 1 - math.exp(-h * tab["ICI"]["reference_exposure_days"]) == pytest.approx(0.178)
    assert q == pytest.approx(9.0 / 17.8)
    assert combined_class(["ICI", "chemo"]) == "ICI+chemo"
    assert combined_class(["ICI+ICI"]) == "ICI+ICI"
    assert combined_class(["anti-angiogenic", "ICI"]) == "ICI+anti-angiogenic"


def test_toxicity_events_follow_the_hazard_with_common_random_numbers(folder, tmp_path):
    text = (SWEEP.replace("n = 4", "n = 400").replace("block = 4", "block = 200")
            .replace('[factors]\npolicy = ["none", "until_progression", "rt", "switch_b", "continue_rechallenge"]',
                     '[toxicity]\nenabled = true\nhold_days = 42\n\n[factors]\nadded_drug = ["none", "b"]'))
    for f in ("model.toml", "a.toml", "b.toml"):
        (tmp_path / f).write_text((folder / f).read_text())
    (tmp_path / "tox.toml").write_text(text)
    ds = run_sweep(tmp_path / "tox.toml")
    tab = load_toxicity_table()
    E, U = patient_draws(11, np.arange(400))
    for s, key in ((0, "ICI"), (1, "ICI+chemo")):
        h, q = hazard_per_day(tab[key])
        expected_first = E[:, 0] / h
        seen = ds["tox_first_day"].values[s]
        hit = expected_first < 336 - 1e-6
        # exposure runs from day 0 without a break until the first event
        np.testing.assert_allclose(seen[hit], expected_first[hit], rtol=1e-9)
        assert np.isnan(seen[~hit]).all()
        disc = ds["tox_discontinued"].values[s]
        np.testing.assert_array_equal(disc[hit & (U[:, 0] < q)], True)
        # observed share with an event by the reference exposure ~ the trial's incidence
        p_obs = np.mean(expected_first <= tab[key]["reference_exposure_days"])
        p_true = tab[key]["g3plus_pct"] / 100
        assert abs(p_obs - p_true) < 4 * math.sqrt(p_true * (1 - p_true) / 400)
    # a patient on hold misses the doses in the 42 days after its event
    s0 = ds.isel(scenario=0)
    held = (s0["tox_events"].values == 1) & ~s0["tox_discontinued"].values
    i = int(np.flatnonzero(held & (s0["tox_first_day"].values < 200))[0])
    t_ae = s0["tox_first_day"].values[i]
    missed = sum(1 for t in np.arange(0, 336, 21.0) if t_ae <= t < t_ae + 42)
    assert s0["cumulative_dose"].sel(drug="drug_a").values[i] == pytest.approx((16 - missed) * 100)
    # toxicity discontinuation shows in the summary
    rate = ds["summary"].sel(metric="tox_discontinuation").values
    np.testing.assert_allclose(rate, ds["tox_discontinued"].mean("patient").values)
    assert rate[1] > rate[0] * 0  # defined for both scenarios


@pytest.mark.parametrize("change, dose_a, dose_b", [
    ({"duration": 84.0}, 5 * 100, 0),                                         # 0..84 q3w
    ({"duration": 84.0, "dose": 150.0}, 5 * 150, 0),
    ({"duration": 84.0, "dose_scale": 0.5}, 5 * 50, 0),
    ({"duration": 84.0, "interval": 42.0}, 3 * 100, 0),                       # 0, 42, 84
    ({"duration": 84.0, "added_drug": "b"}, 5 * 100, 16 * 50),                # concurrent
    ({"duration": 84.0, "added_drug": "b", "sequence": "first_line_first"}, 5 * 100, 11 * 50),  # B from 105
    ({"start_day": 42.0, "duration": 84.0}, 5 * 100, 0),                      # 42..126
])
def test_schedule_factors_give_the_doses_worked_out_by_hand(folder, change, dose_a, dose_b):
    spec = load_sweep(folder / "sweep.toml")
    cm, pop, cols, T, masks = prepare_sweep(spec)
    f = dict(spec.scenarios[0].factors, **change)
    out = simulate_block(cm, spec.data, f, np.arange(4), cols, masks["all"], T)
    np.testing.assert_allclose(out["cumulative_dose"][0], [dose_a, dose_b])


def test_class_without_a_row_takes_the_row_with_an_ici():
    from immunoode.sweep.toxicity import table_row
    tab = load_toxicity_table()
    assert table_row(tab, ["anti-angiogenic"]) is tab["ICI+anti-angiogenic"]
    assert table_row(tab, ["ICI", "chemo"]) is tab["ICI+chemo"]
    with pytest.raises(KeyError):
        table_row(tab, ["ICI", "TKI", "anti-angiogenic"])
