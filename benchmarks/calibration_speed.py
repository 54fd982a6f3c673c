"""Speed of the calibration objective (issue 5 target: >= 100 re-weighting evaluations/s).

    python -m benchmarks.calibration_speed                     # example fit (two-clone lesion)
    python -m benchmarks.calibration_speed fits/nsclc_icis.toml --n 1200

Simulates every arm's plausible cohort once (timed: the cost of a mechanistic change), then
times objective evaluations that only change population parameters (random values inside
the bounds, fixed seed): each one re-weights every arm and evaluates the likelihood.
Prints machine-readable lines at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fit", nargs="?", default=str(ROOT / "fits" / "examples" / "two_clone_fit.toml"))
    ap.add_argument("--n", type=int, help="plausible patients per arm (default: the fit file's)")
    ap.add_argument("--evals", type=int, default=2000, help="re-weighting evaluations to time")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from dataclasses import replace

    from immunoode.calibrate.fit import RateFit, load_fit
    spec = load_fit(args.fit)
    if args.n:
        spec = replace(spec, cohort=dict(spec.cohort, n=args.n))
    rf = RateFit(spec)
    mech = {m: spec.parameters[m].value for m in spec.mechanistic}
    t0 = time.perf_counter()
    data = rf.cohorts(mech)
    t_sim = time.perf_counter() - t0
    n_pat = sum(d.cohort.size for d in data.values())

    pop = [k for k in spec.population_parameters if spec.parameters[k].vary]
    rng = np.random.default_rng(args.seed)
    base = {k: p.value for k, p in spec.parameters.items()}
    draws = []
    for _ in range(args.evals):
        v = dict(base)
        for k in pop:
            p = spec.parameters[k]
            v[k] = float(rng.uniform(p.min, p.max))
        draws.append(v)
    rf.residual(draws[0], data)  # warm-up
    t0 = time.perf_counter()
    for v in draws:
        rf.residual(v, data)
    t_eval = time.perf_counter() - t0
    rate = args.evals / t_eval
    sys.stdout.write(
        f"fit file: {args.fit}\n"
        f"arms: {len(data)}, plausible patients: {n_pat} ({n_pat // max(len(data), 1)} per arm), "
        f"re-weighted variables: {len(spec.population.variables)}, fitted targets: "
        f"{len(rf.likelihood)}\n"
        f"cohort simulation (a mechanistic change): {t_sim:.2f} s "
        f"({1e3 * t_sim / n_pat:.2f} ms per patient incl. classification)\n"
        f"re-weighting objective: {args.evals} evaluations in {t_eval:.3f} s\n"
        f"reweighting_evaluations_per_second {rate:.1f}\n"
        f"resimulation_seconds {t_sim:.3f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
