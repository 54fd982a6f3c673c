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

Several lesions per patient (``[lesions]``, :mod:`immunoode.lesions`): the model is
transformed into an N-lesion model sharing its systemic compartments; sizes, RECIST
targets, new lesions and the progression pattern are then per lesion and site::

    [lesions]
    local_states = ["Ts", "Tr", "Dead"]       # per-lesion copies
    local_parameters = ["T0", "kp_tumor_pembro"]
    [[lesions.lesion]]
    site = "lung"
    [[lesions.lesion]]
    site = "brain"
    prevalence = 0.25
    factors = { T0 = 1e-4, kp_tumor_pembro = 0.1 }   # a seeded micro-metastasis

Pre-treatment history (``[history]``, :mod:`immunoode.history`): every patient grows
from a seeded tumor in an equilibrated host to its sampled diagnosis size; patients who
never get there (or too fast) are screen failures, kept and marked::

    [history]
    seed_states = { Ts = 0.001, Tr = 0.0, Dead = 0.0 }
    baseline_mm = "baseline_mm"               # a sampled variable (mm) or a number

Large arms stream to disk with ``run_trial(..., out=DIR, chunk=N)`` (resumable; read
back with :func:`open_trial`).
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
           "TrialError", "open_trial"]

_UNIT_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
_SECTIONS = {"trial", "scans", "response", "map", "population", "solver", "lesions", "history"}
_TRIAL_KEYS = {"name", "model", "regimen", "n", "seed", "method", "follow_up",
               "lesion_observable", "diameter_unit", "lesion_site", "description"}
_SCAN_KEYS = {"every", "until", "then_every", "times", "noise_sd_mm", "noise_cv"}
_SOLVER_KEYS = {"method", "rtol", "atol", "max_steps", "chunk_size"}
_LESIONS_KEYS = {"local_states", "local_parameters", "lesion"}
_LESION_KEYS = {"site", "factors", "prevalence", "name"}
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
    les = _check_lesions(data.get("lesions"), file)
    from .history import check_history_spec
    hist = check_history_spec(data.get("history"), file)
    out = {"trial": tr, "scans": sc, "response": resp, "solver": solver, "population": pop,
           "map": mp, "lesions": les, "history": hist, "_base": str(base),
           "_file": str(file) if file else None}
    scan_times(out)  # validates the schedule
    return out


def _check_lesions(les, file) -> dict | None:
    """Validate ``[lesions]``: local_states, local_parameters and [[lesions.lesion]] tables."""
    if les is None:
        return None
    if not isinstance(les, Mapping):
        raise TrialError("[lesions] must be a table", file=file)
    les = dict(les)
    _check_keys(les, _LESIONS_KEYS, "lesions", file)
    for key in ("local_states", "local_parameters"):
        v = les.setdefault(key, [])
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise TrialError(f"{key} must be a list of names", file=file, section="lesions", item=key)
    if not les["local_states"]:
        raise TrialError("local_states must name the lesion-local states (tumor clones, dead "
                         "cells, local immune cells ...)", file=file, section="lesions")
    items = les.get("lesion")
    if not isinstance(items, (list, tuple)) or not items:
        raise TrialError("needs at least one [[lesions.lesion]] table with a 'site'", file=file,
                         section="lesions")
    from .lesions import SITES
    out = []
    for k, it in enumerate(items):
        where = f"lesions.lesion[{k}]"
        if not isinstance(it, Mapping):
            raise TrialError("expected a table", file=file, section=where)
        _check_keys(it, _LESION_KEYS, where, file)
        site = it.get("site")
        if site not in SITES:
            from .model import _suggest
            raise TrialError(f"site must be one of {', '.join(SITES)}, got {site!r}"
                             f"{_suggest(str(site), SITES)}", file=file, section=where, item="site")
        fac = it.get("factors", {})
        if not isinstance(fac, Mapping):
            raise TrialError("factors must be a table parameter = multiplier", file=file,
                             section=where, item="factors")
        for p, f in fac.items():
            if p not in les["local_parameters"]:
                raise TrialError(f"{p!r} is not in local_parameters", file=file, section=where,
                                 item="factors")
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (math.isfinite(f) and f >= 0):
                raise TrialError(f"factor of {p!r} must be a number >= 0, got {f!r}", file=file,
                                 section=where, item="factors")
        prev = it.get("prevalence", 1.0)
        if isinstance(prev, bool) or not isinstance(prev, (int, float)) or not (0.0 <= prev <= 1.0):
            raise TrialError(f"prevalence must be a probability in [0, 1], got {prev!r}", file=file,
                             section=where, item="prevalence")
        out.append({"site": site, "factors": dict(fac), "prevalence": float(prev),
                    "name": str(it.get("name", ""))})
    les["lesion"] = out
    return les


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


