"""Target conflicts (immunoode.calibrate.conflicts): a missed target is forced into its
interval by re-fitting the population on the final cohorts, and the cost on the other targets
shows whether the targets can be met together.  Checked on the two-clone example with a
deliberately contradictory row: arm A's ORR observed at 54 % (n = 400) and, in a second row,
required to lie in 20-25 %."""

from __future__ import annotations

import pytest

from immunoode.calibrate.conflicts import forced_refits
from immunoode.calibrate.fit import RateFit, load_fit, run_fit

from .synthetic_fit import synthetic_fit_file

CONFLICT = "C1,orr,a,interval,,20,25,,,,,fit,,,contradictory test row,\n"


@pytest.fixture(scope="module")
def conflicted(tmp_path_factory):
    f, _, _ = synthetic_fit_file(tmp_path_factory.mktemp("conflict"), [
        ("n = 1500", "n = 500"), ("global_maxiter = 25", "global_maxiter = 6"),
        ("mechanistic_grid = 5", "mechanistic_grid = 3"),
        ("mechanistic_refine = 4", "mechanistic_refine = 1")])
    csv = f.parent / "two_clone_targets.csv"
    csv.write_text(csv.read_text() + CONFLICT)
    result = run_fit(f, profiles=False)
    rf = RateFit(load_fit(f))
    mech = [{m: result.values[m] for m in result.spec.mechanistic}]
    return result, forced_refits(rf, result.values, result.table, mech)


def test_contradictory_rows_cannot_both_be_met(conflicted):
    result, forced = conflicted
    t = result.table.set_index("id")
    assert not (t.loc["A1", "met"] and t.loc["C1", "met"])
    missed = list(result.table[(result.table.role == "fit") & ~result.table.met]["id"])
    singles = [c for c in forced if len(c["targets"]) == 1]
    assert [c["target"] for c in singles] == missed
    if len(missed) > 1:                         # and all of them together
        assert forced[-1]["targets"] == missed and forced[-1]["target"] == "+".join(missed)


def test_contradictory_rows_forced_together_are_not_reached(conflicted, tmp_path):
    """A1 (54 %, exact CI about 49-59 %) and C1 (20-25 %) on the same rate: no population
    meets both, and the joint forced fit says so."""
    result, _ = conflicted
    rf = RateFit(result.spec)
    table = result.table.copy()
    table.loc[table.id.isin(["A1", "C1"]), "met"] = False      # force both, even if one was met
    mech = [{m: result.values[m] for m in result.spec.mechanistic}]
    joint = [c for c in forced_refits(rf, result.values, table, mech)
             if set(c["targets"]) >= {"A1", "C1"}]
    assert joint and not joint[0]["reached"]


def test_forcing_one_row_pushes_the_other_out_at_a_large_cost(conflicted):
    result, forced = conflicted
    met = dict(zip(result.table["id"], result.table["met"]))
    pair = [c for c in forced if c["targets"] in (["A1"], ["C1"])]
    assert pair
    for c in pair:
        other = "C1" if c["target"] == "A1" else "A1"
        assert c["reached"], c
        lo, hi = c["interval"]
        assert lo <= c["forced_value"] <= hi
        if met[other]:
            assert other in {m["id"] for m in c["newly_missed"]}
        assert c["chisqr_others_forced"] > c["chisqr_others_optimum"] + 3.84


def test_forced_values_are_a_valid_population(conflicted):
    result, forced = conflicted
    for c in forced:
        for name, p in result.spec.parameters.items():
            assert p.min - 1e-12 <= c["values"][name] <= p.max + 1e-12, name
        for m in result.spec.mechanistic:
            assert c["values"][m] == pytest.approx(result.values[m])


def test_report_and_summary_show_the_conflicts(conflicted, tmp_path):
    import json

    from immunoode.calibrate.report import fit_report, write_fit_outputs
    result, forced = conflicted
    result.conflicts = forced
    text = fit_report(result)
    assert "[[Target conflicts]]" in text
    for c in forced:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(c["target"] + ":"))
        assert f"{c['chisqr_others_forced']:.2f}" in line
    write_fit_outputs(result, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [c["target"] for c in summary["conflicts"]] == [c["target"] for c in forced]
