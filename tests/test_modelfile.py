"""Model files: the documented shape, composition, and one clear error per defect."""

import textwrap

import pytest

import immunoode as im
from immunoode import ModelError, UnitError

ISSUE_EXAMPLE = """
[model]
name = "two_compartment_pk"
time_unit = "day"

[states.A1]
initial = 0.0
unit = "mg"
description = "antibody amount, central"

[states.A2]
initial = 0.0
unit = "mg"

[parameters]
CL = { value = 0.22, unit = "L/day", source = "population PK" }
V1 = { value = 3.48, unit = "L" }
Q  = { value = 0.795, unit = "L/day" }
V2 = { value = 4.06, unit = "L" }

[assignments]
C1 = { expr = "A1 / V1", unit = "mg/L" }

[odes]
A1 = "-CL*C1 - Q*C1 + Q*A2/V2"
A2 = "Q*C1 - Q*A2/V2"

[observables]
concentration = { expr = "C1", unit = "mg/L" }
"""


def write(tmp_path, text, name="m.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path, text) -> str:
    with pytest.raises(ModelError) as ei:
        im.load_model(write(tmp_path, text))
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_issue_example_loads(tmp_path):
    m = im.load_model(write(tmp_path, ISSUE_EXAMPLE))
    assert m.state_names == ("A1", "A2")
    assert m.parameters["CL"].source == "population PK"
    assert m.states["A1"].description == "antibody amount, central"
    assert set(m.observables) == {"concentration"}


def test_builder_and_file_give_the_same_model(tmp_path):
    m_file = im.load_model(write(tmp_path, ISSUE_EXAMPLE))
    b = im.ModelBuilder("two_compartment_pk", time_unit="day")
    b.add_state("A1", 0.0, "mg", "antibody amount, central").add_state("A2", 0.0, "mg")
    for k, v, u in (("CL", 0.22, "L/day"), ("V1", 3.48, "L"), ("Q", 0.795, "L/day"), ("V2", 4.06, "L")):
        b.add_parameter(k, v, u)
    b.add_assignment("C1", "A1 / V1", "mg/L")
    b.add_ode("A1", "-CL*C1 - Q*C1 + Q*A2/V2").add_ode("A2", "Q*C1 - Q*A2/V2")
    b.add_observable("concentration", "C1", "mg/L")
    assert b.build().structure_hash() == m_file.structure_hash()


def test_initial_values_as_parameter_expressions(tmp_path):
    m = im.loads_model("""
        [states.T]
        initial = "V0 * rho"
        unit = "1e9 cell"
        [parameters]
        V0 = { value = 2.0, unit = "mL" }
        rho = { value = 1.0, unit = "1e9 cell/mL" }
        g = { value = 0.01, unit = "1/day" }
        [odes]
        T = "g*T"
    """.replace("\n        ", "\n"))
    assert m.initial_values()["T"] == pytest.approx(2.0)
    assert m.initial_values({"V0": 3.0})["T"] == pytest.approx(3.0)


def test_include_composes_modules_and_override(tmp_path):
    write(tmp_path, """
        [states.A1]
        unit = "mg"
        [parameters]
        CL = { value = 0.2, unit = "L/day" }
        V1 = { value = 3.0, unit = "L" }
        [assignments]
        C1 = { expr = "A1/V1", unit = "mg/L" }
        [odes]
        A1 = "-CL*C1"
    """, "pk.toml")
    write(tmp_path, """
        [states.T]
        initial = 1.0
        unit = "1e9 cell"
        [parameters]
        r = { value = 0.05, unit = "1/day" }
        kd = { value = 0.1, unit = "L/(mg*day)" }
        [odes]
        T = "r*T - kd*C1*T"   # uses C1 from the PK module, by name
    """, "tumor.toml")
    top = write(tmp_path, """
        [model]
        name = "combo"
        include = ["pk.toml", "tumor.toml"]
        [parameters]
        CL = { value = 0.3, override = true, source = "this study" }
    """, "combo.toml")
    m = im.load_model(top)
    assert m.state_names == ("A1", "T")
    assert m.parameters["CL"].value == 0.3 and m.parameters["CL"].unit == "L/day"
    assert len(m.sources) == 3


def test_include_duplicate_names_the_other_file(tmp_path):
    write(tmp_path, '[states.A]\nunit = "mg"\n[odes]\nA = "0"\n', "a.toml")
    top = write(tmp_path, '[model]\ninclude = ["a.toml"]\n[states.A]\nunit = "mg"\n', "top.toml")
    msg = error_of(tmp_path, top.read_text())
    assert "duplicate name" in msg and "a.toml" in msg and "'A'" in msg


def test_include_cycle(tmp_path):
    write(tmp_path, '[model]\ninclude = ["b.toml"]\n', "a.toml")
    write(tmp_path, '[model]\ninclude = ["a.toml"]\n', "b.toml")
    with pytest.raises(ModelError, match="include cycle"):
        im.load_model(tmp_path / "a.toml")


BASE = """
[states.A]
initial = 1.0
unit = "mg"
[parameters]
k = { value = 0.1, unit = "1/day" }
"""


@pytest.mark.parametrize("extra, expected", [
    ('[odes]\nA = "-kk*A"\n', ["[odes]", "'A'", "unknown symbol 'kk'", "did you mean 'k'"]),
    ('[odes]\nA = "-k*A +"\n', ["[odes]", "'A'"]),
    ('[odes]\nA = "-k*A"\n[assignments]\nx = "y + 1"\ny = "2*x"\n', ["cycle among assignments", "x", "y"]),
    ('[states.B]\nunit = "mg"\n[odes]\nA = "-k*A"\n', ["'B'", "no ODE"]),
    ('[odes]\nA = "-k*A"\n[assignments]\nk = "2"\n', ["duplicate name", "'k'"]),
    ('[odes]\nA = "-k"\n', ["right-hand side has unit", "1/d", "mg/d", "'A'"]),
    ('[odes]\nA = "-k*A"\nB = "1"\n', ["unknown state", "'B'"]),
    ('[odes]\nA = "-k*A"\n[observables]\nc = { expr = "A", unit = "mg/L" }\n', ["observables", "'c'"]),
    ('[odes]\nA = "-k*A + __import__(1)"\n', ["[odes]", "'A'"]),
])
def test_clear_errors(tmp_path, extra, expected):
    msg = error_of(tmp_path, BASE + extra)
    assert str(tmp_path / "m.toml") in msg
    for e in expected:
        assert e in msg, (e, msg)


def test_unit_mismatch_is_a_unit_error(tmp_path):
    with pytest.raises(UnitError):
        im.load_model(write(tmp_path, BASE + '[odes]\nA = "-k"\n'))


def test_toml_syntax_error_gives_line(tmp_path):
    msg = error_of(tmp_path, BASE + 'bad = = 1\n[odes]\nA = "-k*A"\n')
    assert "TOML syntax error" in msg and "line 7" in msg


@pytest.mark.parametrize("value, words", [("nan", "not finite"), ("inf", "not finite")])
def test_non_finite_parameter(tmp_path, value, words):
    msg = error_of(tmp_path, BASE.replace("value = 0.1", f"value = {value}") + '[odes]\nA = "-k*A"\n')
    assert words in msg and "'k'" in msg and "[parameters]" in msg


def test_out_of_bounds_parameter(tmp_path):
    msg = error_of(tmp_path, BASE.replace("value = 0.1,", "value = 0.1, lower = 0.5,") + '[odes]\nA = "-k*A"\n')
    assert "below its lower bound" in msg


def test_missing_unit_and_unknown_key(tmp_path):
    assert "needs a unit" in error_of(tmp_path, '[states.A]\ninitial = 1\n[odes]\nA = "0"\n')
    assert "did you mean 'initial'" in error_of(tmp_path, '[states.A]\ninitail = 1\nunit = "mg"\n')


def test_initial_value_may_not_use_states(tmp_path):
    msg = error_of(tmp_path, BASE.replace("initial = 1.0", 'initial = "A"') + '[odes]\nA = "-k*A"\n')
    assert "initial values may only use parameters" in msg


def test_flux_between_different_units(tmp_path):
    text = BASE + '[states.B]\nunit = "mL"\n[fluxes.f]\nfrom = "A"\nto = "B"\nrate = "k*A"\n'
    msg = error_of(tmp_path, text)
    assert "different units" in msg and "'f'" in msg


def test_flux_model_rhs_is_mass_balanced():
    b = im.ModelBuilder("fx")
    b.add_state("A", 1.0, "mg").add_state("B", 0.0, "mg").add_parameter("k", 0.3, "1/day")
    b.add_flux("transfer", "k*A", "A", "B")
    m = b.build()
    rhs = m.rhs()
    assert (rhs["A"] + rhs["B"]).simplify() == 0


def test_included_time_unit_must_match(tmp_path):
    write(tmp_path, '[model]\ntime_unit = "hour"\n[states.A]\nunit = "mg"\n[odes]\nA = "0"\n', "h.toml")
    top = write(tmp_path, '[model]\ntime_unit = "day"\ninclude = ["h.toml"]\n', "top.toml")
    with pytest.raises(ModelError, match="time_unit 'hour' differs"):
        im.load_model(top)