def _build_model(value, base: Path, lesions: Mapping | None):
    """Compiled model for the trial; with ``[lesions]`` the multi-lesion transform of it.

    Returns ``(compiled, LesionModel or None)``.
    """
    if lesions is None:
        return _load_model(value, base), None
    from .compile import CompiledModel, compile_model
    from .lesions import Lesion, multi_lesion_model
    from .model import Model
    if isinstance(value, CompiledModel):
        model = value.model
    elif isinstance(value, Model):
        model = value
    else:
        from .sbml import load_any_model
        path = _resolve(value, "model", base)
        if not path.exists():
            raise ImmunoodeError(f"{path}: no such model file")
        model = load_any_model(path)
    les = [Lesion(x["site"], dict(x["factors"]), x["prevalence"], x["name"]) for x in lesions["lesion"]]
    try:
        lm = multi_lesion_model(model, les, local_states=lesions["local_states"],
                                local_parameters=lesions["local_parameters"])
    except ModelError as exc:
        if isinstance(exc, TrialError):
            raise
        raise TrialError(exc.message, section=exc.section or "lesions", item=exc.item) from None
    return compile_model(lm.model), lm


def _absent_lesions_zero(cm, lm, cols: dict, present: np.ndarray) -> dict:
    """Columns with every local state of an absent lesion set to 0 (no tumor there)."""
    from .population import population_table
    P, _, _, _ = population_table(cm, cols)
    Y0 = cm.initial_state(P.T).T
    out = dict(cols)
    for s in lm.local_states:
        for k, nm in enumerate(lm.names(s)):
            v = np.asarray(out[nm], dtype=float) if nm in out else Y0[:, cm.state_names.index(nm)]
            out[nm] = np.where(present[:, k], v, 0.0)
    return out


