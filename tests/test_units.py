"""Tests for immunoode.units (pint parsing and dimensional analysis)."""

import math

import pint
import pytest

from immunoode.errors import ModelError, UnitError
from immunoode.expr import parse_expression as P
from immunoode.units import check_unit, format_unit, infer_unit, parse_unit, same_unit, ureg

UNITS = {name: parse_unit(text) for name, text in {
    "t": "day",
    "A1": "mg", "A2": "mg", "V1": "L", "V2": "L", "CL": "L/day", "Q": "L/day",
    "C": "mg/L", "EC50": "ug/mL", "Emax": "1", "n": "dimensionless",
    "T": "1e9 cell", "K": "1e9 cell", "r": "1/day", "E": "1e9 cell", "kill": "1/(1e9 cell)/day",
    "G": "g", "D": "mg", "tlag": "h", "Tcells": "cell",
}.items()}


@pytest.mark.parametrize("text", ["day", "h", "hour", "week", "mg", "ug", "L", "mL", "nM", "kg",
                                  "m^2", "m2", "mm", "mm^3", "mm3", "Gy", "1/day",
                                  "dimensionless", "1", "", "cell", "cells", "1e9 cell",
                                  "mg/L/day", "1/(1e9 cell)/day", "mg/kg", "mg/m^2"])
def test_parse_unit_accepts(text):
    q = parse_unit(text)
    assert isinstance(q, pint.Quantity)
    assert q.magnitude > 0


def test_parse_unit_values():
    assert same_unit(parse_unit("mg/L"), ureg.Quantity(1, "mg/L"))
    q = parse_unit("1e9 cell")
    assert math.isclose(q.magnitude, 1e9) and str(q.units) == "cell"
    assert parse_unit("cells") == parse_unit("cell")
    for text in ("1", "", "dimensionless", "  "):
        d = parse_unit(text)
        assert d.dimensionless and d.magnitude == 1
    assert same_unit(parse_unit("m2"), parse_unit("m^2"))
    assert same_unit(parse_unit("mg/L"), parse_unit("ug/mL"))
    assert not same_unit(parse_unit("mg"), parse_unit("g"))


@pytest.mark.parametrize("text, fragment", [
    ("xyz", "unknown unit 'xyz'"),
    ("mg/xyz", "unknown unit 'xyz'"),
    ("mg/", "cannot parse unit"),
    ("mg)", "cannot parse unit"),
    ("__import__('os')", "unit"),
    ("degC", "cannot parse unit"),
    ("-1 mg", "positive finite"),
    ("0 mg", "positive finite"),
])
def test_parse_unit_errors(text, fragment):
    with pytest.raises(UnitError) as info:
        parse_unit(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, ModelError)


def test_parse_unit_non_string():
    with pytest.raises(UnitError):
        parse_unit(3)


def test_two_compartment_pk_passes():
    mg_day = parse_unit("mg/day")
    check_unit(P("-CL*A1/V1 - Q*(A1/V1 - A2/V2)"), mg_day, UNITS, where="odes.A1")
    check_unit(P("Q*(A1/V1 - A2/V2)"), mg_day, UNITS, where="odes.A2")
    c = infer_unit(P("A1/V1"), UNITS)
    assert same_unit(c, parse_unit("mg/L"))
    # concentration vs an EC50 given in ug/mL: same unit (mg/L == ug/mL)
    check_unit(P("Emax*hill(A1/V1, EC50, n)"), parse_unit("1"), UNITS, where="obs.E")


def test_mismatch_message_names_equation_and_units():
    with pytest.raises(UnitError) as info:
        check_unit(P("-CL*A1/V1/V1"), parse_unit("mg/day"), UNITS, where="odes.A1",
                   subject="right-hand side", target="d(A1)/dt needs")
    msg = str(info.value)
    assert msg.startswith("odes.A1: right-hand side has unit mg/L/day")
    assert "[mass/length**3/time]" in msg
    assert "d(A1)/dt needs mg/day [mass/time]" in msg


def test_sum_of_different_dimensions_names_terms():
    with pytest.raises(UnitError) as info:
        infer_unit(P("A1 + C"), UNITS, where="odes.X")
    msg = str(info.value)
    assert "odes.X" in msg and "'A1'" in msg and "'C'" in msg
    assert "mg [mass]" in msg and "mg/L [mass/length**3]" in msg


def test_wildcard_numbers():
    assert same_unit(infer_unit(P("r*T*(1 - T/K)"), UNITS), parse_unit("1e9 cell/day"))
    assert same_unit(infer_unit(P("K - 100"), UNITS), UNITS["K"])
    assert same_unit(infer_unit(P("2*A1 + 3"), UNITS), UNITS["A1"])
    assert same_unit(infer_unit(P("max(C, 0.1)"), UNITS), UNITS["C"])
    assert same_unit(infer_unit(P("piecewise(C, t > 5, 0)"), UNITS), UNITS["C"])
    assert same_unit(infer_unit(P("abs(A1 - 1)"), UNITS), UNITS["A1"])
    assert infer_unit(P("5"), UNITS) is None
    assert infer_unit(P("exp(2) + 1"), UNITS) is None
    check_unit(P("5"), parse_unit("mg/day"), UNITS, where="odes.A1")  # constant input


