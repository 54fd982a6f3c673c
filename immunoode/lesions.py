"""Several lesions per patient: clone the lesion-local part of a single-lesion model.

Stage 1b — model transform.  Consumes a single-lesion :class:`~immunoode.model.Model`
and a list of :class:`Lesion` (site, site-specific parameter factors); produces a new
:class:`~immunoode.model.Model` (wrapped in :class:`LesionModel`) that compiles through
the normal engine, in which every lesion has its own copy of the lesion-local states,
parameters, assignments, fluxes and observables, while all lesions share the systemic
compartments (blood, lymph node, antibody PK).

Rules of the transform
----------------------
* *Local* symbols are the declared ``local_states`` and ``local_parameters``, and every
  assignment that uses a local symbol (transitively).  Lesion ``k`` (1-based) gets the
  copies ``<name>_l<k>``.
* Local states: ODE and initial value are copied with every local symbol renamed.
* Systemic states: the right-hand side is split into its additive terms; a term that
  uses a local symbol is replaced by its **sum over lesions** (each lesion exchanges
  with the shared compartment on its own, e.g. effector cells leaving the blood into
  every lesion, or antigen from every lesion priming naive cells).  Other terms stay.
* Fluxes: a flux that touches a local state or uses a local symbol is cloned per lesion
  (its systemic end stays shared); other fluxes are copied.
* Observables that use a local symbol are cloned per lesion (``tumor_diameter_l1`` ...).
* A local parameter's value in lesion ``k`` is the single-lesion value times the
  lesion's factor for it (``Lesion.factors``, default 1).

With one lesion whose factors are 1 the result has the same equations as the input
(names suffixed).  With ``n`` identical lesions the systemic states follow the
single-lesion model in which every summed term is multiplied by ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import sympy

from .errors import ModelError
from .model import Model, ModelBuilder, _suggest

__all__ = ["SITES", "Lesion", "LesionModel", "multi_lesion_model", "site_index"]

#: lesion sites (organ ids of the response assessment are positions in this tuple)
SITES = ("lung", "lymph_node", "brain", "liver", "bone", "adrenal")


def site_index(site: str) -> int:
    """Organ id of ``site`` (its position in :data:`SITES`)."""
    if site not in SITES:
        raise ModelError(f"unknown lesion site{_suggest(str(site), SITES)}; known sites: "
                         f"{', '.join(SITES)}", section="lesions", item=str(site))
    return SITES.index(site)


@dataclass(frozen=True)
class Lesion:
    """One lesion of a virtual patient.

    Parameters
    ----------
    site : one of :data:`SITES`; ``lymph_node`` lesions are measured by short axis.
    factors : local parameter -> multiplier of the patient's value in this lesion
        (e.g. ``{"kp_tumor_pembro": 0.1}`` for poor antibody penetration in the brain,
        ``{"T0": 1e-4}`` for a seeded micro-metastasis).
    prevalence : [1] probability that a virtual patient has this lesion (drawn per
        patient by the trial; an absent lesion has no tumor cells).
    name : label (default ``<site><k>``).
    """

    site: str
    factors: Mapping[str, float] = field(default_factory=dict)
    prevalence: float = 1.0
    name: str = ""

    @property
    def is_node(self) -> bool:
        return self.site == "lymph_node"


@dataclass(frozen=True)
class LesionModel:
    """A multi-lesion model and the map from single-lesion names to per-lesion names."""

    model: Model
    base: Model
    lesions: tuple[Lesion, ...]
    local_states: tuple[str, ...]
    local_parameters: tuple[str, ...]
    local_assignments: tuple[str, ...]
    local_observables: tuple[str, ...]

    @property
    def n_lesions(self) -> int:
        return len(self.lesions)

    @property
    def lesion_names(self) -> list[str]:
        return [les.name for les in self.lesions]

    @property
    def sites(self) -> list[str]:
        return [les.site for les in self.lesions]

    def is_local(self, name: str) -> bool:
        return name in set(self.local_states + self.local_parameters + self.local_assignments
                           + self.local_observables)

    def names(self, name: str) -> list[str]:
        """Per-lesion names of a local state/parameter/assignment/observable."""
        if not self.is_local(name):
            known = self.local_states + self.local_parameters + self.local_observables
            raise ModelError(f"not lesion-local{_suggest(name, known)}", section="lesions", item=name)
        return [lesion_name(name, k) for k in range(self.n_lesions)]

    def factor(self, parameter: str) -> np.ndarray:
        """(lesion,) multipliers of a local parameter."""
        return np.array([float(les.factors.get(parameter, 1.0)) for les in self.lesions])

    def draw_presence(self, n: int, seed: int) -> np.ndarray:
        """(patient, lesion) lesions that ``n`` virtual patients have: one uniform per patient
        and lesion from ``default_rng(seed)`` below the lesion's prevalence; the index lesion
        (lesion 1) is always present."""
        prev = np.array([les.prevalence for les in self.lesions])
        present = np.random.default_rng(seed).random((n, self.n_lesions)) < prev[None, :]
        present[:, 0] = True
        return present

    def expand_columns(self, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-patient columns of the single-lesion model -> columns of this model.

        A local parameter ``p`` becomes ``p_l<k> = p * factor_k``; a local state's
        column becomes the same initial value in every lesion; other columns pass.
        """
        out: dict[str, np.ndarray] = {}
        for k, v in columns.items():
            if k in self.local_parameters:
                f = self.factor(k)
                for j, nm in enumerate(self.names(k)):
                    out[nm] = np.asarray(v, dtype=float) * f[j]
            elif k in self.local_states:
                for nm in self.names(k):
                    out[nm] = np.asarray(v, dtype=float)
            else:
                out[k] = v
        return out