def _run_history(cm, lm, cols, pop, spec, records, scale, present, n_jobs, progress, sopt):
    """Pre-treatment history of every patient (see :mod:`immunoode.history`)."""
    from .history import simulate_history
    h = spec["history"]
    b = h["baseline_mm"]
    if isinstance(b, str):
        if b not in pop:
            from .model import _suggest
            raise TrialError(f"no sampled variable of that name{_suggest(b, list(pop.data_vars))}",
                             section="history", item="baseline_mm")
        target = pop[b].values.astype(float)
    else:
        target = float(b)
    L = len(records)
    ls = h.get("lesion_seed") or [1.0] * L
    if len(ls) != L:
        raise TrialError(f"lesion_seed has {len(ls)} entries for {L} lesions", section="history",
                         item="lesion_seed")
    seeds = {}
    for st, v in h["seed_states"].items():
        if lm is not None and st in lm.local_states:
            for k, nm in enumerate(lm.names(st)):
                seeds[nm] = float(v) * float(ls[k]) * present[:, k]
        elif st in cm.state_names:
            seeds[st] = float(v)
        else:
            from .model import _suggest
            known = list(lm.local_states) if lm is not None else list(cm.state_names)
            raise TrialError(f"not a (lesion-local) state of the model{_suggest(st, known)}",
                             section="history.seed_states", item=st)
    opts = {k: h[k] for k in ("diagnosis", "equilibrate_days", "max_days", "min_days", "grid_days",
                              "refine_points", "chunk", "window_days")}
    # the history starts from the model's initial state (immune states, PK = 0 before drug)
    return simulate_history(cm, cols, size_records=records, size_scale_mm=scale, target_mm=target,
                            seed_states=seeds, n_jobs=n_jobs, progress=progress, solver=sopt, **opts)


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
            raise TrialError(f"not a parameter or state of model {getattr(cm, 'model', cm).name!r}"
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
              progress: bool = False, *, model=None, regimen=None, out=None,
              chunk: int | None = None, resume: bool = True) -> xr.Dataset:
    """Simulate and classify one virtual trial arm.

    Parameters
    ----------
    spec_or_path : trial TOML file or mapping (see the module docstring).
    n, seed : override ``[trial] n`` / ``seed``; ``seed=None`` and none in the file draws
        one and records it (``ds.attrs["seed"]``).
    n_jobs, progress : passed to :func:`~immunoode.population.simulate_population`.
    model, regimen : optional objects replacing the file's ``model`` / ``regimen``
        (a :class:`~immunoode.model.Model` or compiled model; a Regimen or ``"none"``).
    out : a directory: stream the arm to it, one netCDF file per ``chunk`` patients
        (``part-<first patient>.nc``, complete classified Datasets), so memory stays
        bounded; the returned Dataset then holds only the per-patient variables
        (open everything lazily with :func:`open_trial`).
    chunk : patients per part when streaming (default 2000).
    resume : when streaming, keep parts already written by the same trial (same spec,
        n and seed) and compute only the missing ones.

    Returns
    -------
    Dataset (``patient``, ``lesion``, ``scan``, ``site``); see the module docstring.
    Results do not depend on ``chunk``: every random draw is keyed by patient.
    """
    from .trialstats import summarize

    spec = load_trial(spec_or_path)
    tr = spec["trial"]
    if n is not None:
        tr["n"] = n
    if seed is not None:
        tr["seed"] = seed
    N = tr["n"]
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
        raise TrialError(f"n must be a positive integer, got {N!r}", section="trial", item="n")
    if tr["seed"] is None:
        tr["seed"] = int(np.random.SeedSequence().entropy % (2 ** 63))
    ctx = _prepare(spec, int(N), model, regimen)
    clean = {k: v for k, v in spec.items() if not k.startswith("_")}
    clean["trial"] = dict(clean["trial"], n=int(N), seed=ctx.seed,
                          model=tr["model"] if isinstance(tr["model"], (str, Path)) else ctx.cm.model.name,
                          regimen=(tr["regimen"] if isinstance(tr["regimen"], (str, type(None)))
                                   else getattr(tr["regimen"], "name", "regimen")))
    spec_json = json.dumps(clean, sort_keys=True, default=_json_default)
    if out is None:
        ds, info = _arm_part(ctx, np.arange(int(N)), n_jobs, progress)
    else:
        ds, info = _stream_arm(ctx, Path(out), int(chunk or 2000), spec_json, resume, n_jobs,
                               progress)
    failed, enrolled = ds["failed"].values, ds["enrolled"].values
    screen = ds["screen_status"].values.astype(str)
    table = summarize(ds)
    ds.attrs.update({
        "title": f"virtual trial arm: {tr['name']}",
        "trial_name": str(tr["name"]),
        "trial_spec": spec_json,
        "trial_file": spec["_file"] or "",
        "seed": ctx.seed,
        "population_seed": ctx.pop_seed,
        "noise_seed": ctx.noise_seed,
        "lesion_seed": ctx.lesion_seed,
        "population_method": str(tr["method"]),
        "model_name": info["sim_attrs"]["model_name"],
        "model_hash": info["sim_attrs"]["model_hash"],
        "model_structure_hash": info["sim_attrs"]["model_structure_hash"],
        "regimen": info["sim_attrs"]["regimen"],
        "regimen_name": (ctx.reg.name or "") if ctx.reg is not None else "none",
        "last_dose_day": float("nan") if ctx.stop is None else float(ctx.stop),
        "solver": info["sim_attrs"]["solver"],
        "rtol": info["sim_attrs"].get("rtol", float("nan")),
        "lesion_observable": ctx.obs,
        "size_unit": "mm",
        "noise_sd_mm": float(spec["scans"]["noise_sd_mm"]),
        "noise_cv": float(spec["scans"]["noise_cv"]),
        "lesions_per_patient": len(ctx.records),
        "lesion_sites": json.dumps(ctx.lm.sites if ctx.lm is not None else [str(tr["lesion_site"])]),
        "lesion_note": ("one lesion per patient (the model has one tumor compartment)" if ctx.lm is None
                        else f"{len(ctx.records)} lesion compartments sharing the systemic "
                             "compartments; absent lesions (prevalence) have no tumor"),
        "follow_up_days": float(tr["follow_up"]),
        "scan_days": json.dumps(ctx.times.tolist()),
        "n_patients": int(N),
        "n_failed": int(failed.sum()),
        "n_screened": int(N),
        "n_enrolled": int(enrolled.sum()),
        "n_screen_failures": int((~enrolled).sum()),
        "screen_failure_share": float(np.mean(~enrolled)),
        "screen_failures": json.dumps({str(k): int(v) for k, v in
                                       zip(*np.unique(screen[~enrolled], return_counts=True))}),
        "n_not_measurable": int((enrolled & ~failed & ~ds["measurable"].values).sum()),
        "n_evaluable": int(ds["evaluable"].values.sum()),
        "simulation_wall_time_s": float(info["wall"]),
        "history_wall_time_s": float(info.get("history_wall", 0.0)),
        "summary": table.reset_index().to_json(orient="records"),
        "immunoode_version": info["sim_attrs"]["immunoode_version"],
    })
    if out is not None:
        ds.attrs["store"] = str(out)
        ds.attrs["n_parts"] = int(info["n_parts"])
        ds.attrs["n_parts_resumed"] = int(info["n_resumed"])
        ds.attrs["interrupted"] = int(info.get("interrupted", 0))
    return ds


