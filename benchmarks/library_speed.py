"""Speed of the assembled library model models/cic_nsclc.toml: 2 years of pembrolizumab
200 mg q3w (35 doses).

Measures, in one run:

* model load (parse + unit check) and compile from the on-disk cache (warm) in this process;
  with ``--cold``, also a cold compile in a fresh process with an empty cache directory;
* one simulation, nominal patient, daily output of the tumor diameters (best of ``--repeats``);
* ``--n`` virtual patients (default 1,000; seeded lognormal/uniform spread of growth, kill,
  TMB, PD-L1 TPS and weight) with ``simulate_population`` on ``--jobs`` threads, weekly output,
  and the number of failed patients (kept, never dropped).

    python -m benchmarks.library_speed [--n 1000] [--jobs 2] [--repeats 5] [--cold] [--seed 1]

The last lines are machine-readable (``name value``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import immunoode as im

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "cic_nsclc.toml"
REGIMEN = ROOT / "models" / "regimens" / "nsclc_pembrolizumab_200mg_q3w.toml"
T_END = 730.0


def virtual_patients(n: int, seed: int) -> pd.DataFrame:
    """Seeded spread of a few parameters around the library defaults (not a calibrated population)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "k_grow": 0.012 * rng.lognormal(0.0, 0.3, n).clip(0.3, 2.4),
        "k_CTL": 0.3 * rng.lognormal(0.0, 0.3, n).clip(0.4, 3.0),
        "tmb": rng.lognormal(np.log(8.0), 0.7, n).clip(0.5, 80.0),
        "pdl1_tps": rng.uniform(0.0, 1.0, n),
        "WT": rng.normal(75.0, 12.0, n).clip(40.0, 140.0),
    })


def cold_compile_seconds() -> float:
    """Compile the assembled model in a new process with an empty cache (seconds)."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, IMMUNOODE_CACHE_DIR=d)
        code = ("import time, immunoode as im; m = im.load_model(%r); t = time.perf_counter(); "
                "im.compile_model(m); print(time.perf_counter() - t)" % str(MODEL))
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="also time a cold compile (minutes)")
    a = ap.parse_args(argv)
    out = {}
    t0 = time.perf_counter()
    model = im.load_model(MODEL)
    out["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cm = im.compile_model(model)
    out["compile_s"] = time.perf_counter() - t0
    print(f"{MODEL.name}: {len(model.states)} states, {len(model.parameters)} parameters; "
          f"load {out['load_s']:.2f} s, compile {out['compile_s']:.2f} s "
          f"({'cache hit' if cm.cache_hit else 'cold'})")
    if a.cold:
        out["cold_compile_s"] = cold_compile_seconds()
        print(f"cold compile in a new process: {out['cold_compile_s']:.1f} s")
    reg = im.load_regimen(REGIMEN)
    outs = ["tumor_diameter", "tumor_diameter2"]
    im.simulate(cm, reg, t_end=T_END, outputs=outs)  # warm-up (event table, first call)
    best = np.inf
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ds = im.simulate(cm, reg, t_end=T_END, outputs=outs)
        best = min(best, time.perf_counter() - t0)
    out["single_s"] = best
    d = ds["tumor_diameter"].values
    print(f"one simulation, 2 years, 35 doses: {best * 1e3:.1f} ms (best of {a.repeats}); "
          f"diameter {d[0]:.2f} -> {d[-1]:.2f} cm")
    pop = virtual_patients(a.n, a.seed)
    t_eval = np.arange(0.0, T_END + 0.5, 7.0)
    t0 = time.perf_counter()
    res = im.simulate_population(cm, pop, reg, t_eval=t_eval, outputs=outs, n_jobs=a.jobs,
                                 progress=True)
    out["population_s"] = time.perf_counter() - t0
    out["population_failed"] = int((res["status"].values != 0).sum())
    print(f"{a.n} patients on {a.jobs} threads: {out['population_s']:.2f} s "
          f"({out['population_s'] / a.n * 1e3:.2f} ms/patient), failed: {out['population_failed']}")
    for k, v in out.items():
        print(k, f"{v:.6g}" if isinstance(v, float) else v)
    return out


if __name__ == "__main__":
    main()
