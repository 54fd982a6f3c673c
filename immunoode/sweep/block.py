"""Stage 7 — one unit of work: one scenario for one block of patients.

Consumes the compiled model, the normalised sweep, a scenario's factors and the block's
patient columns; produces per-patient arrays (sizes at every scan, actions, RECIST/SITC
classes, PFS, time on treatment, cumulative dose, adverse events, status).

The patients are integrated scan to scan: each segment ``[t_k, t_k+1)`` gets each patient's
own doses (its plan as changed by the policy and by toxicity), the states at the end of a
segment start the next one, and the policy acts on the scan read at ``t_k+1`` (before any
dose given that day).  Doses are expanded here from the regimen items with the regimen
module's unit conversion; a dose given on a scan day belongs to the segment that starts
that day.

With several lesions (a :class:`~immunoode.lesions.LesionModel`) every lesion is measured
at each scan and read by :class:`~immunoode.sweep.lesionscan.LesionTracker` (RECIST 1.1 on
the sum of diameters, new lesions, oligo vs systemic); radiotherapy and resection scale
only the treated lesions' copies of the states.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..regimen import KIND_BOLUS, KIND_INFUSION, KIND_SCALE, Dose, convert_amount, regimen_from_dict
from ..radiobiology import lq_surviving_fraction
from .lesionscan import LesionTracker
from .policy import ACTION_CODES, LOCAL_ACTIONS, Action, ScanView
from .toxicity import hazard_per_day, patient_draws, table_row

__all__ = ["simulate_block", "BOR_CODES", "SITC_CODES", "PATTERN_CODES", "block_variables"]

BOR_CODES = ("CR", "PR", "SD", "PD", "NE")
SITC_CODES = ("primary", "secondary", "progression_after_stop", "durable_benefit", "not_evaluable")
PATTERN_CODES = ("none", "oligo", "systemic")
_UNIT_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
_EPS = 1e-9


# --------------------------------------------------------------------------- courses
@dataclass
class Course:
    """One treatment course of one patient: dose rows in absolute time."""

    name: str
    klass: str
    start: float
    stop: float               # no dose at or after this time
    end: float                # exposure end (last planned dose + interval)
    interval: float
    t_group: np.ndarray       # dose time each row belongs to
    t: np.ndarray
    kind: np.ndarray
    idx: np.ndarray
    value: np.ndarray
    amount: np.ndarray        # amount given by the row (state unit), 0 for infusion ends
    drug: np.ndarray          # index into the drug list
    stop_reason: str = ""


@dataclass
class Plan:
    """Treatment of one patient as it unfolds."""

    courses: list = field(default_factory=list)
    holds: list = field(default_factory=list)
    rt: list = field(default_factory=list)      # (time, state index, factor) scale events
    lesion_rt: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    resected: np.ndarray = field(default_factory=lambda: np.zeros(1, bool))
    line_start: float = float("nan")
    stop_reason: str = ""
    tox_discontinued: bool = False
    tox_events: int = 0
    tox_first: float = float("nan")
    next_draw: int = 0
    cum_hazard: float = 0.0

    def active(self, t: float) -> list:
        return [c for c in self.courses if c.start <= t + _EPS and t < min(c.stop, c.end) - _EPS]

    def on_hold(self, t: float) -> bool:
        return any(h0 - _EPS <= t < h1 - _EPS for h0, h1 in self.holds)

    def last_stop_reason(self) -> str:
        """Why treatment is off: the plan's reason, else that of the course that ended last."""
        if self.stop_reason or not self.courses:
            return self.stop_reason
        return max(self.courses, key=lambda c: min(c.stop, c.end)).stop_reason

    def stop_all(self, t: float, reason: str) -> None:
        for c in self.courses:
            if c.stop > t:
                c.stop = max(t, c.start)
                c.end = min(c.end, max(t, c.start))
                c.stop_reason = reason
        self.stop_reason = reason


def _template_items(spec: Mapping, name: str):
    return regimen_from_dict(spec["treatments"][name]["items"]).items


