"""Read model files (TOML) into a :class:`~immunoode.model.Model`.

The format is documented in ``docs/model-file.md``.  Expressions are parsed by
:mod:`immunoode.expr` (a whitelist parser; no ``eval``/``sympify`` of file text).
Errors name the file, the section and the item.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

from .errors import ModelError
from .model import Model, ModelBuilder

__all__ = ["load_model", "model_from_dict", "loads_model"]

_TOP = {"model", "states", "parameters", "assignments", "odes", "fluxes", "observables"}
_MODEL_KEYS = {"name", "time_unit", "description", "include"}
_STATE_KEYS = {"initial", "unit", "description"}
_PARAM_KEYS = {"value", "unit", "description", "source", "lower", "upper", "override", "confidence"}
_EXPR_KEYS = {"expr", "unit", "description"}
_FLUX_KEYS = {"from", "to", "rate", "description"}


def _unknown(keys, allowed, *, file, section, item=None):
    for k in keys:
        if k not in allowed:
            close = difflib.get_close_matches(k, sorted(allowed), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(sorted(allowed))})"
            raise ModelError(f"unknown key {k!r}{hint}", file=file, section=section, item=item)


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError("file not found", file=path) from None
    except OSError as exc:
        raise ModelError(f"cannot read file: {exc.strerror}", file=path) from None
    except UnicodeDecodeError:
        raise ModelError("file is not UTF-8 text", file=path) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"TOML syntax error: {exc}", file=path) from None


def _table(data, key, *, file):
    v = data.get(key, {})
    if not isinstance(v, dict):
        raise ModelError(f"[{key}] must be a table", file=file, section=key)
    return v


def _add_file(b: ModelBuilder, data: dict, file, *, stack: tuple, top: bool) -> None:
    _unknown(data.keys(), _TOP, file=file, section=None)
    meta = _table(data, "model", file=file)
    _unknown(meta.keys(), _MODEL_KEYS, file=file, section="model")
    if not top and "time_unit" in meta and str(meta["time_unit"]) != b.time_unit:
        raise ModelError(f"time_unit {meta['time_unit']!r} differs from the including model's "
                         f"{b.time_unit!r}; rates would be misread", file=file, section="model",
                         item="time_unit")
    includes = meta.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ModelError("include must be a list of file paths", file=file, section="model", item="include")
    base = Path(file).parent if file is not None else Path.cwd()
    for inc in includes:
        p = (base / inc).resolve()
        if p in stack:
            chain = " -> ".join(str(s) for s in stack + (p,))
            raise ModelError(f"include cycle: {chain}", file=file, section="model", item="include")
        if not p.exists():
            raise ModelError(f"included file {inc!r} not found (looked in {base})", file=file,
                             section="model", item="include")
        _add_file(b, _read_toml(p), p, stack=stack + (p,), top=False)
        b.add_source(str(p))

    for name, spec in _table(data, "states", file=file).items():
        if not isinstance(spec, dict):
            raise ModelError("a state is a table: [states.NAME] with initial, unit", file=file,
                             section="states", item=name)
        _unknown(spec.keys(), _STATE_KEYS, file=file, section="states", item=name)
        b.add_state(name, spec.get("initial", 0.0), spec.get("unit"), spec.get("description", ""), file=file)

    for name, spec in _table(data, "parameters", file=file).items():
        if not isinstance(spec, dict):
            raise ModelError("a parameter is an inline table: NAME = { value = ..., unit = \"...\" }",
                             file=file, section="parameters", item=name)
        _unknown(spec.keys(), _PARAM_KEYS, file=file, section="parameters", item=name)
        if "value" not in spec:
            raise ModelError("missing 'value'", file=file, section="parameters", item=name)
        source = spec.get("source", "")
        if spec.get("confidence"):
            source = f"{source} [confidence: {spec['confidence']}]".strip()
        b.add_parameter(name, spec["value"], spec.get("unit"), spec.get("description", ""), source,
                        spec.get("lower"), spec.get("upper"), file=file,
                        override=bool(spec.get("override", False)))

    for name, spec in _table(data, "assignments", file=file).items():
        if isinstance(spec, dict):
            _unknown(spec.keys(), _EXPR_KEYS, file=file, section="assignments", item=name)
            if "expr" not in spec:
                raise ModelError("missing 'expr'", file=file, section="assignments", item=name)
            b.add_assignment(name, spec["expr"], spec.get("unit"), spec.get("description", ""), file=file)
        else:
            b.add_assignment(name, spec, file=file)

    for name, spec in _table(data, "odes", file=file).items():
        b.add_ode(name, spec, file=file)

    fluxes = data.get("fluxes", {})
    if isinstance(fluxes, list):  # [[fluxes]] with a name key
        fluxes = {f.get("name", f"flux{i + 1}"): {k: v for k, v in f.items() if k != "name"}
                  for i, f in enumerate(fluxes)}
    if not isinstance(fluxes, dict):
        raise ModelError("[fluxes] must be a table", file=file, section="fluxes")
    for name, spec in fluxes.items():
        if not isinstance(spec, dict):
            raise ModelError("a flux is a table with from, to, rate", file=file, section="fluxes", item=name)
        _unknown(spec.keys(), _FLUX_KEYS, file=file, section="fluxes", item=name)
        if "rate" not in spec:
            raise ModelError("missing 'rate'", file=file, section="fluxes", item=name)
        b.add_flux(name, spec["rate"], spec.get("from"), spec.get("to"), spec.get("description", ""),
                   file=file)

    for name, spec in _table(data, "observables", file=file).items():
        if isinstance(spec, dict):
            _unknown(spec.keys(), _EXPR_KEYS, file=file, section="observables", item=name)
            if "expr" not in spec:
                raise ModelError("missing 'expr'", file=file, section="observables", item=name)
            b.add_observable(name, spec["expr"], spec.get("unit"), spec.get("description", ""), file=file)
        else:
            b.add_observable(name, spec, file=file)


def model_from_dict(data: dict, *, file=None, check_units: bool = True) -> Model:
    """Build a model from an already-parsed TOML document."""
    meta = data.get("model", {}) if isinstance(data.get("model", {}), dict) else {}
    name = meta.get("name") or (Path(file).stem if file else "model")
    time_unit = meta.get("time_unit", "day")
    b = ModelBuilder(str(name), time_unit=str(time_unit), description=str(meta.get("description", "")))
    root = Path(file).resolve() if file is not None else None
    _add_file(b, data, file, stack=(root,) if root else (), top=True)
    if file is not None:
        b.add_source(str(file))
    try:
        return b.build(check_units=check_units)
    except ModelError as exc:
        raise exc.located(file=file) from None


def load_model(path, *, check_units: bool = True) -> Model:
    """Read a TOML model file (and its includes) into a validated :class:`Model`."""
    path = Path(path)
    return model_from_dict(_read_toml(path), file=path, check_units=check_units)


def loads_model(text: str, *, check_units: bool = True) -> Model:
    """Read a model from TOML text (no file; includes are relative to the working directory)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"TOML syntax error: {exc}") from None
    return model_from_dict(data, check_units=check_units)
