"""Tests for immunoode.regimen."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from immunoode.errors import RegimenError
from immunoode.regimen import (
    KIND_BOLUS, KIND_INFUSION, KIND_SCALE, Dose, EventTable, Regimen, Scale,
    convert_amount, load_regimen, regimen_from_dict,
)

UNITS = {"A1": "mg", "A2": "mg", "Ts": "cells", "Tr": "cells", "C": "ug"}
PARS = {"WT": 70.0, "BSA": 1.8, "kg_pt": 80.0}


def ev(reg, t_end=None, units=UNITS, pars=PARS):
    return reg.events(state_units=units, parameters=pars, t_end=t_end)


# ---------------------------------------------------------------- expansion

def test_single_dose():
    e = ev(Regimen((Dose("A1", 200, start=3),)))
    assert len(e) == 1
    assert e.times.tolist() == [3.0]
    assert e.kind.tolist() == [KIND_BOLUS]
    assert e.targets == ("A1",)
    assert e.value.tolist() == [200.0]
    assert e.label == ("dose[1]",)


def test_count_expansion():
    e = ev(Regimen((Dose("A1", 200, every=21, count=5, label="pembro"),)))
    np.testing.assert_allclose(e.times, [0, 21, 42, 63, 84])
    assert set(e.label) == {"pembro"}
    assert np.all(e.value == 200)


def test_until_inclusive():
    e = ev(Regimen((Dose("A1", 1, start=0, every=21, until=84),)))
    np.testing.assert_allclose(e.times, [0, 21, 42, 63, 84])
    # float accumulation: 0.1 * 3 slightly > 0.3 must still be included
    e = ev(Regimen((Dose("A1", 1, every=0.1, until=0.3),)))
    assert len(e) == 4


def test_t_end_cut_keeps_exact_end():
    e = ev(Regimen((Dose("A1", 1, every=7, count=10),)), t_end=21)
    np.testing.assert_allclose(e.times, [0, 7, 14, 21])


def test_open_ended_repeat_needs_t_end():
    r = Regimen((Dose("A1", 1, every=7),))
    with pytest.raises(RegimenError, match="count"):
        ev(r)
    np.testing.assert_allclose(ev(r, t_end=14).times, [0, 7, 14])


def test_ties_keep_item_order_and_sorted():
    r = Regimen((
        Scale("Ts", factor=0.5, start=7, label="rt"),
        Dose("A1", 100, every=7, count=3, label="a"),
        Dose("A2", 50, start=7, label="b"),
    ))
    e = ev(r)
    assert np.all(np.diff(e.times) >= 0)
    at7 = [lab for t, lab in zip(e.times, e.label) if t == 7]
    assert at7 == ["rt", "a", "b"]
    assert e.item.tolist() == [1, 0, 1, 2, 1]


def test_empty():
    assert len(EventTable.empty()) == 0
    assert len(ev(Regimen())) == 0
    t, k, i, v = EventTable.empty().with_state_index(["A1"])
    assert len(t) == len(k) == len(i) == len(v) == 0


# ---------------------------------------------------------------- infusions

def test_infusion_pairs_and_rate():
    d = Dose("A1", 200, every=21, count=2, duration=30 / 1440)  # 30 min
    e = ev(Regimen((d,)))
    assert e.kind.tolist() == [KIND_INFUSION] * 4
    rate = 200 / (30 / 1440)
    np.testing.assert_allclose(e.times, [0, 30 / 1440, 21, 21 + 30 / 1440])
    np.testing.assert_allclose(e.value, [rate, -rate, rate, -rate])
    assert abs(e.value.sum()) < 1e-9
    # integral of rate = amount
    assert math.isclose(rate * d.duration, 200)


def test_duration_zero_is_bolus():
    e = ev(Regimen((Dose("A1", 5, duration=0),)))
    assert e.kind.tolist() == [KIND_BOLUS]


def test_overlapping_infusion_error():
    with pytest.raises(RegimenError, match="overlap"):
        Dose("A1", 1, every=1, count=3, duration=1.5)
    Dose("A1", 1, duration=5)  # single long infusion is fine


# ---------------------------------------------------------------- units

def test_mg_per_kg():
    e = ev(Regimen((Dose("A1", 3, unit="mg/kg", every=14, count=2),)))
    np.testing.assert_allclose(e.value, [210, 210])
    np.testing.assert_allclose(e.conversion, [70, 70])


def test_mg_per_kg_custom_per_and_ug_target():
    e = ev(Regimen((Dose("C", 3, unit="mg/kg", per="kg_pt"),)))
    np.testing.assert_allclose(e.value, [3 * 80 * 1000])  # mg -> ug


@pytest.mark.parametrize("unit", ["mg/m2", "mg/m^2", "mg/m**2", "mg / m2"])
def test_mg_per_m2(unit):
    e = ev(Regimen((Dose("A1", 100, unit=unit),)))
    np.testing.assert_allclose(e.value, [180])


@pytest.mark.parametrize("unit,expected", [("ug", 0.5), ("µg", 0.5), ("mcg", 0.5),
                                           ("g", 500_000), ("mg", 500), ("ng", 5e-4)])
def test_mass_conversion(unit, expected):
    e = ev(Regimen((Dose("A1", 500, unit=unit),)))
    np.testing.assert_allclose(e.value, [expected])


def test_ug_per_kg_to_mg():
    e = ev(Regimen((Dose("A1", 10, unit="ug/kg"),)))
    np.testing.assert_allclose(e.value, [10 * 70 / 1000])


def test_missing_wt_error():
    r = Regimen((Dose("A1", 3, unit="mg/kg"),))
    with pytest.raises(RegimenError) as ei:
        ev(r, pars={})
    msg = str(ei.value)
    assert "dose[1]" in msg and "'WT'" in msg and "--set WT=" in msg and "body weight" in msg


def test_missing_bsa_error():
    with pytest.raises(RegimenError, match="BSA"):
        ev(Regimen((Dose("A1", 3, unit="mg/m2"),)), pars={"WT": 70})


def test_incompatible_units_error():
    with pytest.raises(RegimenError) as ei:
        ev(Regimen((Dose("Ts", 3, unit="mg"),)))
    assert "'mg'" in str(ei.value) and "'cells'" in str(ei.value)


def test_pass_through_units():
    e = ev(Regimen((Dose("Ts", 1e6), Dose("Ts", 2e6, unit="cells"))))
    np.testing.assert_allclose(e.value, [1e6, 2e6])
    assert convert_amount(1, None, "mmol")[0] == 1.0
    assert convert_amount(1, "mmol", "mmol")[0] == 1.0


def test_per_without_per_unit_error():
    with pytest.raises(RegimenError, match="per"):
        Dose("A1", 1, unit="mg", per="WT")


# ---------------------------------------------------------------- targets / scale

def test_unknown_target_suggestion():
    with pytest.raises(RegimenError) as ei:
        ev(Regimen((Dose("A", 1),)), units={"A1": "mg", "B": "mg"})
    assert "did you mean 'A1'" in str(ei.value) and "dose[1]" in str(ei.value)
    with pytest.raises(RegimenError, match="did you mean 'Ts'"):
        ev(Regimen((Scale(["Ts", "Tss"], factor=0.5),)), units={"Ts": "", "Tr": ""})


def test_with_state_index():
    r = Regimen((Dose("A2", 1), Scale(("Ts", "Tr"), factor=0.5, start=1)))
    t, k, i, v = ev(r).with_state_index(["Ts", "Tr", "A1", "A2"])
    assert i.tolist() == [3, 0, 1]
    assert k.tolist() == [KIND_BOLUS, KIND_SCALE, KIND_SCALE]
    with pytest.raises(RegimenError, match="did you mean"):
        ev(r).with_state_index(["Ts", "Tr", "A1", "A3"])


@given(alpha=st.floats(0, 1), beta=st.floats(0, 0.2), d=st.floats(0, 10))
@settings(max_examples=50, deadline=None)
def test_lq_factor(alpha, beta, d):
    s = Scale("Ts", alpha=alpha, beta=beta, dose_gy=d)
    assert math.isclose(s.surviving_fraction, math.exp(-alpha * d - beta * d * d), rel_tol=1e-12)


def test_radiotherapy_fractions():
    s = Scale(["Ts", "Tr"], alpha=0.3, beta=0.03, dose_gy=2, start=10, every=1, count=5)
    e = ev(Regimen((s,)))
    assert len(e) == 10
    assert e.targets == ("Ts", "Tr") * 5
    np.testing.assert_allclose(e.times, np.repeat(np.arange(10, 15), 2))
    np.testing.assert_allclose(e.value, math.exp(-0.3 * 2 - 0.03 * 4))
    assert set(e.kind.tolist()) == {KIND_SCALE}


@pytest.mark.parametrize("kw", [dict(), dict(factor=0), dict(factor=-1),
                                dict(factor=0.5, alpha=0.3, dose_gy=2),
                                dict(alpha=0.3), dict(dose_gy=2), dict(alpha=-1, dose_gy=2)])
def test_scale_validation(kw):
    with pytest.raises(RegimenError):
        Scale("Ts", **kw)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kw,match", [
    (dict(count=3, until=40, every=7), "count.*until|both"),
    (dict(every=0), "every"),
    (dict(every=-7), "every"),
    (dict(count=0, every=7), "count"),
    (dict(count=2.5, every=7), "count"),
    (dict(count=3), "every"),
    (dict(until=10), "every"),
    (dict(duration=-1), "duration"),
    (dict(amount=-1), "amount"),
    (dict(amount=float("nan")), "amount"),
    (dict(amount="200"), "amount"),
    (dict(every=7, until=-1, start=0), "until"),
])
def test_dose_validation(kw, match):
    args = dict(target="A1", amount=1.0)
    args.update(kw)
    with pytest.raises(RegimenError, match=match):
        Dose(**args)


def test_single_dose_count_one_ok():
    assert len(ev(Regimen((Dose("A1", 1, count=1),)))) == 1


# ---------------------------------------------------------------- combination / dicts

def test_addition():
    a = Regimen((Dose("A1", 200, every=21, count=2),), name="pembro")
    b = Regimen((Dose("A2", 3, unit="mg/kg", every=14, count=2),), name="nivo")
    c = a + b
    assert c.items == a.items + b.items
    assert c.name == "pembro + nivo"
    assert len(ev(c)) == 4
    assert sum([a, b]).items == c.items
    assert (a + Scale("Ts", factor=0.5)).items[-1] == Scale("Ts", factor=0.5)


def test_to_dict_round_trip():
    r = Regimen((
        Dose("A1", 200, every=21, count=35, label="pembrolizumab"),
        Dose("A2", 3, unit="mg/kg", per="WT", every=14, until=700, duration=0.0208),
        Scale(("Ts", "Tr"), alpha=0.3, beta=0.03, dose_gy=2, start=10, every=1, count=5),
        Scale("Ts", factor=0.9),
    ), name="combo")
    d = r.to_dict()
    assert "order" not in d
    assert d["scale"][0]["target"] == ["Ts", "Tr"]
    assert regimen_from_dict(d) == r
    import json
    json.dumps(d)
    # interleaved order survives
    r2 = Regimen((r.items[2], r.items[0], r.items[3], r.items[1]))
    assert regimen_from_dict(r2.to_dict()) == r2


def test_describe():
    r = Regimen((Dose("A1", 200, every=21, count=5, unit="mg", label="pembro"),
                 Scale(["Ts", "Tr"], alpha=0.3, beta=0.03, dose_gy=2, every=1, count=5)))
    lines = r.describe().splitlines()
    assert len(lines) == 2
    assert "pembro" in lines[0] and "A1" in lines[0] and "21" in lines[0]
    assert "Ts" in lines[1] and "Tr" in lines[1]


# ---------------------------------------------------------------- files

FILE = """
name = "pembro + RT"

