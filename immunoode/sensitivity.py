"""Forward sensitivities, derived symbolically and integrated by the compiled engine.

Stage 2b — consumes a :class:`~immunoode.model.Model` and a list of parameter names;
produces an *augmented* :class:`~immunoode.model.Model` whose extra states are the
forward sensitivities ``S_ik = ∂y_i/∂p_k`` and whose extra observables are the
observable sensitivities ``∂g/∂p_k``.  The augmented model is an ordinary model:
:func:`~immunoode.compile.compile_model` compiles it (with its own analytic Jacobian
and sparse LU) and caches it on disk, and :func:`~immunoode.simulate.simulate` integrates
it through a regimen with the same restart-at-every-event rule.

Equations (``f`` the right-hand side with assignments substituted, ``g`` an observable)::

    dS/dt  = (∂f/∂y) S + ∂f/∂p,          S(0) = ∂y0/∂p   (initial values may use parameters)
    dg/dp  = (∂g/∂y) S + ∂g/∂p

Only structurally non-zero sensitivities get a state (``S_ik`` is zero for all time
when neither ``y0_i``, ``f_i`` nor a state that ``f_i`` depends on depends on
``p_k``).  Derivatives of ``heaviside``/``min``/``max`` drop their Dirac deltas (as for
the Jacobian, see ``docs/engine.md``): sensitivities across a switch of such a term are
those of the active branch.

Events act on the sensitivities as follows:

* a bolus of a fixed amount ``a`` (``y_i += a``) leaves ``S`` unchanged; an infusion adds
  a parameter-independent input rate, so ``dS/dt`` is unchanged;
* a dose in ``mg/kg`` or ``mg/m2`` is ``a·WT`` (or ``a·BSA``): when that body-size
  parameter is a sensitivity parameter, ``S_{i,WT}`` jumps by ``a`` (an infusion adds
  ``rate/WT``); :meth:`SensitivityModel.regimen` adds these events;
* a ``Scale`` event (``y_i *= c``, ``c`` a constant) also scales every ``S_ik``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import sympy
import xarray as xr

from ._version import __version__
from .errors import ModelError, RegimenError
from .model import Model, ModelBuilder, _suggest
from .regimen import Dose, Regimen, Scale, _parse_unit, convert_amount

__all__ = ["SensitivityModel", "sensitivity_model", "SensitivitySolver",
           "simulate_sensitivities", "finite_difference_sensitivities"]


def _sens_state_name(state: str, par: str) -> str:
    return f"S__{state}__{par}"


def _sens_obs_name(obs: str, par: str) -> str:
    return f"dd__{obs}__{par}"


def _output_expr(model: Model, name: str) -> sympy.Expr:
    """The expression of an observable, a state or an assignment."""
    if name in model.observables:
        return model.observables[name].expr
    if name in model.assignments:
        return model.assignments[name].expr
    return model.symbol(name)


#: Floor of state-dependent logarithm arguments and power bases in sensitivity equations.
_FLOOR = sympy.Float(1e-100)


def _clean(e: sympy.Expr, states=frozenset()) -> sympy.Expr:
    """Tidy a derivative for the sensitivity equations.

    * Dirac deltas (derivatives of switches at measure-zero kinks) are dropped;
    * ``log(x)`` and ``x**n`` (``n`` not an integer) of a state-dependent ``x`` get the
      argument ``max(x, 1e-100)``: the derivatives of ``hill(x, k, n)`` contain
      ``x^(n−1)`` and ``x^n·log x``, whose values at ``x = 0`` (e.g. no drug before the
      first dose) are limits that evaluate to ``0·∞``, and the Jacobian of the sensitivity
      equations differentiates them once more.  Above 1e-100 nothing changes.
    """
    if e.has(sympy.DiracDelta):
        e = e.replace(sympy.DiracDelta, lambda *a: sympy.Integer(0))
    if not states:
        return e

    def floor_log(x):
        return isinstance(x, sympy.log) and bool(x.args[0].free_symbols & states)

    def floor_pow(x):
        return (isinstance(x, sympy.Pow) and not x.exp.is_Integer
                and bool(x.base.free_symbols & states) and not isinstance(x.base, sympy.Max))

    if e.has(sympy.log):
        e = e.replace(floor_log, lambda x: sympy.log(sympy.Max(x.args[0], _FLOOR)))
    e = e.replace(floor_pow, lambda x: sympy.Pow(sympy.Max(x.base, _FLOOR), x.exp))
    return e


@dataclass(frozen=True)
class SensitivityModel:
    """A model augmented with forward-sensitivity states and observables.

    Attributes
    ----------
    model : the original model.
    augmented : the augmented model (original states first, then sensitivities).
    parameters : the sensitivity parameters, in order.
    observables : observables whose sensitivities are recorded.
    state_sens : ``(state, parameter) -> augmented state name`` (structurally non-zero only).
    obs_sens : ``(observable, parameter) -> augmented observable name``.
    """

    model: Model
    augmented: Model
    parameters: tuple[str, ...]
    observables: tuple[str, ...]
    state_sens: Mapping[tuple[str, str], str] = field(default_factory=dict)
    obs_sens: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def regimen(self, regimen: Regimen | None, parameters: Mapping[str, float]) -> Regimen | None:
        """The regimen for the augmented model (adds the events sensitivities need).

        Parameters
        ----------
        regimen : the regimen of the original model.
        parameters : parameter values (body weight/BSA for per-body-size doses).
        """
        if regimen is None:
            return None
        units = {s.name: s.unit for s in self.model.states.values()}
        extra: list = []
        for it in regimen.items:
            if isinstance(it, Scale):
                tg = [n for t in it.targets for (s, _), n in self.state_sens.items() if s == t]
                if tg:
                    extra.append(Scale(tuple(tg), factor=it.surviving_fraction, start=it.start,
                                       every=it.every, count=it.count, until=it.until,
                                       label=(it.label or "scale") + " (sensitivities)"))
                continue
            if it.unit is None:
                continue
            base, per_kind = _parse_unit(it.unit)
            if per_kind is None:
                continue
            per = it.per or {"kg": "WT", "m2": "BSA"}[per_kind]
            if per not in self.parameters:
                continue
            name = self.state_sens.get((it.target, per))
            if name is None:
                raise RegimenError(f"a dose in {it.unit} into {it.target!r} depends on {per!r}, "
                                   f"but the sensitivity model was built without it: pass this "
                                   f"regimen to sensitivity_model / SensitivitySolver(regimen=...)")
            mass, _ = convert_amount(it.amount, base, units[it.target], state=it.target)
            extra.append(Dose(name, it.amount * mass, start=it.start, every=it.every,
                              count=it.count, until=it.until, duration=it.duration,
                              label=(it.label or "dose") + f" (d/d{per})"))
        return regimen + Regimen(tuple(extra)) if extra else regimen


def _per_parameters(regimen: Regimen | None) -> dict[str, set]:
    """``state -> {body-size parameters}`` for every per-kg / per-m2 dose of ``regimen``."""
    out: dict[str, set] = {}
    for it in (regimen.doses if regimen is not None else ()):
        if it.unit is None:
            continue
        _, per_kind = _parse_unit(it.unit)
        if per_kind is not None:
            out.setdefault(it.target, set()).add(it.per or {"kg": "WT", "m2": "BSA"}[per_kind])
    return out


def sensitivity_model(model: Model, parameters: Sequence[str], *,
                      observables: Sequence[str] | None = None,
                      regimen: Regimen | None = None) -> SensitivityModel:
    """Augment ``model`` with the forward sensitivities w.r.t. ``parameters``.

    Parameters
    ----------
    model : the model.
    parameters : names of the parameters to differentiate by.
    observables : observables whose sensitivities are recorded (default: all); states
        and assignments may be named too.
    regimen : only needed when a per-kg / per-m2 dose depends on a sensitivity
        parameter (its body-size parameter): that target's sensitivity is then kept
        even if the equations alone would make it zero.

    Raises
    ------
    ModelError : unknown parameter or observable, or a name collision.
    """
    parameters = tuple(parameters)
    if not parameters:
        raise ModelError("no sensitivity parameters given", section="parameters")
    for p in parameters:
        if p not in model.parameters:
            raise ModelError(f"unknown parameter{_suggest(p, model.parameters)}",
                             file=None, section="parameters", item=p)
    if len(set(parameters)) != len(parameters):
        raise ModelError("a sensitivity parameter is listed twice", section="parameters")
    observables = tuple(model.observables) if observables is None else tuple(observables)
    recordable = list(model.observables) + list(model.states) + list(model.assignments)
    for o in observables:
        if o not in recordable:
            raise ModelError(f"unknown observable{_suggest(o, recordable)} (observables, "
                             "states and assignments can be differentiated)",
                             section="observables", item=o)

    sym = model.symbol
    snames = model.state_names
    ys = [sym(s) for s in snames]
    ps = [sym(p) for p in parameters]
    rhs = model.rhs_substituted()  # Hill() kept whole: closed-form derivatives
    yset = frozenset(ys)
    J = {}
    for i, f in enumerate(rhs):
        fs = f.free_symbols
        for j, y in enumerate(ys):
            if y in fs:
                d = _clean(sympy.diff(f, y), yset)
                if d != 0:
                    J[i, j] = d
    dfdp = {}
    dy0 = {}
    for k, p in enumerate(ps):
        for i, f in enumerate(rhs):
            if p in f.free_symbols:
                d = _clean(sympy.diff(f, p), yset)
                if d != 0:
                    dfdp[i, k] = d
        for i, s in enumerate(model.states.values()):
            if p in s.initial.free_symbols:
                d = _clean(sympy.diff(s.initial, p))
                if d != 0:
                    dy0[i, k] = d
    # structure: which S_ik can be non-zero
    per = _per_parameters(regimen)
    nz = {(i, k) for (i, k) in list(dfdp) + list(dy0)}
    for st, pars in per.items():
        for p in pars:
            if p in parameters and st in snames:
                nz.add((snames.index(st), parameters.index(p)))
    changed = True
    while changed:
        changed = False
        for (i, j) in J:
            for k in range(len(ps)):
                if (j, k) in nz and (i, k) not in nz:
                    nz.add((i, k))
                    changed = True

    taken = set(model.states) | set(model.parameters) | set(model.assignments) | \
        set(model.observables)
    b = ModelBuilder(f"{model.name}__sens", time_unit=model.time_unit,
                     description=f"{model.name} with forward sensitivities w.r.t. "
                                 f"{', '.join(parameters)}")
    for s in model.states.values():
        b.add_state(s.name, s.initial, s.unit, s.description)
    for p in model.parameters.values():
        b.add_parameter(p.name, p.value, p.unit, p.description, p.source, p.lower, p.upper)
    for a in model.assignments.values():
        b.add_assignment(a.name, a.expr, a.unit, a.description)
    for st, e in model.odes.items():
        b.add_ode(st, e)
    for fx in model.fluxes:
        b.add_flux(fx.name, fx.rate, fx.source, fx.target, fx.description)
    for o in model.observables.values():
        b.add_observable(o.name, o.expr, o.unit, o.description)

    state_sens: dict = {}
    for k, p in enumerate(parameters):
        for i, s in enumerate(snames):
            if (i, k) in nz:
                name = _sens_state_name(s, p)
                if name in taken:
                    raise ModelError(f"name {name!r} is needed for a sensitivity state but the "
                                     "model already uses it; rename it", item=name)
                state_sens[(s, p)] = name
    S = {(snames.index(s), parameters.index(p)): sym(n) for (s, p), n in state_sens.items()}
    for (s, p), name in state_sens.items():
        i, k = snames.index(s), parameters.index(p)
        unit = f"({model.states[s].unit})/({model.parameters[p].unit})"
        init = dy0.get((i, k), sympy.Integer(0))
        b.add_state(name, init, unit, f"d {s} / d {p}")
    for (s, p), name in state_sens.items():
        i, k = snames.index(s), parameters.index(p)
        e = dfdp.get((i, k), sympy.Integer(0))
        for (ii, j), d in J.items():
            if ii == i and (j, k) in S:
                e = e + d * S[j, k]
        b.add_ode(name, e)
    obs_sens: dict = {}
    for o in observables:
        g = model.substitute_assignments(_output_expr(model, o))
        for k, p in enumerate(parameters):
            e = _clean(sympy.diff(g, ps[k]), yset) if ps[k] in g.free_symbols else \
                sympy.Integer(0)
            for j, y in enumerate(ys):
                if y in g.free_symbols and (j, k) in S:
                    e = e + _clean(sympy.diff(g, y), yset) * S[j, k]
            name = _sens_obs_name(o, p)
            if name in taken:
                raise ModelError(f"name {name!r} is needed for an observable sensitivity but the "
                                 "model already uses it; rename it", item=name)
            b.add_observable(name, e, None, f"d {o} / d {p}")
            obs_sens[(o, p)] = name
    aug = b.build(check_units=False)
    return SensitivityModel(model, aug, parameters, observables, state_sens, obs_sens)


class _Integrator:
    """Direct calls of a compiled model's kernel for one parameter set at a time.

    Skips the Dataset construction of :func:`~immunoode.simulate.simulate` (the fitting
    loop calls this thousands of times); events are cached per regimen and time span
    (and per body size when a dose is per kg / m2).
    """

    def __init__(self, compiled, rtol: float, atol, max_steps: int = 1_000_000):
        from .simulate import _atol_vector
        self.cm = compiled
        self.rtol = float(rtol)
        self.atol = _atol_vector(compiled, atol)
        self.max_steps = int(max_steps)
        self._events: dict = {}
        self._sel: dict = {}

    def selection(self, names: Sequence[str]) -> np.ndarray:
        key = tuple(names)
        if key not in self._sel:
            from .simulate import resolve_outputs
            self._sel[key] = resolve_outputs(self.cm, list(names))
        return self._sel[key]

    def run(self, regimen: Regimen | None, t_eval: np.ndarray, values: Mapping[str, float],
            names: Sequence[str]) -> np.ndarray:
        """Record variables ``names`` at ``t_eval``: array (len(names), len(t_eval))."""
        from .errors import SimulationError
        from .simulate import STATUS_MESSAGES, prepare_events
        cm = self.cm
        p = cm.parameter_vector(values)
        y0 = cm.initial_state(p)
        t_eval = np.asarray(t_eval, float)
        per = regimen is not None and any("/" in (getattr(it, "unit", None) or "")
                                          for it in regimen.items)
        key = (regimen, float(t_eval[0]), float(t_eval[-1]), p.tobytes() if per else None)
        ev = self._events.get(key)
        if ev is None:
            params = dict(zip(cm.parameter_names, p.tolist()))
            ev = prepare_events(cm, regimen, params, float(t_eval[0]), float(t_eval[-1]))
            if len(self._events) > 4096:
                self._events.clear()
            self._events[key] = ev
        sel = self.selection(names)
        out = np.empty((1, len(sel), len(t_eval)))
        info = np.empty((1, 8))
        status = np.empty(1, dtype=np.int64)
        cm.numba.integrate_many(y0[None, :], p[None, :], t_eval, ev[0][None, :], ev[1][None, :],
                                ev[2][None, :], ev[3][None, :], sel, self.rtol, self.atol,
                                self.max_steps, np.inf, out, info, status)
        st = int(status[0])
        if st != 0:
            sf = int(info[0, 7])
            state = cm.state_names[sf] if 0 <= sf < len(cm.state_names) else "?"
            raise SimulationError(f"integration failed at t={info[0, 6]:.6g}: "
                                  f"{STATUS_MESSAGES.get(st, st)}; state {state!r}")
        return out[0]


class SensitivitySolver:
    """Observables and their parameter sensitivities through a regimen, compiled.

    Parameters
    ----------
    model : the original model.
    parameters : sensitivity parameters.
    observables : observables to return (default: all).
    regimen : see :func:`sensitivity_model` (only for per-kg/per-m2 doses).
    rtol, atol : integrator tolerances, applied to states and sensitivities alike.
    """

    def __init__(self, model: Model, parameters: Sequence[str], *,
                 observables: Sequence[str] | None = None, regimen: Regimen | None = None,
                 rtol: float = 1e-8, atol: float = 1e-10, compile_kw: Mapping | None = None):
        from .compile import compile_model
        self.sm = sensitivity_model(model, parameters, observables=observables, regimen=regimen)
        self.compiled = compile_model(self.sm.augmented, **dict(compile_kw or {}))
        self.rtol = float(rtol)
        self.atol = atol
        self.n_solves = 0
        self._integrator = _Integrator(self.compiled, rtol, atol)

    @property
    def parameters(self) -> tuple[str, ...]:
        return self.sm.parameters

    @property
    def observables(self) -> tuple[str, ...]:
        return self.sm.observables

    def solve(self, t_eval, regimen: Regimen | None, parameters: Mapping[str, float] | None = None,
              observables: Sequence[str] | None = None):
        """Return ``(F, dF)``: observables ``(n_obs, T)`` and sensitivities ``(n_obs, T, n_par)``.

        Parameters
        ----------
        t_eval : [model time unit] output times, non-decreasing.
        regimen : the regimen of the original model.
        parameters : parameter values (overrides of the nominal ones).
        observables : subset of :attr:`observables` (default: all of them).
        """
        obs = self.observables if observables is None else tuple(observables)
        pvals = dict(self.sm.model.parameter_values)
        pvals.update({k: float(v) for k, v in (parameters or {}).items()})
        reg = self.sm.regimen(regimen, pvals)
        names = list(obs) + [self.sm.obs_sens[(o, p)] for o in obs for p in self.parameters]
        rec = self._integrator.run(reg, np.asarray(t_eval, float), pvals, names)
        self.n_solves += 1
        n_o, n_p = len(obs), len(self.parameters)
        F = rec[:n_o]
        dF = rec[n_o:].reshape(n_o, n_p, -1).transpose(0, 2, 1).copy()
        return F, dF


def simulate_sensitivities(model: Model, parameters: Sequence[str], regimen: Regimen | None = None,
                           *, t_eval=None, t_end: float = 365.0, dt: float = 1.0,
                           values: Mapping[str, float] | None = None,
                           observables: Sequence[str] | None = None, rtol: float = 1e-8,
                           atol: float = 1e-10) -> xr.Dataset:
    """Simulate observables and their sensitivities; return a Dataset.

    Parameters
    ----------
    model : the model.
    parameters : sensitivity parameters.
    regimen : dosing regimen.
    t_eval : [model time unit] output times (default ``time_grid(t_end, dt)``).
    values : parameter values (overrides of nominal values).
    observables : observables (default: all).
    rtol, atol : integrator tolerances.

    Returns
    -------
    xarray.Dataset
        For every observable ``o``: ``o`` (time) and ``d_o`` (time, parameter) with
        ``∂o/∂p`` in ``[unit of o]/[unit of p]``; provenance in ``attrs``.
    """
    from .simulate import time_grid
    t_eval = time_grid(t_end, dt) if t_eval is None else np.asarray(t_eval, float)
    solver = SensitivitySolver(model, parameters, observables=observables, regimen=regimen,
                               rtol=rtol, atol=atol)
    F, dF = solver.solve(t_eval, regimen, values)
    pv = dict(model.parameter_values)
    pv.update({k: float(v) for k, v in (values or {}).items()})
    dvars = {}
    for a, o in enumerate(solver.observables):
        comp = (model.observables.get(o) or model.assignments.get(o) or model.states[o])
        unit = comp.unit or ""
        dvars[o] = xr.Variable(("time",), F[a], {"units": unit,
                                                  "description": comp.description})
        dvars[f"d_{o}"] = xr.Variable(("time", "parameter"), dF[a],
                                      {"description": f"forward sensitivity d{o}/dp",
                                       "units": f"{unit or '1'} per parameter unit"})
    ds = xr.Dataset(dvars, coords={
        "time": ("time", t_eval, {"units": model.time_unit}),
        "parameter": ("parameter", list(solver.parameters)),
        "parameter_unit": ("parameter", [model.parameters[p].unit for p in solver.parameters])})
    ds.attrs.update({
        "model_name": model.name, "model_hash": model.content_hash(pv),
        "augmented_structure_hash": solver.sm.augmented.structure_hash(),
        "parameters": json.dumps(pv), "sensitivity_parameters": json.dumps(list(parameters)),
        "regimen": json.dumps(regimen.to_dict() if regimen is not None else {}),
        "solver": solver.compiled.method, "rtol": float(rtol), "atol": float(atol),
        "immunoode_version": __version__})
    return ds


def finite_difference_sensitivities(compiled, parameters: Sequence[str], regimen, t_eval,
                                    values: Mapping[str, float] | None = None,
                                    observables: Sequence[str] | None = None,
                                    rel_step: float = 1e-5, rtol: float = 1e-11,
                                    atol: float = 1e-13):
    """Central finite differences of the plain simulation (reference / fallback).

    Returns ``(F, dF)`` shaped as :meth:`SensitivitySolver.solve`; step ``h = rel_step·|p|``
    (``rel_step`` if ``p = 0``).
    """
    from .simulate import simulate
    obs = tuple(observables) if observables is not None else tuple(compiled.model.observables)
    base = dict(compiled.model.parameter_values)
    base.update({k: float(v) for k, v in (values or {}).items()})

    def run(pv):
        ds = simulate(compiled, regimen, t_eval=t_eval, parameters=pv, rtol=rtol, atol=atol,
                      outputs=list(obs))
        return np.stack([ds[o].values for o in obs])

    F = run(base)
    dF = np.empty(F.shape + (len(parameters),))
    for k, p in enumerate(parameters):
        h = rel_step * abs(base[p]) if base[p] != 0 else rel_step
        up, dn = dict(base), dict(base)
        up[p] += h
        dn[p] -= h
        dF[..., k] = (run(up) - run(dn)) / (2 * h)
    if not np.all(np.isfinite(dF)):
        raise ModelError("finite-difference sensitivities are not finite", item=",".join(parameters))
    return F, dF

