"""Benchmark immunoode against libRoadRunner and a naive scipy baseline.

Run from the repository root::

    python -m benchmarks.compare [--quick] [--n N] [--jobs 2]

Everything uses the reference scenario of ``benchmarks/reference_model.*``: 200 mg
anti-PD-1 into ``A1`` every 21 days from day 0 (35 doses), daily output from day 0
to 730 (731 points), rtol 1e-6 and scalar atol 1e-9 for every engine.  Measured,
in one run:

* compile time of ``reference_model.toml``: *cold* in a subprocess with a fresh,
  empty ``IMMUNOODE_CACHE_DIR`` (derivation, code generation, numba machine code)
  and *warm* in a second new subprocess on the same directory (loads the cache);
* one simulation at nominal parameters, best of ``--repeats`` (in 5 interleaved rounds):
  ``im.simulate``
  end to end, the bare compiled kernel, libRoadRunner (CVODE; doses are an SBML
  event appended to the Antimony text, so CVODE restarts at each dose) and the
  naive baseline (a): ``scipy.integrate.solve_ivp(method="LSODA")`` on a
  ``sympy.lambdify`` right-hand side, restarted at each dose;
* the population from ``population_1000.csv`` (first ``--n`` patients; columns
  are parameters, the rest nominal): immunoode on 1 thread and on ``--jobs``
  threads, libRoadRunner in a loop (reset, set parameters, simulate) and the
  naive baseline on a subset, scaled linearly to N;
* the max relative error of the final tumor (Ts + Tr at day 730) against the
  CSV's ``reference_final_tumor``.

Speed-ups are ratios of times from this same run (machines are noisy).  The last
lines are machine-readable ``name: value`` pairs.
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

HERE = Path(__file__).resolve().parent
MODEL_TOML = HERE / "reference_model.toml"
MODEL_ANT = HERE / "reference_model.ant"
POPULATION_CSV = HERE / "population_1000.csv"

T_EVAL = np.arange(0.0, 731.0)
RTOL, ATOL = 1e-6, 1e-9
DOSE_STATE, DOSE_MG, DOSE_EVERY, DOSE_COUNT = "A1", 200.0, 21.0, 35
NOMINAL_FINAL_TUMOR = 1.5258455   # Ts+Tr at day 730, LSODA at rtol 1e-11 (bench README)
NAN = float("nan")


# ------------------------------------------------------------------ helpers
def best_time(fn, repeats: int) -> tuple[float, object]:
    """Smallest wall time of ``repeats`` calls of ``fn()`` and the last result."""
    best, result = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def wall_time(fn) -> tuple[float, object]:
    """Wall time of one call of ``fn()`` and its result."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def max_rel_error(values, reference) -> float:
    """Largest |value/reference - 1| (inf if any value is not finite)."""
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    if not np.all(np.isfinite(values)):
        return float("inf")
    return float(np.max(np.abs(values - reference) / np.abs(reference)))


