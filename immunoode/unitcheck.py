"""Dimensional checks of a whole :class:`~immunoode.model.Model`.

Every state and parameter declares a unit; assignments and observables may
declare one (then it is checked) or have it inferred.  Each ODE right-hand side
must have the unit of its state per time unit, each flux rate the unit of its
source (or target) state per time unit, and the two ends of a flux must share a
unit so that the flux conserves mass.
"""

from __future__ import annotations

from typing import Mapping

from .errors import ModelError, UnitError
from .units import check_unit, format_unit, infer_unit, parse_unit, same_unit

__all__ = ["check_model_units", "model_units"]


def _parse(text, *, file, section, item):
    try:
        return parse_unit(text)
    except ModelError as exc:
        raise exc.located(file=file, section=section, item=item) from None


def model_units(model, where: Mapping | None = None) -> dict:
    """Unit (pint Quantity) of every name in the model, assignments inferred where undeclared."""
    where = where or {}
    units: dict = {"t": _parse(model.time_unit, file=None, section="model", item="time_unit")}
    for s in model.states.values():
        units[s.name] = _parse(s.unit, file=where.get(("states", s.name)), section="states", item=s.name)
    for p in model.parameters.values():
        units[p.name] = _parse(p.unit, file=where.get(("parameters", p.name)), section="parameters",
                               item=p.name)
    for name in model.assignment_order:
        a = model.assignments[name]
        f = where.get(("assignments", name))
        try:
            if a.unit:
                u = _parse(a.unit, file=f, section="assignments", item=name)
                check_unit(a.expr, u, units, where="", subject="expression",
                           target=f"its declared unit is")
            else:
                u = infer_unit(a.expr, units, where="")
                if u is None:  # a pure number
                    u = parse_unit("1")
        except ModelError as exc:
            raise exc.located(file=f, section="assignments", item=name) from None
        units[name] = u
    return units


def check_model_units(model, where: Mapping | None = None) -> dict:
    """Raise :class:`UnitError` on the first inconsistent equation; return the unit map."""
    where = where or {}
    units = model_units(model, where)
    tu = units["t"]
    for state, rhs in model.odes.items():
        f = where.get(("odes", state))
        try:
            check_unit(rhs, units[state] / tu, units, where="", subject="right-hand side",
                       target=f"d({state})/dt needs")
        except ModelError as exc:
            raise exc.located(file=f, section="odes", item=state) from None
    for fx in model.fluxes:
        f = where.get(("fluxes", fx.name))
        if fx.source and fx.target:
            us, ut = units[fx.source], units[fx.target]
            if not same_unit(us, ut):
                raise UnitError(f"flux joins states with different units ({fx.source}: {format_unit(us)}, "
                                f"{fx.target}: {format_unit(ut)}); mass would not be conserved",
                                file=f, section="fluxes", item=fx.name)
        end = fx.source or fx.target
        try:
            check_unit(fx.rate, units[end] / tu, units, where="", subject="rate",
                       target=f"a flux of {end} needs")
        except ModelError as exc:
            raise exc.located(file=f, section="fluxes", item=fx.name) from None
    for o in model.observables.values():
        f = where.get(("observables", o.name))
        if o.unit:
            try:
                check_unit(o.expr, _parse(o.unit, file=f, section="observables", item=o.name), units,
                           where="", target="its declared unit is")
            except ModelError as exc:
                raise exc.located(file=f, section="observables", item=o.name) from None
    return units
