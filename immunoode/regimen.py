"""Dosing regimens: doses, infusions and multiplicative events -> a flat event table.

A :class:`Regimen` is an ordered collection of :class:`Dose` (bolus or zero-order
infusion into a state) and :class:`Scale` (instantaneous ``state *= factor``,
e.g. a radiotherapy fraction) items.  :meth:`Regimen.events` expands it into an
:class:`EventTable`: one row per event, sorted by time, ties kept in item order.

Times are in the model time unit (days by convention).  Dose amounts are
converted into the unit of the target state (see :func:`convert_amount`):

* mass units ``ng``, ``ug`` (``µg``, ``mcg``), ``mg``, ``g``, ``kg`` convert
  into each other;
* ``X/kg`` is multiplied by the body-weight parameter (``per``, default ``WT``,
  in kg), ``X/m2`` (``m^2``, ``m**2``) by the body-surface-area parameter
  (``per``, default ``BSA``, in m2);
* any other unit passes through only if it equals the state's unit;
  ``unit = None`` always passes through (amount already in the state's unit).

Regimen files are TOML (see ``docs/regimen-file.md``)::

    [[dose]]
    target = "A1"
    amount = 200
    every = 21
    count = 5
"""

from __future__ import annotations

import math
import numbers
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import RegimenError, did_you_mean
from .radiobiology import check_lq_parameters, lq_surviving_fraction

__all__ = [
    "Dose",
    "Scale",
    "Regimen",
    "EventTable",
    "load_regimen",
    "regimen_from_dict",
    "convert_amount",
    "MASS_UNITS",
    "KIND_BOLUS",
    "KIND_INFUSION",
    "KIND_SCALE",
]

#: Event kinds in :attr:`EventTable.kind`.
KIND_BOLUS = 0  #: add ``value`` to the state (target unit)
KIND_INFUSION = 1  #: add ``value`` to the state's input rate (target unit / time)
KIND_SCALE = 2  #: multiply the state by ``value``

#: Mass units, in grams.
MASS_UNITS: dict[str, float] = {
    "ng": 1e-9,
    "ug": 1e-6,
    "\u00b5g": 1e-6,  # micro sign
    "\u03bcg": 1e-6,  # greek mu
    "mcg": 1e-6,
    "mg": 1e-3,
    "g": 1.0,
    "kg": 1e3,
}

_PER_KG = ("kg",)
_PER_M2 = ("m2", "m^2", "m**2", "m\u00b2")
_DEFAULT_PER = {"kg": "WT", "m2": "BSA"}
_PER_WHAT = {"kg": "body weight", "m2": "body surface area"}
_PER_UNIT = {"kg": "kg", "m2": "m2"}

_TOL = 1e-9  # relative tolerance on schedule end points (until / t_end)


# --------------------------------------------------------------------------- helpers


def _suggest(name: str, candidates) -> str:
    return did_you_mean(name, candidates, cutoff=0.5)


