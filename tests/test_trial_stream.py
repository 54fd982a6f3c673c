"""Streaming a trial arm to disk chunk by chunk: same results as in memory, resume, failures kept."""

import numpy as np
import pytest

import immunoode as im
from immunoode.trial import TrialError, open_trial, run_trial, summary_table
from tests.test_trial import MODEL_TOML, _spec


@pytest.fixture(scope="module")
def cm():
    return im.compile_model(im.loads_model(MODEL_TOML))


def _noisy(cm, **kw):
    return _spec(cm, n=30, seed=21, follow_up=168, p_blow=0.15,
                 scans={"noise_cv": 0.05, "noise_sd_mm": 1.0}, **kw)


def test_streamed_arm_equals_in_memory_arm(cm, tmp_path):
    ref = run_trial(_noisy(cm))
    ds = run_trial(_noisy(cm), out=tmp_path / "arm", chunk=7)
    assert ds.attrs["n_parts"] == 5 and ds.attrs["n_parts_resumed"] == 0
    assert sorted(p.name for p in (tmp_path / "arm").iterdir())[0] == "part-000000000.nc"
    for v in ("bor", "sitc", "pfs_time", "status", "failed", "k", "evaluable"):
        np.testing.assert_array_equal(ds[v].values, ref[v].values)
    assert ds.attrs["n_failed"] == ref.attrs["n_failed"] > 0
    assert ds.attrs["summary"] == ref.attrs["summary"]
    # per-patient only in memory; the scans are on disk
    assert "lesion_size" not in ds and "scan" not in ds.dims
    full = open_trial(tmp_path / "arm")
    np.testing.assert_array_equal(full["lesion_size"].values, ref["lesion_size"].values)
    np.testing.assert_array_equal(full["simulated_size"].values, ref["simulated_size"].values)
    # failed patients are on disk with the solver's message
    f = full["failed"].values
    assert all("failed" in m for m in full["message"].values[f])
    full.close()
    assert summary_table(ds).splitlines()[5:] == summary_table(ref).splitlines()[5:]


def test_resume_keeps_parts_of_the_same_trial_only(cm, tmp_path):
    out = tmp_path / "arm"
    a = run_trial(_noisy(cm), out=out, chunk=10)
    (out / "part-000000010.nc").unlink()
    b = run_trial(_noisy(cm), out=out, chunk=10)
    assert b.attrs["n_parts"] == 3 and b.attrs["n_parts_resumed"] == 2
    np.testing.assert_array_equal(a["bor"].values, b["bor"].values)
    c = run_trial(_noisy(cm), out=out, chunk=10, seed=22)      # another trial: recompute all
    assert c.attrs["n_parts_resumed"] == 0
    d = run_trial(_noisy(cm), out=out, chunk=10, seed=22, resume=False)
    assert d.attrs["n_parts_resumed"] == 0
    np.testing.assert_array_equal(c["k"].values, d["k"].values)
    with pytest.raises(TrialError, match="directory"):
        run_trial(_noisy(cm), out=tmp_path / "arm.nc")


def test_cli_stream_and_bootstrap(cm, tmp_path, capsys):
    import argparse
    from immunoode.trial import add_trial_command
    model = tmp_path / "exp.toml"
    model.write_text(MODEL_TOML)
    trial = tmp_path / "t.toml"
    trial.write_text("""
[trial]
model = "exp.toml"
n = 40
seed = 2
follow_up = 168
lesion_observable = "diameter"
diameter_unit = "mm"
[population.parameters.k]
dist = "normal"
mean = -0.003
sd = 0.004
""")
    ap = argparse.ArgumentParser()
    add_trial_command(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["trial", str(trial), "--stream", str(tmp_path / "arm"), "--chunk", "16",
                          "--bootstrap", "20", "--n-boot", "50", "--quiet",
                          "--plots", str(tmp_path / "plots")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "range, trials of n=20" in text and "40 simulated" in text
    assert len(list((tmp_path / "arm").glob("part-*.nc"))) == 3
    assert (tmp_path / "plots" / "spider.png").stat().st_size > 1000