class _Ctx:
    """Everything the per-chunk work needs (built once per arm)."""


def _prepare(spec, N: int, model, regimen) -> _Ctx:
    from .sampling import sample_population
    tr = spec["trial"]
    base = Path(spec["_base"])
    c = _Ctx()
    c.spec, c.N = spec, N
    c.seed = int(tr["seed"])
    seeds = np.random.SeedSequence(c.seed).generate_state(3, np.uint64) % (2 ** 63)
    c.pop_seed, c.noise_seed, c.lesion_seed = (int(x) for x in seeds)
    c.cm, c.lm = _build_model(model if model is not None else tr["model"], base, spec["lesions"])
    c.reg = _load_regimen(regimen if regimen is not None else tr["regimen"], base)
    c.obs = obs = tr["lesion_observable"]
    names_model = c.lm.base if c.lm is not None else c.cm
    base_records = (list(c.lm.base.states) + list(c.lm.base.assignments) + list(c.lm.base.observables)
                    if c.lm is not None else list(c.cm.record_names))
    if obs not in base_records:
        from .model import _suggest
        raise TrialError(f"model {names_model.name!r} has no record{_suggest(obs, base_records)}",
                         section="trial", item="lesion_observable")
    if c.lm is not None and not c.lm.is_local(obs):
        raise TrialError(f"{obs!r} does not depend on any lesion-local state or parameter, so it "
                         "cannot measure a lesion", section="trial", item="lesion_observable")
    c.records = c.lm.names(obs) if c.lm is not None else [obs]
    L = len(c.records)
    c.times = scan_times(spec)
    c.pop = sample_population(spec["population"], N, seed=c.pop_seed, method=tr["method"])
    cols = _simulation_columns(names_model, c.pop, spec)
    if c.lm is not None:
        cols = c.lm.expand_columns(cols)
    if not cols:  # every patient identical: still one column so the population has a size
        p0 = c.cm.parameter_names[0]
        cols = {p0: np.full(N, float(c.cm.parameter_vector()[0]))}
    c.present = np.ones((N, L), bool)
    if c.lm is not None:
        c.present = c.lm.draw_presence(N, c.lesion_seed)
        if not c.present.all():
            cols = _absent_lesions_zero(c.cm, c.lm, cols, c.present)
    c.cols = cols
    c.scale = _UNIT_TO_MM[tr["diameter_unit"]]
    c.sopt = dict(spec["solver"])
    c.stop = _last_dose(c.reg, float(c.times[-1]))
    if c.lm is not None:
        from .lesions import SITES, site_index
        c.lesion_kw = dict(is_node=[les.is_node for les in c.lm.lesions],
                           organ=[site_index(les.site) for les in c.lm.lesions], site_names=list(SITES))
    else:
        c.lesion_kw = dict(is_node=[False], organ=[0], site_names=[str(tr["lesion_site"])])
    if spec["history"] is not None and isinstance(spec["history"]["baseline_mm"], str):
        b = spec["history"]["baseline_mm"]
        if b not in c.pop:
            from .model import _suggest
            raise TrialError(f"no sampled variable of that name{_suggest(b, list(c.pop.data_vars))}",
                             section="history", item="baseline_mm")
    return c


