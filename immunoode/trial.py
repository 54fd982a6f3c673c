"""Virtual trial arms: population + model + regimen + scan schedule → classified patients.

A trial is described by a TOML file (or the same mapping in Python)::

    [trial]
    name = "1L pembrolizumab"
    model = "nsclc_io"                    # path or built-in model name
    regimen = "nsclc_pembrolizumab_200mg_q3w"   # path, built-in name, or "none"
    n = 1000
    seed = 2024
    method = "lhs"                        # random | lhs | sobol (population draw)
    follow_up = 730                       # days
    lesion_observable = "tumor_diameter"  # record giving the lesion's longest diameter
    diameter_unit = "cm"                  # mm | cm | m (converted to mm)
    lesion_site = "lung"

    [scans]                               # baseline at day 0, then:
    every = 42                            # every 6 weeks ...
    until = 365                           # ... for the first year,
    then_every = 84                       # then every 12 weeks up to follow_up
    noise_sd_mm = 0.0                     # optional measurement noise (seeded)
    noise_cv = 0.0
    # times = [0, 42, 84, ...]            # or an explicit list

    [response]                            # options of immunoode.response.assess_response
    confirm = false
    sitc_rule = "duration"

    [map]                                 # sampled covariates -> model parameters
    pdl1_tps = { parameter = "pdl1_tps", scale = 0.01 }    # percent -> fraction
    tmb = "tmb"
    driver = { categories = { EGFR = "egfr", KRAS = "kras" } }   # flag parameter = 1

    [population.parameters.T0]            # a sample_population spec
    dist = "lognormal"
    median = 5.5
    cv = 0.3

    [solver]                              # optional: method, rtol, atol, max_steps
    rtol = 1e-6

Variables in ``[population.parameters]`` must name model parameters or states and go
straight into the simulation; ``[population.covariates]`` are recorded and reach the
model only through ``[map]``.

:func:`run_trial` returns an :class:`xarray.Dataset` over ``patient`` (and
``lesion``, ``scan``, ``site``): the sampled population, the simulation status and
message of every patient (a failed integration is kept, marked ``failed`` and
excluded from the response rates, never dropped), the simulated and the measured
lesion sizes in mm, and the RECIST 1.1 / iRECIST / SITC / progression-pattern
results of :func:`immunoode.response.assess_response`.  ``attrs`` hold the trial
spec as JSON, the seed, the model name and hash, the regimen and the summary.

Limitation: one lesion per patient (the model has one tumor compartment), so
"new lesion" progression and multi-organ patterns cannot occur; every progression
is oligo-progression of the single target lesion.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np
import xarray as xr

from .errors import ImmunoodeError, ModelError

__all__ = ["load_trial", "run_trial", "summary_table", "scan_times", "add_trial_command",
           "TrialError"]

_UNIT_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
_SECTIONS = {"trial", "scans", "response", "map", "population", "solver"}
_TRIAL_KEYS = {"name", "model", "regimen", "n", "seed", "method", "follow_up",
               "lesion_observable", "diameter_unit", "lesion_site", "description"}
_SCAN_KEYS = {"every", "until", "then_every", "times", "noise_sd_mm", "noise_cv"}
_SOLVER_KEYS = {"method", "rtol", "atol", "max_steps", "chunk_size"}
_RESPONSE_KEYS = {"confirm", "confirm_days", "min_sd_days", "detect_mm", "nontarget_pd",
                  "sitc_pd", "sitc_rule", "min_exposure_days", "benefit_days",
                  "off_treatment_days", "oligo_max_lesions", "oligo_max_organs",
                  "lesion_pd_rel", "lesion_pd_abs"}


class TrialError(ModelError):
    """A trial file is invalid (the message names the section and key)."""


# --------------------------------------------------------------------------- spec
def _check_keys(d: Mapping, allowed: set, section: str, file=None) -> None:
    for k in d:
        if k not in allowed:
            from .model import _suggest
            raise TrialError(f"unknown key{_suggest(k, sorted(allowed))}", file=file,
                             section=section, item=k)


def load_trial(spec_or_path) -> dict:
    """Read and validate a trial spec (path to TOML, or a mapping); returns a new dict.

    The result has every section filled with defaults and ``_base`` (the folder
    relative paths are resolved against) and ``_file``.
    """
    file = None
    if isinstance(spec_or_path, (str, Path)):
        import tomllib
        file = Path(spec_or_path)
        if not file.exists():
            raise ImmunoodeError(f"{file}: no such trial file")
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise TrialError(f"invalid TOML: {exc}", file=file) from None
        base = file.resolve().parent
    elif isinstance(spec_or_path, Mapping):
        data = spec_or_path
        base = Path(data.get("_base", Path.cwd()))
    else:
        raise TypeError("run_trial needs a trial file path or a mapping")
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    _check_keys({k: 1 for k in data if not k.startswith("_")}, _SECTIONS, "(top level)", file)
    tr = dict(data.get("trial", {}))
    _check_keys(tr, _TRIAL_KEYS, "trial", file)
    if "model" not in tr:
        raise TrialError("missing 'model' (a model file or built-in name)", file=file, section="trial")
    if "population" not in data:
        raise TrialError("missing [population] (a sample_population spec)", file=file)
    tr.setdefault("name", file.stem if file else "trial")
    tr.setdefault("regimen", None)
    tr.setdefault("n", 100)
    tr.setdefault("seed", None)
    tr.setdefault("method", "random")
    tr.setdefault("follow_up", 730.0)
    tr.setdefault("lesion_observable", "tumor_diameter")
    tr.setdefault("diameter_unit", "cm")
    tr.setdefault("lesion_site", "lung")
    if tr["diameter_unit"] not in _UNIT_TO_MM:
        raise TrialError(f"diameter_unit must be one of {sorted(_UNIT_TO_MM)}, got "
                         f"{tr['diameter_unit']!r}", file=file, section="trial")
    fu = tr["follow_up"]
    if isinstance(fu, bool) or not isinstance(fu, (int, float)) or not (math.isfinite(fu) and fu > 0):
        raise TrialError(f"follow_up must be a positive number of days, got {fu!r}", file=file,
                         section="trial")
    sc = dict(data.get("scans", {}))
    _check_keys(sc, _SCAN_KEYS, "scans", file)
    sc.setdefault("every", 42.0)
    sc.setdefault("until", 365.0)
    sc.setdefault("then_every", 84.0)
    sc.setdefault("noise_sd_mm", 0.0)
    sc.setdefault("noise_cv", 0.0)
    resp = dict(data.get("response", {}))
    _check_keys(resp, _RESPONSE_KEYS, "response", file)
    solver = dict(data.get("solver", {}))
    _check_keys(solver, _SOLVER_KEYS, "solver", file)
    pop = data["population"]
    if not isinstance(pop, Mapping):
        raise TrialError("[population] must be a table", file=file)
    from .sampling import SpecError, validate_spec
    try:
        validate_spec(pop)
    except SpecError as exc:
        raise exc.located(file=file) from None
    mp = dict(data.get("map", {}))
    out = {"trial": tr, "scans": sc, "response": resp, "solver": solver, "population": pop,
           "map": mp, "_base": str(base), "_file": str(file) if file else None}
    scan_times(out)  # validates the schedule
    return out


def scan_times(spec: Mapping) -> np.ndarray:
    """Scan days of a (loaded) trial spec: 0, then every ``every`` to ``until``, then every
    ``then_every`` up to ``follow_up`` (or the explicit ``times``)."""
    sc, fu = spec["scans"], float(spec["trial"]["follow_up"])
    if "times" in sc and sc["times"] is not None:
        t = np.asarray(sc["times"], dtype=float)
        if t.ndim != 1 or t.size < 2 or t[0] != 0 or np.any(np.diff(t) <= 0) or not np.all(np.isfinite(t)):
            raise TrialError("times must be an increasing list starting at 0 with >= 2 scans",
                             section="scans", item="times")
        return t
    every, until, then = float(sc["every"]), float(sc["until"]), float(sc["then_every"])
    if not (every > 0 and then > 0 and until >= 0):
        raise TrialError("every and then_every must be > 0 and until >= 0", section="scans")
    first = every * np.arange(1, int(math.floor(min(until, fu) / every + 1e-9)) + 1)
    last = first[-1] if first.size else 0.0
    second = last + then * np.arange(1, int(math.floor((fu - last) / then + 1e-9)) + 1)
    t = np.concatenate([[0.0], first, second])
    if t.size < 2:
        raise TrialError(f"no scan after baseline within follow_up = {fu:g} days", section="scans")
    return t


def _resolve(value, kind: str, base: Path) -> Path:
    from .cli import resolve_model_path, resolve_regimen_path
    p = Path(str(value))
    if not p.is_absolute() and (base / p).exists():
        return base / p
    return resolve_model_path(str(value)) if kind == "model" else resolve_regimen_path(str(value))


def _load_model(value, base: Path):
    from .compile import CompiledModel, compile_model
    from .model import Model
    if isinstance(value, CompiledModel):
        return value
    if isinstance(value, Model):
        return compile_model(value)
    from .sbml import load_any_model
    path = _resolve(value, "model", base)
    if not path.exists():
        raise ImmunoodeError(f"{path}: no such model file")
    return compile_model(load_any_model(path))


def _load_regimen(value, base: Path):
    from .regimen import Regimen, load_regimen
    if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
        return None
    if isinstance(value, Regimen):
        return value
    path = _resolve(value, "regimen", base)
    if not path.exists():
        raise ImmunoodeError(f"{path}: no such regimen file")
    return load_regimen(path)


def _last_dose(regimen, t_end: float):
    """Time of the last dose within [0, t_end] (None without doses)."""
    if regimen is None or not regimen.doses:
        return None
    from .regimen import _schedule
    last = -np.inf
    for d in regimen.doses:
        t = _schedule(d.start, d.every, d.count, d.until, t_end)
        t = t[t <= t_end + 1e-9]
        if t.size:
            last = max(last, float(t.max()))
    return None if not np.isfinite(last) else last


def _simulation_columns(cm, pop: xr.Dataset, spec: Mapping) -> dict[str, np.ndarray]:
    """Per-patient columns for simulate_population: [population.parameters] + [map]."""
    from .model import _suggest
    names = list(cm.parameter_names) + list(cm.state_names)
    cols: dict[str, np.ndarray] = {}
    for name in spec["population"].get("parameters", {}):
        if name not in pop:
            continue
        if name not in names:
            raise TrialError(f"not a parameter or state of model {cm.model.name!r}"
                             f"{_suggest(name, names)}", section="population.parameters", item=name)
        v = pop[name].values
        if not np.issubdtype(v.dtype, np.number):
            raise TrialError("a categorical variable cannot set a model parameter directly; "
                             "put it under [population.covariates] and use [map]",
                             section="population.parameters", item=name)
        cols[name] = v.astype(float)
    for src, rule in spec["map"].items():
        if src not in pop:
            raise TrialError(f"no sampled variable of that name{_suggest(src, list(pop.data_vars))}",
                             section="map", item=src)
        if isinstance(rule, str):
            rule = {"parameter": rule}
        if not isinstance(rule, Mapping):
            raise TrialError("expected a parameter name or a table", section="map", item=src)
        if "categories" in rule:
            v = pop[src].values.astype(str)
            for cat, par in dict(rule["categories"]).items():
                if par not in names:
                    raise TrialError(f"{par!r} is not a model parameter{_suggest(par, names)}",
                                     section="map", item=src)
                cols[par] = np.maximum(cols.get(par, np.zeros(v.size)), (v == str(cat)).astype(float))
            continue
        par = rule.get("parameter")
        if par not in names:
            raise TrialError(f"{par!r} is not a model parameter{_suggest(str(par), names)}",
                             section="map", item=src)
        v = pop[src].values
        if not np.issubdtype(v.dtype, np.number):
            raise TrialError("a categorical variable needs 'categories'", section="map", item=src)
        cols[par] = v.astype(float) * float(rule.get("scale", 1.0)) + float(rule.get("offset", 0.0))
    return cols


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return repr(o)


# --------------------------------------------------------------------------- run
def run_trial(spec_or_path, n: int | None = None, seed: int | None = None, n_jobs: int = 1,
              progress: bool = False, *, model=None, regimen=None) -> xr.Dataset:
    """Simulate and classify one virtual trial arm.

    Parameters
    ----------
    spec_or_path : trial TOML file or mapping (see the module docstring).
    n, seed : override ``[trial] n`` / ``seed``; ``seed=None`` and none in the file draws
        one and records it (``ds.attrs["seed"]``).
    n_jobs, progress : passed to :func:`~immunoode.population.simulate_population`.
    model, regimen : optional objects replacing the file's ``model`` / ``regimen``
        (a :class:`~immunoode.model.Model` or compiled model; a Regimen or ``"none"``).

    Returns
    -------
    Dataset (``patient``, ``lesion``, ``scan``, ``site``); see the module docstring.
    """
    from .population import simulate_population
    from .response import assess_response
    from .sampling import sample_population
    from .trialstats import summarize

    spec = load_trial(spec_or_path)
    tr, sc = spec["trial"], spec["scans"]
    base = Path(spec["_base"])
    if n is not None:
        tr["n"] = n
    if seed is not None:
        tr["seed"] = seed
    N = tr["n"]
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
        raise TrialError(f"n must be a positive integer, got {N!r}", section="trial", item="n")
    if tr["seed"] is None:
        tr["seed"] = int(np.random.SeedSequence().entropy % (2 ** 63))
    seed_ = int(tr["seed"])
    pop_seed, noise_seed = (int(s) for s in np.random.SeedSequence(seed_).generate_state(2, np.uint64) % (2 ** 63))

    cm = _load_model(model if model is not None else tr["model"], base)
    reg = _load_regimen(regimen if regimen is not None else tr["regimen"], base)
    obs = tr["lesion_observable"]
    if obs not in cm.record_names:
        from .model import _suggest
        raise TrialError(f"model {cm.model.name!r} has no record{_suggest(obs, list(cm.record_names))}",
                         section="trial", item="lesion_observable")
    times = scan_times(spec)
    pop = sample_population(spec["population"], int(N), seed=pop_seed, method=tr["method"])
    cols = _simulation_columns(cm, pop, spec)
    sopt = dict(spec["solver"])
    if not cols:  # every patient identical: still one column so the population has a size
        p0 = cm.parameter_names[0]
        cols = {p0: np.full(int(N), float(cm.parameter_vector()[0]))}
    sim = simulate_population(cm, cols, reg, t_eval=times, outputs=[obs], n_jobs=n_jobs,
                              progress=progress, **sopt)
    status = sim["status"].values
    raw_mm = sim[obs].values * _UNIT_TO_MM[tr["diameter_unit"]]
    failed = (status != 0) | ~np.all(np.isfinite(raw_mm), axis=1)
    message = sim["message"].values.astype(str).astype(object)
    for i in np.flatnonzero(failed & (status == 0)):
        message[i] = f"non-finite {obs} in the simulation"
    sizes = np.where(failed[:, None], np.nan, raw_mm)[:, None, :]

    stop = _last_dose(reg, float(times[-1]))
    ropt = dict(spec["response"])
    ds = assess_response(sizes, times, stop_time=stop, is_node=[False], organ=[0],
                         site_names=[str(tr["lesion_site"])], noise_sd_mm=float(sc["noise_sd_mm"]),
                         noise_cv=float(sc["noise_cv"]), seed=noise_seed, **ropt)
    ds = ds.assign_coords(patient=("patient", np.arange(int(N))))
    for k, v in pop.data_vars.items():
        name = k if k not in ds else f"covariate_{k}"
        ds[name] = xr.Variable(("patient",), v.values, attrs={"kind": "sampled"})
    ds["simulated_size"] = xr.Variable(("patient", "scan"), raw_mm,
                                       attrs={"units": "mm", "description": f"{obs} from the model, "
                                              "before measurement noise and the detection limit"})
    ds["status"] = xr.Variable(("patient",), status.astype(np.int64), attrs={"description": "0 = success"})
    ds["failed"] = xr.Variable(("patient",), failed)
    ds["message"] = xr.Variable(("patient",), message)
    ds["evaluable"] = xr.Variable(("patient",), ~failed & ds["measurable"].values,
                                  attrs={"description": "simulated and measurable at baseline"})
    # failed patients: never a response class
    for var, na in (("bor", "NE"), ("sitc", "not_evaluable"), ("pattern", "none")):
        if var in ds:
            ds[var] = ds[var].where(~ds["failed"], na)

    clean = {k: v for k, v in spec.items() if not k.startswith("_")}
    clean["trial"] = dict(clean["trial"], n=int(N), seed=seed_,
                          model=tr["model"] if isinstance(tr["model"], (str, Path)) else cm.model.name,
                          regimen=(tr["regimen"] if isinstance(tr["regimen"], (str, type(None)))
                                   else getattr(tr["regimen"], "name", "regimen")))
    table = summarize(ds)
    ds.attrs.update({
        "title": f"virtual trial arm: {tr['name']}",
        "trial_name": str(tr["name"]),
        "trial_spec": json.dumps(clean, sort_keys=True, default=_json_default),
        "trial_file": spec["_file"] or "",
        "seed": seed_,
        "population_seed": pop_seed,
        "noise_seed": noise_seed,
        "population_method": str(tr["method"]),
        "model_name": sim.attrs["model_name"],
        "model_hash": sim.attrs["model_hash"],
        "model_structure_hash": sim.attrs["model_structure_hash"],
        "regimen": sim.attrs["regimen"],
        "regimen_name": (reg.name or "") if reg is not None else "none",
        "last_dose_day": float("nan") if stop is None else float(stop),
        "solver": sim.attrs["solver"],
        "lesion_observable": obs,
        "size_unit": "mm",
        "lesions_per_patient": 1,
        "lesion_note": "one lesion per patient (the model has one tumor compartment)",
        "follow_up_days": float(tr["follow_up"]),
        "scan_days": json.dumps(times.tolist()),
        "n_patients": int(N),
        "n_failed": int(failed.sum()),
        "n_not_measurable": int((~failed & ~ds["measurable"].values).sum()),
        "n_evaluable": int(ds["evaluable"].values.sum()),
        "simulation_wall_time_s": float(sim.attrs["wall_time_s"]),
        "summary": table.reset_index().to_json(orient="records"),
        "immunoode_version": sim.attrs["immunoode_version"],
    })
    return ds


# --------------------------------------------------------------------------- summary
_LABELS = {
    "ORR": "objective response (CR+PR)",
    "DCR": "disease control (CR+PR+SD)",
    "BOR_PD": "best response PD",
    "primary_resistance": "primary resistance (SITC)",
    "secondary_resistance": "secondary resistance (SITC)",
    "progression_after_stop": "progression after stop",
    "durable_benefit": "durable benefit, no PD",
    "oligo_progression": "oligo-progression (of PD)",
    "systemic_progression": "systemic progression (of PD)",
}


def summary_table(ds: xr.Dataset, alpha: float = 0.05) -> str:
    """The arm's summary as text: rates with exact CIs, median PFS, counts."""
    from .trialstats import summarize
    tab = summarize(ds, alpha)
    a = ds.attrs
    conf = int(round(100 * (1 - alpha)))
    lines = [f"virtual trial: {a.get('trial_name', '?')}",
             f"model {a.get('model_name', '?')} (hash {str(a.get('model_hash', ''))[:12]}), "
             f"regimen: {a.get('regimen_name', '?')}, seed {a.get('seed', '?')}",
             f"patients: {a.get('n_patients', ds.sizes['patient'])} simulated, "
             f"{a.get('n_failed', 0)} failed (kept, excluded from rates), "
             f"{a.get('n_not_measurable', 0)} without measurable disease, "
             f"{a.get('n_evaluable', '?')} evaluable",
             f"follow-up {a.get('follow_up_days', float('nan')):g} days, "
             f"{ds.sizes['scan']} scans (incl. baseline); "
             f"{a.get('lesions_per_patient', '?')} lesion per patient",
             "",
             f"{'metric':<32}{'estimate':>9}   {conf}% CI (exact){'':>3}{'k/n':>11}"]
    for k in _LABELS:
        if k not in tab.index:
            continue
        r = tab.loc[k]
        if not r["n"]:
            lines.append(f"{_LABELS[k]:<32}{'–':>9}   {'':<18}{'0/0':>11}")
            continue
        ci = f"{100 * r['lower']:5.1f} – {100 * r['upper']:5.1f}%"
        lines.append(f"{_LABELS[k]:<32}{100 * r['estimate']:8.1f}%   {ci:<18}"
                     f"{int(r['k']):>6}/{int(r['n'])}")
    if "median_PFS" in tab.index:
        r = tab.loc["median_PFS"]

        def f(x):
            return "NR" if not np.isfinite(x) else f"{x / 30.4375:.1f}"
        est = "not reached" if not np.isfinite(r["estimate"]) else f"{f(r['estimate'])} mo"
        ci = f"{f(r['lower'])} – {f(r['upper'])} mo"
        lines.append(f"{'median PFS (Kaplan-Meier)':<32}{est:>9}   {ci:<18}"
                     f"{int(r['k']):>6}/{int(r['n'])} events")
    if "pattern" in ds and "site_progressed" in ds:
        pd_ = ds["pattern"].values != "none"
        if pd_.any():
            sp = ds["site_progressed"].values[pd_]
            shares = ", ".join(f"{s} {100 * sp[:, j].mean():.0f}%" for j, s in enumerate(ds["site"].values))
            lines.append(f"{'sites progressing at first PD':<32}{shares}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def _cmd_trial(args) -> int:
    import sys
    ds = run_trial(args.trial, n=args.n, seed=args.seed, n_jobs=args.jobs,
                   progress=not args.quiet and sys.stderr.isatty())
    print(summary_table(ds))
    if args.out:
        from .io import write_results
        path = Path(args.out)
        if path.suffix.lower() != ".nc":
            raise ImmunoodeError(f"{path}: --out needs a .nc (netCDF) file")
        write_results(ds, path)
        print(f"wrote {path}", file=sys.stderr)
    if args.plots:
        from .plots import save_trial_plots
        files = save_trial_plots(ds, args.plots)
        print(f"plots: {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def add_trial_command(subparsers) -> None:
    """Register ``immunoode trial TRIAL.toml [--n N] [--seed S] [--out arm.nc] [--plots DIR]``."""
    t = subparsers.add_parser("trial", help="simulate a virtual trial arm and print its summary")
    t.add_argument("trial", help="trial file (TOML)")
    t.add_argument("--n", type=int, help="number of patients (overrides the file)")
    t.add_argument("--seed", type=int, help="seed (overrides the file)")
    t.add_argument("--out", help="write the classified arm to this netCDF (.nc) file")
    t.add_argument("--plots", metavar="DIR", help="write waterfall, spider, swimmer and KM plots here")
    t.add_argument("--jobs", type=int, default=1, help="threads for the simulation (default 1)")
    t.add_argument("--quiet", action="store_true", help="no progress on stderr")
    t.set_defaults(func=_cmd_trial)
