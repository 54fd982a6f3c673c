"""Reference integration path: :func:`scipy.integrate.solve_ivp` through events.

Uses the compiled (numba) right-hand side and analytic Jacobian of a
:class:`~immunoode.compile.CompiledModel`; restarts the solver at every event
time exactly like the compiled Rodas4 path, so that both can be compared.
"""

from __future__ import annotations

import numpy as np
from scipy.integrate import solve_ivp

from .errors import SimulationError

__all__ = ["integrate_scipy"]


def integrate_scipy(cm, y0, p, t_eval, events, sel, method="LSODA", rtol=1e-6, atol=1e-9,
                    backend="numba"):
    """Integrate one parameter set; return ``(record[sel] over t_eval, stats)``."""
    ev_t, ev_k, ev_i, ev_v = events
    _apply = cm.numba._apply_event  # the compiled path's own event rule, callable from Python
    n = len(y0)
    u = np.zeros(n)
    rows, cols = cm.jac_pattern
    nnz = len(cm.numba.JAC_ROWS) if cm.numba.NNZ else 0
    jv = np.empty(max(nnz, 1))
    nb = cm.numba

    if backend == "numba":
        pe = cm.extended_parameters(p)

        def fun(t, y):
            out = np.empty(n)
            nb.rhs(t, y, pe, u, out)
            return out

        def jac(t, y):
            J = np.zeros((n, n))
            if nnz:
                nb.jac(t, y, pe, jv)
                J[rows, cols] = jv[:nnz]
            return J
    else:
        npm = cm.numpy

        def fun(t, y):
            return npm.rhs(t, y, p, np.empty(n)) + u

        def jac(t, y):
            J = np.zeros((n, n))
            if nnz:
                J[rows, cols] = npm.jac(t, y, p, np.empty(nnz))
            return J

    rec = lambda t, y: cm.record(t, y, p)  # noqa: E731
    y = np.array(y0, dtype=float)
    T = len(t_eval)
    out = np.full((len(sel), T), np.nan)
    t = float(t_eval[0])
    ie = io = 0
    stats = {"n_rhs": 0, "n_jac": 0, "n_lu": 0, "n_steps": 0}
    E = len(ev_t)
    while ie < E and ev_t[ie] <= t:
        _apply(ev_k[ie], ev_i[ie], ev_v[ie], y, u)
        ie += 1
    while io < T and t_eval[io] <= t:
        out[:, io] = rec(t, y)[sel]
        io += 1
    kw = {"jac": jac} if method in ("LSODA", "BDF", "Radau") else {}
    while io < T:
        tb = float(t_eval[-1])
        if ie < E and ev_t[ie] < tb:
            tb = float(ev_t[ie])
        if tb > t:
            inside = t_eval[(t_eval > t) & (t_eval < tb)]
            seg_t = np.append(inside, tb)
            sol = solve_ivp(fun, (t, tb), y, method=method, t_eval=seg_t, rtol=rtol, atol=atol, **kw)
            stats["n_rhs"] += int(sol.nfev)
            stats["n_jac"] += int(sol.njev)
            stats["n_lu"] += int(sol.nlu)
            stats["n_steps"] += len(sol.t) - 1  # solver steps are not exposed; t_eval points
            if sol.status != 0 or sol.y.shape[1] != len(seg_t):
                raise SimulationError(f"{method} failed between t={t:g} and t={tb:g}: {sol.message}")
            for j in range(len(inside)):
                out[:, io] = rec(inside[j], sol.y[:, j])[sel]
                io += 1
            y = sol.y[:, -1].copy()
            t = tb
        while ie < E and ev_t[ie] <= tb:
            _apply(ev_k[ie], ev_i[ie], ev_v[ie], y, u)
            ie += 1
        while io < T and t_eval[io] <= tb:
            out[:, io] = rec(tb, y)[sel]
            io += 1
        t = tb
    return out, stats