[[dose]]
target = "A1"
amount = 200
start = 0
every = 21
count = 5

[[dose]]
target = "A2"
amount = 3
unit = "mg/kg"
per = "WT"
every = 14
until = 28
duration = 0.0208
label = "nivolumab"

[[scale]]
target = ["Ts", "Tr"]
alpha = 0.3
beta = 0.03
dose_gy = 2
start = 10
every = 1
count = 5
"""


def test_load_file(tmp_path):
    p = tmp_path / "reg.toml"
    p.write_text(FILE)
    r = load_regimen(p)
    assert r.name == "pembro + RT"
    assert len(r.doses) == 2 and len(r.scales) == 1
    e = ev(r)
    assert len(e) == 5 + 6 + 10
    inf = e.kind == KIND_INFUSION
    np.testing.assert_allclose(e.value[inf][::2], 210 / 0.0208)


def test_load_file_default_name(tmp_path):
    p = tmp_path / "q3w.toml"
    p.write_text('[[dose]]\ntarget = "A1"\namount = 1\n')
    assert load_regimen(p).name == "q3w"


def test_unknown_field_suggestion(tmp_path):
    p = tmp_path / "reg.toml"
    p.write_text('[[dose]]\ntarget = "A1"\namount = 1\n\n[[dose]]\ntarget = "A1"\namount = 1\nevry = 7\n')
    with pytest.raises(RegimenError) as ei:
        load_regimen(p)
    msg = str(ei.value)
    assert str(p) in msg and "dose[2]" in msg
    assert "unknown field 'evry' (did you mean 'every'?)" in msg


def test_unknown_top_level_key():
    with pytest.raises(RegimenError, match="did you mean 'dose'"):
        regimen_from_dict({"doses": []})


def test_single_table_instead_of_array():
    with pytest.raises(RegimenError, match=r"\[\[dose\]\]"):
        regimen_from_dict({"dose": {"target": "A1", "amount": 1}})


def test_field_error_names_file_item_and_field(tmp_path):
    p = tmp_path / "reg.toml"
    p.write_text('[[dose]]\ntarget = "A1"\namount = 1\nevery = 7\ncount = 3\nuntil = 30\n')
    with pytest.raises(RegimenError) as ei:
        load_regimen(p)
    msg = str(ei.value)
    assert str(p) in msg and "dose[1]" in msg and "count" in msg and "until" in msg
    assert ei.value.file == str(p) and ei.value.item == "dose[1]"


def test_missing_required_field():
    with pytest.raises(RegimenError, match="missing required field 'amount'"):
        regimen_from_dict({"dose": [{"target": "A1"}]}, file="x.toml")


def test_toml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[[dose]]\ntarget = "A1"\namount = = 3\n')
    with pytest.raises(RegimenError) as ei:
        load_regimen(p)
    msg = str(ei.value)
    assert str(p) in msg and "line 3" in msg


def test_missing_file(tmp_path):
    with pytest.raises(RegimenError, match="not found"):
        load_regimen(tmp_path / "nope.toml")


def test_event_table_readonly():
    e = ev(Regimen((Dose("A1", 1),)))
    with pytest.raises(ValueError):
        e.times[0] = 5.0


# ------------------------------------------------------------------ hypoxic-share LQ rule
def test_hypoxic_share_scale_matches_closed_form_and_is_less_lethal():
    d, a, b, f, oer = 8.0, 0.3, 0.03, 0.15, 3.0
    s = Scale(["Ts", "Tr"], alpha=a, beta=b, dose_gy=d, hypoxic_fraction=f, oer=oer)
    expected = (1 - f) * math.exp(-a * d - b * d * d) + f * math.exp(-a * d / oer - b * d * d / oer ** 2)
    assert s.surviving_fraction == pytest.approx(expected, rel=1e-14)
    assert s.surviving_fraction > Scale("Ts", alpha=a, beta=b, dose_gy=d).surviving_fraction
    # f = 0 or OER = 1 is pure LQ
    assert Scale("Ts", alpha=a, beta=b, dose_gy=d, hypoxic_fraction=0.0, oer=oer).surviving_fraction \
        == pytest.approx(math.exp(-a * d - b * d * d), rel=1e-14)
    assert Scale("Ts", alpha=a, beta=b, dose_gy=d, hypoxic_fraction=f, oer=1.0).surviving_fraction \
        == pytest.approx(math.exp(-a * d - b * d * d), rel=1e-14)
    # survives a dict round trip and says what it is
    assert regimen_from_dict(Regimen((s,)).to_dict()).items[0] == s
    assert "hypoxic share 0.15 at OER 3" in s.describe()


@pytest.mark.parametrize("kw,msg", [
    (dict(factor=0.5, hypoxic_fraction=0.1, oer=3), "not both"),
    (dict(alpha=0.3, dose_gy=2, hypoxic_fraction=0.1), "both 'hypoxic_fraction' and 'oer'"),
    (dict(alpha=0.3, dose_gy=2, hypoxic_fraction=1.0, oer=3), r"\[0, 1\)"),
    (dict(alpha=0.3, dose_gy=2, hypoxic_fraction=0.1, oer=0.5), "oer"),
])
def test_hypoxic_share_bad_input_is_a_clear_error(kw, msg):
    with pytest.raises(RegimenError, match=msg):
        Scale("Ts", **kw)


def test_radiobiology_rule_over_fractions_and_bed():
    from immunoode.radiobiology import biologically_effective_dose, lq_surviving_fraction
    one = lq_surviving_fraction(12.5, 0.3, 0.03, 0.15, 3.0)
    assert lq_surviving_fraction(12.5, 0.3, 0.03, 0.15, 3.0, fractions=4) == pytest.approx(one ** 4)
    assert biologically_effective_dose(8.0, 3, 10.0) == pytest.approx(43.2)
    assert biologically_effective_dose(12.5, 4, 10.0) == pytest.approx(112.5)
    with pytest.raises(ValueError, match="dose"):
        lq_surviving_fraction(-1.0, 0.3, 0.03)
