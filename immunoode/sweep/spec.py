"""Stage 7 — scenarios.  Consumes a sweep file (TOML) or the same mapping; produces a
validated :class:`SweepSpec` and its list of :class:`Scenario` (one regimen / policy /
subgroup each, all applied to the same virtual population).

A sweep file::

    [sweep]
    name = "interval x duration"
    model = "nsclc_io"                  # model file or built-in name
    parameters = "fit.toml"             # optional: [parameters] name = value (fitted set)
    trial = "nsclc_1l_pembrolizumab"    # population, scans, [map], [response], [solver]
    n = 200                             # virtual patients (the same for every scenario)
    seed = 1
    block = 50                          # patients per chunk (unit of work and of resume)
    design = "grid"                     # grid | one_at_a_time | sampled
    n_scenarios = 8                     # sampled design only

    [treatments.pembrolizumab]          # every drug a factor or policy may name
    regimen = "nsclc_pembrolizumab_200mg_q3w"
    class = "ICI"                       # ICI | ICI+ICI | chemo | TKI | anti-angiogenic

    [base]                              # factor values shared by every scenario
    first_line = "pembrolizumab"

    [factors]                           # the values each factor takes
    interval = [21, 42]
    duration = [365, 730]

Several lesions per patient: a ``[lesions]`` table (as in a trial file; inline or from the
trial) makes the model a multi-lesion model (:mod:`immunoode.lesions`); radiotherapy then
acts on single lesions (``rt_lesion``, the policy's progressing lesions) and ``[resection]
states`` lists what a resection sets to 0.  ``[population_effects] PARAM = {COVARIATE =
beta}`` multiplies a sampled parameter by ``exp(beta * covariate)`` per patient.

Factors (and their defaults) are listed in :data:`FACTORS`.  Everything is checked before
any work: an unknown factor, an empty list, an unknown treatment, regimen, policy or
subgroup raises :class:`SweepError` naming the file and the item.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ImmunoodeError, ModelError, did_you_mean
from ..radiobiology import check_lq_parameters

__all__ = ["SweepError", "SweepSpec", "Scenario", "FACTORS", "load_sweep", "build_scenarios",
           "TREATMENT_CLASSES"]


class SweepError(ModelError):
    """A sweep file is invalid (the message names the file, section and item)."""


#: factor name -> (default, kind, description)
FACTORS: dict[str, tuple[Any, str, str]] = {
    "first_line": (None, "treatment", "treatment given first (a [treatments] name)"),
    "dose": (None, "positive", "[regimen unit] amount per administration of the first-line doses"),
    "dose_scale": (1.0, "positive", "[1] multiplier of every first-line dose amount"),
    "interval": (None, "positive", "[day] interval between first-line administrations"),
    "start_day": (0.0, "nonneg", "[day] day of the first first-line administration"),
    "duration": (None, "positive", "[day] first-line treatment duration (last dose before start + duration)"),
    "added_drug": ("none", "treatment_or_none", "treatment added to the first line, or 'none'"),
    "sequence": ("concurrent", ("concurrent", "first_line_first", "added_first"),
                 "order of first line and added drug"),
    "rt_fractions": (0, "count", "[1] number of radiotherapy fractions (0 = none)"),
    "rt_dose_gy": (8.0, "positive", "[Gy] radiotherapy dose per fraction"),
    "rt_day": (0.0, "real", "[day] first fraction, relative to the first-line start"),
    "rt_every": (1.0, "positive", "[day] days between fractions"),
    "rt_lesion": (1, "lesion", "[1] lesion (1-based, 1 = index lesion) that the rt_* radiotherapy irradiates"),
    "subgroup": ("all", "subgroup", "population subgroup ('all' or a [subgroups] name)"),
    "policy": ("none", "policy", "adaptive policy ('none', a built-in or a [policies] name)"),
}

TREATMENT_CLASSES = ("ICI", "ICI+ICI", "chemo", "TKI", "anti-angiogenic", "ICI+chemo",
                     "ICI+ICI+chemo", "ICI+TKI", "ICI+anti-angiogenic")
_SWEEP_KEYS = {"name", "model", "parameters", "trial", "n", "seed", "block", "design",
               "n_scenarios", "reference", "description", "follow_up", "objective",
               "lesion_observable", "diameter_unit", "method", "population_file",
               "population_arm"}
_SECTIONS = {"sweep", "treatments", "base", "factors", "radiotherapy", "toxicity", "policies",
             "subgroups", "population", "scans", "map", "response", "solver", "gsa", "optimize",
             "lesions", "resection", "population_effects"}
_DESIGNS = ("grid", "one_at_a_time", "sampled", "gsa", "optimize")


def _suggest(name, options) -> str:
    return did_you_mean(name, options, cutoff=0.5)


@dataclass(frozen=True)
class Scenario:
    """One scenario: a full set of factor values.

    Attributes
    ----------
    index : position in the sweep (0-based).
    name : short label built from the factors that differ from the base.
    factors : every factor of :data:`FACTORS` with its value.
    """

    index: int
    name: str
    factors: Mapping[str, Any]


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file.

    Attributes
    ----------
    data : the normalised sweep (JSON-able; relative paths resolved to absolute).
    file : the sweep file, or None for a mapping.
    scenarios : the design's scenarios (empty for ``gsa`` / ``optimize``).
    """

    data: Mapping[str, Any]
    file: str | None
    scenarios: tuple[Scenario, ...] = field(default=())

    @property
    def name(self) -> str:
        return str(self.data["sweep"]["name"])

    def fingerprint(self) -> str:
        """Content hash of everything that determines the results (resume key)."""
        text = json.dumps([self.data, [dict(sc.factors) for sc in self.scenarios]], sort_keys=True,
                          default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- loading
def _read(spec_or_path) -> tuple[dict, str | None, Path]:
    if isinstance(spec_or_path, (str, Path)):
        file = Path(spec_or_path)
        if not file.exists():
            raise SweepError("no such sweep file", file=file)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SweepError(f"invalid TOML: {exc}", file=file) from None
        return data, str(file), file.resolve().parent
    if isinstance(spec_or_path, Mapping):
        data = copy.deepcopy(dict(spec_or_path))
        base = Path(data.pop("_base", Path.cwd()))
        return data, None, base
    raise TypeError("load_sweep needs a sweep file path or a mapping")


def _resolve_file(value: str, base: Path, kind: str, file, section, item) -> str:
    from ..cli import builtin_dir
    p = Path(value)
    if p.is_absolute() and p.exists():
        return str(p)
    if (base / p).exists():
        return str((base / p).resolve())
    folder = {"model": builtin_dir(), "regimen": builtin_dir() / "regimens",
              "trial": builtin_dir() / "trials"}.get(kind)
    if folder is not None and (folder / f"{value}.toml").exists():
        return str(folder / f"{value}.toml")
    known = sorted(f.stem for f in folder.glob("*.toml")) if folder is not None else []
    raise SweepError(f"no such {kind} file or built-in {kind} {value!r}{_suggest(value, known)}",
                     file=file, section=section, item=item)


def _check_keys(d: Mapping, allowed, file, section) -> None:
    for k in d:
        if k not in allowed:
            raise SweepError(f"unknown key{_suggest(k, sorted(allowed))}", file=file,
                             section=section, item=k)


def _load_parameters(path: str, file) -> dict[str, float]:
    """A parameter file: ``[parameters] name = value`` (or ``{ value = ... }``).

    A calibration result (``immunoode fit``: one table per estimate with ``kind``) gives
    its ``kind = "mechanistic"`` values; ``kind = "population"`` estimates (medians, CVs of
    the patient distributions) belong to a ``[population]`` and are skipped.
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SweepError(f"cannot read parameter file {path}: {exc}", file=file, section="sweep",
                         item="parameters") from None
    table = data.get("parameters", data)
    out = {}
    for k, v in table.items():
        if isinstance(v, Mapping):
            if v.get("kind", "mechanistic") != "mechanistic":
                continue
            v = v.get("value")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SweepError(f"parameter value must be a finite number, got {v!r}",
                             file=path, section="parameters", item=k)
        out[str(k)] = float(v)
    return out


def load_sweep(spec_or_path, *, policies: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file (or mapping) and expand its design.

    Parameters
    ----------
    spec_or_path : sweep TOML file or the same mapping (``_base`` = folder for relative paths).
    policies : extra policies given as Python objects (``name -> AbstractPolicy`` or
        callable); they may be named by the ``policy`` factor.

    Raises
    ------
    SweepError
        Unknown section, key or factor; empty factor list; unknown treatment, regimen,
        policy or subgroup; a model that lacks a dose target.  Raised before any work.
    """
    data, file, base = _read(spec_or_path)
    _check_keys(data, _SECTIONS, file, "(top level)")
    sw = dict(data.get("sweep", {}))
    _check_keys(sw, _SWEEP_KEYS, file, "sweep")
    for req in ("model",):
        if req not in sw:
            raise SweepError(f"missing {req!r}", file=file, section="sweep", item=req)
    sw.setdefault("name", Path(file).stem if file else "sweep")
    sw["model"] = _resolve_file(str(sw["model"]), base, "model", file, "sweep", "model")
    if "trial" in sw:
        sw["trial"] = _resolve_file(str(sw["trial"]), base, "trial", file, "sweep", "trial")
    elif "population" not in data:
        raise SweepError("give 'trial' (a trial file: population, scans, map) or an inline "
                         "[population] section", file=file, section="sweep", item="trial")
    if "parameters" in sw:
        sw["parameters"] = _resolve_file(str(sw["parameters"]), base, "parameter", file, "sweep",
                                         "parameters")
        sw["parameter_values"] = _load_parameters(sw["parameters"], file)
    else:
        sw["parameter_values"] = {}
    for key, default in (("n", 100), ("seed", 0), ("block", 50)):
        v = sw.setdefault(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1):
            raise SweepError(f"must be a {'non-negative' if key == 'seed' else 'positive'} integer, "
                             f"got {v!r}", file=file, section="sweep", item=key)
    if "objective" in sw:
        from .summary import METRICS
        if sw["objective"] not in METRICS:
            raise SweepError(f"unknown metric {sw['objective']!r}{_suggest(sw['objective'], METRICS)}; "
                             f"choose one of {', '.join(METRICS)}", file=file, section="sweep",
                             item="objective")
    sw.setdefault("design", "grid")
    if sw["design"] not in _DESIGNS:
        raise SweepError(f"unknown design {sw['design']!r}; choose one of {', '.join(_DESIGNS)}",
                         file=file, section="sweep", item="design")

    # trial file supplies population / scans / map / response / solver; inline sections win
    from ..trial import TrialError, load_trial
    tdata = tomllib.loads(Path(sw["trial"]).read_text(encoding="utf-8")) if "trial" in sw else {}
    for sec in ("population", "scans", "map", "response", "solver", "lesions"):
        if sec in data:
            tdata[sec] = copy.deepcopy(data[sec])
    if "population_file" in sw:
        _merge_population_file(sw, tdata, base, file)
    tdata.setdefault("trial", {})
    if "follow_up" in sw:
        tdata["trial"]["follow_up"] = sw["follow_up"]
    tdata["trial"]["model"] = sw["model"]
    for key in ("lesion_observable", "diameter_unit", "method"):
        if key in sw:
            tdata["trial"][key] = sw[key]
    tdata["_base"] = str(Path(sw["trial"]).parent) if "trial" in sw else str(base)
    try:
        trial = load_trial(tdata)
    except TrialError as exc:
        raise exc.located(file=file or sw.get("trial")) from None
    trial.pop("_base", None)
    trial.pop("_file", None)
    trial["trial"].pop("regimen", None)
    if trial.get("history") is not None:
        raise SweepError("the trial has a [history] (pre-treatment growth), which sweeps do not "
                         "simulate: every baseline tumor would be the model's initial state; use a "
                         "trial without [history], or give the sweep an inline [population] (with "
                         "the tumor size, e.g. T0) and [lesions]", file=file or sw.get("trial"),
                         section="history")
    trial.pop("history", None)

    model = _model_for_validation(sw["model"])
    states = set(model.state_names)
    params = set(model.parameter_names)
    for k in sw["parameter_values"]:
        if k not in params:
            raise SweepError(f"not a parameter of model {model.name!r}{_suggest(k, params)}",
                             file=sw["parameters"], section="parameters", item=k)

    lesions = trial.get("lesions")
    treatments = _treatments(data.get("treatments", {}), base, file, states)
    rt = _radiotherapy(data.get("radiotherapy", {}), file, states, lesions)
    resection = _resection(data.get("resection", {}), file, lesions)
    if lesions is not None:
        for name, t in treatments.items():
            for it in t["items"].get("dose", []):
                if it.get("target") in lesions["local_states"]:
                    raise SweepError(f"doses the lesion-local state {it['target']!r}; with [lesions] a "
                                     "regimen must dose a shared (systemic) state", file=file,
                                     section="treatments", item=name)
    tox = _toxicity(data.get("toxicity", {}), file)
    subgroups = _subgroups(data.get("subgroups", {}), trial, file)
    effects = _population_effects(data.get("population_effects", {}), trial, file,
                                  _population_estimates(sw.get("parameters")))
    from .policy import BUILTIN_POLICIES, rule_policy_from_table
    pol_tables = dict(data.get("policies", {}))
    for name, table in pol_tables.items():
        if name in BUILTIN_POLICIES:
            raise SweepError("redefines a built-in policy; choose another name", file=file,
                             section="policies", item=name)
        pol = rule_policy_from_table(name, table, treatments, file=file)  # validates
        for key, act in (("on_progression", pol.on_progression), ("on_oligo_progression", pol.on_oligo),
                         ("on_systemic_progression", pol.on_systemic)):
            if act is not None and act.kind == "resect" and lesions is None:
                raise SweepError("action 'resect' needs several lesions: declare [lesions] in the "
                                 "sweep or its trial", file=file, section=f"policies.{name}", item=key)
    python_policies = dict(policies or {})
    known_policies = {"none", *BUILTIN_POLICIES, *pol_tables, *python_policies}

    base_f = dict(data.get("base", {}))
    factors = dict(data.get("factors", {}))
    for section, table in (("base", base_f), ("factors", factors)):
        for k in table:
            if k not in FACTORS:
                raise SweepError(f"unknown factor{_suggest(k, FACTORS)}; known factors: "
                                 f"{', '.join(FACTORS)}", file=file, section=section, item=k)
    for k, vals in factors.items():
        if not isinstance(vals, list):
            raise SweepError(f"a factor takes a list of values, got {vals!r}", file=file,
                             section="factors", item=k)
        if not vals:
            raise SweepError("empty list of values: the design would have no scenario", file=file,
                             section="factors", item=k)
    n_lesions = len(lesions["lesion"]) if lesions is not None else 1
    ctx = dict(treatments=treatments, subgroups=subgroups, policies=known_policies, file=file,
               n_lesions=n_lesions)
    full_base = {k: v[0] for k, v in FACTORS.items()}
    full_base.update({k: _check_value(k, v, ctx, "base") for k, v in base_f.items()})
    factors = {k: [_check_value(k, v, ctx, "factors") for v in vals] for k, vals in factors.items()}
    if full_base["first_line"] is None and not factors.get("first_line"):
        raise SweepError("no first-line treatment: set [base] first_line = NAME (a [treatments] name)",
                         file=file, section="base", item="first_line")

    out = {"sweep": sw, "trial": trial, "treatments": treatments, "radiotherapy": rt,
           "resection": resection, "population_effects": effects,
           "toxicity": tox, "subgroups": subgroups, "policies": pol_tables,
           "python_policies": sorted(python_policies), "base": full_base, "factors": factors,
           "gsa": dict(data.get("gsa", {})), "optimize": dict(data.get("optimize", {}))}
    scenarios = tuple(build_scenarios(out, file=file)) if sw["design"] in ("grid", "one_at_a_time",
                                                                            "sampled") else ()
    for sc in scenarios:
        _check_scenario(sc, out, file)
    return SweepSpec(out, file, scenarios)


def _model_for_validation(path: str):
    from ..sbml import load_any_model
    try:
        return load_any_model(Path(path))
    except ImmunoodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - report any loader failure with the path
        raise SweepError(f"cannot load model: {exc}", file=path) from None


def _treatments(table: Mapping, base: Path, file, states: set) -> dict:
    from ..regimen import RegimenError, load_regimen
    if not isinstance(table, Mapping):
        raise SweepError("[treatments] must be a table of tables", file=file)
    out = {}
    for name, t in table.items():
        if not isinstance(t, Mapping):
            raise SweepError("must be a table with 'regimen' and 'class'", file=file,
                             section="treatments", item=name)
        _check_keys(t, {"regimen", "class", "description"}, file, f"treatments.{name}")
        if "regimen" not in t:
            raise SweepError("missing 'regimen' (a regimen file or built-in name)", file=file,
                             section="treatments", item=name)
        klass = t.get("class", "ICI")
        if klass not in TREATMENT_CLASSES:
            raise SweepError(f"unknown class {klass!r}; choose one of {', '.join(TREATMENT_CLASSES)}",
                             file=file, section="treatments", item=name)
        path = _resolve_file(str(t["regimen"]), base, "regimen", file, "treatments", name)
        try:
            reg = load_regimen(path)
        except RegimenError as exc:
            raise SweepError(f"regimen {path}: {exc}", file=file, section="treatments",
                             item=name) from None
        for it in reg.items:
            tg = (it.target,) if hasattr(it, "amount") else it.targets
            for s in tg:
                if s not in states:
                    raise SweepError(f"regimen {Path(path).name} doses state {s!r}, which the model "
                                     f"does not have (the drug is not in the model; add its PK "
                                     f"module){_suggest(s, states)}", file=file,
                                     section="treatments", item=name)
        out[str(name)] = {"regimen": path, "class": klass, "items": reg.to_dict()}
    return out


# The library's radiotherapy module (models/nsclc/radiotherapy.toml) uses the same values.
RT_DEFAULTS = {"alpha": 0.3, "beta": 0.03, "hypoxic_fraction": 0.15, "oer": 3.0}
RT_SOURCE = ("alpha 0.3/Gy (recalled), alpha/beta 10 Gy (confirmed): shared/treatments "
             "chemo_rt_vegf.csv radiotherapy rows; hypoxic share 0.15 at OER 3 (recalled "
             "estimates, as models/nsclc/radiotherapy.toml f_hyp_RT and oer_RT)")


def _radiotherapy(t: Mapping, file, states: set, lesions: Mapping | None = None) -> dict:
    _check_keys(t, {"targets", "alpha", "beta", "hypoxic_fraction", "oer", "source"}, file,
                "radiotherapy")
    out = {"targets": list(t.get("targets", ["Ts", "Tr"]))}
    for key, default in RT_DEFAULTS.items():
        v = t.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SweepError(f"must be a number, got {v!r}", file=file, section="radiotherapy",
                             item=key)
        out[key] = float(v)
    out["source"] = t.get("source", RT_SOURCE)
    for s in out["targets"]:
        if s not in states:
            raise SweepError(f"not a model state{_suggest(s, states)}", file=file,
                             section="radiotherapy", item=s)
        if lesions is not None and s not in lesions["local_states"]:
            raise SweepError("radiotherapy targets must be lesion-local states (each lesion is "
                             f"irradiated on its own); local states: {', '.join(lesions['local_states'])}",
                             file=file, section="radiotherapy", item=s)
    problem = check_lq_parameters(out["alpha"], out["beta"], out["hypoxic_fraction"], out["oer"])
    if problem:
        raise SweepError(problem, file=file, section="radiotherapy")
    return out


def _merge_population_file(sw: dict, tdata: dict, base: Path, file) -> None:
    """``population_file`` + ``population_arm``: the arm's distributions (a calibration's
    ``fitted_population.toml``) replace the same-named ones of the population."""
    path = _resolve_file(str(sw["population_file"]), base, "population", file, "sweep",
                         "population_file")
    sw["population_file"] = path
    try:
        pf = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SweepError(f"cannot read population file {path}: {exc}", file=file, section="sweep",
                         item="population_file") from None
    arm = sw.get("population_arm")
    if arm not in pf or not isinstance(pf[arm], Mapping):
        raise SweepError(f"population_arm {arm!r} is not a table of {Path(path).name}"
                         f"{_suggest(str(arm), list(pf))}; arms: {', '.join(pf)}", file=file,
                         section="sweep", item="population_arm")
    if "population" not in tdata:
        raise SweepError("population_file needs a population to update (a trial or an inline "
                         "[population])", file=file, section="sweep", item="population_file")
    for kind in ("parameters", "covariates"):
        for name, dist in dict(pf[arm].get(kind, {})).items():
            tdata["population"].setdefault(kind, {})[name] = dict(dist)


def _population_estimates(path: str | None) -> dict[str, float]:
    """``kind = "population"`` estimates of a calibration's parameter file (name -> value)."""
    if path is None:
        return {}
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    return {k: float(v["value"]) for k, v in data.items()
            if isinstance(v, Mapping) and v.get("kind") == "population" and "value" in v}


def _population_effects(table: Mapping, trial: Mapping, file, estimates: Mapping | None = None) -> dict:
    """``[population_effects] PARAM = { COVARIATE = beta }``: per-patient covariate effects on
    the log of a sampled parameter (a calibration's ``effects``), checked against the population.
    ``beta`` is a number or the name of a ``kind = "population"`` estimate of the sweep's
    ``parameters`` file (e.g. ``"k_CTL_pdl1"``)."""
    estimates = estimates or {}
    from ..sampling import sample_population
    if not table:
        return {}
    pars = trial["population"].get("parameters", {})
    pop = sample_population(trial["population"], 4, seed=0)
    out = {}
    for par, eff in table.items():
        if par not in pars:
            raise SweepError(f"not a sampled parameter of the population{_suggest(par, pars)}",
                             file=file, section="population_effects", item=par)
        if not isinstance(eff, Mapping) or not eff:
            raise SweepError("expected a table { covariate = coefficient }", file=file,
                             section="population_effects", item=par)
        row = {}
        for cov, beta in eff.items():
            if cov not in pop or not np.issubdtype(pop[cov].dtype, np.number):
                raise SweepError(f"not a numeric sampled variable{_suggest(cov, list(pop.data_vars))}",
                                 file=file, section=f"population_effects.{par}", item=cov)
            if isinstance(beta, str):
                if beta not in estimates:
                    raise SweepError(f"{beta!r} is not a population estimate of the [sweep] "
                                     f"parameters file{_suggest(beta, estimates)}", file=file,
                                     section=f"population_effects.{par}", item=cov)
                beta = estimates[beta]
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
                raise SweepError(f"coefficient must be a finite number, got {beta!r}", file=file,
                                 section=f"population_effects.{par}", item=cov)
            row[str(cov)] = float(beta)
        d = dict(pars[par])
        if d.get("dist") not in ("lognormal", "normal", "uniform", "loguniform", "fixed"):
            raise SweepError(f"a covariate effect needs a continuous or fixed distribution, not "
                             f"{d.get('dist')!r}", file=file, section="population_effects", item=par)
        out[str(par)] = {"effects": row, "dist": d}
    return out


def _resection(t: Mapping, file, lesions: Mapping | None) -> dict:
    """``[resection] states``: lesion-local states a resection sets to 0 (default: all)."""
    _check_keys(t, {"states", "description"}, file, "resection")
    if lesions is None:
        if t:
            raise SweepError("[resection] needs several lesions: declare [lesions] in the sweep or "
                             "its trial", file=file, section="resection")
        return {"states": []}
    local = list(lesions["local_states"])
    st = t.get("states", local)
    if not isinstance(st, list) or not st:
        raise SweepError(f"states must be a non-empty list of lesion-local states, got {st!r}",
                         file=file, section="resection", item="states")
    for s in st:
        if s not in local:
            raise SweepError(f"not a lesion-local state{_suggest(str(s), local)}; local states: "
                             f"{', '.join(local)}", file=file, section="resection", item=str(s))
    return {"states": [str(s) for s in st]}


def _toxicity(t: Mapping, file) -> dict:
    _check_keys(t, {"enabled", "hold_days", "reference_exposure_days", "table"}, file, "toxicity")
    out = {"enabled": bool(t.get("enabled", False)), "hold_days": float(t.get("hold_days", 42.0))}
    from .toxicity import load_toxicity_table
    table = load_toxicity_table(t.get("table"))
    if "reference_exposure_days" in t:
        for row in table.values():
            row["reference_exposure_days"] = float(t["reference_exposure_days"])
    out["table"] = table
    return out


def _subgroups(table: Mapping, trial: Mapping, file) -> dict:
    from ..sampling import sample_population
    names = set(sample_population(trial["population"], 4, seed=0).data_vars)
    out = {}
    for name, cond in table.items():
        if name == "all":
            raise SweepError("'all' is reserved (the whole population)", file=file,
                             section="subgroups", item=name)
        if not isinstance(cond, Mapping) or not cond:
            raise SweepError("a subgroup is a table: variable = [values] or {min, max}", file=file,
                             section="subgroups", item=name)
        for var, rule in cond.items():
            if var not in names:
                raise SweepError(f"unknown population variable {var!r}{_suggest(var, names)}",
                                 file=file, section=f"subgroups.{name}", item=var)
            if not (isinstance(rule, list) or (isinstance(rule, Mapping) and set(rule) <= {"min", "max"})):
                raise SweepError("expected a list of values or a table {min, max}", file=file,
                                 section=f"subgroups.{name}", item=var)
        out[str(name)] = {k: (list(v) if isinstance(v, list) else dict(v)) for k, v in cond.items()}
    return out


def _check_value(name: str, v, ctx, section):
    default, kind, _ = FACTORS[name]
    file = ctx["file"]

    def bad(msg):
        raise SweepError(f"{msg}, got {v!r}", file=file, section=section, item=name)
    if kind in ("positive", "nonneg", "real", "count"):
        if name in ("interval", "duration", "dose") and v in ("regimen", "none"):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad("expected a number")
        if kind == "positive" and v <= 0:
            bad("must be > 0")
        if kind == "nonneg" and v < 0:
            bad("must be >= 0")
        if kind == "count" and (v < 0 or int(v) != v):
            bad("must be a whole number >= 0")
        return int(v) if kind == "count" else float(v)
    if kind in ("treatment", "treatment_or_none"):
        if kind == "treatment_or_none" and v == "none":
            return "none"
        if v not in ctx["treatments"]:
            bad(f"unknown treatment (declare it under [treatments]; known: "
                f"{', '.join(ctx['treatments']) or 'none'}){_suggest(v, ctx['treatments'])}")
        return v
    if kind == "lesion":
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= ctx["n_lesions"]:
            bad(f"expected a lesion number from 1 to {ctx['n_lesions']} (the sweep has "
                f"{ctx['n_lesions']} lesion{'s' if ctx['n_lesions'] != 1 else ''})")
        return int(v)
    if kind == "subgroup":
        if v != "all" and v not in ctx["subgroups"]:
            bad(f"unknown subgroup{_suggest(v, ctx['subgroups'])}")
        return v
    if kind == "policy":
        if v not in ctx["policies"]:
            bad(f"unknown policy (known: {', '.join(sorted(ctx['policies']))}){_suggest(v, ctx['policies'])}")
        return v
    if isinstance(kind, tuple):
        if v not in kind:
            bad(f"expected one of {', '.join(kind)}")
        return v
    raise AssertionError(kind)


def _check_scenario(sc: Scenario, spec: Mapping, file) -> None:
    f = sc.factors
    t = spec["treatments"][f["first_line"]]
    if f["dose"] is not None:
        n_doses = len(t["items"].get("dose", []))
        if n_doses != 1:
            raise SweepError(f"scenario {sc.name!r}: 'dose' needs a first-line regimen with one dose "
                             f"item, {f['first_line']!r} has {n_doses}; use 'dose_scale'",
                             file=file, section="factors", item="dose")
    if f["rt_fractions"] and f["start_day"] + f["rt_day"] < 0:
        raise SweepError(f"scenario {sc.name!r}: radiotherapy on day {f['start_day'] + f['rt_day']:g} "
                         "comes before the simulation starts (day 0); raise start_day so that "
                         "start_day + rt_day >= 0", file=file, section="factors", item="rt_day")
    if f["added_drug"] == f["first_line"]:
        raise SweepError(f"scenario {sc.name!r}: added_drug equals first_line", file=file,
                         section="factors", item="added_drug")
    if spec["toxicity"]["enabled"]:
        from .toxicity import combined_class, table_row
        tr = spec["treatments"]
        combos = [[t["class"]]]
        if f["added_drug"] != "none":
            combos += [[t["class"], tr[f["added_drug"]]["class"]], [tr[f["added_drug"]]["class"]]]
        pol = spec["policies"].get(f["policy"], {})
        for key in ("on_progression", "on_oligo_progression", "on_systemic_progression"):
            act = pol.get(key)
            to = act.get("to", act.get("treatment")) if isinstance(act, Mapping) else None
            if to and to != "first_line":
                combos += [[tr[to]["class"]], [t["class"], tr[to]["class"]]]
        for classes in combos:
            try:
                table_row(spec["toxicity"]["table"], classes)
            except KeyError:
                raise SweepError(f"scenario {sc.name!r}: no toxicity rate for regimen class "
                                 f"{combined_class(classes)!r} (known: "
                                 f"{', '.join(spec['toxicity']['table'])})", file=file,
                                 section="toxicity") from None


# --------------------------------------------------------------------------- designs
def _label(f: Mapping, base: Mapping) -> str:
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in f.items() if v != base.get(k)]
    return ", ".join(parts) if parts else "base"


