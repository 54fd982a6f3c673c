"""Sweep throughput, Dask overhead, resume savings and memory.

    python -m benchmarks.sweep_speed                       # 10 scenarios x 400 patients
    python -m benchmarks.sweep_speed --scenarios 50 --patients 2000   # the issue's target size
    python -m benchmarks.sweep_speed --fitted             # the calibrated model and population
    python -m benchmarks.sweep_speed --fitted --lesions   # ... with 3 lesions per patient

Runs one scenario sweep (pembrolizumab q3w/q6w x duration x RT fractions on the library model
nsclc_io, nominal parameters, toxicity on; ``--fitted``: nsclc_io_fitted with the fitted
parameter file and the calibrated population of sweeps/stop_2y_rechallenge.toml;
``--lesions``: plus the three-lesion [lesions] of sweeps/oligo_rt_vs_switch.toml) three ways
and prints machine-readable lines:

* local: 2 processes (ProcessEngine(2)), fresh store;
* dask: a 2-worker LocalCluster (DaskEngine(n_workers=2)), fresh store (cluster start-up
  and the workers' first chunk — importing immunoode and loading the compiled model from
  the disk cache — are timed separately and excluded; local processes are forked from the
  parent and start warm);
* resume: the local sweep stopped after half of its chunks, then resumed: the time of the
  resumed part vs the full run, and the chunks recomputed (must be the missing ones only).

The results of the three must be identical.  Peak resident memory of the parent process is
reported after each step (it should not grow with the number of scenarios).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """
[sweep]
name = "benchmark"
model = "{model}"
{parameters}
trial = "nsclc_1l_pembrolizumab"
n = {patients}
seed = 7
block = {block}

[treatments.pembrolizumab]
regimen = "nsclc_pembrolizumab_200mg_q3w"
class = "ICI"

[toxicity]
enabled = true

[base]
first_line = "pembrolizumab"
policy = "until_progression"

[factors]
interval = {intervals}
duration = {durations}
rt_fractions = [0, 3]
"""


def _section(example: str, start: str, stop: str | None) -> str:
    """A block of an example sweep file, from the line ``start`` to the line ``stop``."""
    text = (ROOT / "sweeps" / example).read_text()
    a = text.index(start)
    return text[a:text.index(stop, a)] if stop else text[a:]


def _design(n_scen: int):
    """Factor lists whose grid has about ``n_scen`` scenarios."""
    intervals = [21.0, 28.0, 35.0, 42.0, 49.0]
    durations = [182.0, 365.0, 547.0, 730.0, 912.0]
    k = max(1, n_scen // 2)
    ni = min(len(intervals), max(1, int(round(np.sqrt(k)))))
    nd = min(len(durations), max(1, int(np.ceil(k / ni))))
    return intervals[:ni], durations[:nd]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", type=int, default=10)
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--block", type=int, default=100)
    ap.add_argument("--skip-dask", action="store_true")
    ap.add_argument("--fitted", action="store_true",
                    help="nsclc_io_fitted + fitted parameters + calibrated population")
    ap.add_argument("--lesions", action="store_true", help="three lesions per patient")
    args = ap.parse_args(argv)

    from immunoode.sweep.engines import DaskEngine, ProcessEngine
    from immunoode.sweep.run import run_sweep
    from immunoode.sweep.spec import load_sweep

    iv, du = _design(args.scenarios)
    tmp = Path(tempfile.mkdtemp(prefix="sweep_bench_"))
    f = tmp / "bench.toml"
    text = SWEEP.format(
        patients=args.patients, block=args.block, intervals=json.dumps(iv), durations=json.dumps(du),
        model="nsclc_io_fitted" if args.fitted else "nsclc_io",
        parameters=(f'parameters = "{ROOT / "fits/nsclc_icis/fitted_parameters.toml"}"'
                    if args.fitted else ""))
    if args.lesions:
        text += "\n" + _section("oligo_rt_vs_switch.toml", "# ---- lesions", "# ---- fitted population")
    if args.fitted:
        text += "\n" + _section("stop_2y_rechallenge.toml", "# ---- fitted population", None)
    f.write_text(text)
    spec = load_sweep(f)
    S, N = len(spec.scenarios), args.patients
    print(f"model: {spec.data['sweep']['model']}, fitted parameters: {bool(args.fitted)}, "
          f"lesions per patient: {len(spec.data['trial']['lesions']['lesion']) if args.lesions else 1}")
    print(f"sweep: {S} scenarios x {N} patients = {S * N} patient simulations, "
          f"block {args.block} ({S * int(np.ceil(N / args.block))} chunks)", flush=True)
    run_sweep(spec, None, n=min(N, 8), max_chunks=1)  # compile / warm the cache once

    t = time.perf_counter()
    local = run_sweep(spec, tmp / "local.zarr", engine=ProcessEngine(2), progress=True)
    t_local = time.perf_counter() - t
    print(f"local_2proc_s {t_local:.1f}")
    print(f"local_patients_per_s {S * N / t_local:.0f}")
    print(f"parent_peak_rss_mb_after_local {_rss_mb():.0f}", flush=True)

    if not args.skip_dask:
        t = time.perf_counter()
        eng = DaskEngine(n_workers=2)
        t_start = time.perf_counter() - t
        t = time.perf_counter()
        run_sweep(spec, None, engine=eng, n=min(N, 2 * args.block), max_chunks=2)  # workers import
        t_warm = time.perf_counter() - t                                          # and load the model
        t = time.perf_counter()
        dask_ds = run_sweep(spec, tmp / "dask.zarr", engine=eng, progress=True)
        t_dask = time.perf_counter() - t
        eng.close()
        same = all(np.array_equal(dask_ds[v].values, local[v].values, equal_nan=True)
                   for v in ("size", "pfs_time", "cumulative_dose", "summary"))
        print(f"dask_cluster_start_s {t_start:.1f}")
        print(f"dask_worker_warmup_s {t_warm:.1f}")
        print(f"dask_2worker_s {t_dask:.1f}")
        print(f"dask_over_local_ratio {t_dask / t_local:.3f}")
        print(f"dask_identical_to_local {same}", flush=True)

    n_chunks = int(local["chunk_status"].size)
    half = n_chunks // 2
    t = time.perf_counter()
    run_sweep(spec, tmp / "resume.zarr", engine=ProcessEngine(2), max_chunks=half)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    resumed = run_sweep(spec, tmp / "resume.zarr", engine=ProcessEngine(2))
    t_resume = time.perf_counter() - t
    first = {tuple(x) for x in json.loads(resumed.attrs["chunks_computed_list"])}
    same = all(np.array_equal(resumed[v].values, local[v].values, equal_nan=True)
               for v in ("size", "pfs_time", "cumulative_dose", "summary"))
    print(f"resume_first_half_s {t_first:.1f}")
    print(f"resume_second_half_s {t_resume:.1f}")
    print(f"resume_chunks_recomputed {len(first)} of {n_chunks} (expected {n_chunks - half})")
    print(f"resume_time_saved_vs_full_s {t_local - t_resume:.1f}")
    print(f"resume_identical_to_local {same}")
    print(f"parent_peak_rss_mb_end {_rss_mb():.0f}")
    print(f"sum_of_chunk_compute_s local {np.nansum(local['chunk_wall_s'].values):.1f}"
          + ("" if args.skip_dask else f" dask {np.nansum(dask_ds['chunk_wall_s'].values):.1f}"))


if __name__ == "__main__":
    main()