def _measurement_noise(raw, patients, seed: int, sd: float, cv: float):
    """Measured sizes: ``raw (1 + cv e1) + sd e2`` on present lesions, >= 0.

    One random stream per patient (``SeedSequence([seed, patient])``), so the noise of a
    patient does not depend on which chunk it was simulated in.
    """
    if not (sd or cv):
        return raw
    out = raw.copy()
    present = np.nan_to_num(raw, nan=0.0) > 0
    for j, p in enumerate(patients):
        e = np.random.default_rng([int(seed), int(p)]).standard_normal((2,) + raw.shape[1:])
        out[j] = np.where(present[j], np.clip(raw[j] * (1.0 + cv * e[0]) + sd * e[1], 0.0, None),
                          raw[j])
    return out


def _arm_part(c: _Ctx, ix: np.ndarray, n_jobs: int, progress: bool):
    """Simulate and classify the patients ``ix`` of the arm; returns (Dataset, info)."""
    from .population import simulate_population
    from .response import assess_response
    spec, tr, sc = c.spec, c.spec["trial"], c.spec["scans"]
    n, L, S = ix.size, len(c.records), c.times.size
    cols = {k: np.asarray(v)[ix] for k, v in c.cols.items()}
    present = c.present[ix]
    hist = None
    enrolled = np.ones(n, bool)
    t_hist = 0.0
    if spec["history"] is not None:
        import time
        t_hist = time.perf_counter()
        hist = _run_history(c.cm, c.lm, cols, c.pop.isel(patient=ix), spec, c.records, c.scale,
                            present, n_jobs, progress, c.sopt)
        t_hist = time.perf_counter() - t_hist
        enrolled = hist.is_patient
        for st, v in hist.state.items():
            cols[st] = v
    idx = np.flatnonzero(enrolled)
    raw_mm = np.full((n, L, S), np.nan)
    status = np.zeros(n, np.int64)
    message = np.full(n, "", dtype=object)
    wall, interrupted = 0.0, False
    if idx.size:
        sub = {k: np.asarray(v)[idx] for k, v in cols.items()}
        sim = simulate_population(c.cm, sub, c.reg, t_eval=c.times, outputs=c.records,
                                  n_jobs=n_jobs, progress=progress, **c.sopt)
        sim_attrs = sim.attrs
        interrupted = bool(sim.attrs.get("interrupted", 0))
        wall = float(sim.attrs["wall_time_s"])
        status[idx] = sim["status"].values
        message[idx] = sim["message"].values.astype(str)
        raw_mm[idx] = np.stack([sim[r].values for r in c.records], axis=1) * c.scale
    else:
        sim_attrs = simulate_population(c.cm, {k: np.asarray(v)[:1] for k, v in cols.items()}, None,
                                        t_eval=c.times[:2], outputs=c.records[:1]).attrs
    raw_mm = np.where(present[:, :, None], raw_mm, np.nan)
    failed = enrolled & ((status != 0) | ~np.all(np.isfinite(raw_mm) | ~present[:, :, None], axis=(1, 2)))
    for i in np.flatnonzero(failed & (status == 0)):
        message[i] = f"non-finite {c.obs} in the simulation"
    screen = np.full(n, "patient", dtype=object) if hist is None else hist.status.astype(object)
    for i in np.flatnonzero(~enrolled):
        message[i] = f"not a patient ({hist.status[i]}): {hist.message[i]}"
        status[i] = -20
    sizes = np.where(failed[:, None, None] | ~enrolled[:, None, None], np.nan, raw_mm)
    sizes = _measurement_noise(sizes, ix, c.noise_seed, float(sc["noise_sd_mm"]), float(sc["noise_cv"]))

    ds = assess_response(sizes, c.times, stop_time=c.stop, **c.lesion_kw, **dict(spec["response"]))
    ds = ds.assign_coords(patient=("patient", ix))
    if c.lm is not None:
        ds = ds.assign_coords(lesion=("lesion", c.lm.lesion_names),
                              lesion_site=("lesion", c.lm.sites))
        ds["lesion_present"] = xr.Variable(("patient", "lesion"), present,
                                           attrs={"description": "the patient has this lesion "
                                                  "(drawn from its prevalence)"})
    for k, v in c.pop.data_vars.items():
        name = k if k not in ds else f"covariate_{k}"
        ds[name] = xr.Variable(("patient",), v.values[ix], attrs={"kind": "sampled"})
    sim_size = raw_mm if c.lm is not None else raw_mm[:, 0, :]
    sim_dims = ("patient", "lesion", "scan") if c.lm is not None else ("patient", "scan")
    ds["simulated_size"] = xr.Variable(sim_dims, sim_size,
                                       attrs={"units": "mm", "description": f"{c.obs} from the model, "
                                              "before measurement noise and the detection limit"})
    ds["status"] = xr.Variable(("patient",), status.astype(np.int64),
                               attrs={"description": "0 = success, -20 = not a patient (history)"})
    ds["failed"] = xr.Variable(("patient",), failed)
    ds["message"] = xr.Variable(("patient",), message.astype(str).astype(object))
    ds["screen_status"] = xr.Variable(("patient",), screen.astype(str),
                                      attrs={"description": "pre-treatment history: patient or "
                                             "the reason for a screen failure"})
    ds["enrolled"] = xr.Variable(("patient",), enrolled)
    if hist is not None:
        ds["t_diagnosis"] = xr.Variable(("patient",), hist.t_diagnosis,
                                        attrs={"units": "day", "description": "time from tumor "
                                               "seeding to diagnosis size"})
        ds["diagnosis_size"] = xr.Variable(("patient",), hist.size_mm,
                                           attrs={"units": "mm", "description": "diagnosis size "
                                                  "reached (largest size for non-patients)"})
    ds["evaluable"] = xr.Variable(("patient",), enrolled & ~failed & ds["measurable"].values,
                                  attrs={"description": "simulated and measurable at baseline"})
    ds["measurable"] = ds["measurable"] & ds["evaluable"]
    # failed patients: never a response class
    for var, na in (("bor", "NE"), ("sitc", "not_evaluable"), ("pattern", "none")):
        if var in ds:
            ds[var] = ds[var].where(~ds["failed"], na)
    ds.attrs["noise_sd_mm"] = float(sc["noise_sd_mm"])
    ds.attrs["noise_cv"] = float(sc["noise_cv"])
    return ds, {"sim_attrs": dict(sim_attrs), "wall": wall, "interrupted": interrupted,
                "history_wall": t_hist}