def _number(value, name: str, *, optional: bool = True) -> float | None:
    """Validate a finite real number (bools and strings rejected) -> float."""
    if value is None:
        if optional:
            return None
        raise RegimenError(f"missing required field {name!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RegimenError(f"{name!r} must be a number (got {value!r})")
    v = float(value)
    if not math.isfinite(v):
        raise RegimenError(f"{name!r} must be finite (got {v!r})")
    return v


def _integer(value, name: str) -> int | None:
    """Validate an integer (an integral float is accepted) -> int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RegimenError(f"{name!r} must be an integer (got {value!r})")
    if isinstance(value, numbers.Integral):
        return int(value)
    v = float(value)
    if not math.isfinite(v) or v != int(v):
        raise RegimenError(f"{name!r} must be an integer (got {value!r})")
    return int(v)


def _opt_str(value, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RegimenError(f"{name!r} must be a non-empty string (got {value!r})")
    return value.strip()


def _parse_unit(unit: str) -> tuple[str, str | None]:
    """Split a dose unit into ``(base, per)`` where per is ``"kg"``, ``"m2"`` or None.

    ``"mg/kg" -> ("mg", "kg")``, ``"mg/m^2" -> ("mg", "m2")``, ``"mg" -> ("mg", None)``,
    ``"mg/L" -> ("mg/L", None)`` (not a per-body-size unit).
    """
    u = unit.replace(" ", "")
    if "/" in u:
        base, denom = u.rsplit("/", 1)
        if base:
            if denom in _PER_KG:
                return base, "kg"
            if denom in _PER_M2:
                return base, "m2"
    return u, None


def _check_schedule(start, every, count, until) -> tuple[float, float | None, int | None, float | None]:
    start = _number(start, "start", optional=False)
    every = _number(every, "every")
    count = _integer(count, "count")
    until = _number(until, "until")
    if every is not None and every <= 0:
        raise RegimenError(f"'every' must be > 0 (got {every:g})")
    if count is not None and count < 1:
        raise RegimenError(f"'count' must be >= 1 (got {count})")
    if count is not None and until is not None:
        raise RegimenError("give either 'count' or 'until', not both")
    if every is None:
        if count is not None and count > 1:
            raise RegimenError(f"'count' = {count} requires 'every' (the dosing interval)")
        if until is not None:
            raise RegimenError("'until' requires 'every' (the dosing interval)")
    if until is not None and until < start:
        raise RegimenError(f"'until' ({until:g}) is before 'start' ({start:g})")
    return start, every, count, until


def _schedule(start: float, every: float | None, count: int | None, until: float | None,
              t_end: float | None) -> np.ndarray:
    """Event times ``start + k*every`` of one item (before the t_end cut)."""
    if every is None:
        n = 1
    elif count is not None:
        n = count
    else:
        last = until if until is not None else t_end
        if last is None:
            raise RegimenError(
                f"repeats every {every:g} without 'count' or 'until'; "
                "give one of them (or pass t_end)"
            )
        if last < start:
            return np.empty(0)
        n = int(math.floor((last - start) / every + _TOL)) + 1
    return start + every * np.arange(n) if every is not None else np.array([start])


def _schedule_text(start, every, count, until) -> str:
    if every is None:
        return f"at t={start:g}"
    reps = f"x{count}" if count is not None else (f"until t={until:g}" if until is not None
                                                   else "until the end")
    return f"every {every:g} {reps} from t={start:g}"


def convert_amount(amount: float, unit: str | None, state_unit: str | None, *,
                   per: str | None = None, parameters: Mapping[str, float] | None = None,
                   state: str | None = None) -> tuple[float, str]:
    """Conversion factor from a dose unit to a state's unit.

    Parameters
    ----------
    amount : dose amount in ``unit`` (only used in messages).
    unit : dose unit (``None``: already in the state's unit).
    state_unit : unit of the target state.
    per : parameter name holding body weight [kg] (``X/kg``) or BSA [m2]
        (``X/m2``); default ``"WT"`` / ``"BSA"``.
    parameters : model parameter values.
    state : target state name (only used in messages).

    Returns
    -------
    factor : float
        Multiply the dose amount by this to get the amount in ``state_unit``
        (includes the body-weight / BSA multiplication).
    note : str
        Human readable description of the conversion (provenance).

    Raises
    ------
    RegimenError
        Missing body-size parameter, or units that cannot be converted.
    """
    state_unit = "" if state_unit is None else str(state_unit).strip()
    if unit is None:
        return 1.0, "no conversion"
    u = unit.replace(" ", "")
    if u == state_unit.replace(" ", ""):
        return 1.0, "no conversion"
    base, per_kind = _parse_unit(u)
    factor = 1.0
    notes = []
    if per_kind is not None:
        pname = per or _DEFAULT_PER[per_kind]
        params = parameters or {}
        if pname not in params:
            raise RegimenError(
                f"unit {unit} needs {_PER_WHAT[per_kind]} parameter {pname!r} "
                f"({_PER_UNIT[per_kind]}) in the model or --set {pname}=..."
            )
        pval = params[pname]
        try:
            pval = float(pval)
        except (TypeError, ValueError):
            raise RegimenError(f"parameter {pname!r} is not a number ({pval!r})") from None
        if not (math.isfinite(pval) and pval > 0):
            raise RegimenError(
                f"{_PER_WHAT[per_kind]} parameter {pname!r} must be finite and > 0 (got {pval:g})"
            )
        factor *= pval
        notes.append(f"x {pname}={pval:g} {_PER_UNIT[per_kind]}")
    if base == state_unit.replace(" ", ""):
        pass
    elif base in MASS_UNITS and state_unit in MASS_UNITS:
        f = MASS_UNITS[base] / MASS_UNITS[state_unit]
        factor *= f
        if f != 1.0:
            notes.append(f"x {f:g} ({base}->{state_unit})")
    else:
        shown = state_unit or "dimensionless"
        of = f" of state {state!r}" if state else ""
        raise RegimenError(
            f"cannot convert dose unit {unit!r} to unit {shown!r}{of} "
            "(only mass units ng, ug, mg, g, kg convert; other units must match exactly)"
        )
    return factor, (f"{unit} -> {state_unit}: " + " ".join(notes)) if notes else "no conversion"


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Dose:
    """A bolus or zero-order infusion into state ``target``, possibly repeated.

    Parameters
    ----------
    target : name of the state receiving the dose.
    amount : amount per dose, in ``unit`` (>= 0).
    start : time of the first dose [model time unit, days].
    every : dosing interval [time]; ``None`` = single dose.
    count : number of doses (>= 1); default 1 without ``every``.
    until : last allowed dose time (inclusive) [time], instead of ``count``.
    duration : infusion duration [time]; ``None`` or 0 = bolus.  Must be
        shorter than ``every`` when repeated.
    unit : dose unit; ``None`` = the target state's unit.  ``"mg"``, ``"ug"``,
        ``"mg/kg"``, ``"mg/m2"`` ... (see :func:`convert_amount`).
    per : parameter holding body weight [kg] or BSA [m2] for ``X/kg`` /
        ``X/m2`` units; default ``"WT"`` / ``"BSA"``.
    label : free text (drug name) used in output.
    """

    target: str
    amount: float
    start: float = 0.0
    every: float | None = None
    count: int | None = None
    until: float | None = None
    duration: float | None = None
    unit: str | None = None
    per: str | None = None
    label: str | None = None

    def __post_init__(self):
        target = _opt_str(self.target, "target")
        if target is None:
            raise RegimenError("missing required field 'target'")
        amount = _number(self.amount, "amount", optional=False)
        if amount < 0:
            raise RegimenError(f"'amount' must be >= 0 (got {amount:g})")
        start, every, count, until = _check_schedule(self.start, self.every, self.count, self.until)
        duration = _number(self.duration, "duration")
        if duration is not None and duration < 0:
            raise RegimenError(f"'duration' must be >= 0 (got {duration:g})")
        repeated = every is not None and (count is None or count > 1)
        if duration and repeated and duration >= every:
            raise RegimenError(
                f"infusion 'duration' ({duration:g}) must be shorter than 'every' ({every:g}): "
                "consecutive infusions would overlap"
            )
        unit = _opt_str(self.unit, "unit")
        per = _opt_str(self.per, "per")
        if per is not None and (unit is None or _parse_unit(unit)[1] is None):
            raise RegimenError(f"'per' = {per!r} only applies to units such as mg/kg or mg/m2 "
                               f"(unit is {unit!r})")
        label = _opt_str(self.label, "label")
        for name, value in dict(target=target, amount=amount, start=start, every=every,
                                count=count, until=until, duration=duration, unit=unit,
                                per=per, label=label).items():
            object.__setattr__(self, name, value)

    @property
    def is_infusion(self) -> bool:
        """True for a zero-order infusion (``duration > 0``)."""
        return bool(self.duration)

    def times(self, t_end: float | None = None) -> np.ndarray:
        """Dose (start) times [time], not cut at ``t_end`` except for open-ended repeats."""
        return _schedule(self.start, self.every, self.count, self.until, t_end)

    def describe(self) -> str:
        """One human-readable line."""
        unit = f" {self.unit}" if self.unit else ""
        per = f" ({self.per})" if self.per else ""
        how = f"infusion over {self.duration:g}" if self.is_infusion else "bolus"
        name = f"{self.label}: " if self.label else ""
        return (f"{name}{self.amount:g}{unit}{per} -> {self.target}, {how}, "
                f"{_schedule_text(self.start, self.every, self.count, self.until)}")


@dataclass(frozen=True)
class Scale:
    """Instantaneous multiplicative event ``state *= factor`` (e.g. radiotherapy fraction).

    Parameters
    ----------
    target : state name, or several names (one event per state).
    factor : surviving fraction / multiplier, in (0, inf).
    alpha, beta, dose_gy : OR linear-quadratic model,
        ``factor = exp(-alpha*dose_gy - beta*dose_gy**2)`` with alpha [1/Gy],
        beta [1/Gy^2], dose_gy [Gy] per fraction.  A missing alpha or beta is 0.
    hypoxic_fraction, oer : optional, with the LQ model: a hypoxic share [1] of the clonogens
        that needs ``oer`` [1] times the dose (:func:`immunoode.radiobiology.lq_surviving_fraction`).
        Missing: pure LQ.
    start, every, count, until : schedule, as for :class:`Dose`.
    label : free text used in output.
    """

    target: str | tuple[str, ...]
    factor: float | None = None
    alpha: float | None = None
    beta: float | None = None
    dose_gy: float | None = None
    start: float = 0.0
    every: float | None = None
    count: int | None = None
    until: float | None = None
    label: str | None = None
    hypoxic_fraction: float | None = None
    oer: float | None = None

    def __post_init__(self):
        raw = self.target
        if isinstance(raw, str):
            targets = (raw,)
        elif isinstance(raw, (list, tuple)):
            targets = tuple(raw)
        else:
            raise RegimenError(f"'target' must be a state name or a list of names (got {raw!r})")
        if not targets:
            raise RegimenError("'target' is empty")
        targets = tuple(_opt_str(t, "target") for t in targets)
        if len(set(targets)) != len(targets):
            raise RegimenError(f"'target' lists a state twice: {list(targets)}")
        target = targets[0] if isinstance(raw, str) else targets
        factor = _number(self.factor, "factor")
        alpha = _number(self.alpha, "alpha")
        beta = _number(self.beta, "beta")
        dose_gy = _number(self.dose_gy, "dose_gy")
        hypoxic_fraction = _number(self.hypoxic_fraction, "hypoxic_fraction")
        oer = _number(self.oer, "oer")
        lq = (alpha, beta, dose_gy) != (None, None, None)
        if factor is not None:
            if lq or (hypoxic_fraction, oer) != (None, None):
                raise RegimenError("give either 'factor' or 'alpha'/'beta'/'dose_gy' "
                                   "(with 'hypoxic_fraction'/'oer'), not both")
            if factor <= 0:
                raise RegimenError(f"'factor' must be > 0 (got {factor:g})")
        elif not lq:
            raise RegimenError("give 'factor', or 'alpha' and/or 'beta' with 'dose_gy'")
        else:
            if dose_gy is None:
                raise RegimenError("linear-quadratic scaling needs 'dose_gy' (Gy per fraction)")
            if alpha is None and beta is None:
                raise RegimenError("linear-quadratic scaling needs 'alpha' and/or 'beta'")
            for n, v in (("alpha", alpha), ("beta", beta), ("dose_gy", dose_gy)):
                if v is not None and v < 0:
                    raise RegimenError(f"{n!r} must be >= 0 (got {v:g})")
            if (hypoxic_fraction is None) != (oer is None):
                raise RegimenError("a hypoxic share needs both 'hypoxic_fraction' and 'oer'")
            if hypoxic_fraction is not None:
                problem = check_lq_parameters(alpha or 0.0, beta or 0.0, hypoxic_fraction, oer)
                if problem:
                    raise RegimenError(problem)
        start, every, count, until = _check_schedule(self.start, self.every, self.count, self.until)
        label = _opt_str(self.label, "label")
        for name, value in dict(target=target, factor=factor, alpha=alpha, beta=beta,
                                dose_gy=dose_gy, start=start, every=every, count=count,
                                until=until, label=label, hypoxic_fraction=hypoxic_fraction,
                                oer=oer).items():
            object.__setattr__(self, name, value)
        if self.surviving_fraction <= 0:
            raise RegimenError("linear-quadratic surviving fraction underflows to 0")

    @property
    def targets(self) -> tuple[str, ...]:
        """Target state names as a tuple."""
        return (self.target,) if isinstance(self.target, str) else tuple(self.target)

    @property
    def surviving_fraction(self) -> float:
        """The multiplier applied per event (``factor`` or the LQ value)."""
        if self.factor is not None:
            return self.factor
        return lq_surviving_fraction(self.dose_gy, self.alpha or 0.0, self.beta or 0.0,
                                     self.hypoxic_fraction or 0.0, self.oer or 1.0)

    def times(self, t_end: float | None = None) -> np.ndarray:
        """Event times [time]."""
        return _schedule(self.start, self.every, self.count, self.until, t_end)

    def describe(self) -> str:
        """One human-readable line."""
        name = f"{self.label}: " if self.label else ""
        if self.factor is not None:
            how = f"x {self.factor:g}"
        else:
            hyp = (f", hypoxic share {self.hypoxic_fraction:g} at OER {self.oer:g}"
                   if self.hypoxic_fraction is not None else "")
            how = (f"x {self.surviving_fraction:.6g} (LQ: alpha={self.alpha or 0:g}/Gy, "
                   f"beta={self.beta or 0:g}/Gy^2, {self.dose_gy:g} Gy{hyp})")
        return (f"{name}scale {', '.join(self.targets)} {how}, "
                f"{_schedule_text(self.start, self.every, self.count, self.until)}")


_DOSE_FIELDS = tuple(f.name for f in fields(Dose))
_SCALE_FIELDS = tuple(f.name for f in fields(Scale))


# --------------------------------------------------------------------------- event table


@dataclass(frozen=True, eq=False)
class EventTable:
    """Flat, time-sorted table of regimen events (ties in regimen item order).

    Attributes
    ----------
    times : float array, event times [model time unit].
    kind : int8 array, 0 = bolus (add ``value`` to the state), 1 = infusion
        rate change (add ``value`` to the state's input rate), 2 = multiply
        the state by ``value``.
    targets : target state name of each event.
    value : float array; bolus amount [target unit], rate change
        [target unit / time] (``+rate`` at infusion start, ``-rate`` at stop),
        or multiplicative factor [-].
    label : label of each event (item label, else ``"dose[i]"`` / ``"scale[i]"``).
    conversion : float array, factor applied to the dose amount to express it
        in the target unit (incl. body weight / BSA); 1 for scale events.
    item : int array, index of the generating item in ``Regimen.items``.
    """

    times: np.ndarray
    kind: np.ndarray
    targets: tuple[str, ...]
    value: np.ndarray
    label: tuple[str, ...]
    conversion: np.ndarray = field(default=None)
    item: np.ndarray = field(default=None)

    def __post_init__(self):
        n = len(self.targets)
        arrays = dict(
            times=np.asarray(self.times, dtype=float).reshape(-1),
            kind=np.asarray(self.kind, dtype=np.int8).reshape(-1),
            value=np.asarray(self.value, dtype=float).reshape(-1),
            conversion=(np.ones(n) if self.conversion is None
                        else np.asarray(self.conversion, dtype=float).reshape(-1)),
            item=(np.full(n, -1, dtype=np.int64) if self.item is None
                  else np.asarray(self.item, dtype=np.int64).reshape(-1)),
        )
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "label", tuple(self.label))
        for name, arr in arrays.items():
            if arr.shape[0] != n:
                raise ValueError(f"EventTable.{name} has {arr.shape[0]} rows, expected {n}")
            arr = arr.copy()
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if len(self.label) != n:
            raise ValueError(f"EventTable.label has {len(self.label)} rows, expected {n}")

    @classmethod
    def empty(cls) -> "EventTable":
        """A table with no events."""
        return cls(np.empty(0), np.empty(0, np.int8), (), np.empty(0), ())

    def __len__(self) -> int:
        return len(self.targets)

    def with_state_index(self, names: Sequence[str]):
        """Arrays for an integrator, with targets as positions in ``names``.

        Parameters
        ----------
        names : state names in the model's state-vector order.

        Returns
        -------
        times : float array [time]
        kind : int8 array (0 bolus, 1 infusion rate change, 2 multiply)
        index : intp array, position of each event's target in ``names``
        value : float array (see class docstring)
        """
        pos = {n: i for i, n in enumerate(names)}
        index = np.empty(len(self), dtype=np.intp)
        for k, t in enumerate(self.targets):
            if t not in pos:
                raise RegimenError(f"unknown target state {t!r}{_suggest(t, names)}",
                                   item=self.label[k])
            index[k] = pos[t]
        return self.times.copy(), self.kind.copy(), index, self.value.copy()

    def rows(self) -> list[tuple[float, int, str, float, str]]:
        """Rows ``(time, kind, target, value, label)`` as plain Python values."""
        return [(float(t), int(k), s, float(v), lab) for t, k, s, v, lab in
                zip(self.times, self.kind, self.targets, self.value, self.label)]


# --------------------------------------------------------------------------- regimen


def _item_names(items) -> list[str]:
    """``dose[i]`` / ``scale[i]`` (1-based, counted per kind as in the file)."""
    nd = ns = 0
    out = []
    for it in items:
        if isinstance(it, Dose):
            nd += 1
            out.append(f"dose[{nd}]")
        else:
            ns += 1
            out.append(f"scale[{ns}]")
    return out


def _item_dict(item) -> dict:
    names = _DOSE_FIELDS if isinstance(item, Dose) else _SCALE_FIELDS
    out = {}
    for n in names:
        v = getattr(item, n)
        if v is None:
            continue
        if isinstance(v, tuple):
            v = list(v)
        out[n] = v
    return out


@dataclass(frozen=True)
class Regimen:
    """An ordered collection of :class:`Dose` and :class:`Scale` items.

    Parameters
    ----------
    items : the doses and scale events; their order breaks ties between
        events at the same time.
    name : optional name (e.g. ``"pembrolizumab q3w"``).
    """

    items: tuple[Dose | Scale, ...] = ()
    name: str | None = None

    def __post_init__(self):
        items = tuple(self.items)
        for it in items:
            if not isinstance(it, (Dose, Scale)):
                raise RegimenError(f"regimen items must be Dose or Scale (got {type(it).__name__})")
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "name", _opt_str(self.name, "name"))

    def __add__(self, other) -> "Regimen":
        """Combine regimens (or append a Dose / Scale); items keep their order."""
        if isinstance(other, (Dose, Scale)):
            return Regimen(self.items + (other,), self.name)
        if not isinstance(other, Regimen):
            return NotImplemented
        names = [n for n in (self.name, other.name) if n]
        return Regimen(self.items + other.items, " + ".join(names) if names else None)

    def __radd__(self, other) -> "Regimen":
        if other == 0:  # sum([...])
            return self
        if isinstance(other, (Dose, Scale)):
            return Regimen((other,) + self.items, self.name)
        return NotImplemented

    def __len__(self) -> int:
        return len(self.items)

    @property
    def doses(self) -> tuple[Dose, ...]:
        return tuple(i for i in self.items if isinstance(i, Dose))

    @property
    def scales(self) -> tuple[Scale, ...]:
        return tuple(i for i in self.items if isinstance(i, Scale))

    def to_dict(self) -> dict:
        """JSON/TOML-able description; :func:`regimen_from_dict` inverts it.

        Keys: ``name`` (if set), ``dose`` and ``scale`` (lists of tables, None
        fields omitted) and, only when doses and scales are interleaved,
        ``order`` (list of ``"dose"``/``"scale"`` giving the item order).
        """
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        doses = [_item_dict(i) for i in self.items if isinstance(i, Dose)]
        scales = [_item_dict(i) for i in self.items if isinstance(i, Scale)]
        if doses:
            out["dose"] = doses
        if scales:
            out["scale"] = scales
        order = ["dose" if isinstance(i, Dose) else "scale" for i in self.items]
        if order != sorted(order):  # "dose" < "scale": interleaved otherwise
            out["order"] = order
        return out

    def describe(self) -> str:
        """One human-readable line per item."""
        if not self.items:
            return "(empty regimen)"
        return "\n".join(f"{n}: {it.describe()}" for n, it in zip(_item_names(self.items), self.items))

    def events(self, *, state_units: Mapping[str, str | None], parameters: Mapping[str, float],
               t_end: float | None = None) -> EventTable:
        """Expand into a time-sorted :class:`EventTable`.

        Parameters
        ----------
        state_units : unit of every model state, ``{name: unit}``; also defines
            which states exist.
        parameters : model parameter values (body weight ``WT`` [kg], ``BSA``
            [m2] ... for per-body-size doses).
        t_end : drop events after this time (events exactly at ``t_end`` are
            kept); also bounds repeats that have neither ``count`` nor ``until``.

        Raises
        ------
        RegimenError
            Unknown target state, unit that cannot be converted, missing
            body-size parameter, open-ended repeat without ``t_end``.
        """
        times, kinds, targets, values, labels, convs, idx = [], [], [], [], [], [], []
        for k, (item, iname) in enumerate(zip(self.items, _item_names(self.items))):
            label = item.label or iname
            try:
                tgts = (item.target,) if isinstance(item, Dose) else item.targets
                for t in tgts:
                    if t not in state_units:
                        raise RegimenError(
                            f"unknown target state {t!r}{_suggest(t, state_units.keys())}")
                ts = item.times(t_end)
                if isinstance(item, Dose):
                    conv, _ = convert_amount(item.amount, item.unit, state_units[item.target],
                                             per=item.per, parameters=parameters,
                                             state=item.target)
                    amount = item.amount * conv
                    if item.is_infusion:
                        rate = amount / item.duration
                        ev_t = np.column_stack([ts, ts + item.duration]).reshape(-1)
                        ev_v = np.tile([rate, -rate], len(ts))
                        ev_k = KIND_INFUSION
                    else:
                        ev_t, ev_v, ev_k = ts, np.full(len(ts), amount), KIND_BOLUS
                    times.append(ev_t)
                    values.append(ev_v)
                    kinds.append(np.full(len(ev_t), ev_k, np.int8))
                    targets.extend([item.target] * len(ev_t))
                    convs.append(np.full(len(ev_t), conv))
                    n = len(ev_t)
                else:
                    nt = len(tgts)
                    ev_t = np.repeat(ts, nt)
                    n = len(ev_t)
                    times.append(ev_t)
                    values.append(np.full(n, item.surviving_fraction))
                    kinds.append(np.full(n, KIND_SCALE, np.int8))
                    targets.extend(list(tgts) * len(ts))
                    convs.append(np.ones(n))
            except RegimenError as e:
                raise e.located(item=iname if not item.label else f"{iname} ({item.label})") from None
            labels.extend([label] * n)
            idx.append(np.full(n, k, np.int64))
        if not targets:
            return EventTable.empty()
        t = np.concatenate(times)
        order = np.argsort(t, kind="stable")
        if t_end is not None:
            keep = t[order] <= t_end + _TOL * max(1.0, abs(t_end))
            order = order[keep]
        return EventTable(
            times=t[order],
            kind=np.concatenate(kinds)[order],
            targets=tuple(targets[i] for i in order),
            value=np.concatenate(values)[order],
            label=tuple(labels[i] for i in order),
            conversion=np.concatenate(convs)[order],
            item=np.concatenate(idx)[order],
        )


# --------------------------------------------------------------------------- loading


_TOP_KEYS = ("name", "dose", "scale", "order")


def _item_from_dict(cls, raw, allowed, where: str):
    if not isinstance(raw, Mapping):
        raise RegimenError(f"must be a table (got {type(raw).__name__})", item=where)
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        k = unknown[0]
        raise RegimenError(f"unknown field {k!r}{_suggest(k, allowed)}", item=where)
    required = ("target", "amount") if cls is Dose else ("target",)
    for r in required:
        if r not in raw:
            raise RegimenError(f"missing required field {r!r}", item=where)
    try:
        return cls(**dict(raw))
    except RegimenError as e:
        raise e.located(item=where) from None


def _table_list(data, key) -> list:
    v = data.get(key, [])
    if isinstance(v, Mapping):
        raise RegimenError(f"{key!r} must be an array of tables: write [[{key}]], not [{key}]",
                           item=key)
    if not isinstance(v, (list, tuple)):
        raise RegimenError(f"{key!r} must be an array of tables ([[{key}]])", item=key)
    return list(v)


def regimen_from_dict(data: Mapping, *, file=None) -> Regimen:
    """Build a :class:`Regimen` from a parsed regimen file / :meth:`Regimen.to_dict` output.

    Parameters
    ----------
    data : ``{"name": str, "dose": [table, ...], "scale": [table, ...]}``
        (``order`` optional, see :meth:`Regimen.to_dict`).
    file : path used in error messages.

    Raises
    ------
    RegimenError
        Unknown or invalid fields; located as ``file 'dose[i]'`` (1-based).
    """
    try:
        if not isinstance(data, Mapping):
            raise RegimenError(f"regimen must be a table (got {type(data).__name__})")
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            k = unknown[0]
            raise RegimenError(f"unknown top-level key {k!r}{_suggest(k, _TOP_KEYS)}; "
                               "expected [[dose]], [[scale]] or name", item=k)
        doses = [_item_from_dict(Dose, d, _DOSE_FIELDS, f"dose[{i}]")
                 for i, d in enumerate(_table_list(data, "dose"), 1)]
        scales = [_item_from_dict(Scale, s, _SCALE_FIELDS, f"scale[{i}]")
                  for i, s in enumerate(_table_list(data, "scale"), 1)]
        order = data.get("order")
        if order is None:
            items = doses + scales
        else:
            if (not isinstance(order, (list, tuple))
                    or any(o not in ("dose", "scale") for o in order)
                    or sum(o == "dose" for o in order) != len(doses)
                    or sum(o == "scale" for o in order) != len(scales)):
                raise RegimenError("'order' must list \"dose\"/\"scale\" once per item", item="order")
            di, si = iter(doses), iter(scales)
            items = [next(di) if o == "dose" else next(si) for o in order]
        try:
            name = _opt_str(data.get("name"), "name")
        except RegimenError as e:
            raise e.located(item="name") from None
        return Regimen(tuple(items), name)
    except RegimenError as e:
        raise e.located(file=file) from None


def load_regimen(path) -> Regimen:
    """Read a TOML regimen file (see ``docs/regimen-file.md``).

    Parameters
    ----------
    path : str or Path.

    Returns
    -------
    Regimen
        ``name`` is the file's ``name`` key, else the file stem.

    Raises
    ------
    RegimenError
        File missing, TOML syntax error (with line and column), invalid content.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RegimenError("regimen file not found", file=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RegimenError(f"cannot read regimen file: {e}", file=p) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RegimenError(f"TOML syntax error: {e}", file=p) from None
    reg = regimen_from_dict(data, file=p)
    if reg.name is None:
        reg = Regimen(reg.items, p.stem)
    return reg