def _modify_first_line(items, f: Mapping, horizon: float):
    """Apply dose / dose_scale / interval / duration to the first-line items (relative time)."""
    out = []
    for it in items:
        if isinstance(it, Dose):
            amount = it.amount if f["dose"] is None else f["dose"]
            amount = amount * f["dose_scale"]
            every = it.every
            if every is not None:
                if it.count is not None:
                    span = (it.count - 1) * every
                elif it.until is not None:
                    span = it.until - it.start
                else:
                    span = horizon
                if f["duration"] is not None:
                    span = f["duration"]
                every = f["interval"] or every
                it = dataclasses.replace(it, amount=amount, every=every, count=None,
                                         until=it.start + span * (1 + 1e-12))
            else:
                it = dataclasses.replace(it, amount=amount)
        out.append(it)
    return tuple(out)


def _span(items, horizon: float) -> tuple[float, float]:
    """(last dose time, interval) of relative items."""
    last, interval = 0.0, 0.0
    for it in items:
        t = it.times(horizon)
        t = t[t <= horizon + _EPS]
        if t.size:
            last = max(last, float(t.max()))
        if getattr(it, "every", None):
            interval = max(interval, float(it.every))
    return last, interval or 21.0


def make_course(name: str, klass: str, items, t0: float, cm, params: Mapping, drugs: list,
                horizon: float, max_duration: float | None) -> Course:
    """Expand relative ``items`` started at day ``t0`` for one patient."""
    units = {s.name: s.unit for s in cm.model.states.values()}
    sidx = {s: i for i, s in enumerate(cm.state_names)}
    rows = []
    rel_h = max(horizon - t0, 0.0)
    for it in items:
        if not isinstance(it, Dose):
            continue
        ts = it.times(rel_h)
        ts = ts[ts <= rel_h + _EPS] + t0
        conv, _ = convert_amount(it.amount, it.unit, units[it.target], per=it.per, parameters=params,
                                 state=it.target)
        amount = it.amount * conv
        label = it.label or it.target
        d = drugs.index(label)
        i = sidx[it.target]
        for t in ts:
            if it.is_infusion:
                rate = amount / it.duration
                rows.append((t, t, KIND_INFUSION, i, rate, amount, d))
                rows.append((t, t + it.duration, KIND_INFUSION, i, -rate, 0.0, d))
            else:
                rows.append((t, t, KIND_BOLUS, i, amount, amount, d))
    a = np.array(rows, dtype=float).reshape(-1, 7)
    a = a[np.argsort(a[:, 0], kind="stable")]  # rows by dose time (searchsorted per segment)
    last, interval = _span(items, rel_h)
    stop = horizon + 1.0 if max_duration is None else t0 + max_duration
    own_end = t0 + last + interval
    end = min(own_end, stop)
    reason = "max_duration" if stop < own_end - _EPS else "completed"
    return Course(name, klass, t0, stop, end, interval, a[:, 0], a[:, 1], a[:, 2].astype(np.int64),
                  a[:, 3].astype(np.int64), a[:, 4], a[:, 5], a[:, 6].astype(np.int64), reason)


def drug_labels(spec: Mapping) -> list[str]:
    """Every dosed drug label of the sweep's treatments (the ``drug`` dimension)."""
    out = []
    for name in spec["treatments"]:
        for it in _template_items(spec, name):
            if isinstance(it, Dose):
                lab = it.label or it.target
                if lab not in out:
                    out.append(lab)
    return out


# --------------------------------------------------------------------------- toxicity
def _apply_toxicity(plan: Plan, a: float, b: float, E, U, table, hold_days: float) -> None:
    """Advance the patient's adverse-event clock over [a, b); holds or discontinues."""
    t = a
    while t < b - _EPS and not plan.tox_discontinued and plan.next_draw < len(E):
        # next breakpoint where the exposure (set of running courses, hold) may change
        marks = [b]
        for c in plan.courses:
            for x in (c.start, min(c.stop, c.end)):
                if t + _EPS < x < b:
                    marks.append(x)
        for h0, h1 in plan.holds:
            for x in (h0, h1):
                if t + _EPS < x < b:
                    marks.append(x)
        u = min(marks)
        act = plan.active(t)
        if act and not plan.on_hold(t):
            h, q = hazard_per_day(table_row(table, [c.klass for c in act]))
            need = E[plan.next_draw] - plan.cum_hazard
            if h > 0 and h * (u - t) >= need:
                t_ae = t + need / h
                plan.tox_events += 1
                if not math.isfinite(plan.tox_first):
                    plan.tox_first = t_ae
                disc = U[plan.next_draw] < q
                plan.next_draw += 1
                plan.cum_hazard = 0.0
                if disc:
                    plan.tox_discontinued = True
                    plan.stop_all(t_ae, "toxicity")
                else:
                    plan.holds.append((t_ae, t_ae + hold_days))
                t = t_ae
                continue
            plan.cum_hazard += h * (u - t)
        t = u