def _per_patient(ds: xr.Dataset) -> xr.Dataset:
    """Only the variables over ``patient`` (and ``site``): what the summary needs."""
    keep = [k for k, v in ds.data_vars.items() if v.dims in (("patient",), ("patient", "site"))]
    out = ds[keep]
    drop = [c for c in out.coords if c not in ("patient", "site")]
    return out.drop_vars(drop)


def _stream_arm(c: _Ctx, out: Path, chunk: int, spec_json: str, resume: bool, n_jobs: int,
                progress: bool):
    """Run the arm chunk by chunk, writing ``out/part-<first>.nc``; return per-patient data."""
    import hashlib
    import sys
    import time
    if chunk < 1:
        raise TrialError(f"chunk must be a positive number of patients, got {chunk!r}")
    if out.suffix.lower() == ".nc":
        raise TrialError(f"{out}: streaming writes a directory of parts; give a directory name")
    out.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(spec_json.encode()).hexdigest()
    parts, info = [], {"wall": 0.0, "n_parts": 0, "n_resumed": 0, "sim_attrs": None}
    t0 = time.perf_counter()
    starts = range(0, c.N, chunk)
    for i, a in enumerate(starts):
        ix = np.arange(a, min(c.N, a + chunk))
        path = out / f"part-{a:09d}.nc"
        if resume and path.exists():
            try:
                with xr.open_dataset(path) as old:
                    same = (old.attrs.get("trial_key") == key and old.sizes["patient"] == ix.size
                            and int(old["patient"].values[0]) == a)
                    if same:
                        parts.append(_per_patient(old).load())
                        info["n_parts"] += 1
                        info["n_resumed"] += 1
                        info["sim_attrs"] = info["sim_attrs"] or json.loads(old.attrs["sim_attrs"])
                        continue
            except (OSError, ValueError, KeyError):
                pass  # unreadable or foreign part: compute it again
        try:
            ds, pinfo = _arm_part(c, ix, n_jobs, False)
        except KeyboardInterrupt:
            info["interrupted"] = 1
            break
        if pinfo["interrupted"]:
            info["interrupted"] = 1
            break
        info["wall"] += pinfo["wall"]
        info["history_wall"] = info.get("history_wall", 0.0) + pinfo["history_wall"]
        info["sim_attrs"] = info["sim_attrs"] or pinfo["sim_attrs"]
        ds.attrs["trial_key"] = key
        ds.attrs["sim_attrs"] = json.dumps(pinfo["sim_attrs"], default=_json_default)
        from .io import write_results
        tmp = out / f".writing-{a:09d}.nc"      # never matched by part-*.nc
        write_results(ds, tmp)
        tmp.replace(path)
        parts.append(_per_patient(ds))
        info["n_parts"] += 1
        del ds
        if progress:
            el = time.perf_counter() - t0
            done = int(ix[-1]) + 1
            sys.stderr.write(f"\r{done}/{c.N} patients written ({i + 1} parts)  {el:,.0f} s   ")
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    if info.get("interrupted"):
        sys.stderr.write(f"interrupted: {len(parts)} parts kept in {out}; run again to resume\n")
    if not parts:
        raise KeyboardInterrupt
    ds = xr.concat(parts, dim="patient")
    if info["sim_attrs"] is None:
        info["sim_attrs"] = {}
    return ds, info


