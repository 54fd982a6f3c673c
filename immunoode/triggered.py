"""Stage 3b' — simulate models with state-triggered (root-finding) events.

Consumes a :class:`TriggeredModel` (a :class:`~immunoode.model.Model` plus
:class:`Event` s whose triggers are conditions on states, parameters,
assignments and time) and produces the same ``xarray.Dataset`` over ``time`` as
:func:`immunoode.simulate`.

The right-hand side and analytic Jacobian are the compiled model's
(:func:`~immunoode.compile.compile_model`: the numba functions, or the
vectorised numpy ones with ``backend="numpy"``, which need no machine-code
compilation).  Integration uses a :mod:`scipy.integrate` solver (LSODA, BDF or
Radau) stepped one step at a time; after each step every *relation* of every
trigger (``a < b`` → ``g = a − b``) is checked for a sign change and the
earliest root is located on the step's dense output with Brent's method.

Event semantics follow SBML Level 3 Version 2 (section 4.12):

* an event fires when its trigger goes from false to true (``initial_value``
  is the trigger's value "just before" the start, so an event with
  ``initial_value=False`` whose trigger is true at ``t0`` fires at ``t0``);
* its ``delay`` (evaluated when it fires) postpones the assignments; with
  ``use_values_from_trigger_time`` the assigned values are computed when it
  fires, otherwise when they are executed;
* a non-``persistent`` event whose trigger turns false before its execution is
  cancelled;
* events due at the same time execute one at a time, highest ``priority``
  first (evaluated when the choice is made; events without priority come after
  those with one; ties in document order); after each execution all triggers are
  re-evaluated, so an assignment may fire further events at the same instant;
* all assignments of one event use the values from before that event.

A sign change is attributed to the relation itself, not to the floating-point
value at the located root: after a continuous crossing the relation is taken
to have switched, whatever rounding gives there.  After an event assignment,
relations whose value changed are re-evaluated exactly (so ``x >= 1`` holds
right after ``x = 1``).
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import sympy
import xarray as xr
from scipy.integrate import BDF, LSODA, Radau
from scipy.optimize import brentq

from ._version import __version__
from .errors import ModelError, SimulationError
from .expr import TIME, expand_hill

__all__ = ["Event", "TriggeredModel", "simulate_triggered", "SOLVERS"]

_RTOL_ROOT = 4 * np.finfo(float).eps
#: scipy solvers this path can step through.
SOLVERS = {"LSODA": LSODA, "BDF": BDF, "Radau": Radau}


@dataclass(frozen=True)
class Event:
    """A discrete event: when ``trigger`` becomes true, assign new values.

    Attributes
    ----------
    name : identifier (used in messages).
    trigger : sympy Boolean in states, parameters, assignments and ``t``.
    assignments : ``((target, expression), ...)``; a target is a state or a parameter.
    delay : [model time unit] expression evaluated when the event fires, or None.
    priority : expression evaluated when simultaneous events are ordered, or None.
    persistent : when False, the event is cancelled if its trigger turns false
        before the assignments are executed.
    initial_value : the trigger's value just before the start time.
    use_values_from_trigger_time : compute the assigned values when the event
        fires (True) or when it is executed (False).
    """

    name: str
    trigger: object
    assignments: tuple = ()
    delay: object = None
    priority: object = None
    persistent: bool = True
    initial_value: bool = True
    use_values_from_trigger_time: bool = True


@dataclass(frozen=True)
class TriggeredModel:
    """A model together with its state-triggered events.

    Attributes
    ----------
    model : the :class:`~immunoode.model.Model` (its ODEs hold between events).
    events : :class:`Event` s, in document order (ties in priority keep this order
        when no priority is given).
    source : file the events came from (for error messages).
    renamed : ``((sbml_id, name), ...)`` for SBML ids renamed on import (``time`` → ``time_``).
    """

    model: object
    events: tuple = ()
    source: str = ""
    renamed: tuple = ()

    def __post_init__(self):
        m = self.model
        targets = set(m.states) | set(m.parameters)
        known = targets | set(m.assignments) | set(m.observables) | {"t"}
        for ev in self.events:
            for tgt, e in ev.assignments:
                if tgt not in targets:
                    raise ModelError(f"event assigns {tgt!r}, which is neither a state nor a "
                                     f"parameter", file=self.source or None, section="events",
                                     item=ev.name)
            exprs = [ev.trigger] + [e for _, e in ev.assignments] + \
                [x for x in (ev.delay, ev.priority) if x is not None]
            for e in exprs:
                for s in getattr(e, "free_symbols", ()):
                    if s.name not in known:
                        raise ModelError(f"event uses unknown symbol {s.name!r}",
                                         file=self.source or None, section="events", item=ev.name)


# =============================================================================== numerics
_REL_OPS = {
    sympy.StrictGreaterThan: lambda s: s > 0, sympy.GreaterThan: lambda s: s >= 0,
    sympy.StrictLessThan: lambda s: s < 0, sympy.LessThan: lambda s: s <= 0,
    sympy.Equality: lambda s: s == 0, sympy.Unequality: lambda s: s != 0,
}


def _atomize(trigger, atoms: dict):
    """Replace every relation ``a op b`` in a Boolean by a Boolean symbol; collect ``a − b``."""
    if trigger is sympy.true or trigger is sympy.false:
        return trigger
    if isinstance(trigger, sympy.Rel):
        g = trigger.lhs - trigger.rhs
        key = (type(trigger), g)
        if key not in atoms:
            atoms[key] = sympy.Symbol(f"_rel{len(atoms)}")
        return atoms[key]
    if isinstance(trigger, (sympy.And, sympy.Or, sympy.Not, sympy.Xor, sympy.Implies,
                            sympy.Equivalent, sympy.ITE)):
        return trigger.func(*[_atomize(a, atoms) for a in trigger.args])
    if isinstance(trigger, sympy.Expr):  # a number used as a condition: non-zero is true
        return _atomize(sympy.Ne(trigger, 0), atoms)
    raise ModelError(f"cannot use {trigger} as an event trigger")


class _Evaluator:
    """Numeric functions of (t, record values, parameter values) for event math."""

    def __init__(self, cm):
        m = cm.model
        self.names = list(cm.record_names) + list(cm.parameter_names)
        self.syms = [m.symbol(n) for n in self.names]
        self._cache = {}

    def fn(self, expr):
        key = expr
        f = self._cache.get(key)
        if f is None:
            e = expand_hill(expr) if isinstance(expr, sympy.Basic) else sympy.Float(expr)
            # generated from sympy objects (never from file text)
            f = sympy.lambdify([TIME] + self.syms, e, modules=["math"])
            self._cache[key] = f
        return f


def _dataset(cm, t_eval, names, data, attrs):
    from .simulate import _record_meta
    meta = _record_meta(cm)
    dv = {}
    for k, n in enumerate(names):
        unit, desc = meta.get(n, ("", ""))
        if n in cm.model.parameters:
            p = cm.model.parameters[n]
            unit, desc, kind = p.unit, p.description, "parameter"
        else:
            kind = ("state" if n in cm.model.states else
                    "assignment" if n in cm.model.assignments else "observable")
        dv[n] = xr.Variable(("time",), data[k], attrs={"units": unit, "description": desc,
                                                       "kind": kind})
    coords = {"time": ("time", np.asarray(t_eval, float), {"units": cm.model.time_unit})}
    return xr.Dataset(dv, coords=coords, attrs=attrs)


def simulate_triggered(tmodel: TriggeredModel, *, t_eval=None, t_end: float = 10.0,
                       dt: float = 1.0, parameters: Mapping[str, float] | None = None,
                       initial: Mapping[str, float] | None = None, method: str = "LSODA", rtol: float = 1e-8, atol: float = 1e-12,
                       backend: str = "numba", compiled=None, include_parameters: bool = False,
                       max_events: int = 1_000_000, max_steps: int = 1_000_000,
                       seed: int = 0) -> xr.Dataset:
    """Simulate a model with state-triggered events; return a Dataset over ``time``.

    Parameters
    ----------
    tmodel
        The model and its events.
    t_eval
        [model time unit] Output times (non-decreasing); default ``time_grid(t_end, dt)``.
        An output time equal to an event time reports the state after the event.
    parameters
        Overrides of nominal parameter values, name -> value.
    initial
        Overrides of initial state values, name -> value.
    method
        ``"LSODA"`` (default), ``"BDF"`` or ``"Radau"`` (all use the analytic Jacobian).
    rtol, atol
        Relative and absolute tolerance of the integrator.
    backend
        ``"numba"`` (compiled right-hand side) or ``"numpy"`` (vectorised code; no
        machine-code compilation, for one-off runs of small models).
    compiled
        A :class:`~immunoode.compile.CompiledModel` of ``tmodel.model`` to reuse.
    include_parameters
        Also output every parameter over time (by default only those events change).
    Returns
    -------
    xarray.Dataset
        States, assignments and observables (and parameters, see ``include_parameters``)
        over ``time``; ``attrs`` hold the provenance, solver statistics, ``n_events``,
        ``n_roots`` and ``event_log`` (JSON list of ``[time, event name]``).

    Other Parameters
    ----------------
    max_events
        Stop with :class:`~immunoode.errors.SimulationError` after this many event executions.
    seed
        Seed of the random order of simultaneous events with equal priority (SBML
        leaves it random; events without priority run in document order).

    Raises
    ------
    SimulationError
        The integrator failed or too many events were executed.
    """
    from .compile import compile_model
    from .simulate import time_grid

    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SOLVERS)}")
    if backend not in ("numba", "numpy"):
        raise ValueError(f"unknown backend {backend!r}; choose 'numba' or 'numpy'")
    model = tmodel.model
    cm = compiled if compiled is not None else compile_model(model, warm=False)
    t_eval = time_grid(t_end, dt) if t_eval is None else np.asarray(t_eval, dtype=float)
    if t_eval.ndim != 1 or len(t_eval) < 1 or np.any(np.diff(t_eval) < 0) or \
            not np.all(np.isfinite(t_eval)):
        raise ValueError("t_eval must be a finite, non-decreasing 1-D array")
    p = cm.parameter_vector(parameters).copy()
    p0 = p.copy()
    y = np.asarray(cm.initial_state(p), dtype=float).copy()
    for k, v in (initial or {}).items():
        if k not in cm.state_names:
            from .model import _suggest
            raise ModelError(f"unknown state{_suggest(k, cm.state_names)}", section="states",
                             item=k)
        y[cm.state_names.index(k)] = float(v)
    n = len(y)
    ev = tmodel.events
    rng = np.random.default_rng(seed)
    evaluator = _Evaluator(cm)
    pidx = {k: i for i, k in enumerate(cm.parameter_names)}
    sidx = {k: i for i, k in enumerate(cm.state_names)}
    rows, cols = cm.jac_pattern
    nnz = len(rows) if cm.numpy.NNZ else 0
    if backend == "numba":
        nb = cm.numba
        u = np.zeros(n)
        pe_box = [cm.extended_parameters(p)]

        def fun(t, yy):
            out = np.empty(n)
            nb.rhs(t, yy, pe_box[0], u, out)
            return out

        jv = np.empty(max(nnz, 1))

        def jac(t, yy):
            J = np.zeros((n, n))
            if nnz:
                nb.jac(t, yy, pe_box[0], jv)
                J[rows, cols] = jv[:nnz]
            return J

        def params_changed():
            pe_box[0] = cm.extended_parameters(p)
    else:
        npm = cm.numpy

        def fun(t, yy):
            return npm.rhs(t, yy, p, np.empty(n))

        def jac(t, yy):
            J = np.zeros((n, n))
            if nnz:
                J[rows, cols] = npm.jac(t, yy, p, np.empty(nnz))[:nnz]
            return J

        def params_changed():
            pass

    # ----------------------------------------------------------------- event math
    atoms: dict = {}
    bool_exprs = [_atomize(e.trigger, atoms) for e in ev]
    atom_list = list(atoms.items())  # ((type, g), symbol)
    atom_syms = [s for _, s in atom_list]
    atom_ops = [_REL_OPS[k[0]] for k, _ in atom_list]
    atom_g = [evaluator.fn(k[1]) for k, _ in atom_list]
    trig_fns = [sympy.lambdify(atom_syms, b, modules=["math"]) for b in bool_exprs]
    prio_fns = [evaluator.fn(e.priority) if e.priority is not None else None for e in ev]
    delay_fns = [evaluator.fn(e.delay) if e.delay is not None else None for e in ev]
    assign_fns = [[(tgt, evaluator.fn(x)) for tgt, x in e.assignments] for e in ev]

    rec_fn = cm.numpy.record
    rec_buf = np.empty(len(cm.record_names))

    def values_at(t, yy):
        return rec_fn(t, yy, p, rec_buf).tolist() + p.tolist()

    def g_all(t, yy):
        v = values_at(t, yy)
        return np.array([float(g(t, *v)) for g in atom_g])

    def triggers(signs):
        flags = [op(s) for op, s in zip(atom_ops, signs)]
        return [bool(f(*flags)) for f in trig_fns]

    def g_scalar(k, dense):
        def h(tt):
            yy = dense(tt)
            return float(atom_g[k](tt, *values_at(tt, yy)))
        return h

    # ------------------------------------------------------------------ state
    t = float(t_eval[0])
    T = len(t_eval)
    names = list(cm.record_names)
    changed_params = sorted({tgt for e in ev for tgt, _ in e.assignments if tgt in pidx})
    pnames = list(cm.parameter_names) if include_parameters else changed_params
    out = np.full((len(names) + len(pnames), T), np.nan)
    io = 0
    pending: list = []   # heap of (time, order, event, values)
    seq = [0]
    n_exec = 0
    log: list = []   # executed events: [time, name] (the first 10,000)
    stats = {"n_rhs": 0, "n_jac": 0, "n_lu": 0, "n_steps": 0, "n_events": 0, "n_roots": 0}
    signs = np.sign(g_all(t, y)) if atom_g else np.zeros(0)
    prev = [bool(e.initial_value) for e in ev]

    def record_upto(tt, yy, inclusive):
        nonlocal io
        while io < T and (t_eval[io] < tt or (inclusive and t_eval[io] <= tt)):
            out[:len(names), io] = cm.record(t_eval[io], yy, p)
            out[len(names):, io] = [p[pidx[k]] for k in pnames]
            io += 1

    def schedule(k, tt, yy):
        d = 0.0
        if delay_fns[k] is not None:
            d = float(delay_fns[k](tt, *values_at(tt, yy)))
            if not d >= 0:
                raise SimulationError(f"event {ev[k].name!r}: delay evaluates to {d} at t={tt:g} "
                                      f"(must be >= 0)")
        vals = None
        if ev[k].use_values_from_trigger_time:
            v = values_at(tt, yy)
            vals = [float(f(tt, *v)) for _, f in assign_fns[k]]
        seq[0] += 1
        heapq.heappush(pending, (tt + d, seq[0], k, vals))

    def update_triggers(tt, yy):
        nonlocal prev
        now = triggers(signs)
        for k in range(len(ev)):
            if now[k] and not prev[k]:
                schedule(k, tt, yy)
            elif prev[k] and not now[k] and not ev[k].persistent:
                pending[:] = [x for x in pending if x[2] != k]
                heapq.heapify(pending)
        prev = now

    def process(tt, yy):
        """Execute every event due at ``tt`` (priority order, re-checking triggers)."""
        nonlocal n_exec, signs
        update_triggers(tt, yy)
        while pending and pending[0][0] <= tt + 1e-14 * max(1.0, abs(tt)):
            due = [x for x in pending if x[0] <= tt + 1e-14 * max(1.0, abs(tt))]
            v = values_at(tt, yy)

            prios = [float(prio_fns[x[2]](tt, *v)) if prio_fns[x[2]] is not None else -math.inf
                     for x in due]
            top = max(prios)
            tied = [x for x, pr in zip(due, prios) if pr == top]
            # SBML: simultaneous events of equal priority execute in random order
            chosen = tied[int(rng.integers(len(tied)))] if len(tied) > 1 and \
                top > -math.inf else min(tied, key=lambda x: (x[2], x[1]))
            pending.remove(chosen)
            heapq.heapify(pending)
            _, _, k, vals = chosen
            if vals is None:
                vals = [float(f(tt, *v)) for _, f in assign_fns[k]]
            g_before = g_all(tt, yy) if atom_g else None
            for (tgt, _), val in zip(assign_fns[k], vals):
                if tgt in sidx:
                    yy[sidx[tgt]] = val
                else:
                    p[pidx[tgt]] = val
            if any(tgt in pidx for tgt, _ in assign_fns[k]):
                params_changed()
            n_exec += 1
            stats["n_events"] += 1
            if len(log) < 10_000:
                log.append([float(tt), ev[k].name])
            if n_exec > max_events:
                raise SimulationError(f"more than {max_events} event executions by t={tt:g} "
                                      f"(last: {ev[k].name!r}); the events may trigger each other "
                                      f"endlessly")
            if atom_g:
                g_after = g_all(tt, yy)
                moved = g_after != g_before
                signs = np.where(moved, np.sign(g_after), signs)
            update_triggers(tt, yy)
        return yy

    y = process(t, y)
    record_upto(t, y, True)
    solver_cls = SOLVERS[method]
    t_final = float(t_eval[-1])
    while t < t_final:
        t_bound = min(t_final, pending[0][0]) if pending else t_final
        if t_bound <= t:
            y = process(t, y)
            record_upto(t, y, True)
            if pending and pending[0][0] <= t:
                raise SimulationError(f"event processing did not advance at t={t:g}")
            continue
        solver = solver_cls(fun, t, y, t_bound, rtol=rtol, atol=atol, jac=jac)
        root_t = None
        while solver.status == "running":
            msg = solver.step()
            stats["n_steps"] += 1
            if solver.status == "failed":
                raise SimulationError(f"{method} failed at t={solver.t:.6g}: {msg}")
            if stats["n_steps"] > max_steps:
                raise SimulationError(f"more than {max_steps} steps by t={solver.t:.6g}")
            if not np.all(np.isfinite(solver.y)):
                raise SimulationError(f"the state became non-finite at t={solver.t:.6g}")
            t_old, t_new = solver.t_old, solver.t
            if atom_g:
                g_new = g_all(t_new, solver.y)
                s_new = np.sign(g_new)
                crossed = np.nonzero((s_new != signs) & ~(np.isnan(s_new) & np.isnan(signs)))[0]
            else:
                crossed = []
            if len(crossed):
                dense = solver.dense_output()
                roots = {}
                for k in crossed:
                    if signs[k] == 0:
                        roots[k] = t_old
                    elif s_new[k] == 0:
                        roots[k] = t_new
                    else:
                        h = g_scalar(k, dense)
                        s0 = signs[k]

                        def hh(tt, h=h, s0=s0, t_old=t_old):
                            return s0 * 1e-300 if tt == t_old else h(tt)
                        try:
                            roots[k] = brentq(hh, t_old, t_new, xtol=1e-13 * max(1.0, abs(t_new)),
                                              rtol=_RTOL_ROOT)
                        except ValueError:  # same sign at both ends on the dense output
                            roots[k] = t_new
                tr = min(roots.values())
                tol = 1e-12 * max(1.0, abs(tr))
                for k, r in roots.items():
                    if r <= tr + tol:
                        signs[k] = s_new[k] if (signs[k] == 0 or s_new[k] == 0) else -signs[k]
                root_t = tr
                yr = np.asarray(dense(tr), dtype=float) if tr < t_new else solver.y.copy()
                # outputs strictly before the root come from the dense output
                while io < T and t_eval[io] < tr:
                    out[:len(names), io] = cm.record(t_eval[io], dense(t_eval[io]), p)
                    out[len(names):, io] = [p[pidx[k]] for k in pnames]
                    io += 1
                stats["n_roots"] += 1
                t, y = tr, yr
                break
            dense = None
            while io < T and t_eval[io] < t_new:
                if dense is None:
                    dense = solver.dense_output()
                out[:len(names), io] = cm.record(t_eval[io], dense(t_eval[io]), p)
                out[len(names):, io] = [p[pidx[k]] for k in pnames]
                io += 1
            t, y = t_new, solver.y.copy()
        stats["n_rhs"] += int(solver.nfev)
        stats["n_jac"] += int(solver.njev)
        stats["n_lu"] += int(solver.nlu)
        if root_t is None and solver.status == "failed":
            raise SimulationError(f"{method} failed at t={solver.t:.6g}")
        y = process(t, y)
        record_upto(t, y, True)
    record_upto(t, y, True)
    attrs = {
        "model_name": model.name,
        "model_hash": model.content_hash(dict(zip(cm.parameter_names, p0.tolist()))),
        "model_structure_hash": model.structure_hash(),
        "parameters": json.dumps(dict(zip(cm.parameter_names, p0.tolist()))),
        "events": json.dumps([e.name for e in ev]),
        "solver": method, "backend": backend, "rtol": float(rtol), "seed": int(seed),
        "atol": json.dumps(np.atleast_1d(atol).tolist()), "time_unit": model.time_unit,
        "immunoode_version": __version__,
    }
    attrs.update(stats)
    attrs["event_log"] = json.dumps(log)
    return _dataset(cm, t_eval, names + pnames, out, attrs)