# --------------------------------------------------------------------------- events
def _segment_events(plan: Plan, a: float, b: float, first: bool, given: dict):
    """Event rows of [a, b), marking the doses given (rows of a course are sorted by dose time)."""
    parts = []
    for c in plan.courses:
        g = c.t_group
        lo = int(np.searchsorted(g, a - _EPS, side="left"))
        hi = int(np.searchsorted(g, min(b, c.stop) - _EPS, side="left"))
        if hi <= lo:
            continue
        sl = slice(lo, hi)
        gs = g[sl]
        if plan.holds:
            m = np.ones(hi - lo, bool)
            for h0, h1 in plan.holds:
                m &= ~((gs >= h0 - _EPS) & (gs < h1 - _EPS))
            if not m.any():
                continue
            sl = np.arange(lo, hi)[m]
            gs = g[sl]
        parts.append(np.column_stack([c.t[sl], c.kind[sl], c.idx[sl], c.value[sl]]))
        given["dose"] += np.bincount(c.drug[sl], weights=c.amount[sl], minlength=len(given["dose"]))
        given["first"] = min(given["first"], float(gs[0]))
        if gs[-1] >= given["last"]:
            given["last"] = float(gs[-1])
            given["interval"] = c.interval
    for t, idx, factor in plan.rt:
        if a - _EPS <= t < b - _EPS:
            parts.append(np.array([[t, KIND_SCALE, idx, factor]]))
    if not parts:
        return np.empty((0, 4))
    if len(parts) == 1:
        return parts[0]
    ev = np.concatenate(parts)
    return ev[np.argsort(ev[:, 0], kind="stable")]


# --------------------------------------------------------------------------- main
def block_variables(n_scan: int, n_drug: int, n_lesion: int = 1) -> dict[str, tuple]:
    """Per-patient output variables of a block: name -> (extra dims, dtype, fill)."""
    return {
        "size": (("scan",), np.float64, np.nan),
        "lesion_size": (("scan", "lesion"), np.float64, np.nan),
        "lesion_present": (("lesion",), np.bool_, False),
        "lesion_progressing": (("lesion",), np.bool_, False),
        "lesion_rt_courses": (("lesion",), np.int16, -1),
        "lesion_resected": (("lesion",), np.bool_, False),
        "action": (("scan",), np.int8, -1),
        "bor": ((), np.int8, -1), "sitc": ((), np.int8, -1), "pattern": ((), np.int8, -1),
        "measurable": ((), np.bool_, False),
        "pfs_time": ((), np.float64, np.nan), "pfs_event": ((), np.bool_, False),
        "pfs2_time": ((), np.float64, np.nan), "pfs2_event": ((), np.bool_, False),
        "best_pct_change": ((), np.float64, np.nan),
        "time_on_treatment": ((), np.float64, np.nan), "last_dose_day": ((), np.float64, np.nan),
        "cumulative_dose": (("drug",), np.float64, np.nan),
        "tox_events": ((), np.int16, -1), "tox_first_day": ((), np.float64, np.nan),
        "tox_discontinued": ((), np.bool_, False),
        "status": ((), np.int16, -100), "in_subgroup": ((), np.bool_, False),
    }


