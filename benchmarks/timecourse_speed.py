"""Time the shipped time-course fit: sensitivity Jacobian vs finite differences.

Fits ``fits/timecourse_two_cpt_pk.toml`` (two-compartment PK, 8 individuals,
136 observations, combined error model estimated; 4 structural parameters + the
error ratio) as a naive pooled fit, once with the residual Jacobian from the
forward sensitivities and once with scipy's finite differences, and prints for each:
fit time (best of ``--repeats``, compile excluded — both compiled models come from
the cache after the first run), residual and Jacobian evaluations, ODE solves, the
estimates and -2LL; then the time of the profile-likelihood intervals.

    python -m benchmarks.timecourse_speed [--repeats 3] [--no-profiles]

The last lines are machine-readable (``name value``).

Measured (2026-11-29, the shared 2-core development VM with other jobs running, so
times vary between runs; two runs):

* sensitivity Jacobian: 0.19–0.25 s, 14 residual + 13 Jacobian evaluations,
  128–136 ODE solves (112–120 of them with sensitivities);
* finite differences: 0.48–0.77 s, 112 residual evaluations, 1008–1072 ODE solves;
* both reach the same optimum (estimates within 9e-6 relative, same -2LL 706.661269);
* with lmfit ``conf_interval`` profiles: 12–14 s (1451 residual + 1020 Jacobian
  evaluations: the profiles refit with Levenberg–Marquardt at every probed value).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from immunoode.calibrate.timecourse import fit_timecourse, load_fit_file

FIT_FILE = Path(__file__).resolve().parents[1] / "fits" / "timecourse_two_cpt_pk.toml"


def _best(problem, repeats, **kw):
    best = None
    for _ in range(repeats):
        fit = fit_timecourse(problem, **kw)
        if best is None or fit.fit_time < best.fit_time:
            best = fit
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-profiles", action="store_true")
    a = ap.parse_args(argv)
    problem, _ = load_fit_file(FIT_FILE)
    t0 = time.perf_counter()
    fit_timecourse(problem)   # compile / load both models, warm caches
    warm = time.perf_counter() - t0
    out = {}
    print(f"{FIT_FILE.name}: {len(problem.data.ids)} individuals, {problem.data.n_obs} "
          f"observations; first (warm-up) fit incl. compile/cache load {warm:.2f} s")
    fits = {}
    for jac in ("sensitivity", "finite-difference"):
        fit = _best(replace(problem, jacobian=jac), a.repeats)
        fits[jac] = fit
        print(f"\njacobian = {jac}: {fit.message}")
        print(f"  fit time {fit.fit_time:.3f} s; {fit.nfev} residual + {fit.njev} Jacobian "
              f"evaluations; {fit.n_solves} ODE solves ({fit.n_sens_solves} with sensitivities)")
        print("  " + ", ".join(f"{p} = {v:.5g}" for p, v in fit.values().items()) +
              f"; -2LL = {fit.minus2ll:.6f}")
        key = "sens" if jac == "sensitivity" else "fd"
        out[f"{key}_fit_time_s"] = fit.fit_time
        out[f"{key}_residual_evals"] = fit.nfev
        out[f"{key}_jacobian_evals"] = fit.njev
        out[f"{key}_ode_solves"] = fit.n_solves
    d = np.max(np.abs(fits["sensitivity"].estimate / fits["finite-difference"].estimate - 1))
    out["max_rel_diff_estimates"] = float(d)
    out["speedup_sens_vs_fd"] = out["fd_fit_time_s"] / out["sens_fit_time_s"]
    if not a.no_profiles:
        fit = fit_timecourse(problem, profiles=True)
        print(f"\nwith profile-likelihood intervals (lmfit conf_interval): {fit.fit_time:.2f} s, "
              f"{fit.nfev} residual + {fit.njev} Jacobian evaluations")
        out["profiles_fit_time_s"] = fit.fit_time
    print()
    for k, v in out.items():
        print(f"{k} {v:.6g}")
    return out


if __name__ == "__main__":
    main()