def lesion_name(name: str, k: int) -> str:
    """Name of the copy of ``name`` in lesion ``k`` (0-based index; suffix is 1-based)."""
    return f"{name}_l{k + 1}"


def _sym(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, real=True)


def _uses(expr: sympy.Expr, names: set[str]) -> bool:
    return any(s.name in names for s in expr.free_symbols)


def multi_lesion_model(model: Model, lesions: Sequence[Lesion | str], *,
                       local_states: Sequence[str], local_parameters: Sequence[str] = (),
                       name: str | None = None, check_units: bool = True) -> LesionModel:
    """Turn a single-lesion model into an N-lesion model sharing systemic compartments.

    Parameters
    ----------
    model : the single-lesion model.
    lesions : :class:`Lesion` objects or site names, one per lesion.
    local_states : states that every lesion has its own copy of (tumor clones, dead
        cells, local immune cells ...).
    local_parameters : parameters with a per-lesion value (initial size, antibody
        penetration, infiltration ...); the copies start at the model value times the
        lesion's factor.
    name : name of the new model (default ``<model>_<N>lesions``).

    Raises
    ------
    ModelError
        Unknown names, a factor for a non-local parameter, an unknown site, or a
        systemic initial value that uses a local parameter.
    """
    les: list[Lesion] = []
    for k, x in enumerate(lesions):
        if isinstance(x, str):
            x = Lesion(site=x)
        if not isinstance(x, Lesion):
            raise TypeError(f"lesions[{k}] must be a Lesion or a site name, got {type(x).__name__}")
        site_index(x.site)
        if not (0.0 <= float(x.prevalence) <= 1.0):
            raise ModelError(f"prevalence must be in [0, 1], got {x.prevalence!r}",
                             section="lesions", item=x.name or x.site)
        les.append(x)
    if not les:
        raise ModelError("need at least one lesion", section="lesions")
    counts: dict[str, int] = {}
    named = []
    for x in les:
        counts[x.site] = counts.get(x.site, 0) + 1
        named.append(x if x.name else Lesion(x.site, dict(x.factors), x.prevalence,
                                             f"{x.site}{counts[x.site]}"))
    les = named
    if len({x.name for x in les}) != len(les):
        raise ModelError("lesion names must be unique", section="lesions")

    ls, lp = tuple(local_states), tuple(local_parameters)
    for s in ls:
        if s not in model.states:
            raise ModelError(f"not a state of model {model.name!r}{_suggest(s, model.states)}",
                             section="lesions.local_states", item=s)
    for p in lp:
        if p not in model.parameters:
            raise ModelError(f"not a parameter of model {model.name!r}{_suggest(p, model.parameters)}",
                             section="lesions.local_parameters", item=p)
    if not ls:
        raise ModelError("declare at least one lesion-local state", section="lesions.local_states")
    for x in les:
        for p, f in x.factors.items():
            if p not in lp:
                raise ModelError(f"factor for {p!r}, which is not a local parameter (declare it in "
                                 f"local_parameters){_suggest(p, lp)}", section="lesions", item=x.name)
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not np.isfinite(f) or f < 0:
                raise ModelError(f"factor for {p!r} must be a finite number >= 0, got {f!r}",
                                 section="lesions", item=x.name)

    local = set(ls) | set(lp)
    la = []
    for a in model.assignment_order:
        if _uses(model.assignments[a].expr, local):
            local.add(a)
            la.append(a)
    lo = [o for o, ob in model.observables.items() if _uses(ob.expr, local)]
    n = len(les)
    all_names = set(model.states) | set(model.parameters) | set(model.assignments) | set(model.observables)
    for x in sorted(local | set(lo)):
        for k in range(n):
            if lesion_name(x, k) in all_names:
                raise ModelError(f"the copy name {lesion_name(x, k)!r} is already used in the model; "
                                 "rename it", section="lesions", item=x)
    maps = [{_sym(x): _sym(lesion_name(x, k)) for x in local} for k in range(n)]

    def per_lesion(expr):
        return [expr.xreplace(m) for m in maps]

    b = ModelBuilder(name or f"{model.name}_{n}lesions", model.time_unit,
                     description=f"{model.description} [{n} lesions: "
                                 f"{', '.join(x.name for x in les)}; local states "
                                 f"{', '.join(ls)}]".strip())
    for src in model.sources:
        b.add_source(src)
    for p in model.parameters.values():
        if p.name in lp:
            for k, x in enumerate(les):
                v = p.value * float(x.factors.get(p.name, 1.0))
                lower = None if p.lower is None else min(p.lower, v)
                upper = None if p.upper is None else max(p.upper, v)
                b.add_parameter(lesion_name(p.name, k), v, p.unit,
                                f"{p.description} [lesion {x.name}, {x.site}]", p.source, lower, upper)
        else:
            b.add_parameter(p.name, p.value, p.unit, p.description, p.source, p.lower, p.upper)
    rhs = model.rhs()
    for s in model.states.values():
        if s.name in ls:
            for k, (init, x) in enumerate(zip(per_lesion(s.initial), les)):
                b.add_state(lesion_name(s.name, k), init, s.unit, f"{s.description} [lesion {x.name}]")
        else:
            if _uses(s.initial, local):
                raise ModelError("the initial value of a systemic state uses a lesion-local "
                                 "parameter; make the state local or the parameter systemic",
                                 section="states", item=s.name)
            b.add_state(s.name, s.initial, s.unit, s.description)
    for a in model.assignment_order:
        ad = model.assignments[a]
        if a in local:
            for k, e in enumerate(per_lesion(ad.expr)):
                b.add_assignment(lesion_name(a, k), e, ad.unit, ad.description)
        else:
            b.add_assignment(a, ad.expr, ad.unit, ad.description)
    for s, e in model.odes.items():
        if s in ls:
            for k, ek in enumerate(per_lesion(e)):
                b.add_ode(lesion_name(s, k), ek)
        else:
            b.add_ode(s, _sum_local_terms(e, local, per_lesion))
    for f in model.fluxes:
        touches = (f.source in ls) or (f.target in ls) or _uses(f.rate, local)
        if not touches:
            b.add_flux(f.name, f.rate, f.source, f.target, f.description)
            continue
        for k, e in enumerate(per_lesion(f.rate)):
            src = lesion_name(f.source, k) if f.source in ls else f.source
            tgt = lesion_name(f.target, k) if f.target in ls else f.target
            b.add_flux(lesion_name(f.name, k), e, src, tgt, f.description)
    for o in model.observables.values():
        if o.name in lo:
            for k, e in enumerate(per_lesion(o.expr)):
                b.add_observable(lesion_name(o.name, k), e, o.unit,
                                 f"{o.description} [lesion {les[k].name}]")
        else:
            b.add_observable(o.name, o.expr, o.unit, o.description)
    new = b.build(check_units=check_units)
    return LesionModel(new, model, tuple(les), ls, lp, tuple(la), tuple(lo))


def _sum_local_terms(expr, local: set[str], per_lesion) -> sympy.Expr:
    """Additive terms of a systemic RHS: local ones summed over lesions, others kept."""
    out = []
    for term in sympy.Add.make_args(expr):
        if _uses(term, local):
            out.extend(per_lesion(term))
        else:
            out.append(term)
    return sympy.Add(*out)