def simulate_block(cm, spec: Mapping, factors: Mapping, patients: np.ndarray,
                   columns: Mapping[str, np.ndarray], in_subgroup: np.ndarray, scan_days: np.ndarray,
                   *, policy=None, lesion_model=None, present: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """Simulate one scenario for one block of patients.

    Parameters
    ----------
    cm : compiled model.
    spec : normalised sweep (:attr:`SweepSpec.data`).
    factors : the scenario's factor values.
    patients : [1] global patient indices (they key the random streams).
    columns : per-patient model parameters / initial states, arrays of len(patients).
    in_subgroup : patients of the scenario's subgroup (others are not simulated).
    scan_days : [day] scan schedule, baseline first.
    policy : :class:`~immunoode.sweep.policy.AbstractPolicy` or None.
    lesion_model : the :class:`~immunoode.lesions.LesionModel` of a multi-lesion sweep
        (``cm`` is its compiled model), None for one lesion.
    present : (patient, lesion) lesions the patients have (default all); the columns of an
        absent lesion must already hold zero tumor states.

    Returns
    -------
    dict of arrays over (patient[, scan | drug]), see :func:`block_variables`.
    """
    from ..response import assess_response
    from ..simulate import _atol_vector, records_from_states, resolve_outputs

    lm = lesion_model
    n = len(patients)
    T = np.asarray(scan_days, float)
    S = len(T)
    L = 1 if lm is None else lm.n_lesions
    trial = spec["trial"]
    drugs = drug_labels(spec)
    out = {k: np.full((n,) + tuple({"scan": S, "drug": len(drugs), "lesion": L}[d] for d in dims),
                      fill, dtype=dt)
           for k, (dims, dt, fill) in block_variables(S, len(drugs), L).items()}
    out["in_subgroup"][:] = in_subgroup
    present = np.ones((n, L), bool) if present is None else np.asarray(present, bool).reshape(n, L)
    out["lesion_present"][:] = present
    todo = np.flatnonzero(in_subgroup)
    if todo.size == 0:
        return out

    # parameters and initial states
    pn, sn = cm.parameter_names, cm.state_names
    P = np.repeat(cm.parameter_vector()[None, :], n, axis=0)
    for k, v in {**spec["sweep"]["parameter_values"], **factors.get("_parameters", {})}.items():
        if lm is not None and k in lm.local_parameters:  # one copy per lesion, times its factor
            for nm, f in zip(lm.names(k), lm.factor(k)):
                P[:, pn.index(nm)] = v * f
        else:
            P[:, pn.index(k)] = v
    init = {}
    for k, v in columns.items():
        if k in pn:
            P[:, pn.index(k)] = v
        else:
            init[k] = np.asarray(v, float)
    Y = cm.initial_state(P.T).T.copy()
    for k, v in init.items():
        Y[:, sn.index(k)] = v
    obs = trial["trial"]["lesion_observable"]
    osel = resolve_outputs(cm, [obs] if lm is None else lm.names(obs))
    to_mm = _UNIT_TO_MM[trial["trial"]["diameter_unit"]]
    resp = dict(trial["response"])
    detect = float(resp.get("detect_mm", 5.0))
    solver = dict(trial["solver"])
    rtol = float(solver.get("rtol", 1e-6))
    atol_v = _atol_vector(cm, solver.get("atol", 1e-9))
    max_steps = int(solver.get("max_steps", 1_000_000))
    horizon = float(T[-1])
    tox = spec["toxicity"]
    E, U = patient_draws(int(spec["sweep"]["seed"]), patients)
    rt = spec["radiotherapy"]
    if lm is None:
        rt_idx = [[sn.index(s) for s in rt["targets"]]]
        cut_idx = [[]]
    else:  # each lesion's own copies of the targets
        rt_idx = [[sn.index(lm.names(s)[k]) for s in rt["targets"]] for k in range(L)]
        cut_idx = [[sn.index(lm.names(s)[k]) for s in spec.get("resection", {}).get("states", [])]
                   for k in range(L)]

    def rt_events(t0, dose_gy, fractions, every, lesions=(1,)):
        """LQ scale events (with the hypoxic share) of a radiotherapy course to the 1-based
        ``lesions``."""
        f = lq_surviving_fraction(dose_gy, rt["alpha"], rt["beta"], rt["hypoxic_fraction"],
                                  rt["oer"])
        return [(t0 + j * every, i, f) for j in range(int(fractions)) for k in lesions
                for i in rt_idx[k - 1]]

    def resect_events(t0, lesions):
        """Scale events that set the resected lesions' local states to 0."""
        if lm is None:
            raise ValueError("action 'resect' needs several lesions ([lesions] in the sweep or "
                             "its trial)")
        return [(t0, i, 0.0) for k in lesions for i in cut_idx[k - 1]]

    # plans at day 0
    fl_items = _modify_first_line(_template_items(spec, factors["first_line"]), factors, horizon)
    fl_class = spec["treatments"][factors["first_line"]]["class"]
    added = factors["added_drug"]
    add_items = _template_items(spec, added) if added != "none" else ()
    fl_last, fl_int = _span(fl_items, horizon)
    add_last, add_int = _span(add_items, horizon) if add_items else (0.0, 0.0)
    t_fl = float(factors["start_day"])
    t_add = t_fl
    if added != "none" and factors["sequence"] == "first_line_first":
        t_add = t_fl + fl_last + fl_int
    elif added != "none" and factors["sequence"] == "added_first":
        t_fl = t_add + add_last + add_int
    max_d = getattr(policy, "max_duration", None)
    plans: list[Plan | None] = [None] * n
    given = [None] * n
    status = np.zeros(n, np.int64)
    for i in todo:
        params = dict(zip(pn, P[i]))
        pl = Plan(line_start=min(t_fl, t_add), lesion_rt=np.zeros(L, np.int64),
                  resected=np.zeros(L, bool))
        pl.courses.append(make_course(factors["first_line"], fl_class, fl_items, t_fl, cm, params,
                                      drugs, horizon, max_d))
        if added != "none":
            pl.courses.append(make_course(added, spec["treatments"][added]["class"], add_items, t_add,
                                          cm, params, drugs, horizon, None))
        les = int(factors.get("rt_lesion", 1))
        if les > L:
            raise ValueError(f"rt_lesion = {les} but the model has {L} lesion(s)")
        if factors["rt_fractions"] and present[i, les - 1]:  # an absent lesion gets no RT
            pl.rt.extend(rt_events(t_fl + factors["rt_day"], factors["rt_dose_gy"],
                                   factors["rt_fractions"], factors["rt_every"], (les,)))
            pl.lesion_rt[les - 1] += 1
        plans[i] = pl
        given[i] = {"dose": np.zeros(len(drugs)), "first": np.inf, "last": -np.inf, "interval": 0.0}

    def measure(states, rows):
        """(rows, lesion) measured sizes [mm], 0 below the detection limit."""
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 records of absent lesions
            rec = records_from_states(cm, np.array([0.0]), states[:, :, None], P[rows], osel)[:, :, 0]
        mm = rec * to_mm
        return np.where(mm < detect, 0.0, mm)

    sites = tuple(lm.sites) if lm is not None else (str(trial["trial"].get("lesion_site", "lung")),)
    sizes = out["size"]
    lsize = out["lesion_size"]
    m0 = measure(Y[todo], todo)
    lsize[todo, 0] = np.where(present[todo], m0, np.nan)
    trackers: list[LesionTracker | None] = [None] * n
    if lm is None:
        sizes[todo, 0] = m0[:, 0]
    else:
        from ..lesions import site_index
        is_node = [les.is_node for les in lm.lesions]
        organ = [site_index(x) for x in lm.sites]
        opts = {k: resp[k] for k in ("nontarget_pd", "oligo_max_lesions", "oligo_max_organs",
                                     "lesion_pd_rel", "lesion_pd_abs") if k in resp}
        for r, i in enumerate(todo):
            trackers[i] = LesionTracker(m0[r], is_node, organ, **opts)
            sizes[i, 0] = trackers[i].baseline_sod
    actions = out["action"]
    actions[todo, 0] = 0
    base_mm = sizes[:, 0].copy()
    nadir = base_mm.copy()
    n_prog = np.zeros(n, np.int64)
    pfs2 = np.full(n, np.nan)
    alive = todo.copy()
    n_st = len(sn)
    for k in range(1, S):
        a, b = float(T[k - 1]), float(T[k])
        evs = []
        for i in alive:
            if tox["enabled"]:
                _apply_toxicity(plans[i], a, b, E[i], U[i], tox["table"], tox["hold_days"])
            evs.append(_segment_events(plans[i], a, b, k == 1, given[i]))
        if alive.size:
            m = max(1, max(len(e) for e in evs))
            EV = np.full((alive.size, m, 4), 0.0)
            EV[:, :, 0] = np.inf
            for r, e in enumerate(evs):
                EV[r, :len(e)] = e
            res = np.empty((alive.size, n_st, 2))
            info = np.empty((alive.size, 8))
            st = np.empty(alive.size, np.int64)
            cm.numba.integrate_many(np.ascontiguousarray(Y[alive]), np.ascontiguousarray(P[alive]),
                                    np.array([a, b]), np.ascontiguousarray(EV[:, :, 0]),
                                    np.ascontiguousarray(EV[:, :, 1].astype(np.int64)),
                                    np.ascontiguousarray(EV[:, :, 2].astype(np.int64)),
                                    np.ascontiguousarray(EV[:, :, 3]), np.arange(n_st, dtype=np.int64),
                                    rtol, atol_v, max_steps, np.inf, res, info, st)
            ok = (st == 0) & np.all(np.isfinite(res[:, :, 1]), axis=1)
            status[alive[~ok]] = np.where(st[~ok] != 0, st[~ok], -2)
            Y[alive[ok]] = res[ok, :, 1]
            alive = alive[ok]
        if not alive.size:
            continue
        mk = measure(Y[alive], alive)
        lsize[alive, k] = np.where(present[alive], mk, np.nan)
        if lm is None:
            sizes[alive, k] = mk[:, 0]
        for r, i in enumerate(alive):
            pl = plans[i]
            if lm is None:
                s = sizes[i, k]
                measurable = base_mm[i] >= 10.0
                prog = bool(measurable and s >= 1.2 * nadir[i] - 1e-9 and s >= nadir[i] + 5.0 - 1e-9)
                pattern = "oligo" if int(resp.get("oligo_max_lesions", 3)) >= 1 else "systemic"
                progressing, new, nad = ((1,) if prog else ()), (), nadir[i]
            else:
                reading = trackers[i].read(mk[r])
                s = sizes[i, k] = reading.sod_mm
                prog, pattern = reading.progression, reading.pattern
                progressing, new, nad = reading.progressing, reading.new, trackers[i].sod_nadir
                trackers[i].update(mk[r], reading)
            code = 0
            if prog:
                if n_prog[i] == 1 and not np.isfinite(pfs2[i]):
                    pfs2[i] = b
                act_now = pl.active(b)
                view = ScanView(int(patients[i]), k, b, float(s), float(base_mm[i]), float(nad),
                                True, pattern, bool(act_now), tuple(c.name for c in act_now),
                                int(n_prog[i]), pl.last_stop_reason(),
                                float(b - pl.line_start) if act_now else float("nan"),
                                lesion_sizes_mm=tuple(float(x) for x in mk[r]),
                                progressing_lesions=progressing, new_lesions=new, lesion_sites=sites)
                action = policy.decide(view) if policy is not None else Action()
                code = _apply_action(action, pl, b, factors, spec, cm, dict(zip(pn, P[i])), drugs,
                                     horizon, rt_events, fl_items, max_d, view=view,
                                     resect_events=resect_events, present=present[i])
                n_prog[i] += 1
                nadir[i] = s
            else:
                nadir[i] = min(nadir[i], s)
            actions[i, k] = code
    # classification (RECIST 1.1 / SITC / pattern) of the measured sizes
    out["status"][todo] = status[todo]
    ok = todo[status[todo] == 0]
    last_dose = np.array([given[i]["last"] if given[i] and np.isfinite(given[i]["last"]) else np.nan
                          for i in range(n)])
    if ok.size:
        keys = ("confirm", "confirm_days", "min_sd_days", "detect_mm", "sitc_rule",
                "min_exposure_days", "benefit_days", "off_treatment_days", "oligo_max_lesions",
                "oligo_max_organs")
        if lm is None:
            r = {k: v for k, v in resp.items() if k in keys}
            ds = assess_response(sizes[ok][:, None, :], T, stop_time=last_dose[ok], is_node=[False],
                                 organ=[0], **r)
        else:
            from ..lesions import SITES
            keys += ("nontarget_pd", "lesion_pd_rel", "lesion_pd_abs")
            r = {k: v for k, v in resp.items() if k in keys}
            ds = assess_response(np.moveaxis(lsize[ok], 2, 1), T, stop_time=last_dose[ok],
                                 is_node=is_node, organ=organ, site_names=list(SITES), **r)
        out["lesion_progressing"][ok] = ds["lesion_progressing"].values
        out["bor"][ok] = [BOR_CODES.index(x) for x in ds["bor"].values]
        out["sitc"][ok] = [SITC_CODES.index(x) for x in ds["sitc"].values]
        out["pattern"][ok] = [PATTERN_CODES.index(x) for x in ds["pattern"].values]
        out["measurable"][ok] = ds["measurable"].values
        out["pfs_time"][ok] = ds["pfs_time"].values
        out["pfs_event"][ok] = ds["pfs_event"].values
        out["best_pct_change"][ok] = ds["best_pct_change"].values
        p2 = pfs2[ok]
        out["pfs2_event"][ok] = np.isfinite(p2)
        out["pfs2_time"][ok] = np.where(np.isfinite(p2), p2, T[-1])
    for i in todo:
        g = given[i]
        out["cumulative_dose"][i] = g["dose"]
        if np.isfinite(g["first"]):
            out["time_on_treatment"][i] = min(g["last"] + g["interval"], T[-1]) - g["first"]
            out["last_dose_day"][i] = g["last"]
        else:
            out["time_on_treatment"][i] = 0.0
        out["tox_events"][i] = plans[i].tox_events
        out["tox_first_day"][i] = plans[i].tox_first
        out["tox_discontinued"][i] = plans[i].tox_discontinued
        out["lesion_rt_courses"][i] = plans[i].lesion_rt
        out["lesion_resected"][i] = plans[i].resected
    return out


def _target_lesions(action: Action, view: ScanView | None, present: np.ndarray) -> tuple:
    """1-based lesions a local action treats: its own ``lesions`` or the progressing ones,
    those the patient has."""
    les = action.lesions if action.lesions is not None else (view.progressing_lesions if view else (1,))
    les = tuple(int(j) for j in les)
    bad = [j for j in les if not 1 <= j <= len(present)]
    if bad:
        raise ValueError(f"action {action.kind!r} names lesion(s) {bad}; the model has lesions "
                         f"1..{len(present)}")
    return tuple(j for j in les if present[j - 1])


def _apply_action(action: Action, pl: Plan, t: float, factors, spec, cm, params, drugs, horizon,
                  rt_events, fl_items, max_d, *, view: ScanView | None = None, resect_events=None,
                  present: np.ndarray | None = None) -> int:
    """Change the plan from day ``t``; returns the action code stored for the scan."""
    kind = action.kind
    if kind in ("none",):
        return ACTION_CODES["none"]
    if pl.tox_discontinued and kind in ("switch", "add", "rechallenge"):
        return ACTION_CODES["none"]  # no further treatment after a toxicity discontinuation

    def start(name, cap):
        if name == "first_line":
            name, items = factors["first_line"], fl_items
        else:
            items = _template_items(spec, name)
        klass = spec["treatments"][name]["class"]
        pl.courses.append(make_course(name, klass, items, t, cm, params, drugs, horizon, cap))
        pl.line_start = t
        pl.stop_reason = ""

    if kind == "continue":
        return ACTION_CODES["continue"]
    if kind == "stop":
        if not pl.active(t):
            return ACTION_CODES["none"]  # nothing running: nothing to stop
        pl.stop_all(t, "progression")
        return ACTION_CODES["stop"]
    if kind in LOCAL_ACTIONS:
        les = _target_lesions(action, view, np.ones(1, bool) if present is None else present)
        if kind == "radiotherapy":
            pl.rt.extend(rt_events(t, action.dose_gy, action.fractions, action.every, les))
            for j in les:
                pl.lesion_rt[j - 1] += 1
        else:
            if resect_events is None:
                raise ValueError("action 'resect' needs several lesions")
            pl.rt.extend(resect_events(t, les))
            for j in les:
                pl.resected[j - 1] = True
        if action.then == "stop":
            pl.stop_all(t, "progression")
        elif action.then == "switch":
            pl.stop_all(t, "progression")
            start(action.treatment, action.max_duration)
        elif action.then == "add":
            start(action.treatment, action.max_duration)
        return ACTION_CODES[kind]
    if kind == "switch":
        pl.stop_all(t, "progression")
        start(action.treatment, action.max_duration)
        return ACTION_CODES["switch"]
    if kind == "add":
        start(action.treatment, action.max_duration)
        return ACTION_CODES["add"]
    if kind == "rechallenge":
        start(action.treatment or "first_line", action.max_duration)
        return ACTION_CODES["rechallenge"]
    raise ValueError(f"unknown action {kind!r}")