def build_scenarios(spec: Mapping, *, file=None) -> list[Scenario]:
    """Expand the design of a normalised sweep (``spec["factors"]`` over ``spec["base"]``).

    * ``grid``: every combination (the first factor varies slowest);
    * ``one_at_a_time``: the base, then each factor value in turn with the others at base;
    * ``sampled``: ``n_scenarios`` combinations drawn without replacement from the grid
      (seeded by the sweep seed).
    """
    base, factors = spec["base"], spec["factors"]
    design = spec["sweep"]["design"]
    names = list(factors)
    combos: list[dict] = []
    if design == "grid" or design == "sampled":
        for values in itertools.product(*(factors[k] for k in names)):
            combos.append(dict(base, **dict(zip(names, values))))
        if design == "sampled":
            k = spec["sweep"].get("n_scenarios")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise SweepError(f"design 'sampled' needs n_scenarios >= 1, got {k!r}", file=file,
                                 section="sweep", item="n_scenarios")
            rng = np.random.default_rng([int(spec["sweep"]["seed"]), 31])
            pick = np.sort(rng.choice(len(combos), size=min(k, len(combos)), replace=False))
            combos = [combos[i] for i in pick]
    elif design == "one_at_a_time":
        combos.append(dict(base))
        for k in names:
            for v in factors[k]:
                if v != base[k]:
                    combos.append(dict(base, **{k: v}))
    if not combos:
        raise SweepError("the design has no scenario", file=file, section="factors")
    seen, out = set(), []
    for f in combos:
        key = json.dumps(f, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        out.append(Scenario(len(out), _label(f, base), f))
    return out
