"""The symbolic model: one internal representation for every way a model comes in.

A :class:`Model` holds states, parameters, assignments (named intermediate
expressions), explicit ODEs and/or fluxes between states, and observables, all
as sympy expressions over plain symbols.  Models are built with
:class:`ModelBuilder` (the Python API) or read from TOML files
(:func:`immunoode.modelfile.load_model`), which uses the same builder, so both
paths share one set of checks: unknown symbols, duplicate names, assignment
cycles, states without an equation, non-finite values and units.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import sympy

from .errors import ModelError, UnitError, did_you_mean
from .expr import TIME, parse_expression

__all__ = [
    "State",
    "Parameter",
    "Assignment",
    "Flux",
    "Observable",
    "Model",
    "ModelBuilder",
]

RESERVED = frozenset({"t", "time"})


@dataclass(frozen=True)
class State:
    """A dynamic variable; ``initial`` is an expression of parameters."""

    name: str
    initial: sympy.Expr
    unit: str
    description: str = ""


@dataclass(frozen=True)
class Parameter:
    """A constant with a value, a unit and (ideally) a source."""

    name: str
    value: float
    unit: str
    description: str = ""
    source: str = ""
    lower: float | None = None
    upper: float | None = None


@dataclass(frozen=True)
class Assignment:
    """A named expression of states, parameters, time and other assignments."""

    name: str
    expr: sympy.Expr
    unit: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Flux:
    """A transfer ``rate`` (source unit per time) from ``source`` to ``target``.

    Either end may be ``None`` (production from, or loss to, outside the model).
    """

    name: str
    rate: sympy.Expr
    source: str | None = None
    target: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Observable:
    """A named output expression, e.g. a concentration or a tumor diameter."""

    name: str
    expr: sympy.Expr
    unit: str | None = None
    description: str = ""


def _suggest(name: str, candidates: Iterable[str]) -> str:
    return did_you_mean(name, candidates)


def _as_expr(value, *, section: str, item: str, where_file=None) -> sympy.Expr:
    """Number or expression text (parsed safely) or sympy expression -> sympy."""
    if isinstance(value, bool):
        raise ModelError("expected a number or an expression, got a boolean",
                         file=where_file, section=section, item=item)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ModelError(f"value {value!r} is not finite", file=where_file,
                             section=section, item=item)
        return sympy.Float(value) if isinstance(value, float) else sympy.Integer(value)
    if isinstance(value, sympy.Basic):
        return value
    if isinstance(value, str):
        try:
            return parse_expression(value)
        except ModelError as exc:
            raise exc.located(file=where_file, section=section, item=item) from None
    raise ModelError(f"expected a number or an expression string, got {type(value).__name__}",
                     file=where_file, section=section, item=item)


@dataclass(frozen=True)
class Model:
    """A validated symbolic model.  Build it with :class:`ModelBuilder`.

    Attributes
    ----------
    name : model name.
    time_unit : unit of the independent variable ``t`` (e.g. ``"day"``).
    states, parameters, assignments, observables : dicts name -> component, in
        declaration order (the state order is the order of the state vector).
    odes : explicit right-hand sides, state name -> expression (without fluxes).
    fluxes : transfers; their rates are added to/subtracted from the ODEs.
    """

    name: str
    time_unit: str
    states: Mapping[str, State]
    parameters: Mapping[str, Parameter]
    assignments: Mapping[str, Assignment]
    odes: Mapping[str, sympy.Expr]
    fluxes: tuple[Flux, ...]
    observables: Mapping[str, Observable]
    description: str = ""
    sources: tuple[str, ...] = ()
    _order: tuple[str, ...] = field(default=(), repr=False)

    # ----------------------------------------------------------------- names
    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(self.states)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(self.parameters)

    @property
    def parameter_values(self) -> dict[str, float]:
        return {k: p.value for k, p in self.parameters.items()}

    def symbol(self, name: str) -> sympy.Symbol:
        return TIME if name == "t" else sympy.Symbol(name, real=True)

    @property
    def assignment_order(self) -> tuple[str, ...]:
        """Assignments in dependency (topological) order."""
        return self._order

    # ------------------------------------------------------------ equations
    def rhs(self) -> dict[str, sympy.Expr]:
        """d(state)/dt for every state, fluxes included, assignments *not* substituted."""
        out = {s: self.odes.get(s, sympy.Integer(0)) for s in self.states}
        for fx in self.fluxes:
            if fx.source is not None:
                out[fx.source] = out[fx.source] - fx.rate
            if fx.target is not None:
                out[fx.target] = out[fx.target] + fx.rate
        return out

    def substitute_assignments(self, expr: sympy.Expr) -> sympy.Expr:
        """Replace assignment symbols by their (fully expanded) definitions."""
        return expr.xreplace(self._assignment_map())

    def _assignment_map(self) -> dict:
        cache = getattr(self, "_amap_cache", None)
        if cache is not None:
            return cache
        amap: dict = {}
        for name in self._order:
            a = self.assignments[name]
            amap[self.symbol(name)] = a.expr.xreplace(amap)
        object.__setattr__(self, "_amap_cache", amap)
        return amap

    def rhs_substituted(self) -> list[sympy.Expr]:
        """Right-hand sides in state order with assignments substituted."""
        amap = self._assignment_map()
        return [e.xreplace(amap) for e in self.rhs().values()]

    def initial_values(self, parameters: Mapping[str, float] | None = None) -> dict[str, float]:
        """Numeric initial state for the given (default: nominal) parameter values."""
        vals = self.parameter_values
        if parameters:
            vals.update(parameters)
        subs = {self.symbol(k): v for k, v in vals.items()}
        return {k: float(s.initial.xreplace(subs)) for k, s in self.states.items()}

    # ----------------------------------------------------------- provenance
    def to_dict(self, *, values: bool = True) -> dict:
        """Canonical description (used for hashing and provenance)."""
        d = {
            "name": self.name,
            "time_unit": self.time_unit,
            "states": [[s.name, sympy.srepr(s.initial), s.unit] for s in self.states.values()],
            "parameters": [[p.name, p.unit] + ([repr(float(p.value))] if values else [])
                           for p in self.parameters.values()],
            "assignments": [[a.name, sympy.srepr(a.expr), a.unit] for a in self.assignments.values()],
            "odes": [[k, sympy.srepr(v)] for k, v in self.odes.items()],
            "fluxes": [[f.name, f.source, f.target, sympy.srepr(f.rate)] for f in self.fluxes],
            "observables": [[o.name, sympy.srepr(o.expr), o.unit] for o in self.observables.values()],
        }
        return d

    def content_hash(self, values: Mapping[str, float] | None = None) -> str:
        """SHA-256 of the equations and parameter values (``values`` override nominal ones)."""
        vals = self.parameter_values
        if values:
            vals.update({k: float(v) for k, v in values.items()})
        return _sha([self.structure_hash(), [repr(float(vals[k])) for k in self.parameters]])

    def structure_hash(self) -> str:
        """SHA-256 of the equations only (no parameter values): the compile-cache key."""
        cached = self.__dict__.get("_structure_hash")
        if cached is None:
            cached = _sha(self.to_dict(values=False))
            object.__setattr__(self, "_structure_hash", cached)
        return cached

    def with_parameters(self, **values: float) -> "Model":
        """A copy with new nominal parameter values (validated)."""
        params = dict(self.parameters)
        for k, v in values.items():
            if k not in params:
                raise ModelError(f"unknown parameter{_suggest(k, params)}", section="parameters", item=k)
            p = params[k]
            _check_value(k, float(v), p.lower, p.upper, section="parameters")
            params[k] = Parameter(p.name, float(v), p.unit, p.description, p.source, p.lower, p.upper)
        return Model(self.name, self.time_unit, self.states, params, self.assignments, self.odes,
                     self.fluxes, self.observables, self.description, self.sources, self._order)

    def to_sbml(self, path=None, regimen=None, **kw) -> str:
        """Write the model (and optionally a regimen as events) as SBML L3V2; see :mod:`immunoode.sbml`."""
        from .sbml import to_sbml
        return to_sbml(self, path, regimen, **kw)

    def summary(self) -> str:
        """Human-readable listing of states, parameters and units."""
        lines = [f"model {self.name} (time unit: {self.time_unit}; hash {self.content_hash()[:12]})",
                 f"states ({len(self.states)}):"]
        for s in self.states.values():
            lines.append(f"  {s.name:<14} [{s.unit}]  initial = {s.initial}  {s.description}".rstrip())
        lines.append(f"parameters ({len(self.parameters)}):")
        for p in self.parameters.values():
            lines.append(f"  {p.name:<14} = {p.value:<12g} [{p.unit}]  {p.description}".rstrip())
        if self.assignments:
            lines.append(f"assignments ({len(self.assignments)}):")
            for a in self.assignments.values():
                lines.append(f"  {a.name:<14} = {a.expr}  [{a.unit or '?'}]")
        if self.fluxes:
            lines.append(f"fluxes ({len(self.fluxes)}):")
            for f in self.fluxes:
                lines.append(f"  {f.name:<14} {f.source or '∅'} -> {f.target or '∅'}: {f.rate}")
        if self.observables:
            lines.append(f"observables ({len(self.observables)}):")
            for o in self.observables.values():
                lines.append(f"  {o.name:<14} = {o.expr}  [{o.unit or '?'}]")
        return "\n".join(lines)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=False, default=str).encode()).hexdigest()


def _check_value(name, value, lower, upper, *, section, file=None):
    if not math.isfinite(value):
        raise ModelError(f"value {value!r} is not finite", file=file, section=section, item=name)
    if lower is not None and value < lower:
        raise ModelError(f"value {value!r} is below its lower bound {lower!r}", file=file,
                         section=section, item=name)
    if upper is not None and value > upper:
        raise ModelError(f"value {value!r} is above its upper bound {upper!r}", file=file,
                         section=section, item=name)


class ModelBuilder:
    """Build a :class:`Model` step by step (the Python way in).

    Every ``add_*`` method takes numbers, expression strings (parsed safely) or
    sympy expressions.  ``file`` / ``section`` keyword arguments only serve
    error messages.  Call :meth:`build` to validate and freeze.

    Examples
    --------
    >>> b = ModelBuilder("one_compartment", time_unit="day")
    >>> b.add_parameter("CL", 0.2, "L/day"); b.add_parameter("V", 3.0, "L")
    >>> b.add_state("A", 0.0, "mg")
    >>> b.add_ode("A", "-CL/V*A")
    >>> model = b.build()
    """

    def __init__(self, name: str, time_unit: str = "day", description: str = ""):
        self.name = name
        self.time_unit = time_unit
        self.description = description
        self._states: dict[str, State] = {}
        self._params: dict[str, Parameter] = {}
        self._assign: dict[str, Assignment] = {}
        self._odes: dict[str, sympy.Expr] = {}
        self._fluxes: list[Flux] = []
        self._obs: dict[str, Observable] = {}
        self._where: dict[tuple[str, str], str | None] = {}  # (section, name) -> file
        self._sources: list[str] = []

    # ----------------------------------------------------------------- adds
    def _claim(self, section: str, name: str, file) -> None:
        if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
            raise ModelError("invalid name: use letters, digits and '_' (not starting with a digit)",
                             file=file, section=section, item=str(name))
        if name in RESERVED:
            raise ModelError(f"{name!r} is reserved for time", file=file, section=section, item=name)
        for sec, table in (("states", self._states), ("parameters", self._params),
                           ("assignments", self._assign), ("observables", self._obs)):
            if name in table:
                other = self._where.get((sec, name))
                at = f" (already defined in [{sec}]{' of ' + other if other else ''})"
                raise ModelError(f"duplicate name{at}", file=file, section=section, item=name)
        self._where[(section, name)] = None if file is None else str(file)

    def add_state(self, name: str, initial=0.0, unit: str | None = None, description: str = "",
                  *, file=None) -> "ModelBuilder":
        self._claim("states", name, file)
        if not unit:
            raise ModelError("every state needs a unit (use unit = \"1\" for dimensionless)",
                             file=file, section="states", item=name)
        init = _as_expr(initial, section="states", item=name, where_file=file)
        self._states[name] = State(name, init, str(unit), description)
        return self

    def add_parameter(self, name: str, value: float, unit: str | None = None, description: str = "",
                      source: str = "", lower: float | None = None, upper: float | None = None,
                      *, file=None, override: bool = False) -> "ModelBuilder":
        if override:
            if name not in self._params:
                raise ModelError("override = true but no such parameter was included"
                                 f"{_suggest(name, self._params)}", file=file, section="parameters",
                                 item=name)
            old = self._params[name]
            unit = unit or old.unit
            if unit != old.unit:
                raise ModelError(f"override changes the unit from {old.unit!r} to {unit!r}",
                                 file=file, section="parameters", item=name)
            value = _num(value, file=file, section="parameters", item=name)
            _check_value(name, value, lower if lower is not None else old.lower,
                         upper if upper is not None else old.upper, section="parameters", file=file)
            self._params[name] = Parameter(name, value, unit, description or old.description,
                                           source or old.source,
                                           old.lower if lower is None else lower,
                                           old.upper if upper is None else upper)
            return self
        self._claim("parameters", name, file)
        if not unit:
            raise ModelError("every parameter needs a unit (use unit = \"1\" for dimensionless)",
                             file=file, section="parameters", item=name)
        value = _num(value, file=file, section="parameters", item=name)
        for bname, b in (("lower", lower), ("upper", upper)):
            if b is not None:
                _num(b, file=file, section="parameters", item=f"{name}.{bname}")
        if lower is not None and upper is not None and lower > upper:
            raise ModelError(f"lower bound {lower} exceeds upper bound {upper}", file=file,
                             section="parameters", item=name)
        _check_value(name, value, lower, upper, section="parameters", file=file)
        self._params[name] = Parameter(name, value, str(unit), description, source, lower, upper)
        return self

    def add_assignment(self, name: str, expr, unit: str | None = None, description: str = "",
                       *, file=None) -> "ModelBuilder":
        self._claim("assignments", name, file)
        e = _as_expr(expr, section="assignments", item=name, where_file=file)
        self._assign[name] = Assignment(name, e, unit, description)
        return self

    def add_ode(self, state: str, rhs, *, file=None) -> "ModelBuilder":
        if state in self._odes:
            raise ModelError("duplicate ODE for this state", file=file, section="odes", item=state)
        self._odes[state] = _as_expr(rhs, section="odes", item=state, where_file=file)
        self._where[("odes", state)] = None if file is None else str(file)
        return self

    def add_flux(self, name: str, rate, source: str | None = None, target: str | None = None,
                 description: str = "", *, file=None) -> "ModelBuilder":
        if any(f.name == name for f in self._fluxes):
            raise ModelError("duplicate flux name", file=file, section="fluxes", item=name)
        if source is None and target is None:
            raise ModelError("a flux needs 'from' and/or 'to'", file=file, section="fluxes", item=name)
        e = _as_expr(rate, section="fluxes", item=name, where_file=file)
        self._fluxes.append(Flux(name, e, source, target, description))
        self._where[("fluxes", name)] = None if file is None else str(file)
        return self

    def add_observable(self, name: str, expr, unit: str | None = None, description: str = "",
                       *, file=None) -> "ModelBuilder":
        self._claim("observables", name, file)
        e = _as_expr(expr, section="observables", item=name, where_file=file)
        self._obs[name] = Observable(name, e, unit, description)
        return self

    def add_source(self, path: str) -> None:
        self._sources.append(str(path))

    # ---------------------------------------------------------------- build
    def build(self, *, check_units: bool = True) -> Model:
        """Validate everything and return the frozen :class:`Model`."""
        if not self._states:
            raise ModelError("the model has no states", section="states")
        w = self._where
        known = set(self._states) | set(self._params) | set(self._assign) | {"t"}

        def check_symbols(expr, section, item, allowed=known):
            for sym in sorted(expr.free_symbols, key=lambda s: s.name):
                if sym.name not in allowed:
                    hint = _suggest(sym.name, allowed - {"t"})
                    what = "symbol"
                    if section == "states" and sym.name in known:
                        hint = " (initial values may only use parameters)"
                        what = "non-parameter symbol"
                    raise ModelError(f"unknown {what} {sym.name!r}{hint}",
                                     file=w.get((section, item)), section=section, item=item)

        params_only = set(self._params)
        for s in self._states.values():
            check_symbols(s.initial, "states", s.name, params_only)
        for a in self._assign.values():
            check_symbols(a.expr, "assignments", a.name)
        for k, e in self._odes.items():
            if k not in self._states:
                raise ModelError(f"ODE for unknown state{_suggest(k, self._states)}",
                                 file=w.get(("odes", k)), section="odes", item=k)
            check_symbols(e, "odes", k)
        for f in self._fluxes:
            for end, nm in (("from", f.source), ("to", f.target)):
                if nm is not None and nm not in self._states:
                    raise ModelError(f"'{end}' names unknown state {nm!r}{_suggest(nm, self._states)}",
                                     file=w.get(("fluxes", f.name)), section="fluxes", item=f.name)
            check_symbols(f.rate, "fluxes", f.name)
        for o in self._obs.values():
            check_symbols(o.expr, "observables", o.name)

        has_eq = set(self._odes) | {f.source for f in self._fluxes} | {f.target for f in self._fluxes}
        for s in self._states:
            if s not in has_eq:
                raise ModelError("state has no ODE and no flux (write `NAME = \"0\"` in [odes] "
                                 "for a constant state)", file=w.get(("states", s)),
                                 section="states", item=s)

        order = _toposort(self._assign, w)
        model = Model(self.name, self.time_unit, dict(self._states), dict(self._params),
                      dict(self._assign), dict(self._odes), tuple(self._fluxes), dict(self._obs),
                      self.description, tuple(self._sources), order)
        if check_units:
            from .unitcheck import check_model_units
            check_model_units(model, where=w)
        return model


def _num(value, *, file, section, item) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"expected a number, got {value!r}", file=file, section=section, item=item)
    value = float(value)
    if not math.isfinite(value):
        raise ModelError(f"value {value!r} is not finite", file=file, section=section, item=item)
    return value


def _toposort(assign: Mapping[str, Assignment], where) -> tuple[str, ...]:
    """Order assignments so that each comes after those it uses; report cycles."""
    deps = {k: {s.name for s in a.expr.free_symbols if s.name in assign} for k, a in assign.items()}
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(k, path):
        st = state.get(k, 0)
        if st == 2:
            return
        if st == 1:
            cyc = path[path.index(k):] + [k]
            raise ModelError("cycle among assignments: " + " -> ".join(cyc),
                             file=where.get(("assignments", k)), section="assignments", item=k)
        state[k] = 1
        for d in sorted(deps[k]):
            visit(d, path + [k])
        state[k] = 2
        order.append(k)

    for k in assign:
        visit(k, [])
    return tuple(order)