def open_trial(path) -> xr.Dataset:
    """Open a streamed arm (a directory of parts) lazily as one Dataset over ``patient``."""
    path = Path(path)
    files = sorted(path.glob("part-*.nc"))
    if not files:
        raise ImmunoodeError(f"{path}: no trial parts (part-*.nc) here")
    return xr.open_mfdataset(files, combine="nested", concat_dim="patient", data_vars="minimal",
                             coords="minimal", compat="override", join="override")


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


def summary_table(ds: xr.Dataset, alpha: float = 0.05, *, bootstrap_n: int | None = None,
                  n_boot: int = 1000, seed: int | None = None) -> str:
    """The arm's summary as text: rates with exact CIs, median PFS, counts.

    ``bootstrap_n``: also show, per metric, the ``1 - alpha`` percentile interval over
    ``n_boot`` virtual trials of ``bootstrap_n`` evaluable patients drawn from the arm
    without replacement (:func:`~immunoode.trialstats.bootstrap_summary`, seeded by
    ``seed``, default the arm's seed): the spread a real trial of that size would show.
    """
    from .trialstats import bootstrap_summary, summarize
    tab = summarize(ds, alpha)
    a = ds.attrs
    conf = int(round(100 * (1 - alpha)))
    n_les = a.get('lesions_per_patient', '?')
    lines = [f"virtual trial: {a.get('trial_name', '?')}",
             f"model {a.get('model_name', '?')} (hash {str(a.get('model_hash', ''))[:12]}), "
             f"regimen: {a.get('regimen_name', '?')}, seed {a.get('seed', '?')}"]
    if int(a.get("n_screen_failures", 0)):
        why = json.loads(a.get("screen_failures", "{}"))
        lines.append(f"screened {a.get('n_screened')}: {a.get('n_enrolled')} enrolled, "
                     f"{a.get('n_screen_failures')} screen failures "
                     f"({100 * float(a.get('screen_failure_share', 0)):.1f}%: "
                     + ", ".join(f"{k} {v}" for k, v in why.items()) + ")")
    lines += [f"patients: {a.get('n_enrolled', a.get('n_patients', ds.sizes['patient']))} simulated, "
              f"{a.get('n_failed', 0)} failed (kept, excluded from rates), "
              f"{a.get('n_not_measurable', 0)} without measurable disease, "
              f"{a.get('n_evaluable', '?')} evaluable",
              f"follow-up {a.get('follow_up_days', float('nan')):g} days, "
              f"{ds.sizes.get('scan') or len(json.loads(a.get('scan_days', '[]')))} scans (incl. baseline); "
              f"{n_les} lesion{'s' if n_les != 1 else ''} per patient"
              + (f" ({', '.join(json.loads(a['lesion_sites']))})" if n_les != 1 and "lesion_sites" in a
                 else "")]
    boot = None
    if bootstrap_n is not None:
        bseed = int(a.get("seed", 0)) if seed is None else seed
        boot = bootstrap_summary(ds, int(bootstrap_n), n_boot=int(n_boot), seed=bseed, alpha=alpha)
    lines += ["",
             f"{'metric':<32}{'estimate':>9}   {conf}% CI (exact){'':>3}{'k/n':>11}"
             + (f"   {conf}% range, trials of n={int(bootstrap_n)}" if boot is not None else "")]
    for k in _LABELS:
        if k not in tab.index:
            continue
        r = tab.loc[k]
        if not r["n"]:
            lines.append(f"{_LABELS[k]:<32}{'–':>9}   {'':<18}{'0/0':>11}")
            continue
        ci = f"{100 * r['lower']:5.1f} – {100 * r['upper']:5.1f}%"
        bt = ""
        if boot is not None and k in boot.index and np.isfinite(boot.loc[k, "lower"]):
            bt = f"   {100 * boot.loc[k, 'lower']:5.1f} – {100 * boot.loc[k, 'upper']:5.1f}%"
        lines.append(f"{_LABELS[k]:<32}{100 * r['estimate']:8.1f}%   {ci:<18}"
                     f"{int(r['k']):>6}/{int(r['n'])}{bt}")
    if "median_PFS" in tab.index:
        r = tab.loc["median_PFS"]

        def f(x):
            return "NR" if not np.isfinite(x) else f"{x / 30.4375:.1f}"
        est = "not reached" if not np.isfinite(r["estimate"]) else f"{f(r['estimate'])} mo"
        ci = f"{f(r['lower'])} – {f(r['upper'])} mo"
        bt = ""
        if boot is not None and "median_PFS" in boot.index:
            bt = f"   {f(boot.loc['median_PFS', 'lower'])} – {f(boot.loc['median_PFS', 'upper'])} mo"
        lines.append(f"{'median PFS (Kaplan-Meier)':<32}{est:>9}   {ci:<18}"
                     f"{int(r['k']):>6}/{int(r['n'])} events{bt}")
    if "pattern" in ds and "site_progressed" in ds:
        pd_ = ds["pattern"].values != "none"
        if pd_.any():
            sp = ds["site_progressed"].values[pd_]
            used = set(json.loads(a.get("lesion_sites", "[]"))) or set(ds["site"].values.tolist())
            shares = ", ".join(f"{s} {100 * sp[:, j].mean():.0f}%" for j, s in enumerate(ds["site"].values)
                               if s in used)
            lines.append(f"{'sites progressing at first PD':<32}{shares}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def _cmd_trial(args) -> int:
    import sys
    ds = run_trial(args.trial, n=args.n, seed=args.seed, n_jobs=args.jobs,
                   progress=not args.quiet and sys.stderr.isatty(), out=args.stream,
                   chunk=args.chunk)
    print(summary_table(ds, bootstrap_n=args.bootstrap, n_boot=args.n_boot))
    if args.out:
        from .io import write_results
        path = Path(args.out)
        if path.suffix.lower() != ".nc":
            raise ImmunoodeError(f"{path}: --out needs a .nc (netCDF) file")
        write_results(ds, path)
        print(f"wrote {path}", file=sys.stderr)
    if args.plots:
        from .plots import save_trial_plots
        if args.stream:
            full = open_trial(args.stream)
            full.attrs.update(ds.attrs)
            files = save_trial_plots(full, args.plots)
            full.close()
        else:
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
    t.add_argument("--stream", metavar="DIR",
                   help="write the arm to DIR chunk by chunk (netCDF parts; bounded memory, resumable)")
    t.add_argument("--chunk", type=int, default=2000, help="patients per part with --stream")
    t.add_argument("--bootstrap", type=int, metavar="N",
                   help="also show the spread of trials of N patients drawn from the arm")
    t.add_argument("--n-boot", type=int, default=1000, help="bootstrap trials (default 1000)")
    t.add_argument("--jobs", type=int, default=1, help="threads for the simulation (default 1)")
    t.add_argument("--quiet", action="store_true", help="no progress on stderr")
    t.set_defaults(func=_cmd_trial)
