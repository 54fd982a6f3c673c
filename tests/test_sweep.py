"""Scenario sweeps: file validation, designs, execution engines, resume, summaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import immunoode as im
from immunoode.sweep.engines import AbstractEngine, DaskEngine, ProcessEngine, SerialEngine
from immunoode.sweep.run import open_sweep, run_sweep
from immunoode.sweep.spec import SweepError, load_sweep
from immunoode.sweep.summary import ranking

SWEEP = """
[sweep]
name = "test sweep"
model = "nsclc_io"
trial = "nsclc_1l_pembrolizumab"
n = 8
seed = 5
block = 4
follow_up = 252

[treatments.pembrolizumab]
regimen = "nsclc_pembrolizumab_200mg_q3w"
class = "ICI"

[base]
first_line = "pembrolizumab"

[factors]
interval = [21, 42]
rt_fractions = [0, 3]
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="session")
def sweep_file(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("sweep"), SWEEP)


@pytest.fixture(scope="session")
def local_result(sweep_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "local.zarr"
    return run_sweep(sweep_file, out, engine=SerialEngine())


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("edit, match", [
    (("interval = [21, 42]", "intervall = [21, 42]"), r"sweep\.toml.*\[factors\].*'intervall'.*did you mean 'interval'"),
    (("interval = [21, 42]", "interval = []"), r"sweep\.toml.*\[factors\].*'interval'.*empty"),
    (('first_line = "pembrolizumab"', 'first_line = "pembro"'), r"sweep\.toml.*\[base\].*'first_line'.*unknown treatment"),
    (('regimen = "nsclc_pembrolizumab_200mg_q3w"', 'regimen = "no_such_regimen"'), r"sweep\.toml.*\[treatments\].*'pembrolizumab'.*no such regimen"),
    (('regimen = "nsclc_pembrolizumab_200mg_q3w"', 'regimen = "atezolizumab_1200mg_q3w"'), r"sweep\.toml.*'pembrolizumab'.*does not have.*not in the model"),
    (("rt_fractions = [0, 3]", 'policy = ["none", "rt_always"]'), r"sweep\.toml.*'policy'.*unknown policy"),
    (("n = 8", "n = 0"), r"sweep\.toml.*\[sweep\].*'n'.*positive integer"),
    (("rt_fractions = [0, 3]", "rt_fractions = [3]\nrt_day = [-7]"), r"sweep\.toml.*'rt_day'.*before the simulation starts"),
])
def test_bad_sweep_file_fails_before_work_naming_file_and_item(tmp_path, edit, match):
    p = write(tmp_path, SWEEP.replace(*edit))
    with pytest.raises(SweepError, match=match):
        load_sweep(p)


def test_designs_grid_one_at_a_time_sampled(tmp_path):
    grid = load_sweep(write(tmp_path, SWEEP))
    assert [dict(s.factors)["interval"] for s in grid.scenarios] == [21, 21, 42, 42]
    assert [dict(s.factors)["rt_fractions"] for s in grid.scenarios] == [0, 3, 0, 3]
    oat = load_sweep(write(tmp_path, SWEEP.replace('block = 4', 'block = 4\ndesign = "one_at_a_time"')))
    # base (interval = regimen's own, no RT) + 2 intervals + one non-base rt value
    assert [s.name for s in oat.scenarios] == ["base", "interval=21", "interval=42", "rt_fractions=3"]
    smp = load_sweep(write(tmp_path, SWEEP.replace('block = 4', 'block = 4\ndesign = "sampled"\nn_scenarios = 3')))
    assert len(smp.scenarios) == 3
    assert {s.name for s in smp.scenarios} <= {s.name for s in grid.scenarios}


# --------------------------------------------------------------------------- numerics
def test_segmented_simulation_matches_one_shot_population(sweep_file):
    """Scan-to-scan integration with carried-over states equals simulate_population."""
    from immunoode.sweep.block import simulate_block
    from immunoode.sweep.run import prepare_sweep
    spec = load_sweep(sweep_file)
    cm, pop, cols, T, masks = prepare_sweep(spec)
    f = dict(spec.scenarios[0].factors)  # interval 21, no RT: the regimen as written
    out = simulate_block(cm, spec.data, f, np.arange(8), cols, masks["all"], T)
    reg = im.load_regimen(spec.data["treatments"]["pembrolizumab"]["regimen"])
    ref = im.simulate_population(cm, cols, reg, t_eval=T, outputs=["tumor_diameter"], rtol=1e-10,
                                 atol=1e-12)
    mm = ref["tumor_diameter"].values * 10.0
    mm = np.where(mm < 5.0, 0.0, mm)
    np.testing.assert_allclose(out["size"], mm, rtol=2e-4)
    # 200 mg at days 0, 21, ..., 231 (12 doses before the last scan at 252)
    np.testing.assert_allclose(out["cumulative_dose"][:, 0], 200.0 * 12)


def test_radiotherapy_is_a_multiplicative_lq_event(sweep_file):
    """3 x 8 Gy on day 0,1,2 multiplies the tumor cells by S(8 Gy)^3 (no drug), with the default
    survival rule: LQ (alpha 0.3/Gy, beta 0.03/Gy^2) with a 15 % hypoxic share at OER 3."""
    from immunoode.sweep.block import simulate_block
    from immunoode.sweep.run import prepare_sweep
    spec = load_sweep(sweep_file)
    cm, pop, cols, T, masks = prepare_sweep(spec)
    f = dict(spec.scenarios[1].factors, rt_every=1e-9, dose_scale=1e-12)
    assert f["rt_fractions"] == 3
    out = simulate_block(cm, spec.data, f, np.arange(8), cols, masks["all"], np.array([0.0, 1e-6]))
    ref = simulate_block(cm, spec.data, dict(f, rt_fractions=0), np.arange(8), cols, masks["all"],
                         np.array([0.0, 1e-6]))
    # diameter ~ (viable + dead)^(1/3); RT removes viable cells: check against the closed form
    rho = cm.parameter_vector()[cm.parameter_names.index("rho_T")]
    P = {k: v for k, v in cols.items()}
    T0 = P["T0"]
    per_fraction = 0.85 * np.exp(-(0.3 * 8 + 0.03 * 64)) + 0.15 * np.exp(-(0.3 * 8 / 3 + 0.03 * 64 / 9))
    surv = per_fraction ** 3
    d_expected = (6 * T0 * surv / (rho * np.pi)) ** (1 / 3) * 10
    np.testing.assert_allclose(out["size"][:, 1], np.where(d_expected < 5, 0, d_expected), rtol=1e-4)
    assert np.all(out["size"][:, 1] < ref["size"][:, 1])


# --------------------------------------------------------------------------- execution
def test_local_run_has_summaries_provenance_and_ranking(local_result):
    ds = local_result
    assert ds.sizes["scenario"] == 4 and ds.sizes["patient"] == 8
    assert (ds["chunk_status"].values == 1).all()
    for key in ("model_hash", "immunoode_version", "seed", "sweep_spec", "solver", "parameters"):
        assert key in ds.attrs
    assert set(ds["interval"].values) == {21.0, 42.0}
    orr = ds["summary"].sel(metric="ORR").values
    k = ds["summary_k"].sel(metric="ORR").values
    n = ds["summary_n"].sel(metric="ORR").values
    np.testing.assert_allclose(orr, k / n)
    manual = (ds["bor"].isin(["CR", "PR"]) & ds["measurable"]).sum("patient").values
    np.testing.assert_array_equal(k, manual)
    lo, hi = ds["summary_lower"].sel(metric="ORR").values, ds["summary_upper"].sel(metric="ORR").values
    assert np.all(lo <= orr) and np.all(orr <= hi)
    # q6w gives half the doses of q3w over the same span
    cum = ds["mean_cumulative_dose"].sel(drug="pembrolizumab")
    np.testing.assert_allclose(cum.values[[0, 2]], [2400.0, 1200.0])
    table = ranking(ds, by="ORR")
    assert list(table["rank"]) == [1, 2, 3, 4] and table["ORR"].is_monotonic_decreasing


def test_process_engine_equals_serial(sweep_file, local_result, tmp_path):
    ds = run_sweep(sweep_file, tmp_path / "p.zarr", engine=ProcessEngine(2))
    for v in ("size", "pfs_time", "bor", "cumulative_dose", "summary"):
        np.testing.assert_array_equal(ds[v].values, local_result[v].values)


def test_dask_local_cluster_equals_local_run(sweep_file, local_result, tmp_path):
    pytest.importorskip("dask.distributed")
    with DaskEngine(n_workers=2) as eng:
        assert eng.n_workers == 2
        ds = run_sweep(sweep_file, tmp_path / "d.zarr", engine=eng)
    for v in ("size", "action", "pfs_time", "pfs_event", "bor", "sitc", "cumulative_dose",
              "time_on_treatment", "summary", "summary_lower", "summary_upper"):
        np.testing.assert_array_equal(ds[v].values, local_result[v].values, err_msg=v)


class _InterruptAfter(AbstractEngine):
    """Runs items in order and raises KeyboardInterrupt after ``k`` of them (a Ctrl-C)."""

    name = "interrupting"

    def __init__(self, k):
        self.k = k

    def imap_unordered(self, fn, items):
        for j, (key, payload) in enumerate(items):
            if j == self.k:
                raise KeyboardInterrupt
            yield key, fn(payload)


def test_interrupted_sweep_resumes_to_the_same_result_computing_only_missing_chunks(
        sweep_file, local_result, tmp_path):
    out = tmp_path / "r.zarr"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_file, out, engine=_InterruptAfter(3))
    part = open_sweep(out)
    assert int((part["chunk_status"].values == 1).sum()) == 3
    done_before = {tuple(x) for x in np.argwhere(part["chunk_status"].values == 1)}
    ds = run_sweep(sweep_file, out, engine=SerialEngine())
    recomputed = {tuple(x) for x in json.loads(ds.attrs["chunks_computed_list"])}
    assert len(recomputed) == 8 - 3 and not (recomputed & done_before)
    for v in ("size", "pfs_time", "bor", "summary"):
        np.testing.assert_array_equal(ds[v].values, local_result[v].values, err_msg=v)
    again = run_sweep(sweep_file, out)
    assert again.attrs["chunks_computed"] == 0