def load_population(n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """First ``n`` patients: parameter columns (name -> values) and reference final tumor."""
    table = np.genfromtxt(POPULATION_CSV, delimiter=",", names=True)[:n]
    names = [c for c in table.dtype.names if c not in ("patient", "reference_final_tumor")]
    return {c: np.asarray(table[c], float) for c in names}, np.asarray(table["reference_final_tumor"])


def patient_params(columns: dict[str, np.ndarray], i: int) -> dict[str, float]:
    return {k: float(v[i]) for k, v in columns.items()}


# ------------------------------------------------------------ compile time
_COMPILE_SNIPPET = (
    "import immunoode as im; cm = im.compile_model(im.load_model({path!r})); "
    "print(cm.compile_time, int(cm.cache_hit))"
)


def compile_in_subprocess(cache_dir: str) -> tuple[float, bool]:
    """compile_time reported by a new Python process using ``cache_dir``."""
    env = dict(os.environ, IMMUNOODE_CACHE_DIR=cache_dir)
    code = _COMPILE_SNIPPET.format(path=str(MODEL_TOML))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    seconds, hit = res.stdout.split()[-2:]
    return float(seconds), bool(int(hit))


def measure_compile() -> dict:
    with tempfile.TemporaryDirectory(prefix="immunoode_bench_cache_") as d:
        cold, cold_hit = compile_in_subprocess(d)
        warm, warm_hit = compile_in_subprocess(d)
    if cold_hit or not warm_hit:   # e.g. immunoode's sources changed between the two runs
        print(f"WARNING: expected a cold miss and a warm hit, got cache_hit={cold_hit} (cold), "
              f"{warm_hit} (warm)", flush=True)
    return {"cold": cold, "warm": warm}


# --------------------------------------------------------------- immunoode
class Immunoode:
    """immunoode: ``im.simulate`` / ``im.simulate_population`` and the bare kernel."""

    def __init__(self):
        import immunoode as im
        self.im = im
        self.cm = im.compile_model(im.load_model(MODEL_TOML))
        self.regimen = im.Regimen((im.Dose(target=DOSE_STATE, amount=DOSE_MG, start=0.0,
                                           every=DOSE_EVERY, count=DOSE_COUNT),))
        self.i_tumor = [self.cm.state_names.index(s) for s in ("Ts", "Tr")]
        self.ok = self.works()

    def simulate(self, everything: bool = False) -> float:
        """End to end; by default the Dataset holds the 18 states (what libRoadRunner returns),
        with ``everything`` also the 22 assignments and observables."""
        outputs = None if everything else list(self.cm.state_names)
        try:
            ds = self.im.simulate(self.cm, self.regimen, t_eval=T_EVAL, rtol=RTOL, atol=ATOL,
                                  outputs=outputs)
        except self.im.SimulationError as exc:
            print(f"immunoode FAILED: {exc}", flush=True)
            return float("nan")
        return float(ds["Ts"].values[-1] + ds["Tr"].values[-1])  # numpy, as for libRoadRunner

    def works(self) -> bool:
        """One nominal run; a failure must not be timed 20 times over (nor the population)."""
        return bool(np.isfinite(self.simulate()))

    def kernel_args(self):
        """Pre-built arrays for one bare ``integrate_many`` call at nominal parameters."""
        from immunoode.simulate import prepare_events
        cm = self.cm
        p = cm.parameter_vector()
        ev = prepare_events(cm, self.regimen, dict(zip(cm.parameter_names, p)), 0.0, T_EVAL[-1])
        sel = np.asarray(self.i_tumor, np.int64)
        return (cm.initial_state(p)[None, :], p[None, :], T_EVAL, *(a[None, :] for a in ev), sel,
                RTOL, np.full(len(cm.state_names), ATOL), 1_000_000, np.inf,
                np.empty((1, len(sel), len(T_EVAL))), np.empty((1, 8)), np.empty(1, np.int64))

    def kernel(self, args) -> float:
        self.cm.numba.integrate_many(*args)
        out, status = args[-3], args[-1]
        return float(out[0, :, -1].sum()) if status[0] == 0 else float("nan")

    def population(self, columns, n_jobs: int) -> np.ndarray:
        pop = self.im.simulate_population(self.cm, columns, self.regimen, t_eval=T_EVAL,
                                          outputs=["Ts", "Tr"], rtol=RTOL, atol=ATOL,
                                          n_jobs=n_jobs)
        final = (pop["Ts"][:, -1] + pop["Tr"][:, -1]).values
        return np.where(pop["status"].values == 0, final, np.nan)


# ------------------------------------------------------------ libRoadRunner
_DOSE_EVENT = f"""
  next_dose = 0; n_doses = 0;
  E_dose: at (time >= next_dose && n_doses < {DOSE_COUNT}), t0 = false: \
{DOSE_STATE} = {DOSE_STATE} + {DOSE_MG:g}, next_dose = next_dose + {DOSE_EVERY:g}, n_doses = n_doses + 1;
end
"""


def antimony_with_doses() -> str:
    """The reference Antimony text with the dosing schedule as one counting SBML event."""
    text = MODEL_ANT.read_text().rstrip()
    assert text.endswith("end"), "reference_model.ant must end with 'end'"
    return text[: -len("end")] + _DOSE_EVENT


class RoadRunner:
    """libRoadRunner (CVODE) on the SBML converted from the Antimony file."""

    def __init__(self):
        import antimony
        import roadrunner
        antimony.clearPreviousLoads()
        if antimony.loadAntimonyString(antimony_with_doses()) < 0:
            raise RuntimeError(antimony.getLastError())
        self.rr = roadrunner.RoadRunner(antimony.getSBMLString(antimony.getMainModuleName()))
        self.rr.setIntegrator("cvode")
        self.rr.integrator.relative_tolerance = RTOL
        self.rr.integrator.absolute_tolerance = ATOL
        self.rr.integrator.maximum_num_steps = 1_000_000
        self.rr.timeCourseSelections = ["time", "Ts", "Tr"]

    def simulate(self, params: dict[str, float] | None = None) -> float:
        rr = self.rr
        rr.resetAll()                      # species, time and the event's counters
        for k, v in (params or {}).items():
            rr[k] = v
        res = rr.simulate(T_EVAL[0], T_EVAL[-1], len(T_EVAL))
        return float(res[-1, 1] + res[-1, 2])

    def population(self, columns) -> np.ndarray:
        n = len(next(iter(columns.values())))
        return np.array([self.simulate(patient_params(columns, i)) for i in range(n)])


# ------------------------------------------------------- naive baseline (a)
class NaiveScipy:
    """Baseline (a): solve_ivp(LSODA) with a sympy.lambdify right-hand side."""

    def __init__(self, model):
        import sympy
        from immunoode.expr import expand_hill
        ys = [model.symbol(s) for s in model.state_names]
        ps = [model.symbol(p) for p in model.parameter_names]
        rhs = [expand_hill(e) for e in model.rhs_substituted()]
        f = sympy.lambdify((ys, ps), rhs, modules="numpy")
        self.fun = lambda t, y, p: f(y, p)
        self.model = model
        self.i_dose = model.state_names.index(DOSE_STATE)
        self.i_tumor = [model.state_names.index(s) for s in ("Ts", "Tr")]

    def simulate(self, params: dict[str, float] | None = None) -> float:
        from scipy.integrate import solve_ivp
        m = self.model
        values = dict(m.parameter_values, **(params or {}))
        p = [values[k] for k in m.parameter_names]
        init = m.initial_values(values)
        y = np.array([init[s] for s in m.state_names], float)
        dose_times = DOSE_EVERY * np.arange(DOSE_COUNT)
        bounds = np.append(dose_times, T_EVAL[-1])
        for t0, t1 in zip(bounds[:-1], bounds[1:]):
            y[self.i_dose] += DOSE_MG
            last = t1 == T_EVAL[-1]
            t_out = T_EVAL[(T_EVAL >= t0) & ((T_EVAL <= t1) if last else (T_EVAL < t1))]
            t_out = np.append(t_out, t1) if t_out[-1] < t1 else t_out
            sol = solve_ivp(self.fun, (t0, t1), y, method="LSODA", t_eval=t_out, rtol=RTOL,
                            atol=ATOL, args=(p,))
            if not sol.success:
                return float("nan")
            y = sol.y[:, -1].copy()
        return float(y[self.i_tumor].sum())

    def population(self, columns, n: int) -> np.ndarray:
        return np.array([self.simulate(patient_params(columns, i)) for i in range(n)])


# -------------------------------------------------------------- the runs
def measure_single(imo: Immunoode, rr: RoadRunner, naive: NaiveScipy, repeats: int,
                   rounds: int = 5) -> dict:
    """Best time per engine over ``rounds`` interleaved rounds of ``repeats // rounds`` calls:
    this machine's speed drifts for seconds at a time, and interleaving exposes every engine
    to the same drift instead of giving one engine a slow window."""
    timed = {"rr": rr.simulate}
    if imo.ok:
        args = imo.kernel_args()
        timed.update({"im_simulate": imo.simulate,
                      "im_simulate_all": lambda: imo.simulate(everything=True),
                      "im_kernel": lambda: imo.kernel(args)})
    for fn in timed.values():   # warm-up
        fn()
    naive.simulate()
    res = dict.fromkeys(("im_simulate", "im_simulate_tumor", "im_kernel", "im_kernel_tumor",
                         "im_simulate_all", "im_simulate_all_tumor"), NAN)
    best = dict.fromkeys(timed, np.inf)
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, fn in timed.items():
            t, value = best_time(fn, per_round)
            best[name] = min(best[name], t)
            res[f"{name}_tumor"] = value
    for name, t in best.items():
        res[name] = t
    res["naive"], res["naive_tumor"] = best_time(naive.simulate, max(1, repeats // 5))
    return res


def measure_population(imo: Immunoode, rr: RoadRunner, naive: NaiveScipy, n: int, jobs: int,
                       n_naive: int) -> dict:
    columns, reference = load_population(n)
    n = len(reference)
    res = {"n": n, "jobs": jobs, "n_naive": min(n_naive, n)}
    if imo.ok:
        imo.population({k: v[:2] for k, v in columns.items()}, jobs)   # warm-up (threads)
        res["im_1"], im1 = wall_time(lambda: imo.population(columns, 1))
        res["im_jobs"], imj = wall_time(lambda: imo.population(columns, jobs))
    else:
        res["im_1"] = res["im_jobs"] = NAN
        im1 = imj = np.full(n, np.nan)
    res["rr"], rrv = wall_time(lambda: rr.population(columns))
    if imo.ok:   # once more after libRoadRunner's loop: best of two, against drifting speed
        res["im_1"] = min(res["im_1"], wall_time(lambda: imo.population(columns, 1))[0])
    t_naive, nv = wall_time(lambda: naive.population(columns, res["n_naive"]))
    res["naive"] = t_naive * n / res["n_naive"]
    res["im_err"] = max_rel_error(im1, reference)
    res["im_jobs_err"] = max_rel_error(imj, reference)
    res["rr_err"] = max_rel_error(rrv, reference)
    res["naive_err"] = max_rel_error(nv, reference[: res["n_naive"]])
    res["im_failed"] = int(np.sum(~np.isfinite(im1)))
    return res


# ------------------------------------------------------------------ report
def report(comp: dict, single: dict, pop: dict, imo_ok: bool = True,
           method: str = "compiled") -> None:
    ms = 1e3
    n, jobs = pop["n"], pop["jobs"]
    print(f"\nReference scenario: 35 x 200 mg q21d, output daily 0..730 (731 points), "
          f"rtol {RTOL:g}, atol {ATOL:g}")
    print(f"compile (immunoode): cold {comp['cold']:.2f} s (fresh cache, new process), "
          f"warm {comp['warm']:.3f} s (from cache, new process)\n")
    rows = [
        (f"immunoode im.simulate ({method}), 18 states", single["im_simulate"],
         single["im_simulate_tumor"], pop["im_1"], pop["im_err"]),
        ("immunoode im.simulate, all 40 outputs", single["im_simulate_all"],
         single["im_simulate_all_tumor"], None, None),
        ("immunoode bare kernel", single["im_kernel"], single["im_kernel_tumor"], None, None),
        (f"immunoode population, {jobs} threads", None, None, pop["im_jobs"], pop["im_jobs_err"]),
        ("libRoadRunner CVODE, SBML event", single["rr"], single["rr_tumor"], pop["rr"],
         pop["rr_err"]),
        (f"(a) scipy LSODA + lambdify [pop: {pop['n_naive']} pts, scaled]", single["naive"],
         single["naive_tumor"], pop["naive"], pop["naive_err"]),
    ]
    head = f"{'engine':<52} {'one sim [ms]':>12} {'final tumor rel.err':>20} " \
           f"{f'{n} patients [s]':>18} {'pop max rel.err':>16}"
    print(head)
    print("-" * len(head))
    for name, t1, tumor, tp, err in rows:
        c1 = f"{t1 * ms:12.2f}" if t1 is not None else f"{'-':>12}"
        c2 = f"{abs(tumor / NOMINAL_FINAL_TUMOR - 1):20.2e}" if tumor is not None else f"{'-':>20}"
        c3 = f"{tp:18.3f}" if tp is not None else f"{'-':>18}"
        c4 = f"{err:16.2e}" if err is not None else f"{'-':>16}"
        print(f"{name:<52} {c1} {c2} {c3} {c4}")
    if not imo_ok:
        print("\nWARNING: immunoode failed on the nominal patient; its figures are nan")
    elif pop["im_failed"]:
        print(f"\nWARNING: immunoode failed for {pop['im_failed']} of {n} patients")
    print("\n(population speed-up vs libRoadRunner compares 1 thread with 1 thread)")
    print(f"population_speedup_2cores_vs_1core: {pop['im_1'] / pop['im_jobs']}")
    print(f"speedup_vs_naive_single: {single['naive'] / single['im_simulate']}")
    print(f"compile_cold_s: {comp['cold']}")
    print(f"compile_warm_s: {comp['warm']}")
    print(f"single_speedup_vs_libroadrunner: {single['rr'] / single['im_simulate']}")
    print(f"population_speedup_vs_libroadrunner: {pop['rr'] / pop['im_1']}")
    print(f"population_max_rel_error: {pop['im_err']}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 patients, fewer repeats")
    ap.add_argument("--n", type=int, default=None, help="patients (default 1000; 100 with --quick)")
    ap.add_argument("--jobs", type=int, default=2, help="threads for the parallel population run")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the single run (20)")
    args = ap.parse_args(argv)
    args.n = args.n or (100 if args.quick else 1000)
    args.repeats = args.repeats or (10 if args.quick else 20)
    args.n_naive = 10 if args.quick else 20
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()

    def stage(text):
        print(f"[{time.perf_counter() - start:6.1f} s] {text}", flush=True)

    stage("compile time: cold and warm, each in a new process")
    comp = measure_compile()
    stage("loading the engines")
    imo = Immunoode()
    rr = RoadRunner()
    naive = NaiveScipy(imo.cm.model)
    stage(f"one simulation, best of {args.repeats}")
    single = measure_single(imo, rr, naive, args.repeats)
    stage(f"population of {args.n}")
    pop = measure_population(imo, rr, naive, args.n, args.jobs, args.n_naive)
    stage("done")
    report(comp, single, pop, imo.ok, getattr(imo.cm, "method", "compiled"))


if __name__ == "__main__":
    main()
