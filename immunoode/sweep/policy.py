"""Stage 7 — adaptive treatment policies.  Consumes what a clinician sees at a scan (a
:class:`ScanView`); produces the decision (an :class:`Action`) that the segment-by-segment
simulation (:mod:`immunoode.sweep.block`) applies from that scan on.

Policies are declared in the sweep file::

    [policies.rt_then_continue]
    max_duration = 730                        # [day] stop the first line after 2 years
    on_progression = "stop"                   # stop | continue | none | {action = ...}
    on_oligo_progression = { action = "radiotherapy", dose_gy = 8, fractions = 3, then = "continue" }
    on_systemic_progression = { action = "switch", to = "pembro_chemo" }
    rechallenge = { treatment = "first_line", max_duration = 365 }   # PD after a 2-year stop

or written in Python as an :class:`AbstractPolicy` subclass (or any picklable callable
``f(view) -> Action``).  Built-in policies: ``none`` (the planned regimen whatever
happens), ``until_progression`` (stop at the first progression) and ``stop_at_2y``
(``until_progression`` with a 2-year cap).

Local treatments act on lesions: ``radiotherapy`` irradiates, and ``resect`` removes, the
progressing lesions of the scan (``ScanView.progressing_lesions``; in a multi-lesion sweep
only those lesions' copies of the tumor states change) unless the action names its
``lesions``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["ScanView", "Action", "AbstractPolicy", "RulePolicy", "CallablePolicy",
           "BUILTIN_POLICIES", "rule_policy_from_table", "make_policy", "ACTION_CODES",
           "LOCAL_ACTIONS"]

#: codes stored per scan in the ``action`` variable
ACTION_CODES = {"none": 0, "continue": 1, "stop": 2, "radiotherapy": 3, "switch": 4, "add": 5,
                "rechallenge": 6, "resect": 7}
_ACTIONS = ("none", "continue", "stop", "radiotherapy", "switch", "add", "resect")
#: actions on lesions (they take ``then``)
LOCAL_ACTIONS = ("radiotherapy", "resect")


@dataclass(frozen=True)
class ScanView:
    """What the policy sees at one scan of one patient.

    Attributes
    ----------
    patient : patient index in the population.
    scan : scan number (0 = baseline).
    time : [day] scan day.
    size_mm : [mm] measured lesion size (0 below the detection limit); with several
        lesions the sum of the target lesions' diameters (nodes: short axis).
    baseline_mm, nadir_mm : [mm] the same at baseline and its nadir since the last progression.
    progression : RECIST 1.1 progression at this scan (sum +20 % and +5 mm over the nadir;
        with several lesions also a new lesion or non-target growth).
    pattern : ``"oligo"`` (at most ``oligo_max_lesions`` progressing lesions in at most
        ``oligo_max_organs`` organs), ``"systemic"`` or ``"none"``; a single-lesion model
        always reads ``"oligo"`` unless ``oligo_max_lesions`` is 0.
    on_treatment : a systemic treatment is running.
    treatments : names of the running treatments.
    n_progressions : progressions seen before this scan.
    stop_reason : why the last treatment stopped (``""``, ``"max_duration"``,
        ``"progression"``, ``"toxicity"``, ``"completed"``).
    days_on_treatment : [day] since the current line started (NaN off treatment).
    lesion_sizes_mm : [mm] every lesion's measured size (0 absent / below detection), in
        lesion order (lesion 1 = the index lesion).
    progressing_lesions : 1-based indices of the progressing lesions (empty without progression).
    new_lesions : 1-based indices of the lesions that are new at this scan.
    lesion_sites : site of every lesion (``lung``, ``lymph_node`` ...).
    """

    patient: int
    scan: int
    time: float
    size_mm: float
    baseline_mm: float
    nadir_mm: float
    progression: bool
    pattern: str
    on_treatment: bool
    treatments: tuple
    n_progressions: int
    stop_reason: str
    days_on_treatment: float
    lesion_sizes_mm: tuple = ()
    progressing_lesions: tuple = ()
    new_lesions: tuple = ()
    lesion_sites: tuple = ()


@dataclass(frozen=True)
class Action:
    """A decision taken at a scan.

    Parameters
    ----------
    kind : ``none`` (nothing), ``continue`` (keep treating beyond progression), ``stop``,
        ``radiotherapy`` (to the progressing lesions), ``resect`` (remove the progressing
        lesions: their tumor states set to 0; multi-lesion sweeps only), ``switch`` (stop,
        start ``treatment``), ``add`` (start ``treatment`` alongside), ``rechallenge``
        (restart ``treatment``).
    treatment : a [treatments] name (``first_line`` = the scenario's first line).
    max_duration : [day] cap of the treatment started (None = its regimen).
    dose_gy, fractions, every : [Gy], [1], [day] radiotherapy schedule.
    then : after radiotherapy / resection: ``continue``, ``stop`` or ``switch`` / ``add``
        (with ``treatment``).
    lesions : 1-based lesions that radiotherapy / resection treats (None = the scan's
        progressing lesions).
    """

    kind: str = "none"
    treatment: str | None = None
    max_duration: float | None = None
    dose_gy: float = 8.0
    fractions: int = 3
    every: float = 1.0
    then: str = "continue"
    lesions: tuple | None = None


class AbstractPolicy(abc.ABC):
    """Contract: :meth:`decide` receives one :class:`ScanView` and returns an :class:`Action`.

    It must not keep state between calls (a sweep calls it for many patients, in any
    order, in other processes) and must be picklable.  ``max_duration`` [day] (or None)
    caps every first-line course; ``rechallenge_duration`` is the cap of a rechallenge.
    """

    max_duration: float | None = None

    @abc.abstractmethod
    def decide(self, view: ScanView) -> Action:
        """The action at this scan."""


class CallablePolicy(AbstractPolicy):
    """Wrap a picklable ``f(view) -> Action | None`` (None = no action)."""

    def __init__(self, func, max_duration: float | None = None):
        self.func = func
        self.max_duration = max_duration

    def decide(self, view: ScanView) -> Action:
        a = self.func(view)
        return Action() if a is None else a


class RulePolicy(AbstractPolicy):
    """The declarative policy of a ``[policies.NAME]`` table (see the module docstring)."""

    def __init__(self, name: str, *, max_duration=None, on_progression: Action = Action(),
                 on_oligo: Action | None = None, on_systemic: Action | None = None,
                 rechallenge: Action | None = None):
        self.name = name
        self.max_duration = max_duration
        self.on_progression = on_progression
        self.on_oligo = on_oligo
        self.on_systemic = on_systemic
        self.rechallenge = rechallenge

    def decide(self, view: ScanView) -> Action:
        if not view.progression:
            return Action()
        if not view.on_treatment:
            if self.rechallenge is not None and view.stop_reason == "max_duration":
                return self.rechallenge
            return Action()
        if view.pattern == "oligo" and self.on_oligo is not None:
            return self.on_oligo
        if view.pattern == "systemic" and self.on_systemic is not None:
            return self.on_systemic
        return self.on_progression

    def __repr__(self) -> str:
        return f"RulePolicy({self.name!r})"


def _action(value, where: str, treatments: Mapping, file) -> Action:
    from .spec import SweepError, _suggest
    if isinstance(value, str):
        value = {"action": value}
    if not isinstance(value, Mapping):
        raise SweepError(f"expected an action name or a table, got {value!r}", file=file,
                         section="policies", item=where)
    allowed = {"action", "to", "treatment", "max_duration", "dose_gy", "fractions", "every", "then"}
    for k in value:
        if k not in allowed:
            raise SweepError(f"unknown key {k!r}{_suggest(k, allowed)}", file=file,
                             section="policies", item=where)
    kind = value.get("action", "none")
    if kind not in _ACTIONS + ("rechallenge",):
        raise SweepError(f"unknown action {kind!r}{_suggest(kind, _ACTIONS)}; choose one of "
                         f"{', '.join(_ACTIONS)}", file=file, section="policies", item=where)
    to = value.get("to", value.get("treatment"))
    then = value.get("then", "continue")
    needs_to = kind in ("switch", "add", "rechallenge") or (kind in LOCAL_ACTIONS and then in ("switch", "add"))
    if needs_to and to is None:
        raise SweepError(f"action {kind!r} needs 'to' (a [treatments] name)", file=file,
                         section="policies", item=where)
    if to is not None and to != "first_line" and to not in treatments:
        raise SweepError(f"unknown treatment {to!r}{_suggest(to, treatments)} (known: "
                         f"{', '.join(treatments) or 'none'})", file=file, section="policies", item=where)
    if then not in ("continue", "stop", "switch", "add"):
        raise SweepError(f"'then' must be continue, stop, switch or add, got {then!r}", file=file,
                         section="policies", item=where)
    try:
        return Action(kind=kind, treatment=to,
                      max_duration=None if value.get("max_duration") is None else float(value["max_duration"]),
                      dose_gy=float(value.get("dose_gy", 8.0)), fractions=int(value.get("fractions", 3)),
                      every=float(value.get("every", 1.0)), then=then)
    except (TypeError, ValueError) as exc:
        raise SweepError(f"invalid number: {exc}", file=file, section="policies", item=where) from None


def rule_policy_from_table(name: str, table: Mapping, treatments: Mapping, *, file=None) -> RulePolicy:
    """Build (and validate) a :class:`RulePolicy` from a ``[policies.NAME]`` table."""
    from .spec import SweepError, _suggest
    allowed = {"max_duration", "on_progression", "on_oligo_progression", "on_systemic_progression",
               "rechallenge", "description"}
    if not isinstance(table, Mapping):
        raise SweepError("a policy is a table", file=file, section="policies", item=name)
    for k in table:
        if k not in allowed:
            raise SweepError(f"unknown key {k!r}{_suggest(k, allowed)}", file=file,
                             section=f"policies.{name}", item=k)
    md = table.get("max_duration")
    if md is not None and (isinstance(md, bool) or not isinstance(md, (int, float)) or md <= 0):
        raise SweepError(f"max_duration must be a positive number of days, got {md!r}", file=file,
                         section=f"policies.{name}", item="max_duration")

    def opt(key):
        return _action(table[key], f"{name}.{key}", treatments, file) if key in table else None
    rech = table.get("rechallenge")
    if rech is not None:
        rech = dict(rech) if isinstance(rech, Mapping) else {"treatment": rech}
        rech.setdefault("treatment", "first_line")
        rech["action"] = "rechallenge"
        rech = _action(rech, f"{name}.rechallenge", treatments, file)
    return RulePolicy(name, max_duration=None if md is None else float(md),
                      on_progression=opt("on_progression") or Action(),
                      on_oligo=opt("on_oligo_progression"), on_systemic=opt("on_systemic_progression"),
                      rechallenge=rech)


BUILTIN_POLICIES: dict[str, dict] = {
    "until_progression": {"on_progression": "stop"},
    "stop_at_2y": {"on_progression": "stop", "max_duration": 730},
}


def make_policy(name: str, spec: Mapping, python_policies: Mapping[str, Any] | None = None) -> AbstractPolicy | None:
    """The policy object called ``name`` in a normalised sweep (None for ``"none"``)."""
    if name == "none":
        return None
    if python_policies and name in python_policies:
        p = python_policies[name]
        return p if isinstance(p, AbstractPolicy) else CallablePolicy(p)
    table = spec["policies"].get(name, BUILTIN_POLICIES.get(name))
    return rule_policy_from_table(name, table, spec["treatments"])
