"""Long-format time-course data (NONMEM-style CSV) for time-course fitting.

Stage 6a — consumes a CSV file (or a :class:`pandas.DataFrame`) and a model; produces a
:class:`TimecourseData`: per individual, the observations and the doses as a
:class:`~immunoode.regimen.Regimen`.

Columns (names are case-insensitive; one header row):

``id``
    individual identifier (any text).
``time``
    [model time unit] time of the record.
``dv``
    observed value, in the unit of the observable (empty on dose records).
``observable``
    name of a model observable (or state / assignment) measured (empty on dose records).
``evid`` (optional)
    NONMEM event id: ``0`` observation (default when the column is absent or empty),
    ``1`` dose.
``amt`` (optional)
    [unit of the target state] dose amount, on ``evid = 1`` rows.
``cmt`` (optional)
    dose target: a state name or its 1-based position in the state vector; default: the
    ``dose_target`` argument.
``rate`` (optional)
    [target unit / time] zero-order infusion rate (duration ``amt / rate``); empty or
    ``0`` for a bolus.
``mdv`` (optional)
    ``1`` marks an observation row to ignore (kept out of the fit, reported as such).

Any other column must name a model parameter: it is read as an individual covariate
(e.g. ``WT``), constant within an individual, and overrides the parameter's value for
that individual.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import ModelError
from ..model import Model, _suggest
from ..regimen import Dose, Regimen

__all__ = ["DataError", "Individual", "TimecourseData", "read_timecourse_data",
           "timecourse_data_from_rows"]

REQUIRED = ("id", "time", "dv", "observable")
OPTIONAL = ("evid", "amt", "cmt", "rate", "mdv")


class DataError(ModelError):
    """A time-course data file is invalid (names the file, the row and the column)."""

    def __init__(self, message: str, *, file=None, row: int | None = None,
                 column: str | None = None, section=None, item=None):
        self.row = row
        self.column = column
        where = []
        if row is not None:
            where.append(f"line {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(message, file=file, section=", ".join(where) or section, item=item)

    def _format(self) -> str:
        where = [w for w in (self.file, self.section) if w]
        if self.item:
            where.append(repr(self.item))
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


@dataclass(frozen=True)
class Individual:
    """One individual's observations and doses.

    Attributes
    ----------
    id : identifier as written in the file.
    time : [model time unit] observation times (sorted, ties kept in file order).
    dv : observed values.
    observable : observable name of each observation.
    line : line of each observation in the file (1 = header).
    regimen : doses of this individual (``None`` when there are none).
    covariates : parameter overrides read from covariate columns.
    n_ignored : observation rows with ``mdv = 1``.
    """

    id: str
    time: np.ndarray
    dv: np.ndarray
    observable: tuple[str, ...]
    line: np.ndarray
    regimen: Regimen | None = None
    covariates: Mapping[str, float] = field(default_factory=dict)
    n_ignored: int = 0

    @property
    def n_obs(self) -> int:
        return len(self.dv)


@dataclass(frozen=True)
class TimecourseData:
    """Observations of many individuals (see :func:`read_timecourse_data`).

    Attributes
    ----------
    individuals : in order of first appearance in the file.
    file : source file (or ``None``).
    observables : observable names present in the data, in order of first appearance.
    """

    individuals: tuple[Individual, ...]
    file: str | None
    observables: tuple[str, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(i.id for i in self.individuals)

    @property
    def n_obs(self) -> int:
        return sum(i.n_obs for i in self.individuals)

    def __getitem__(self, id_) -> Individual:
        for ind in self.individuals:
            if ind.id == str(id_):
                return ind
        raise KeyError(f"no individual {id_!r} in {self.file or 'the data'}")

    def with_regimen(self, regimen: Regimen) -> "TimecourseData":
        """A copy in which every individual receives ``regimen`` (a regimen file)."""
        inds = []
        for ind in self.individuals:
            if ind.regimen is not None:
                raise DataError("the data has dose records (evid = 1) and a regimen was also "
                                "given; use one or the other", file=self.file, item=ind.id)
            inds.append(Individual(ind.id, ind.time, ind.dv, ind.observable, ind.line, regimen,
                                   ind.covariates, ind.n_ignored))
        return TimecourseData(tuple(inds), self.file, self.observables)


def _num(text: str, *, file, row, column, what="a number") -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"expected {what}, got {text!r}", file=file, row=row,
                        column=column) from None
    if not math.isfinite(v):
        raise DataError(f"value {text!r} is not finite", file=file, row=row, column=column)
    return v


def read_timecourse_data(path, model: Model, *, dose_target: str | None = None) -> TimecourseData:
    """Read a long-format CSV (see the module docstring) and check it against ``model``.

    Parameters
    ----------
    path : CSV file.
    model : the model (observables, states and parameters the file may name).
    dose_target : state receiving doses of rows without ``cmt``.

    Raises
    ------
    DataError : missing/unknown column, bad number, unknown observable or state,
        dose without an amount, covariate that varies within an individual, no
        observations.  The message names the file, the line and the column.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError("data file not found", file=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file: {e}", file=path) from None
    if not rows:
        raise DataError("the data file is empty (expected a header row: id,time,dv,observable)",
                        file=path)
    return timecourse_data_from_rows(rows[0], rows[1:], model, file=str(path),
                                     dose_target=dose_target)


def timecourse_data_from_rows(header: Sequence[str], rows: Sequence[Sequence[str]], model: Model,
                              *, file: str | None = None,
                              dose_target: str | None = None) -> TimecourseData:
    """Build :class:`TimecourseData` from a header and text rows (see :func:`read_timecourse_data`)."""
    cols = [h.strip() for h in header]
    low = [c.lower() for c in cols]
    colmap: dict[str, int] = {}
    covs: dict[str, int] = {}
    known = REQUIRED + OPTIONAL
    for j, (c, lc) in enumerate(zip(cols, low)):
        if lc in known:
            if lc in colmap:
                raise DataError(f"column {c!r} appears twice", file=file, row=1, column=c)
            colmap[lc] = j
        elif c in model.parameters:
            covs[c] = j
        elif c == "":
            raise DataError(f"empty column name (column {j + 1})", file=file, row=1)
        else:
            hint = _suggest(lc, known) or _suggest(c, model.parameters)
            raise DataError(f"unknown column{hint}; expected {', '.join(REQUIRED)}, optionally "
                            f"{', '.join(OPTIONAL)}, or a model parameter (covariate)",
                            file=file, row=1, column=c)
    missing = [r for r in REQUIRED if r not in colmap]
    if missing:
        raise DataError(f"missing required column(s) {', '.join(repr(m) for m in missing)} "
                        f"(header: {', '.join(cols)})", file=file, row=1)
    recordable = set(model.observables) | set(model.states) | set(model.assignments)
    states = model.state_names
    if dose_target is not None and dose_target not in states:
        raise DataError(f"dose target is not a state{_suggest(dose_target, states)}",
                        file=file, item=dose_target)
    per: dict[str, dict] = {}
    order: list[str] = []
    obs_order: list[str] = []
    ncol = len(cols)

    def cell(r, name):
        j = colmap.get(name)
        return None if j is None else r[j].strip()

    for k, r in enumerate(rows):
        line = k + 2
        if not r or all(not x.strip() for x in r):
            continue
        if len(r) != ncol:
            raise DataError(f"has {len(r)} fields, the header has {ncol}", file=file, row=line)
        id_ = cell(r, "id")
        if not id_:
            raise DataError("empty id", file=file, row=line, column=cols[colmap["id"]])
        t = _num(cell(r, "time"), file=file, row=line, column=cols[colmap["time"]])
        ev = cell(r, "evid")
        evid = 0 if not ev else _num(ev, file=file, row=line, column=cols[colmap["evid"]])
        if evid not in (0, 1):
            raise DataError(f"evid {ev!r} is not supported (0 = observation, 1 = dose)",
                            file=file, row=line, column=cols[colmap["evid"]])
        if id_ not in per:
            per[id_] = {"obs": [], "doses": [], "cov": {}, "ignored": 0}
            order.append(id_)
        rec = per[id_]
        for c, j in covs.items():
            txt = r[j].strip()
            if not txt:
                continue
            v = _num(txt, file=file, row=line, column=c)
            if c in rec["cov"] and rec["cov"][c][0] != v:
                raise DataError(f"covariate changes within individual {id_!r} "
                                f"({rec['cov'][c][0]:g} on line {rec['cov'][c][1]}, {v:g} here); "
                                "time-varying covariates are not supported",
                                file=file, row=line, column=c)
            rec["cov"].setdefault(c, (v, line))
        if evid == 1:
            amt_txt = cell(r, "amt")
            if not amt_txt:
                raise DataError("dose record (evid = 1) without an amount", file=file, row=line,
                                column="amt")
            amt = _num(amt_txt, file=file, row=line, column=cols[colmap["amt"]])
            if amt < 0:
                raise DataError(f"negative dose amount {amt:g}", file=file, row=line,
                                column=cols[colmap["amt"]])
            cmt = cell(r, "cmt")
            if cmt:
                if cmt in states:
                    target = cmt
                else:
                    try:
                        idx = int(float(cmt))
                    except ValueError:
                        raise DataError(f"cmt {cmt!r} is not a state{_suggest(cmt, states)} "
                                        "nor a 1-based state number", file=file, row=line,
                                        column=cols[colmap["cmt"]]) from None
                    if not 1 <= idx <= len(states) or idx != float(cmt):
                        raise DataError(f"cmt {cmt!r} is out of range (1..{len(states)}: "
                                        f"{', '.join(states)})", file=file, row=line,
                                        column=cols[colmap["cmt"]])
                    target = states[idx - 1]
            elif dose_target is not None:
                target = dose_target
            else:
                raise DataError("dose record without cmt and no dose target given "
                                "(add a cmt column or set dose_target)", file=file, row=line)
            rate_txt = cell(r, "rate")
            rate = 0.0 if not rate_txt else _num(rate_txt, file=file, row=line,
                                                 column=cols[colmap["rate"]])
            if rate < 0:
                raise DataError(f"negative infusion rate {rate:g}", file=file, row=line,
                                column=cols[colmap["rate"]])
            dur = amt / rate if rate > 0 else None
            try:
                rec["doses"].append(Dose(target, amt, start=t, duration=dur,
                                         label=f"line {line}"))
            except ModelError as e:
                raise DataError(e.message, file=file, row=line) from None
            continue
        mdv = cell(r, "mdv")
        if mdv and _num(mdv, file=file, row=line, column=cols[colmap["mdv"]]) != 0:
            rec["ignored"] += 1
            continue
        obs = cell(r, "observable")
        if not obs:
            raise DataError("observation record without an observable name", file=file,
                            row=line, column=cols[colmap["observable"]])
        if obs not in recordable:
            raise DataError(f"unknown observable {obs!r}{_suggest(obs, recordable)}; the model "
                            f"has {', '.join(model.observables) or 'no observables'}",
                            file=file, row=line, column=cols[colmap["observable"]])
        dv_txt = cell(r, "dv")
        if not dv_txt:
            raise DataError("observation record without a value (set mdv = 1 to skip it)",
                            file=file, row=line, column=cols[colmap["dv"]])
        dv = _num(dv_txt, file=file, row=line, column=cols[colmap["dv"]])
        rec["obs"].append((t, dv, obs, line))
        if obs not in obs_order:
            obs_order.append(obs)
    inds = []
    for id_ in order:
        rec = per[id_]
        ob = sorted(rec["obs"], key=lambda x: x[0])
        if not ob:
            continue  # dose-only individuals carry no information for the fit
        reg = Regimen(tuple(sorted(rec["doses"], key=lambda d: d.start))) if rec["doses"] else None
        inds.append(Individual(
            id_, np.array([o[0] for o in ob]), np.array([o[1] for o in ob]),
            tuple(o[2] for o in ob), np.array([o[3] for o in ob], dtype=np.int64), reg,
            {c: v for c, (v, _) in rec["cov"].items()}, rec["ignored"]))
    if not inds:
        raise DataError("no observation records (evid = 0 with a dv) in the data", file=file)
    return TimecourseData(tuple(inds), file, tuple(obs_order))
