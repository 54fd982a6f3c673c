"""Units (pint) and dimensional analysis of sympy expressions.

A *unit* here is a ``pint.Quantity`` whose magnitude is a scale factor, e.g.
``1 mg/L`` or ``1e9 cell``. Two units are the same when they have the same
dimensionality **and** the same scale (relative tolerance 1e-9): ``mg`` and ``g``
differ, ``mg/L`` and ``ug/mL`` agree.

Rules of :func:`infer_unit`
---------------------------
* Symbol: its unit from the ``units`` mapping (keyed by symbol name; the time
  symbol ``t`` must be given under ``"t"``). A missing name is a UnitError.
* Numbers (any sub-expression without free symbols) are *wildcards*: in a sum,
  ``min``/``max``/``piecewise`` branches and comparisons they take the unit of
  the other operands (``1 - T/K``, ``K_T - 100``, ``x > 0`` are fine); in
  products they are dimensionless. A whole expression that is a pure number has
  the wildcard unit: :func:`infer_unit` returns ``None`` and :func:`check_unit`
  accepts it against any unit.
* Add: all terms must have the same unit (dimensionality and scale).
* Mul: product of the units.
* Pow: the exponent must be dimensionless. A numeric exponent gives
  ``unit**exponent`` (``sqrt`` is ``Pow(x, 1/2)``, ``x/y`` is ``x*y**-1``); a
  symbolic exponent requires a dimensionless base (use ``hill(x, K, n)`` for a
  Hill term with a dimensional ``x``).
* exp, log, sin, cos, tan, tanh: argument dimensionless (scale 1), result
  dimensionless.
* Abs: unit of its argument. Min, Max, Piecewise: all value branches share one
  unit; in conditions both sides of each comparison share one unit.
* Heaviside: any argument, dimensionless result.
* Hill(x, k, n): ``x`` and ``k`` share a unit, ``n`` dimensionless; result
  dimensionless.
* Anything else is a UnitError ("cannot determine the unit of ...").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import pint
import sympy
from sympy.logic.boolalg import BooleanAtom

from .errors import UnitError
from .expr import Hill

__all__ = ["ureg", "parse_unit", "infer_unit", "check_unit", "same_unit", "format_unit"]

#: The unit registry of immunoode (constant: only definitions added at import).
ureg = pint.UnitRegistry()
ureg.define("cell = [cell_count]")

_REL_TOL = 1e-9
_DIMLESS_FUNCS = (sympy.exp, sympy.log, sympy.sin, sympy.cos, sympy.tan, sympy.tanh)
# "m2", "mm3": a unit symbol directly followed by a 2 or 3 exponent at a word end
_BARE_EXPONENT = re.compile(r"(?<=[A-Za-z])([23])(?![\w.])")


def parse_unit(text: str) -> pint.Quantity:
    """Parse a unit string into a Quantity (magnitude = scale factor).

    Parameters
    ----------
    text : str
        e.g. ``"mg/L"``, ``"1/day"``, ``"1e9 cell"``, ``"mm^3"`` (also ``"mm3"``),
        ``"1"``, ``""`` or ``"dimensionless"`` (dimensionless).

    Returns
    -------
    pint.Quantity
        e.g. ``1 mg/L``; ``1e9 cell``; ``1 dimensionless``.

    Raises
    ------
    UnitError
        Unknown unit, non-multiplicative unit (degC), or a scale that is not a
        positive finite number.
    """
    if not isinstance(text, str):
        raise UnitError(f"unit must be a string, got {type(text).__name__}")
    if len(text) > 200:
        raise UnitError(f"unit text is too long ({len(text)} characters)")
    src = _BARE_EXPONENT.sub(r"**\1", text.strip())
    try:
        q = ureg.parse_expression(src) if src else ureg.Quantity(1, "dimensionless")
        if not isinstance(q, pint.Quantity):
            q = ureg.Quantity(q, "dimensionless")
        q = q * 1  # rejects offset units (degC ...)
        mag = float(q.magnitude)
    except pint.UndefinedUnitError as exc:
        names = ", ".join(repr(n) for n in getattr(exc, "unit_names", ()) or ())
        raise UnitError(f"unknown unit {names or repr(text)} in {text!r}") from None
    except Exception as exc:  # pint raises many types (TokenError, DimensionalityError ...)
        detail = str(exc) or "invalid unit syntax"
        raise UnitError(f"cannot parse unit {text!r} ({detail})") from None
    if not (math.isfinite(mag) and mag > 0):
        raise UnitError(f"unit {text!r} must have a positive finite scale factor, got {mag}")
    return q


def _dim_str(q: pint.Quantity) -> str:
    dims = dict(q.dimensionality)
    if not dims:
        return "dimensionless"
    num, den = [], []
    for name, p in sorted(dims.items()):
        name = name.strip("[]")
        txt = name if abs(p) == 1 else f"{name}**{abs(p):g}"
        (num if p > 0 else den).append(txt)
    return ("*".join(num) or "1") + "".join("/" + d for d in den)


_SYMBOL_OVERRIDES = {"day": "day", "week": "week", "year": "year", "minute": "min"}


def _fmt_number(x: float) -> str:
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2),
                  f"{x:g}")


def _unit_symbol(name: str) -> str:
    if name in _SYMBOL_OVERRIDES:
        return _SYMBOL_OVERRIDES[name]
    try:
        sym = ureg.get_symbol(name)
    except Exception:  # pragma: no cover - defensive
        sym = name
    if name.endswith("liter") and sym.endswith("l"):
        sym = sym[:-1] + "L"
    return sym


def format_unit(q: pint.Quantity | None) -> str:
    """Compact text of a unit with its dimensionality, e.g. ``mg/L [mass/length**3]``."""
    if q is None:
        return "any (pure number)"
    units = dict(q.units._units)
    num, den = [], []
    for name, p in units.items():
        s = _unit_symbol(name)
        txt = s if abs(p) == 1 else f"{s}^{abs(p):g}"
        (num if p > 0 else den).append(txt)
    body = ("*".join(num) or ("1" if den else "dimensionless")) + "".join("/" + d for d in den)
    mag = float(q.magnitude)
    if mag != 1:
        body = f"{_fmt_number(mag)} {body}" if num or den else _fmt_number(mag)
    return f"{body} [{_dim_str(q)}]"


def _ratio(a: pint.Quantity, b: pint.Quantity) -> float | None:
    """``a/b`` as a plain number if dimensions agree, else None."""
    if a.dimensionality != b.dimensionality:
        return None
    return float((a / b).to("dimensionless").magnitude)


def same_unit(a: pint.Quantity | None, b: pint.Quantity | None) -> bool:
    """True if ``a`` and ``b`` agree in dimensionality and scale (None = wildcard)."""
    if a is None or b is None:
        return True
    r = _ratio(a, b)
    return r is not None and math.isclose(r, 1.0, rel_tol=_REL_TOL)


def _mismatch(a, b) -> str:
    r = _ratio(a, b)
    if r is None:
        return "different dimensions"
    return f"same dimension, scale differs by a factor {_fmt_number(r)}"


_ONE = ureg.Quantity(1, "dimensionless")


class _Inferer:
    def __init__(self, units: Mapping[str, pint.Quantity], where: str):
        self.units = units
        self.where = where

    def fail(self, msg: str) -> UnitError:
        return UnitError(f"{self.where}: {msg}" if self.where else msg)

    def need_dimensionless(self, q, what: str, hint: str = ""):
        if q is not None and not same_unit(q, _ONE):
            raise self.fail(f"{what} must be dimensionless but has unit {format_unit(q)}{hint}")

    def common(self, items, what: str):
        """Unit shared by ``items`` (sympy exprs), numbers being wildcards."""
        ref = ref_expr = None
        for it in items:
            q = self.infer(it)
            if q is None:
                continue
            if ref is None:
                ref, ref_expr = q, it
            elif not same_unit(ref, q):
                raise self.fail(
                    f"{what} {sympy.sstr(ref_expr)!r} has unit {format_unit(ref)} but "
                    f"{sympy.sstr(it)!r} has unit {format_unit(q)} ({_mismatch(q, ref)})")
        return ref

    def condition(self, c):
        if isinstance(c, BooleanAtom):
            return
        if isinstance(c, sympy.core.relational.Relational):
            self.common([c.lhs, c.rhs], "in the comparison, operand")
            return
        if isinstance(c, (sympy.And, sympy.Or, sympy.Not, sympy.Xor)):
            for a in c.args:
                self.condition(a)
            return
        raise self.fail(f"cannot determine the units in condition {sympy.sstr(c)!r}")

    def infer(self, e):
        if e.is_number:
            return None
        if e.is_Symbol:
            try:
                q = self.units[e.name]
            except KeyError:
                raise self.fail(f"unknown symbol {e.name!r} (no unit known for it)") from None
            if isinstance(q, pint.Unit):
                q = ureg.Quantity(1, str(q))
            if not isinstance(q, pint.Quantity):
                raise self.fail(f"unit of {e.name!r} must be a pint.Quantity, got {type(q).__name__}")
            return q
        if e.is_Add:
            return self.common(e.args, "term")
        if e.is_Mul:
            out = None
            for a in e.args:
                q = self.infer(a)
                if q is not None:
                    out = q if out is None else out * q
            return _ONE if out is None else out
        if e.is_Pow:
            base, ex = e.args
            qb = self.infer(base)
            if ex.is_number:
                if qb is None:
                    return None
                p = int(ex) if ex.is_Integer else float(ex)
                return qb ** p
            self.need_dimensionless(self.infer(ex), f"exponent {sympy.sstr(ex)!r}")
            self.need_dimensionless(
                qb, f"base {sympy.sstr(base)!r} of a symbolic power",
                " (use hill(x, K, n) for a Hill term with a dimensional x)")
            return _ONE
        if isinstance(e, _DIMLESS_FUNCS):
            for a in e.args:
                self.need_dimensionless(self.infer(a), f"argument of {type(e).__name__}()")
            return _ONE
        if isinstance(e, sympy.Abs):
            return self.infer(e.args[0])
        if isinstance(e, (sympy.Min, sympy.Max)):
            return self.common(e.args, f"{type(e).__name__}() argument")
        if isinstance(e, sympy.Piecewise):
            for _, c in e.args:
                self.condition(c)
            return self.common([v for v, _ in e.args], "piecewise value")
        if isinstance(e, sympy.Heaviside):
            self.infer(e.args[0])
            return _ONE
        if isinstance(e, Hill):
            x, k, n = e.args
            self.common([x, k], "in hill(x, k, n), argument")
            self.need_dimensionless(self.infer(n), "the Hill exponent n")
            return _ONE
        raise self.fail(f"cannot determine the unit of {sympy.sstr(e)!r}")


def infer_unit(expr: sympy.Expr, units: Mapping[str, pint.Quantity], *,
               where: str = "") -> pint.Quantity | None:
    """Unit of ``expr`` given the unit of every free symbol.

    Parameters
    ----------
    expr : sympy.Expr
        Expression (e.g. from :func:`immunoode.expr.parse_expression`).
    units : Mapping[str, pint.Quantity]
        Unit of each symbol name, including ``"t"`` for time.
    where : str
        Location prefixed to error messages, e.g. ``"odes.A1"``.

    Returns
    -------
    pint.Quantity or None
        The unit (magnitude = scale factor), or ``None`` if ``expr`` is a pure
        number (wildcard, compatible with any unit).

    Raises
    ------
    UnitError
        Inconsistent units (see the module docstring for the rules).
    """
    try:
        if isinstance(expr, (int, float)):  # a bare number, never text
            expr = sympy.Integer(expr) if isinstance(expr, int) else sympy.Float(expr)
        return _Inferer(units, where).infer(expr)
    except UnitError:
        raise
    except RecursionError:
        raise UnitError(f"{where}: expression is too deeply nested" if where
                        else "expression is too deeply nested") from None
    except (pint.PintError, TypeError, ValueError, ArithmeticError) as exc:
        raise UnitError(f"{where}: unit analysis failed: {exc}" if where
                        else f"unit analysis failed: {exc}") from None


def check_unit(expr, expected: pint.Quantity, units: Mapping[str, pint.Quantity], *,
               where: str, subject: str = "expression",
               target: str = "the expected unit is") -> None:
    """Raise UnitError unless ``expr`` has the unit ``expected``.

    Dimensionality and scale factor (relative 1e-9) must both agree; a pure
    number is accepted for any ``expected``.

    Parameters
    ----------
    expr : sympy.Expr
    expected : pint.Quantity
        e.g. ``parse_unit("mg/day")``.
    units : Mapping[str, pint.Quantity]
        Unit of each symbol name (``"t"`` for time).
    where : str
        Location for the message, e.g. ``"odes.A1"``.
    subject, target : str
        Wording of the message ``"{where}: {subject} has unit X but {target} Y"``,
        e.g. ``subject="right-hand side", target="d(A1)/dt needs"``.
    """
    actual = infer_unit(expr, units, where=where)
    if actual is None or same_unit(actual, expected):
        return
    prefix = f"{where}: " if where else ""
    raise UnitError(f"{prefix}{subject} has unit {format_unit(actual)} but {target} "
                    f"{format_unit(expected)}" + (
                        f" (same dimension, scale differs by a factor {_fmt_number(_ratio(actual, expected))})"
                        if _ratio(actual, expected) is not None else ""))
