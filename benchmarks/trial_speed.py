"""Virtual-trial speed: a first-line anti-PD-1 arm of the library model, and its scaling.

Targets (issue 4; benchmarks, not timed tests):

* a 10,000-patient 1L pembrolizumab arm of the library model with its lesion structure
  (``models/trials/nsclc_1l_pembrolizumab_lesions.toml``: 4 lesion compartments, the
  pre-treatment growth history, 2 years, scans every 6 weeks): patients per second;
* the same arm's treatment phase looped through libRoadRunner on a subset (goal: the
  compiled population path ≥ 3× faster), with the agreement of the two at the scans;
* response classification (RECIST 1.1 + iRECIST + SITC + pattern) of 10,000 patients ×
  30 scans (goal < 1 s);
* scaling with streaming to disk (1k → 10k → 100k patients; each size in its own
  process, so the peak resident memory of each is measured alone; goal < 2 GiB).

    python -m benchmarks.trial_speed                      # everything, n = 10,000
    python -m benchmarks.trial_speed --n 1000 --rr 20 --scaling 1000,2000
    python -m benchmarks.trial_speed --only classify

Prints one line per measurement and, at the end, machine-readable ``key: value`` lines.
The first run compiles the 4-lesion model (about 2 minutes on the 2-core machine; then
the on-disk cache serves it); compile time is not counted in the arm's figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LESION_TRIAL = ROOT / "models" / "trials" / "nsclc_1l_pembrolizumab_lesions.toml"


def load_spec(path: Path, history: bool = True) -> dict:
    """The trial spec with scans every 6 weeks for 2 years (and optionally no history)."""
    from immunoode.trial import load_trial
    spec = load_trial(path)
    spec["scans"].update(every=42, until=730)
    if not history:
        spec["history"] = None
    return spec


def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------- the arm
def measure_arm(n: int, jobs: int, history: bool) -> dict:
    from immunoode.trial import _prepare, run_trial, summary_table
    spec = load_spec(LESION_TRIAL, history)
    t = time.perf_counter()
    _prepare(load_spec(LESION_TRIAL, history), 2, None, None)  # compile or load from cache
    warm = time.perf_counter() - t
    t = time.perf_counter()
    ds = run_trial(spec, n=n, seed=2024, n_jobs=jobs)
    wall = time.perf_counter() - t
    print(summary_table(ds))
    a = ds.attrs
    return {"n": n, "jobs": jobs, "history": history, "model_load_s": warm, "wall_s": wall,
            "patients_per_s": n / wall, "simulation_s": a["simulation_wall_time_s"],
            "history_s": a["history_wall_time_s"], "n_enrolled": a["n_enrolled"],
            "n_failed": a["n_failed"], "screen_failure_share": a["screen_failure_share"],
            "n_states": len(_prepare(spec, 2, None, None).cm.state_names)}


# ------------------------------------------------------------ libRoadRunner
def measure_roadrunner(m: int, jobs: int) -> dict:
    """Treatment phase of the same arm (no history) for m patients: immunoode vs libRoadRunner."""
    import roadrunner

    import immunoode as im
    from immunoode.population import population_table
    from immunoode.trial import _prepare
    spec = load_spec(LESION_TRIAL, history=False)
    c = _prepare(spec, m, None, None)
    cm, times, records = c.cm, c.times, c.records
    cols = {k: np.asarray(v, float) for k, v in c.cols.items()}
    t = time.perf_counter()
    sim1 = im.simulate_population(cm, cols, c.reg, t_eval=times, outputs=records, n_jobs=1)
    im_1 = time.perf_counter() - t
    t = time.perf_counter()
    im.simulate_population(cm, cols, c.reg, t_eval=times, outputs=records, n_jobs=jobs)
    im_j = time.perf_counter() - t
    ours = np.stack([sim1[r].values for r in records], axis=1)          # (m, L, S)

    t = time.perf_counter()
    rr = roadrunner.RoadRunner(im.to_sbml(cm.model, None, c.reg))
    rr_load = time.perf_counter() - t
    rr.setIntegrator("cvode")
    rr.integrator.relative_tolerance = 1e-6
    rr.integrator.absolute_tolerance = 1e-9
    rr.integrator.maximum_num_steps = 1_000_000
    rr.timeCourseSelections = ["time"] + list(records)
    # every state's initial value explicitly: initial assignments use sampled parameters
    P, init, _, _ = population_table(cm, cols)
    Y0 = cm.initial_state(P.T).T.copy()
    for k, v in init.items():
        Y0[:, cm.state_names.index(k)] = v
    pcols = {k: v for k, v in cols.items() if k in cm.parameter_names}
    out = np.empty_like(ours)
    t = time.perf_counter()
    for i in range(m):
        rr.resetAll()
        for k, v in pcols.items():
            rr[k] = float(v[i])
        for j, s in enumerate(cm.state_names):
            rr[s] = float(Y0[i, j])
        res = np.asarray(rr.simulate(times=list(times)))
        out[i] = res[:, 1:].T
    rr_t = time.perf_counter() - t
    big = np.abs(out) > 1e-3                       # lesions present (cm)
    err = float(np.max(np.abs(ours - out)[big] / np.abs(out)[big])) if big.any() else float("nan")
    return {"m": m, "immunoode_1thread_s": im_1, f"immunoode_{jobs}threads_s": im_j,
            "roadrunner_s": rr_t, "roadrunner_load_s": rr_load,
            "speedup_1thread": rr_t / im_1, f"speedup_{jobs}threads": rr_t / im_j,
            "max_rel_diff_diameter": err}


# ------------------------------------------------------------ classification
def measure_classification(P: int = 10_000, L: int = 4, S: int = 30, repeats: int = 5) -> dict:
    from immunoode.response import assess_response
    rng = np.random.default_rng(0)
    base = rng.lognormal(np.log(20.0), 0.5, (P, L, 1))
    rate = rng.normal(-0.02, 0.06, (P, L, 1))
    sizes = base * np.exp(rate * np.arange(S) + np.cumsum(rng.normal(0, 0.05, (P, L, S)), axis=2))
    sizes[:, -1, :6] = 0.0                          # a lesion that may appear later (new)
    times = 42.0 * np.arange(S)
    organ = np.array([0, 1, 3, 2])[:L]
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        ds = assess_response(sizes, times, is_node=organ == 1, organ=organ, confirm=True,
                             site_names=["lung", "lymph_node", "brain", "liver"], stop_time=730.0)
        best = min(best, time.perf_counter() - t)
    return {"patients": P, "lesions": L, "scans": S, "best_s": best,
            "bor_counts": {k: int(v) for k, v in zip(*np.unique(ds["bor"].values, return_counts=True))}}


# ------------------------------------------------------------ scaling, streamed
def _one_streamed(n: int, jobs: int, trial: str, history: bool, chunk: int) -> None:
    """Child process: one streamed arm; prints a JSON line."""
    from immunoode.trial import _prepare, run_trial
    spec = load_spec(Path(trial), history)
    _prepare(load_spec(Path(trial), history), 2, None, None)
    rss0 = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ds = run_trial(spec, n=n, seed=7, n_jobs=jobs, out=Path(tmp) / "arm", chunk=chunk)
        wall = time.perf_counter() - t
        disk = sum(p.stat().st_size for p in (Path(tmp) / "arm").glob("part-*.nc"))
    print(json.dumps({"n": n, "wall_s": wall, "patients_per_s": n / wall,
                      "peak_rss_mib": peak_rss_mib(), "rss_after_load_mib": rss0,
                      "disk_mib": disk / 2 ** 20, "n_parts": ds.attrs["n_parts"],
                      "n_failed": ds.attrs["n_failed"]}))


def measure_scaling(sizes, jobs: int, trial: str, history: bool, chunk: int) -> list[dict]:
    rows = []
    for n in sizes:
        cmd = [sys.executable, "-m", "benchmarks.trial_speed", "--child", str(n), "--jobs", str(jobs),
               "--trial", trial, "--chunk", str(chunk)] + ([] if history else ["--no-history"])
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        line = [x for x in res.stdout.splitlines() if x.startswith("{")]
        if res.returncode or not line:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"scaling run n={n} failed")
        rows.append(json.loads(line[-1]))
        print(f"  streamed n={n}: {rows[-1]}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="patients in the arm")
    ap.add_argument("--rr", type=int, default=40, help="patients looped through libRoadRunner")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--scaling", default="1000,10000,100000", help="comma-separated sizes")
    ap.add_argument("--scaling-trial", default=str(LESION_TRIAL), help="trial file of the scaling runs")
    ap.add_argument("--chunk", type=int, default=2000, help="patients per streamed part")
    ap.add_argument("--no-history", action="store_true", help="skip the pre-treatment history")
    ap.add_argument("--only", choices=["arm", "rr", "classify", "scaling"], action="append")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--trial", default=str(LESION_TRIAL), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _one_streamed(a.child, a.jobs, a.trial, not a.no_history, a.chunk)
        return
    only = set(a.only or ["arm", "rr", "classify", "scaling"])
    results = {}
    if "classify" in only:
        r = measure_classification()
        print(f"classification {r}", flush=True)
        results["classify_10000x30_s"] = r["best_s"]
    if "rr" in only:
        r = measure_roadrunner(a.rr, a.jobs)
        print(f"libroadrunner comparison {r}", flush=True)
        results["speedup_vs_libroadrunner_1thread"] = r["speedup_1thread"]
        results[f"speedup_vs_libroadrunner_{a.jobs}threads"] = r[f"speedup_{a.jobs}threads"]
        results["max_rel_diff_vs_libroadrunner"] = r["max_rel_diff_diameter"]
    if "arm" in only:
        r = measure_arm(a.n, a.jobs, not a.no_history)
        print(f"arm {r}", flush=True)
        results["arm_patients"] = a.n
        results["arm_wall_s"] = r["wall_s"]
        results["arm_patients_per_s"] = r["patients_per_s"]
    if "scaling" in only:
        rows = measure_scaling([int(x) for x in a.scaling.split(",") if x], a.jobs, a.scaling_trial,
                               not a.no_history, a.chunk)
        for row in rows:
            results[f"streamed_{row['n']}_wall_s"] = row["wall_s"]
            results[f"streamed_{row['n']}_peak_rss_mib"] = row["peak_rss_mib"]
    for k, v in results.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
