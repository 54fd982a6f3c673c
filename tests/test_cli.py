"""The command line, run as a real subprocess where it matters."""

import subprocess
import sys

import pandas as pd
import pytest

from immunoode import __version__
from immunoode.cli import main

from .test_modelfile import ISSUE_EXAMPLE


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "immunoode.cli", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_check_ok_and_error(tmp_path, capsys):
    good = tmp_path / "pk.toml"
    good.write_text(ISSUE_EXAMPLE)
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "A1" in out and "L/day" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(ISSUE_EXAMPLE.replace('"-CL*C1', '"-CLL*C1'))
    r = run("check", str(bad))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown symbol 'CLL'" in lines[0] and "Traceback" not in r.stderr


def test_simulate_csv_matches_analytic(tmp_path):
    model = tmp_path / "pk.toml"
    model.write_text(ISSUE_EXAMPLE)
    reg = tmp_path / "reg.toml"
    reg.write_text('[[dose]]\ntarget = "A1"\namount = 200\nstart = 0\nevery = 21\ncount = 5\n')
    out = tmp_path / "res.csv"
    r = run("simulate", str(model), "--regimen", str(reg), "--t-end", "105", "--dt", "0.5",
            "--rtol", "1e-9", "--atol", "1e-12", "--out", str(out))
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert list(df.columns) == ["time", "A1", "A2", "concentration"]
    import numpy as np
    from scipy.linalg import expm
    K = np.array([[-(0.22 + 0.795) / 3.48, 0.795 / 4.06], [0.795 / 3.48, -0.795 / 4.06]])
    t = df["time"].to_numpy()
    ref = np.zeros(len(t))
    for td in range(0, 105, 21):
        ref += np.array([(expm(K * (tt - td)) @ [200.0, 0.0])[0] if tt >= td else 0.0 for tt in t])
    assert np.max(np.abs(df["A1"] - ref)) / ref.max() < 1e-6


def test_simulate_netcdf_with_set(tmp_path):
    import xarray as xr
    out = tmp_path / "r.nc"
    assert main(["simulate", "two_compartment_pk", "--regimen", "pembrolizumab_200mg_q3w",
                 "--set", "CL=0.3", "--t-end", "42", "--out", str(out)]) == 0
    ds = xr.open_dataset(out)
    assert '"CL": 0.3' in ds.attrs["parameters"]
    assert ds["concentration"].attrs["units"] == "mg/L"
    assert ds.attrs["solver"] == "rodas5p" and ds.attrs["immunoode_version"] == __version__
    ds.close()


@pytest.mark.parametrize("args, words", [
    (["simulate", "two_compartment_pk", "--set", "CLX=1"], "unknown parameter"),
    (["simulate", "two_compartment_pk", "--set", "CL=abc"], "not a number"),
    (["simulate", "no_such_model"], "no such file or built-in model"),
    (["simulate", "two_compartment_pk", "--out", "x.xlsx"], "unsupported output format"),
])
def test_user_errors_are_one_line(args, words, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 1
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("immunoode: error")]) == 1


def test_main_job_runs_the_library_model(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--t-end", "84"]) == 0
    out = capsys.readouterr().out
    assert "pembrolizumab" in out and "PD-1 occupancy" in out
    for f in ("untreated.nc", "pembrolizumab.csv", "tumor_diameter.png"):
        assert (tmp_path / f).exists()
    import xarray as xr
    with xr.open_dataset(tmp_path / "pembrolizumab.nc") as ds:
        # treatment shrinks this default virtual patient's tumor within 12 weeks
        assert float(ds["tumor_diameter"][-1]) < float(ds["tumor_diameter"][0])
