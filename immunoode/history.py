"""Pre-treatment history: grow every virtual patient's tumor until diagnosis, batched.

Stage 3b — virtual patients.  Consumes a compiled model and per-patient parameter
columns; produces, for every patient, the model state at diagnosis (the trial's
initial state), the time from seeding to diagnosis, and a screening status.

For each chunk of patients, three :func:`~immunoode.population.simulate_population`
calls (never a Python loop over patients):

1. **Host equilibrium**: every state named in ``seed_states`` (tumor cells) is set to 0
   and the model
   runs ``equilibrate_days`` untreated; the final state is the immune-equilibrated,
   tumor-free host.
2. **Growth**: the seed (e.g. 10⁶ tumor cells) is placed in that host and the model
   runs untreated, in windows of ``window_days``, up to ``max_days``; the diagnosis size
   (index lesion, or the sum over lesions) and all states are recorded every
   ``grid_days``.  The first grid interval in which the size reaches the patient's
   sampled baseline size brackets diagnosis; diagnosed patients leave after their window.
3. **Refinement**: from the state at the start of the bracket the model runs over the
   bracket on a grid of ``refine_points``; the crossing is located on that grid and
   the state is interpolated linearly to it (error O(h²), h = grid_days /
   (refine_points − 1)).

Screening status (``screen_status``): ``patient``; ``immune_control`` (never reaches
diagnosis size and ends smaller than its peak, i.e. the immune system holds or
eliminates it); ``too_slow`` (still growing at ``max_days``); ``too_fast`` (diagnosis
sooner than ``min_days`` after seeding: implausible); ``failed`` (an integration
failed; the solver message is kept).  The model must be autonomous (no explicit ``t``),
since every stage restarts the clock at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .errors import ModelError

__all__ = ["HistoryResult", "simulate_history", "check_history_spec", "SCREEN_STATUS"]

SCREEN_STATUS = ("patient", "immune_control", "too_slow", "too_fast", "failed")
_HISTORY_KEYS = {"seed_states", "lesion_seed", "baseline_mm", "diagnosis", "equilibrate_days",
                 "max_days", "min_days", "grid_days", "refine_points", "chunk", "window_days"}
_DEFAULTS = {"diagnosis": "index", "equilibrate_days": 3650.0, "max_days": 7300.0,
             "min_days": 180.0, "grid_days": 14.0, "refine_points": 65, "chunk": 1024,
             "window_days": 730.0}


def check_history_spec(h, file=None) -> dict | None:
    """Validate a ``[history]`` table (None when absent) and fill defaults."""
    from .trial import TrialError, _check_keys
    if h is None:
        return None
    if not isinstance(h, Mapping):
        raise TrialError("[history] must be a table", file=file)
    h = dict(h)
    _check_keys(h, _HISTORY_KEYS, "history", file)
    for k, v in _DEFAULTS.items():
        h.setdefault(k, v)
    seeds = h.get("seed_states")
    if not isinstance(seeds, Mapping) or not seeds:
        raise TrialError("seed_states must be a table state = amount at seeding (e.g. "
                         "{ Ts = 0.001 } for 1e6 cells in units of 1e9 cells)", file=file,
                         section="history", item="seed_states")
    for k, v in seeds.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise TrialError(f"seed of {k!r} must be a number >= 0, got {v!r}", file=file,
                             section="history", item="seed_states")
    if "baseline_mm" not in h:
        raise TrialError("baseline_mm must name the sampled population variable with each "
                         "patient's diameter at diagnosis in mm (or be a number)", file=file,
                         section="history", item="baseline_mm")
    if h["diagnosis"] not in ("index", "sum"):
        raise TrialError(f"diagnosis must be 'index' (first lesion) or 'sum' (all lesions), got "
                         f"{h['diagnosis']!r}", file=file, section="history", item="diagnosis")
    for k in ("equilibrate_days", "max_days", "grid_days", "window_days"):
        v = h[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise TrialError(f"{k} must be a positive number of days, got {v!r}", file=file,
                             section="history", item=k)
    if not (isinstance(h["min_days"], (int, float)) and 0 <= h["min_days"] < h["max_days"]):
        raise TrialError("min_days must be in [0, max_days)", file=file, section="history",
                         item="min_days")
    if not (isinstance(h["refine_points"], int) and h["refine_points"] >= 3):
        raise TrialError("refine_points must be an integer >= 3", file=file, section="history",
                         item="refine_points")
    if not (isinstance(h["chunk"], int) and h["chunk"] >= 1):
        raise TrialError("chunk must be a positive integer", file=file, section="history", item="chunk")
    ls = h.get("lesion_seed")
    if ls is not None and (not isinstance(ls, (list, tuple))
                           or not all(isinstance(x, (int, float)) and x >= 0 for x in ls)):
        raise TrialError("lesion_seed must be a list of multipliers >= 0, one per lesion", file=file,
                         section="history", item="lesion_seed")
    return h


@dataclass
class HistoryResult:
    """Outcome of :func:`simulate_history` (arrays over patients).

    Attributes
    ----------
    status : screening status, labels of :data:`SCREEN_STATUS`.
    t_diagnosis : [day] time from seeding to diagnosis (NaN for non-patients).
    size_mm : [mm] diagnosis size reached (the target for patients; the largest size
        reached for non-patients).
    state : state name -> (patient,) model state at diagnosis (NaN for non-patients).
    message : solver message for failed patients, else a short reason.
    """

    status: np.ndarray
    t_diagnosis: np.ndarray
    size_mm: np.ndarray
    state: dict[str, np.ndarray]
    message: np.ndarray

    @property
    def is_patient(self) -> np.ndarray:
        return self.status == "patient"

    @property
    def screen_failure_share(self) -> float:
        return float(np.mean(~self.is_patient)) if self.status.size else float("nan")


def _size(ds, records: Sequence[str], scale: float, diagnosis: str) -> np.ndarray:
    """(patient, time) diagnosis size in mm."""
    if diagnosis == "index":
        return ds[records[0]].values * scale
    return sum(ds[r].values for r in records) * scale


def simulate_history(cm, columns: Mapping[str, np.ndarray], *, size_records: Sequence[str],
                     size_scale_mm: float, target_mm, seed_states: Mapping[str, np.ndarray],
                     diagnosis: str = "index", equilibrate_days: float = 3650.0,
                     max_days: float = 7300.0, min_days: float = 180.0, grid_days: float = 14.0,
                     refine_points: int = 65, chunk: int = 1024, window_days: float = 730.0,
                     n_jobs: int = 1,
                     progress: bool = False, solver: Mapping | None = None) -> HistoryResult:
    """Grow every patient from a seeded tumor in an equilibrated host to its diagnosis size.

    Parameters
    ----------
    cm : compiled model (autonomous).
    columns : per-patient parameter (and initial-state) columns, as for
        :func:`~immunoode.population.simulate_population`.
    size_records : records giving lesion size (one per lesion; the first is the index lesion).
    size_scale_mm : [mm per record unit] e.g. 10 for a diameter in cm.
    target_mm : [mm] scalar or (patient,) diagnosis size.
    seed_states : state -> scalar or (patient,) amount placed at seeding; these states are
        0 during host equilibration.
    diagnosis : ``"index"`` (the first record reaches the target) or ``"sum"``.
    equilibrate_days, max_days, min_days, grid_days : [day] see the module docstring.
    refine_points : grid points of the refinement over one ``grid_days`` bracket.
    chunk : patients per batch.
    window_days : [day] growth is integrated in windows of this length; a patient leaves
        after the window in which it reached diagnosis (memory: chunk × states ×
        window_days / grid_days doubles).
    solver : options of ``simulate_population`` (method, rtol, atol, max_steps).
    """
    from .expr import TIME
    from .population import simulate_population
    if any(TIME in e.free_symbols for e in cm.model.rhs_substituted()):
        raise ModelError("the pre-treatment history needs an autonomous model (no explicit 't' "
                         "in the equations); use a clock state instead", section="history")
    for r in size_records:
        if r not in cm.record_names:
            from .model import _suggest
            raise ModelError(f"no such record{_suggest(r, cm.record_names)}", section="history", item=r)
    for s in seed_states:
        if s not in cm.state_names:
            from .model import _suggest
            raise ModelError(f"not a state of the model{_suggest(s, cm.state_names)}",
                             section="history.seed_states", item=s)
    cols = {k: np.asarray(v, dtype=float) for k, v in columns.items()}
    N = len(next(iter(cols.values())))
    target = np.broadcast_to(np.asarray(target_mm, dtype=float), (N,)).copy()
    seeds = {k: np.broadcast_to(np.asarray(v, dtype=float), (N,)) for k, v in seed_states.items()}
    sopt = dict(solver or {})
    sopt.pop("chunk_size", None)
    states = list(cm.state_names)
    grid = np.arange(0.0, max_days + 0.5 * grid_days, grid_days)
    window_steps = max(1, int(round(window_days / grid_days)))
    fine = np.linspace(0.0, grid_days, int(refine_points))

    status = np.full(N, "patient", dtype=object)
    t_diag = np.full(N, np.nan)
    size_out = np.full(N, np.nan)
    message = np.full(N, "", dtype=object)
    state = {s: np.full(N, np.nan) for s in states}
    bad = ~np.isfinite(target) | (target <= 0)
    status[bad] = "failed"
    message[bad] = "baseline size must be a positive number of mm"

    def sim(c, t_eval, outputs):
        r = simulate_population(cm, c, None, t_eval=t_eval, outputs=outputs, n_jobs=n_jobs, **sopt)
        if r.attrs.get("interrupted"):
            raise KeyboardInterrupt  # Ctrl-C: stop the history, never mark patients failed
        return r

    for c0 in range(0, N, int(chunk)):
        ix = np.arange(c0, min(N, c0 + int(chunk)))
        ix = ix[~bad[ix]]
        if ix.size == 0:
            continue
        sub = {k: v[ix] for k, v in cols.items()}
        # 1. tumor-free host at equilibrium
        eq_cols = dict(sub, **{k: np.zeros(ix.size) for k in seeds})
        eq = sim(eq_cols, np.array([0.0, float(equilibrate_days)]), states)
        # 2. growth from the seed, window by window (patients leave once diagnosed)
        cur = {s: eq[s].values[:, -1].copy() for s in states}
        for kname, v in seeds.items():
            cur[kname] = v[ix].copy()
        tg = target[ix]
        n = ix.size
        ok = eq["status"].values == 0
        msg = eq["message"].values.astype(str).astype(object)
        hit = np.zeros(n, bool)
        k = np.full(n, -1)
        bracket = {s: np.full(n, np.nan) for s in states}
        peak = np.full(n, -np.inf)
        last = np.full(n, np.nan)
        active = ok.copy()
        off = 0
        K = grid.size - 1
        outs = states + [x for x in size_records if x not in states]
        while active.any() and off < K:
            steps = min(int(window_steps), K - off)
            a = np.flatnonzero(active)
            w_cols = {kname: v[a] for kname, v in sub.items()}
            w_cols.update({s: cur[s][a] for s in states})
            g = sim(w_cols, grid_days * np.arange(steps + 1), outs)
            size = _size(g, size_records, size_scale_mm, diagnosis)      # (m, steps + 1)
            with np.errstate(invalid="ignore"):
                above = size >= tg[a, None]
            h = above.any(axis=1)   # a failure after the crossing does not matter
            j = above.argmax(axis=1)
            gok = g["status"].values == 0
            hit[a[h]] = True
            k[a[h]] = off + j[h]
            for s in states:
                vals = g[s].values
                bracket[s][a[h]] = vals[np.flatnonzero(h), np.maximum(j[h] - 1, 0)]
                cur[s][a] = vals[:, -1]
            fin = np.where(np.isfinite(size), size, -np.inf)
            peak[a] = np.maximum(peak[a], fin.max(axis=1))
            last[a] = size[:, -1]
            bad_g = ~gok & ~h
            ok[a[bad_g]] = False
            msg[a[bad_g]] = g["message"].values.astype(str)[bad_g]
            active[a[h | bad_g]] = False
            off += steps
        ok |= hit
        status[ix[~ok]] = "failed"
        message[ix[~ok]] = msg[~ok]
        size_out[ix] = np.where(hit, np.nan, peak)
        nohit = ok & ~hit
        controlled = nohit & (last < peak * (1 - 1e-6))
        status[ix[controlled]] = "immune_control"
        message[ix[controlled]] = "never reached the diagnosis size: tumor held or eliminated"
        slow = nohit & ~controlled
        status[ix[slow]] = "too_slow"
        message[ix[slow]] = f"still below the diagnosis size after {max_days:g} days"
        at_start = hit & (k == 0)   # seed already at or above the diagnosis size
        status[ix[at_start]] = "too_fast"
        message[ix[at_start]] = "the seed is already at the diagnosis size"
        ref = hit & (k > 0)
        if not ref.any():
            continue
        # 3. refine inside the bracket [grid[k-1], grid[k]]
        jr = np.flatnonzero(ref)
        kk = k[jr] - 1
        r_cols = {kname: v[jr] for kname, v in sub.items()}
        r_cols.update({s: bracket[s][jr] for s in states})
        r = sim(r_cols, fine, states + [x for x in size_records if x not in states])
        rok = r["status"].values == 0
        fsize = _size(r, size_records, size_scale_mm, diagnosis)          # (m, F)
        tt = tg[jr]
        fab = fsize >= tt[:, None]
        fab[:, -1] |= rok  # the coarse grid saw the crossing by the end of the bracket
        j = np.maximum(fab.argmax(axis=1), 1)
        m = np.arange(jr.size)
        s0, s1 = fsize[m, j - 1], fsize[m, j]
        with np.errstate(invalid="ignore", divide="ignore"):
            w = np.clip(np.where(s1 > s0, (tt - s0) / (s1 - s0), 1.0), 0.0, 1.0)
        td = grid[kk] + fine[j - 1] + w * (fine[j] - fine[j - 1])
        for s in states:
            a = r[s].values
            state[s][ix[jr]] = np.where(rok, (1 - w) * a[m, j - 1] + w * a[m, j], np.nan)
        t_diag[ix[jr]] = np.where(rok, td, np.nan)
        size_out[ix[jr]] = np.where(rok, (1 - w) * s0 + w * s1, np.nan)
        fail_r = ~rok
        status[ix[jr[fail_r]]] = "failed"
        message[ix[jr[fail_r]]] = r["message"].values.astype(str)[fail_r]
        fast = rok & (td < min_days)
        status[ix[jr[fast]]] = "too_fast"
        message[ix[jr[fast]]] = [f"diagnosis size reached after {x:.0f} days (< {min_days:g})"
                                 for x in td[fast]]
        if progress:
            import sys
            sys.stderr.write(f"\rhistory: {min(N, c0 + int(chunk))}/{N} patients   ")
            sys.stderr.flush()
    if progress:
        import sys
        sys.stderr.write("\n")
    notp = status != "patient"
    for s in states:
        state[s][notp] = np.nan
    t_diag[notp] = np.nan
    return HistoryResult(status.astype(str), t_diag, size_out, state, message.astype(str))