def test_store_of_another_sweep_is_refused(sweep_file, tmp_path):
    from immunoode.sweep.run import SweepStoreError
    out = tmp_path / "x.zarr"
    run_sweep(sweep_file, out, max_chunks=1)
    other = write(tmp_path, SWEEP.replace("seed = 5", "seed = 6"), "other.toml")
    with pytest.raises(SweepStoreError, match="different sweep"):
        run_sweep(other, out)


def _boom(payload):
    if payload["factors"]["interval"] == 42 and payload["patients"][0] == 4:
        raise RuntimeError("worker lost")
    from immunoode.sweep.run import run_chunk
    return run_chunk(payload)


class _Flaky(AbstractEngine):
    name = "flaky"

    def imap_unordered(self, fn, items):
        for key, payload in items:
            try:
                yield key, _boom(payload)
            except RuntimeError as exc:
                yield key, exc


def test_failed_chunk_is_retried_then_recorded_not_dropped(sweep_file, tmp_path):
    ds = run_sweep(sweep_file, tmp_path / "f.zarr", engine=_Flaky(), retries=1)
    st = ds["chunk_status"].values
    assert (st == 2).sum() == 2  # interval 42 (2 scenarios), block 1
    assert ds.sizes["patient"] == 8
    bad = ds["status"].values == -30
    assert bad.sum() == 2 * 4 and ds["failed"].values[bad].all()
    assert "worker lost" in ds.attrs["failed_chunks"]
    # failed patients are excluded from the rates, counted in 'failed'
    assert ds["summary_n"].sel(metric="ORR").values.tolist() == [8, 8, 4, 4]
    np.testing.assert_allclose(ds["summary"].sel(metric="failed").values, [0, 0, 0.5, 0.5])


def test_cli_sweep_and_report(sweep_file, tmp_path, capsys):
    from immunoode.cli import main
    out = tmp_path / "c.zarr"
    assert main(["sweep", str(sweep_file), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert "rank" in capsys.readouterr().out
    assert main(["sweep", str(sweep_file), "--out", str(out), "--workers", "1"]) == 1  # exists
    assert main(["sweep", str(sweep_file), "--out", str(out), "--workers", "1", "--resume", "--quiet"]) == 0
    assert "0 chunks computed" in capsys.readouterr().out
    assert main(["report", str(out), "--plots", str(tmp_path / "plots")]) == 0
    files = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert files == ["forest.png", "heatmap_interval_rt_fractions.png", "pfs_curves.png"]
