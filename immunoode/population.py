"""Simulate many parameter sets (virtual patients) through one regimen.

Each patient is integrated on its own with its own error control (never one
batched system with a shared error norm), inside compiled code, in parallel
over ``n_jobs`` threads, in chunks so that progress can be shown and Ctrl-C
stops cleanly between chunks.  A patient whose integration fails is kept and
marked (``status`` < 0, ``message``), never dropped.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Mapping, Sequence

import numpy as np
import xarray as xr

from .compile import CompiledModel
from .errors import ModelError, RegimenError
from .progress import Progress
from .regimen import Regimen
from .simulate import (COMPILED_METHODS, METHODS, STATUS_MESSAGES, _compiled, kernel_selection,
                       records_from_states, _atol_vector, prepare_events, provenance,
                       resolve_outputs, time_grid, to_dataset)

__all__ = ["simulate_population", "population_table"]

_NO_EVENTS = (np.full(1, np.inf), np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1))


def population_table(cm: CompiledModel, population) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """Parameter matrix (N, n_params), initial-state overrides, patient ids.

    ``population`` is a pandas DataFrame, a mapping name -> 1-D array, or an
    xarray Dataset with a ``patient`` dimension.  Columns may name parameters or
    states (initial values); anything else is an error.
    """
    if isinstance(population, xr.Dataset):
        ids = population["patient"].values if "patient" in population.coords else None
        cols = {k: np.asarray(v.values, dtype=float) for k, v in population.data_vars.items()
                if v.dims == ("patient",) and np.issubdtype(v.dtype, np.number)}
    elif hasattr(population, "columns"):  # pandas
        ids = np.asarray(population.index)
        cols = {str(c): np.asarray(population[c], dtype=float) for c in population.columns}
    elif isinstance(population, Mapping):
        ids = None
        cols = {k: np.atleast_1d(np.asarray(v, dtype=float)) for k, v in population.items()}
    else:
        raise TypeError("population must be a DataFrame, a mapping of arrays or an xarray Dataset")
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1:
        raise ModelError(f"population columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    if n == 0:
        raise ModelError("the population is empty")
    p_nom = cm.parameter_vector()
    P = np.repeat(p_nom[None, :], n, axis=0)
    init = {}
    pnames, snames = cm.parameter_names, cm.state_names
    for k, v in cols.items():
        if k in pnames:
            P[:, pnames.index(k)] = v
        elif k in snames:
            init[k] = v
        else:
            from .model import _suggest
            raise ModelError(f"population column is neither a parameter nor a state"
                             f"{_suggest(k, pnames + snames)}", item=k)
    if ids is None or len(ids) != n:
        ids = np.arange(n)
    return P, init, cols, np.asarray(ids)


def _needs_per_patient_events(regimen: Regimen | None) -> bool:
    if regimen is None:
        return False
    return any("/" in (getattr(it, "unit", None) or "") for it in regimen.items)


def simulate_population(model, population, regimen: Regimen | None = None, *, t_eval=None,
                        t_end: float = 365.0, dt: float = 1.0, outputs: Sequence[str] | None = None,
                        method: str = "rodas5p", rtol: float = 1e-6, atol=1e-9,
                        n_jobs: int = 1, chunk_size: int = 64, progress: bool = False,
                        max_steps: int = 1_000_000, hmax: float = np.inf) -> xr.Dataset:
    """Simulate every patient of ``population`` and return a Dataset over (patient, time).

    Parameters
    ----------
    model : :class:`~immunoode.model.Model` or :class:`~immunoode.compile.CompiledModel`.
    population : per-patient parameter (and initial-state) values, see :func:`population_table`.
    regimen : the same regimen for everyone (weight-based doses use each patient's ``WT``/``BSA``).
    outputs : record names to keep (default: all states, assignments, observables);
        keep this short for large populations — memory is N × len(outputs) × len(t_eval).
    n_jobs : threads for the compiled path (chunks of patients run in parallel; the
        compiled integrator releases the GIL).
    chunk_size : patients per compiled call (progress and Ctrl-C act between chunks).

    Returns
    -------
    Dataset with the outputs over (patient, time), ``status`` (0 = success),
    ``message``, ``n_steps``, ``t_fail``; ``attrs["n_failed"]`` counts failures.
    Interrupted runs return what finished, the rest marked ``status = -10``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cm = _compiled(model, method)
    t_eval = time_grid(t_end, dt) if t_eval is None else np.asarray(t_eval, dtype=float)
    P, init, _, ids = population_table(cm, population)
    N, T = P.shape[0], len(t_eval)
    sel = resolve_outputs(cm, outputs)
    ksel, post = kernel_selection(cm, sel)
    atol_v = _atol_vector(cm, atol)
    Y0 = cm.initial_state(P.T).T.copy()
    for k, v in init.items():
        Y0[:, cm.state_names.index(k)] = v

    # events: shared unless doses depend on per-patient covariates
    bad_events: dict[int, str] = {}
    pnames = cm.parameter_names
    t0, t1 = float(t_eval[0]), float(t_eval[-1])
    if _needs_per_patient_events(regimen):
        evs = []
        for i in range(N):
            try:
                evs.append(prepare_events(cm, regimen, dict(zip(pnames, P[i])), t0, t1))
            except RegimenError as exc:  # e.g. a missing or invalid body weight for mg/kg
                bad_events[i] = str(exc)
                evs.append(_NO_EVENTS)
        E = max(len(e[0]) for e in evs)
        EV_T = np.full((N, E), np.inf)
        EV_K = np.zeros((N, E), np.int64)
        EV_I = np.zeros((N, E), np.int64)
        EV_V = np.zeros((N, E))
        for i, e in enumerate(evs):
            m = len(e[0])
            EV_T[i, :m], EV_K[i, :m], EV_I[i, :m], EV_V[i, :m] = e
    else:
        e = prepare_events(cm, regimen, dict(zip(pnames, P[0])), t0, t1)
        EV_T, EV_K, EV_I, EV_V = (np.ascontiguousarray(np.repeat(a[None, :], N, axis=0)) for a in e)

    OUT = np.full((N, len(sel), T), np.nan)
    INFO = np.zeros((N, 8))
    INFO[:, 6] = np.nan
    STATUS = np.full(N, -10, dtype=np.int64)
    bad = ~(np.all(np.isfinite(P), axis=1) & np.all(np.isfinite(Y0), axis=1))
    for i in bad_events:
        bad[i] = True
    STATUS[bad] = -12
    todo = np.flatnonzero(~bad)
    prog = Progress(N, progress)
    interrupted = False
    t_start = time.perf_counter()
    try:
        if method in COMPILED_METHODS:
            chunks = [todo[c:c + chunk_size] for c in range(0, len(todo), chunk_size)]

            def run_chunk(ix):
                out = np.empty((len(ix), len(ksel), T))
                info = np.empty((len(ix), 8))
                st = np.empty(len(ix), dtype=np.int64)
                cm.numba.integrate_many(Y0[ix], P[ix], t_eval, EV_T[ix], EV_K[ix], EV_I[ix],
                                        EV_V[ix], ksel, float(rtol), atol_v, int(max_steps),
                                        float(hmax), out, info, st)
                if post:
                    with np.errstate(all="ignore"):  # failed patients carry NaN
                        out = records_from_states(cm, t_eval, out, P[ix], sel)
                OUT[ix], INFO[ix], STATUS[ix] = out, info, st
                return len(ix)

            done = int(bad.sum())
            if n_jobs <= 1:
                for ix in chunks:
                    done += run_chunk(ix)
                    prog.update(done, int(np.sum((STATUS < 0) & (STATUS != -10))))
            else:
                with ThreadPoolExecutor(max_workers=int(n_jobs)) as pool:
                    futures = [pool.submit(run_chunk, ix) for ix in chunks]
                    try:
                        for fut in as_completed(futures):
                            done += fut.result()
                            prog.update(done, int(np.sum((STATUS < 0) & (STATUS != -10))))
                    except KeyboardInterrupt:
                        for fut in futures:
                            fut.cancel()
                        raise
        else:
            from .scipy_path import integrate_scipy
            from .errors import SimulationError
            for k, i in enumerate(todo):
                ev = (EV_T[i], EV_K[i], EV_I[i], EV_V[i])
                try:
                    OUT[i], _ = integrate_scipy(cm, Y0[i], P[i], t_eval, ev, sel, method, rtol, atol_v)
                    STATUS[i] = 0
                except SimulationError:
                    STATUS[i] = -11
                prog.update(k + 1, int(np.sum((STATUS < 0) & (STATUS != -10))))
    except KeyboardInterrupt:
        interrupted = True
        sys.stderr.write("\ninterrupted: returning the patients that finished\n")
    wall = time.perf_counter() - t_start

    messages = []
    for i in range(N):
        s = int(STATUS[i])
        msg = STATUS_MESSAGES.get(s, f"status {s}")
        if i in bad_events:
            msg = f"{msg}: {bad_events[i]}"
        elif s < 0 and s not in (-10, -12) and np.isfinite(INFO[i, 6]):
            sf = int(INFO[i, 7])
            state = cm.state_names[sf] if 0 <= sf < len(cm.state_names) else "?"
            msg = f"failed at t={INFO[i, 6]:.6g}: {msg} (state {state!r})"
        messages.append(msg)

    params = dict(zip(pnames, cm.parameter_vector().tolist()))
    attrs = provenance(cm, params, regimen, method, rtol, atol_v)
    attrs["parameters_note"] = "nominal values; per-patient values are the parameter variables"
    tmpl = to_dataset(cm, t_eval, np.zeros((len(sel), T)), sel, attrs)
    # build every variable first and the Dataset once (one merge, not one per variable)
    data = {}
    for name, k in zip([cm.record_names[i] for i in sel], range(len(sel))):
        data[name] = xr.Variable(("patient", "time"), OUT[:, k, :], attrs=tmpl[name].attrs)
    for name, v in tmpl.data_vars.items():
        if name not in data and "time" not in v.dims:
            data[name] = v.variable
    for j, pn in enumerate(pnames):
        if not np.all(P[:, j] == P[0, j]):
            data[pn] = xr.Variable(("patient",), P[:, j], attrs={"kind": "parameter"})
    data["status"] = xr.Variable(("patient",), STATUS, attrs={"description": "0 = success"})
    data["message"] = xr.Variable(("patient",), np.array(messages, dtype=object))
    data["n_steps"] = xr.Variable(("patient",), INFO[:, 0].astype(np.int64))
    data["t_fail"] = xr.Variable(("patient",), INFO[:, 6])
    coords = {k: v.variable for k, v in tmpl.coords.items()}
    coords["patient"] = xr.Variable(("patient",), ids)
    ds = xr.Dataset(data, coords=coords, attrs=tmpl.attrs)
    ds.attrs["n_patients"] = N
    ds.attrs["n_failed"] = int(np.sum(STATUS != 0))
    ds.attrs["interrupted"] = int(interrupted)
    ds.attrs["wall_time_s"] = wall
    ds.attrs["n_jobs"] = int(n_jobs)
    return ds
