"""Stage 7a — calibration targets. Consumes a CSV table of published statistics; produces a
validated :class:`TargetTable` of :class:`Target` rows for the likelihood.

A target table has one row per published statistic (percent values, as papers report them)::

    id,statistic,arm,kind,value,low,high,n,landmark_days,window_days,group,role,source_ids,trial_or_study,source,note
    T06,orr,1l_ici_mono,binomial,44.8,,,154,,,,fit,E12,KEYNOTE-024,NEJM abstract,69/154

``kind`` says how the statistic enters the likelihood:

* ``binomial``: a point value with its sample size ``n`` (k = value·n/100 events);
* ``interval``: a published range ``[low, high]`` (either end may be empty: open);
* ``point``: a point value without ``n`` (scored as a zero-width interval);
* ``multinomial``: one category of a group (same ``group``) of shares summing to 100 %,
  e.g. the timing of acquired resistance in windows ``0-365``, ``365-730``, ``730-``.

``role`` is ``fit`` (used in the objective) or ``heldout`` (predicted after the fit and
reported as the out-of-sample check).  The statistics are defined in
:data:`immunoode.calibrate.vpop.STATISTICS`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError

__all__ = ["Target", "TargetTable", "TargetError", "load_targets", "KINDS", "ROLES", "COLUMNS"]

KINDS = ("binomial", "interval", "point", "multinomial")
ROLES = ("fit", "heldout")
COLUMNS = ("id", "statistic", "arm", "kind", "value", "low", "high", "n", "landmark_days",
           "window_days", "group", "role", "source_ids", "trial_or_study", "source", "note")
_REQUIRED = ("id", "statistic", "arm", "kind", "role", "source")


class TargetError(ModelError):
    """A target table is invalid (the message names the file, the row id and the column)."""


@dataclass(frozen=True)
class Target:
    """One published statistic.

    Attributes
    ----------
    value, low, high
        [fraction, 0-1] point value and interval ends (``None`` where not given; an open
        interval end is ``0.0`` / ``1.0``).
    n
        Sample size of a binomial or multinomial observation (``None`` if unknown).
    landmark_days
        [day] Landmark of time-dependent statistics (``ar_of_responders``, ``pfs_rate``).
    window
        [day] ``(start, end)`` of a multinomial timing window (``end`` may be ``inf``).
    """

    id: str
    statistic: str
    arm: str
    kind: str
    role: str
    value: float | None = None
    low: float | None = None
    high: float | None = None
    n: int | None = None
    landmark_days: float | None = None
    window: tuple[float, float] | None = None
    group: str = ""
    source_ids: str = ""
    trial_or_study: str = ""
    source: str = ""
    note: str = ""

    @property
    def observed(self) -> float:
        """[fraction] The published value (midpoint of an interval)."""
        if self.value is not None:
            return self.value
        return 0.5 * ((self.low or 0.0) + (1.0 if self.high is None else self.high))

    def bounds(self) -> tuple[float, float]:
        """[fraction] ``(low, high)`` of an interval target; ``(value, value)`` for a point."""
        if self.kind == "point" or (self.low is None and self.high is None):
            return (self.observed, self.observed)
        return (0.0 if self.low is None else self.low, 1.0 if self.high is None else self.high)


@dataclass(frozen=True)
class TargetTable:
    """The targets of one fit, in file order."""

    targets: tuple[Target, ...]
    path: str = "<memory>"
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self):
        return iter(self.targets)

    def select(self, *, role: str | None = None, arm: str | None = None) -> list[Target]:
        """Targets with this role and/or arm."""
        return [t for t in self.targets if (role is None or t.role == role)
                and (arm is None or t.arm == arm)]

    @property
    def arms(self) -> list[str]:
        """Arms named by the table, in first-seen order."""
        return list(dict.fromkeys(t.arm for t in self.targets))

    def groups(self, *, role: str | None = None) -> dict[str, list[Target]]:
        """Multinomial groups: ``(arm, group)`` key ``"arm/group"`` -> its category rows."""
        out: dict[str, list[Target]] = {}
        for t in self.select(role=role):
            if t.kind == "multinomial":
                out.setdefault(f"{t.arm}/{t.group}", []).append(t)
        return out


# --------------------------------------------------------------------------- parsing
def _num(row, col, where, *, integer=False, percent=False):
    s = (row.get(col) or "").strip()
    if not s:
        return None
    try:
        v = float(s)
    except ValueError:
        raise TargetError(f"column {col!r}: not a number; got {s!r}", **where) from None
    if not math.isfinite(v):
        raise TargetError(f"column {col!r}: not finite; got {s!r}", **where)
    if integer:
        if v != int(v) or v < 1:
            raise TargetError(f"column {col!r}: must be a positive whole number; got {s!r}", **where)
        return int(v)
    if percent:
        if not 0.0 <= v <= 100.0:
            raise TargetError(f"column {col!r}: a percentage must lie in [0, 100]; got {s!r}", **where)
        return v / 100.0
    return v


def _window(s: str, where) -> tuple[float, float]:
    parts = s.split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        a = float(parts[0])
        b = math.inf if parts[1].strip() == "" else float(parts[1])
    except ValueError:
        raise TargetError(f"column 'window_days': expected 'start-end' days such as '0-365' or "
                          f"'730-'; got {s!r}", **where) from None
    if not (0 <= a < b):
        raise TargetError(f"column 'window_days': start must be >= 0 and below end; got {s!r}",
                          **where)
    return (a, b)


def _parse_row(row: dict, file: str) -> Target:
    tid = (row.get("id") or "").strip()
    where = {"file": file, "item": tid or "(row without id)"}
    for col in _REQUIRED:
        if not (row.get(col) or "").strip():
            raise TargetError(f"column {col!r} is empty; every row needs "
                              f"{', '.join(_REQUIRED)}", **where)
    kind, role = row["kind"].strip(), row["role"].strip()
    if kind not in KINDS:
        raise TargetError(f"column 'kind': must be one of {KINDS}; got {kind!r}", **where)
    if role not in ROLES:
        raise TargetError(f"column 'role': must be one of {ROLES}; got {role!r}", **where)
    value = _num(row, "value", where, percent=True)
    low = _num(row, "low", where, percent=True)
    high = _num(row, "high", where, percent=True)
    n = _num(row, "n", where, integer=True)
    landmark = _num(row, "landmark_days", where)
    if landmark is not None and landmark <= 0:
        raise TargetError(f"column 'landmark_days': must be > 0; got {landmark!r}", **where)
    win = (row.get("window_days") or "").strip()
    window = _window(win, where) if win else None
    group = (row.get("group") or "").strip()
    if kind == "binomial" and (value is None or n is None):
        raise TargetError("a binomial target needs both 'value' (percent) and 'n'", **where)
    if kind == "interval":
        if low is None and high is None:
            raise TargetError("an interval target needs 'low' and/or 'high' (percent)", **where)
        if low is not None and high is not None and low > high:
            raise TargetError(f"'low' ({100 * low:g}) is above 'high' ({100 * high:g})", **where)
    if kind == "point" and value is None:
        raise TargetError("a point target needs 'value' (percent)", **where)
    if kind == "multinomial" and (value is None or not group):
        raise TargetError("a multinomial target needs 'value' (its category share, percent) and "
                          "'group' (rows of one group are its categories)", **where)
    return Target(id=tid, statistic=row["statistic"].strip(), arm=row["arm"].strip(), kind=kind,
                  role=role, value=value, low=low, high=high, n=n, landmark_days=landmark,
                  window=window, group=group, source_ids=(row.get("source_ids") or "").strip(),
                  trial_or_study=(row.get("trial_or_study") or "").strip(),
                  source=row["source"].strip(), note=(row.get("note") or "").strip())


def _check_groups(table: TargetTable, file: str) -> None:
    for key, rows in table.groups().items():
        roles = {t.role for t in rows}
        ns = {t.n for t in rows}
        where = {"file": file, "item": key}
        if len(rows) < 2:
            raise TargetError("a multinomial group needs at least two category rows", **where)
        if len(roles) > 1 or len(ns) > 1:
            raise TargetError(f"rows of one multinomial group must share 'role' and 'n'; got roles "
                              f"{sorted(roles)} and n {sorted(map(str, ns))}", **where)
        total = sum(t.value for t in rows)
        if abs(total - 1.0) > 0.02:
            raise TargetError(f"category shares must sum to 100 %; got {100 * total:g} %", **where)
        if rows[0].role == "fit" and rows[0].n is None:
            raise TargetError("a multinomial group used in the fit needs 'n' (the number of "
                              "events); without n keep it role = heldout", **where)


def load_targets(path) -> TargetTable:
    """Read and validate a target CSV (percent values; see the module docstring).

    Raises
    ------
    TargetError
        Unknown columns, a missing required column, a bad number, duplicate ids, or a table
        without any row; the message names the file, the row id and the column.
    """
    file = Path(path)
    if not file.exists():
        raise TargetError("no such target table", file=file)
    with open(file, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in _REQUIRED if c not in header]
        if missing:
            raise TargetError(f"missing column(s) {missing}; a target table has the columns "
                              f"{', '.join(COLUMNS)}", file=file)
        unknown = [c for c in header if c not in COLUMNS]
        if unknown:
            raise TargetError(f"unknown column(s) {unknown}; allowed: {', '.join(COLUMNS)}",
                              file=file)
        rows = [r for r in reader if any((v or "").strip() for v in r.values())]
    if not rows:
        raise TargetError("the target table has no rows; add at least one published statistic",
                          file=file)
    targets = [_parse_row(r, str(file)) for r in rows]
    seen: set[str] = set()
    for t in targets:
        if t.id in seen:
            raise TargetError("duplicate target id", file=file, item=t.id)
        seen.add(t.id)
    table = TargetTable(tuple(targets), path=str(file))
    _check_groups(table, str(file))
    return table