def test_products_and_powers():
    assert same_unit(infer_unit(P("A1*A2"), UNITS), parse_unit("mg^2"))
    assert same_unit(infer_unit(P("sqrt(A1*A2)"), UNITS), parse_unit("mg"))
    assert same_unit(infer_unit(P("A1^2/V1"), UNITS), parse_unit("mg^2/L"))
    assert same_unit(infer_unit(P("(T/K)^n"), UNITS), parse_unit("1"))
    assert same_unit(infer_unit(P("kill*E*T"), UNITS), parse_unit("1e9 cell/day"))
    assert same_unit(infer_unit(P("Tcells/1e9"), UNITS), parse_unit("cell"))


def test_exp_of_dimensional_is_error():
    with pytest.raises(UnitError, match=r"argument of exp\(\) must be dimensionless.*mg"):
        infer_unit(P("exp(A1)"), UNITS, where="odes.A1")
    with pytest.raises(UnitError, match="dimensionless"):
        infer_unit(P("log(C)"), UNITS)
    assert same_unit(infer_unit(P("exp(-CL/V1*t)"), UNITS), parse_unit("1"))
    assert same_unit(infer_unit(P("log(A1/D)"), UNITS), parse_unit("1"))


def test_scaled_dimensionless_argument_is_error():
    # mg/g is dimensionless but scaled by 1e-3
    with pytest.raises(UnitError, match="dimensionless"):
        infer_unit(P("exp(A1/G)"), UNITS)


def test_hill_with_dimensional_x_ok():
    assert same_unit(infer_unit(P("hill(C, EC50, n)"), UNITS), parse_unit("1"))
    with pytest.raises(UnitError, match="hill"):
        infer_unit(P("hill(C, A1, n)"), UNITS)
    with pytest.raises(UnitError, match="Hill exponent"):
        infer_unit(P("hill(C, EC50, A1)"), UNITS)


def test_symbolic_power_with_dimensional_base_hint():
    with pytest.raises(UnitError) as info:
        infer_unit(P("C^n/(EC50^n + C^n)"), UNITS, where="obs.E")
    msg = str(info.value)
    assert "obs.E" in msg and "symbolic power" in msg and "hill(x, K, n)" in msg
    with pytest.raises(UnitError, match="exponent"):
        infer_unit(P("(T/K)^A1"), UNITS)


def test_scale_mismatch_mg_vs_g():
    with pytest.raises(UnitError) as info:
        infer_unit(P("A1 + G"), UNITS)
    assert "factor 1000" in str(info.value) or "factor 0.001" in str(info.value)
    with pytest.raises(UnitError) as info:
        check_unit(P("G"), parse_unit("mg"), UNITS, where="odes.A1")
    assert "factor 1000" in str(info.value)
    with pytest.raises(UnitError, match="factor"):
        check_unit(P("Tcells"), UNITS["T"], UNITS, where="odes.T")


def test_conditions_checked():
    infer_unit(P("ifelse(t > 5 and A1 < 2, C, 0)"), UNITS)
    with pytest.raises(UnitError, match="comparison"):
        infer_unit(P("ifelse(t > A1, C, 0)"), UNITS)
    with pytest.raises(UnitError, match="piecewise value"):
        infer_unit(P("ifelse(t > 1, C, A1)"), UNITS)
    with pytest.raises(UnitError, match="factor"):
        infer_unit(P("ifelse(t > tlag, 1, 0)"), UNITS)  # day vs hour
    assert same_unit(infer_unit(P("C*heaviside(A1 - 1)"), UNITS), UNITS["C"])
    with pytest.raises(UnitError, match="factor"):
        infer_unit(P("heaviside(t - tlag)"), UNITS)


def test_min_max_units():
    with pytest.raises(UnitError, match="Min"):
        infer_unit(P("min(A1, C)"), UNITS)


def test_unknown_symbol():
    with pytest.raises(UnitError, match="unknown symbol 'foo'"):
        infer_unit(P("foo*A1"), UNITS, where="odes.A1")
    with pytest.raises(UnitError, match="'t'"):
        infer_unit(P("t"), {})


def test_format_unit():
    assert format_unit(parse_unit("mg/L/day")) == "mg/L/day [mass/length**3/time]"
    assert format_unit(parse_unit("1e9 cell")) == "1e9 cell [cell_count]"
    assert format_unit(parse_unit("1")) == "dimensionless [dimensionless]"
    assert format_unit(None).startswith("any")
