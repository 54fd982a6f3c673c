"""SBML import and export (python-libsbml).

* :func:`read_sbml` reads SBML Level 2 (v1-v5) / Level 3 (v1, v2) core into a
  :class:`~immunoode.model.Model` built through :class:`~immunoode.model.ModelBuilder`,
  the same path TOML files take.  :func:`read_sbml_with_regimen` also turns the
  simple dosing events ``time >= c: S = S + a`` / ``S = S * f`` into a
  :class:`~immunoode.regimen.Regimen`.
* :func:`to_sbml` writes a model (and optionally a regimen, as events) as SBML
  Level 3 Version 2, with units, checked by libsbml's consistency checks.

MathML is converted node by node from libsbml's AST into sympy objects (and
back); no formula text is ever evaluated (no ``eval``, ``sympify``,
``parse_expr``).  Unsupported constructs raise :class:`~immunoode.errors.ModelError`
naming the SBML element.  See ``docs/sbml.md`` for the mapping and the exact
list of supported and refused constructs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import sympy

from .errors import ModelError, UnitError
from .expr import TIME, Hill, expand_hill
from .model import Model, ModelBuilder

__all__ = ["read_sbml", "read_sbml_with_regimen", "to_sbml", "load_any_model",
           "cmd_import_sbml", "cmd_export_sbml", "add_sbml_commands", "UNKNOWN_UNIT",
           "AVOGADRO"]

#: Unit given to quantities whose SBML unit is missing or cannot be expressed.
UNKNOWN_UNIT = "1"
#: Value of the ``avogadro`` csymbol (the value libsbml and libRoadRunner use).
AVOGADRO = 6.02214179e23


def _libsbml():
    try:
        import libsbml
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ModelError("SBML support needs python-libsbml (pip install python-libsbml)") from exc
    return libsbml


def _sym(name: str) -> sympy.Symbol:
    return TIME if name == "t" else sympy.Symbol(name, real=True)


def _one_to_one_functions(ls) -> dict:
    """sympy function -> libsbml AST type for the MathML functions that map one to one
    (used in both directions: import inverts it, export uses it as is)."""
    return {sympy.exp: ls.AST_FUNCTION_EXP, sympy.log: ls.AST_FUNCTION_LN,
            sympy.Abs: ls.AST_FUNCTION_ABS, sympy.floor: ls.AST_FUNCTION_FLOOR,
            sympy.ceiling: ls.AST_FUNCTION_CEILING, sympy.sin: ls.AST_FUNCTION_SIN,
            sympy.cos: ls.AST_FUNCTION_COS, sympy.tan: ls.AST_FUNCTION_TAN,
            sympy.sinh: ls.AST_FUNCTION_SINH, sympy.cosh: ls.AST_FUNCTION_COSH,
            sympy.tanh: ls.AST_FUNCTION_TANH, sympy.asin: ls.AST_FUNCTION_ARCSIN,
            sympy.acos: ls.AST_FUNCTION_ARCCOS, sympy.atan: ls.AST_FUNCTION_ARCTAN,
            sympy.asinh: ls.AST_FUNCTION_ARCSINH, sympy.acosh: ls.AST_FUNCTION_ARCCOSH,
            sympy.atanh: ls.AST_FUNCTION_ARCTANH}


# =========================================================================== import: math
class RateOf(sympy.Function):
    """Placeholder for SBML's ``rateOf(x)`` csymbol; replaced by dx/dt after import."""

    nargs = 1


def _flat(name: str, exact):
    """A sympy function printed as ``name`` (``math.floor`` ...) whose derivative is 0.

    floor, ceiling and factorial (of integers) are piecewise constant: their
    derivative is 0 wherever it exists, which is what the Jacobian needs (sympy's
    own classes leave an unprintable ``Derivative``/``polygamma`` behind).
    """
    def _eval(cls, x):
        if x.is_Number:
            return exact(x)
        return None
    return type(name, (sympy.Function,), {"nargs": 1, "eval": classmethod(_eval),
                                          "fdiff": lambda self, argindex=1: sympy.Integer(0)})


_Floor = _flat("floor", sympy.floor)
_Ceiling = _flat("ceiling", sympy.ceiling)
_FactorialGamma = _flat("gamma", sympy.gamma)  # factorial(x) = gamma(x + 1)


def _quotient(a, b):
    """MathML ``quotient``: the integer part of a/b, truncated towards zero."""
    q = a / b
    return sympy.Piecewise((_Floor(q), q >= 0), (_Ceiling(q), True))


class _MathConverter:
    """libsbml ASTNode -> sympy, node by node (no text evaluation)."""

    def __init__(self, ls, functions: dict, file):
        self.ls = ls
        self.functions = functions  # id -> FunctionDefinition
        self.file = file
        t = ls
        simple = {code: fn for fn, code in _one_to_one_functions(ls).items()}
        simple.update({
            t.AST_FUNCTION_SEC: lambda x: 1 / sympy.cos(x),
            t.AST_FUNCTION_CSC: lambda x: 1 / sympy.sin(x),
            t.AST_FUNCTION_COT: lambda x: 1 / sympy.tan(x),
            t.AST_FUNCTION_SECH: lambda x: 1 / sympy.cosh(x),
            t.AST_FUNCTION_CSCH: lambda x: 1 / sympy.sinh(x),
            t.AST_FUNCTION_COTH: lambda x: 1 / sympy.tanh(x),
            t.AST_FUNCTION_ARCSEC: lambda x: sympy.acos(1 / x),
            t.AST_FUNCTION_ARCCSC: lambda x: sympy.asin(1 / x),
            t.AST_FUNCTION_ARCCOT: lambda x: sympy.atan(1 / x),
            t.AST_FUNCTION_ARCSECH: lambda x: sympy.acosh(1 / x),
            t.AST_FUNCTION_ARCCSCH: lambda x: sympy.asinh(1 / x),
            t.AST_FUNCTION_ARCCOTH: lambda x: sympy.atanh(1 / x),
            t.AST_FUNCTION_FACTORIAL: lambda x: _FactorialGamma(x + 1),
            t.AST_FUNCTION_FLOOR: _Floor,
            t.AST_FUNCTION_CEILING: _Ceiling,
        })
        self.simple = simple
        self.rel = {t.AST_RELATIONAL_EQ: sympy.Eq, t.AST_RELATIONAL_NEQ: sympy.Ne,
                    t.AST_RELATIONAL_LT: sympy.Lt, t.AST_RELATIONAL_LEQ: sympy.Le,
                    t.AST_RELATIONAL_GT: sympy.Gt, t.AST_RELATIONAL_GEQ: sympy.Ge}

    def error(self, msg, element):
        return ModelError(msg, file=self.file, section="sbml", item=element)

    # -- boolean/number coercions (SBML tools treat true as 1 and non-zero as true)
    @staticmethod
    def num(x):
        if isinstance(x, sympy.logic.boolalg.Boolean) and not isinstance(x, sympy.Expr):
            if x is sympy.true:
                return sympy.Integer(1)
            if x is sympy.false:
                return sympy.Integer(0)
            return sympy.Piecewise((sympy.Integer(1), x), (sympy.Integer(0), True))
        return x

    @staticmethod
    def cond(x):
        if isinstance(x, sympy.logic.boolalg.Boolean) and not isinstance(x, sympy.Expr):
            return x
        return sympy.Ne(x, 0)

    def convert(self, node, element: str, env: dict | None = None, depth: int = 0):
        """sympy expression for ``node``; ``element`` names the SBML element in errors."""
        if node is None:
            raise self.error("has no math", element)
        return self.num(self._conv(node, element, env or {}, depth))

    def _conv(self, node, element, env, depth):
        ls = self.ls
        if depth > 500:
            raise self.error("math is nested too deeply", element)
        ty = node.getType()
        kids = [node.getChild(i) for i in range(node.getNumChildren())]

        def c(k):
            return self.num(self._conv(k, element, env, depth + 1))

        def b(k):
            return self.cond(self._conv(k, element, env, depth + 1))

        if ty == ls.AST_INTEGER:
            return sympy.Integer(node.getInteger())
        if ty in (ls.AST_REAL, ls.AST_REAL_E):
            v = node.getReal()
            if math.isnan(v):
                return sympy.nan
            if math.isinf(v):
                return sympy.oo if v > 0 else -sympy.oo
            return sympy.Float(v)
        if ty == ls.AST_RATIONAL:
            return sympy.Rational(node.getNumerator(), node.getDenominator())
        if ty == ls.AST_NAME:
            name = node.getName()
            if name in env:
                return env[name]
            return _sym(name)
        if ty == ls.AST_NAME_TIME:
            return TIME
        if ty == ls.AST_NAME_AVOGADRO:
            return sympy.Float(AVOGADRO)
        if ty == ls.AST_CONSTANT_PI:  # as the double every simulator uses (pi == 3.14159...)
            return sympy.Float(math.pi)
        if ty == ls.AST_CONSTANT_E:
            return sympy.Float(math.e)
        if ty == ls.AST_CONSTANT_TRUE:
            return sympy.true
        if ty == ls.AST_CONSTANT_FALSE:
            return sympy.false
        if ty == ls.AST_FUNCTION_DELAY:
            raise self.error("uses the 'delay' csymbol: delay differential equations are not "
                             "supported", element)
        if ty == ls.AST_FUNCTION_RATE_OF:
            arg = self._conv(kids[0], element, env, depth + 1) if len(kids) == 1 else None
            if not isinstance(arg, sympy.Symbol) or arg is TIME:
                raise self.error("uses 'rateOf' on something other than a model variable "
                                 "(only rateOf(<id>) is supported)", element)
            return RateOf(arg)
        if ty in (ls.AST_FUNCTION_QUOTIENT, ls.AST_FUNCTION_REM) and len(kids) != 2:
            raise self.error(f"{node.getName() or 'quotient/rem'!r} takes two arguments, got "
                             f"{len(kids)}", element)
        if ty == ls.AST_FUNCTION_QUOTIENT:
            return _quotient(c(kids[0]), c(kids[1]))
        if ty == ls.AST_FUNCTION_REM:
            a, d = c(kids[0]), c(kids[1])
            return a - d * _quotient(a, d)
        if ty == ls.AST_PLUS:
            return sympy.Add(*[c(k) for k in kids]) if kids else sympy.Integer(0)
        if ty == ls.AST_TIMES:
            return sympy.Mul(*[c(k) for k in kids]) if kids else sympy.Integer(1)
        if ty == ls.AST_MINUS:
            if len(kids) == 1:
                return -c(kids[0])
            return c(kids[0]) - c(kids[1])
        if ty == ls.AST_DIVIDE:
            return c(kids[0]) / c(kids[1])
        if ty in (ls.AST_POWER, ls.AST_FUNCTION_POWER):
            return sympy.Pow(c(kids[0]), c(kids[1]))
        if ty == ls.AST_FUNCTION_ROOT:
            if len(kids) == 1:
                return sympy.sqrt(c(kids[0]))
            deg = c(kids[0])
            return sympy.Pow(c(kids[1]), 1 / deg)
        if ty == ls.AST_FUNCTION_LOG:
            if len(kids) == 1:
                return sympy.log(c(kids[0])) / sympy.log(10)
            base = c(kids[0])
            return sympy.log(c(kids[1])) / sympy.log(base)
        if ty in self.simple:
            if len(kids) != 1:
                raise self.error(f"function {node.getName()!r} takes one argument", element)
            return self.simple[ty](c(kids[0]))
        if ty == ls.AST_FUNCTION_MAX:
            return sympy.Max(*[c(k) for k in kids])
        if ty == ls.AST_FUNCTION_MIN:
            return sympy.Min(*[c(k) for k in kids])
        if ty == ls.AST_FUNCTION_PIECEWISE:
            pairs = []
            n = len(kids)
            for i in range(0, n - 1, 2):
                pairs.append((c(kids[i]), b(kids[i + 1])))
            if n % 2 == 1:
                pairs.append((c(kids[-1]), sympy.true))
            else:
                pairs.append((sympy.nan, sympy.true))  # undefined otherwise (as in SBML)
            return sympy.Piecewise(*pairs)
        if ty in self.rel:
            args = [c(k) for k in kids]
            if len(args) < 2:
                raise self.error("a relational operator needs two arguments", element)
            f = self.rel[ty]
            if ty == ls.AST_RELATIONAL_NEQ and len(args) != 2:
                raise self.error("'neq' takes exactly two arguments", element)
            return sympy.And(*[f(args[i], args[i + 1]) for i in range(len(args) - 1)])
        if ty == ls.AST_LOGICAL_AND:
            return sympy.And(*[b(k) for k in kids]) if kids else sympy.true
        if ty == ls.AST_LOGICAL_OR:
            return sympy.Or(*[b(k) for k in kids]) if kids else sympy.false
        if ty == ls.AST_LOGICAL_XOR:
            return sympy.Xor(*[b(k) for k in kids]) if kids else sympy.false
        if ty == ls.AST_LOGICAL_NOT:
            return sympy.Not(b(kids[0]))
        if ty == ls.AST_LOGICAL_IMPLIES:
            return sympy.Implies(b(kids[0]), b(kids[1]))
        if ty == ls.AST_FUNCTION:
            return self._call(node, kids, element, env, depth)
        if ty == ls.AST_LAMBDA:
            raise self.error("a lambda may only appear in a function definition", element)
        name = node.getName() or ls.ASTNode.getName(node) or f"AST type {ty}"
        raise self.error(f"uses the MathML function {name!r}, which is not supported "
                         f"(csymbols from packages and MathML outside SBML core are refused)",
                         element)

    def _call(self, node, kids, element, env, depth):
        fname = node.getName()
        fd = self.functions.get(fname)
        if fd is None:
            raise self.error(f"calls undefined function {fname!r}", element)
        lam = fd.getMath()
        if lam is None or lam.getType() != self.ls.AST_LAMBDA:
            raise self.error(f"function definition {fname!r} has no lambda", element)
        nb = lam.getNumBvars() if hasattr(lam, "getNumBvars") else lam.getNumChildren() - 1
        if nb != len(kids):
            raise self.error(f"function {fname!r} takes {nb} arguments, got {len(kids)}", element)
        args = [self._conv(k, element, env, depth + 1) for k in kids]
        inner = {lam.getChild(i).getName(): a for i, a in enumerate(args)}
        body = lam.getChild(lam.getNumChildren() - 1)
        return self._conv(body, f"{element} (via function {fname})", inner, depth + 1)


# =========================================================================== import: units
_KIND_TO_PINT = {
    "ampere": "ampere", "becquerel": "becquerel", "candela": "candela", "coulomb": "coulomb",
    "dimensionless": None, "farad": "farad", "gram": "gram", "gray": "gray", "henry": "henry",
    "hertz": "hertz", "item": None, "joule": "joule", "katal": "katal", "kelvin": "kelvin",
    "kilogram": "kilogram", "litre": "liter", "liter": "liter", "lumen": "lumen", "lux": "lux",
    "metre": "meter", "meter": "meter", "mole": "mole", "newton": "newton", "ohm": "ohm",
    "pascal": "pascal", "radian": "radian", "second": "second", "siemens": "siemens",
    "sievert": "sievert", "steradian": "steradian", "tesla": "tesla", "volt": "volt",
    "watt": "watt", "weber": "weber",
}


def _paren(u: str) -> str:
    return u if u.isidentifier() else f"({u})"


def _fmt_factor(x: float) -> str:
    return repr(float(x)) if x != int(x) or abs(x) >= 1e15 else str(int(x))


class _Units:
    """SBML unit references -> pint-parsable strings (None when not expressible)."""

    def __init__(self, ls, model, level: int):
        self.ls = ls
        self.model = model
        self.level = level
        self.defs = {ud.getId(): ud for ud in model.getListOfUnitDefinitions()}

    def _ud_string(self, ud) -> str | None:
        from .units import parse_unit, same_unit
        parts = []
        for u in ud.getListOfUnits():
            kind = self.ls.UnitKind_toString(u.getKind())
            if kind not in _KIND_TO_PINT:
                return None  # celsius, avogadro...
            base = _KIND_TO_PINT[kind]
            factor = u.getMultiplier() * 10.0 ** u.getScale()
            exp = u.getExponentAsDouble()
            if not (math.isfinite(factor) and factor > 0 and math.isfinite(exp)):
                return None
            core = base if base else ("1" if factor == 1 else None)
            if base is None:
                if factor == 1:
                    continue
                term = f"{_fmt_factor(factor)}"
            elif factor == 1:
                term = core
            else:
                term = f"({_fmt_factor(factor)}*{base})"
            if exp != 1:
                e = _fmt_factor(exp)
                term = f"{term}**({e})" if exp < 0 else f"{term}**{e}"
            parts.append(term)
        text = "*".join(parts) if parts else "1"
        try:
            q = parse_unit(text)
        except UnitError:
            return None
        # prefer the definition's name or id when it is itself a unit with the same meaning
        # ("day", "mg/L"; to_sbml writes the immunoode unit text as the name)
        for cand in (ud.getName(), ud.getId()):
            try:
                if cand and same_unit(parse_unit(cand), q):
                    return cand
            except Exception:
                pass
        return text

    def resolve(self, ref: str | None) -> str | None:
        """pint string for a unit reference (a unit definition id or a base unit kind)."""
        if not ref:
            return None
        if ref in self.defs:
            return self._ud_string(self.defs[ref])
        if ref == "dimensionless":
            return "1"
        builtin_l2 = {"substance": "mole", "volume": "liter", "area": "meter**2",
                      "length": "meter", "time": "second"}
        if self.level < 3 and ref in builtin_l2:
            return builtin_l2[ref]
        base = _KIND_TO_PINT.get(ref)
        return base

    def model_default(self, what: str) -> str | None:
        m = self.model
        if self.level >= 3:
            getter = {"substance": m.getSubstanceUnits, "time": m.getTimeUnits,
                      "volume": m.getVolumeUnits, "area": m.getAreaUnits,
                      "length": m.getLengthUnits}[what]
            return self.resolve(getter())
        return self.resolve(what)


# =========================================================================== import: model
def _check_errors(ls, doc, file):
    errs = []
    for i in range(doc.getNumErrors()):
        e = doc.getError(i)
        if e.getSeverity() >= ls.LIBSBML_SEV_ERROR:
            errs.append(f"line {e.getLine()}: {e.getMessage().strip()}")
    if errs:
        raise ModelError("invalid SBML: " + "; ".join(errs[:3]) +
                         (f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""), file=file)


def _read_document(path):
    ls = _libsbml()
    path = Path(path)
    if not path.exists():
        raise ModelError("file not found", file=path)
    doc = ls.readSBMLFromFile(str(path))
    _check_errors(ls, doc, path)
    model = doc.getModel()
    if model is None:
        raise ModelError("the SBML document has no model", file=path)
    # SBML packages (fbc, comp, qual, distrib, arrays ...) change what the model means: refuse
    # them; layout and render only describe drawings and are ignored
    ns = doc.getSBMLNamespaces().getNamespaces()
    for i in range(ns.getLength()):
        uri, prefix = ns.getURI(i), ns.getPrefix(i)
        if not prefix or "sbml.org/sbml/level" not in uri:
            continue
        if prefix in ("layout", "render"):
            continue
        raise ModelError(f"uses the SBML package {prefix!r} ({uri}), which is not supported "
                         f"(only SBML core is)", file=path, section="sbml", item=prefix)
    return ls, doc, model, path


def _sanitize(name: str, taken: set) -> str:
    out = name
    while out in taken or out in ("t", "time"):
        out = out + "_"
    taken.add(out)
    return out


def _topo_eval(exprs: dict, values: dict, file) -> dict:
    """Evaluate name -> sympy expression in dependency order, numerically, into ``values``."""
    pending = dict(exprs)
    while pending:
        progress = False
        for name, e in list(pending.items()):
            syms = e.free_symbols
            if all(s.name in values for s in syms):
                sub = {s: sympy.Float(values[s.name]) for s in syms}
                v = e.xreplace(sub)
                try:
                    val = float(sympy.N(expand_hill(v), 17))
                except (TypeError, ValueError):
                    raise ModelError(f"initial value evaluates to {v} (not a real number)",
                                     file=file, section="sbml", item=name) from None
                values[name] = val
                del pending[name]
                progress = True
        if not progress:
            name = sorted(pending)[0]
            missing = sorted(s.name for s in pending[name].free_symbols if s.name not in values)
            raise ModelError("cannot compute the initial value: it depends on "
                             + ", ".join(missing) + " (undefined or circular)",
                             file=file, section="sbml", item=name)
    return values


def read_sbml(path, *, check_units: bool | None = None) -> Model:
    """Read an SBML file into a :class:`Model`.

    Events are refused (use :func:`read_sbml_with_regimen` for simple dosing
    events).  ``check_units``: ``None`` (default) checks units when every
    quantity has an expressible unit and skips the check with a warning
    otherwise (or when the SBML units are inconsistent); ``False`` never checks;
    ``True`` checks and raises :class:`~immunoode.errors.UnitError`.
    """
    model, _ = _read(path, events="refuse", check_units=check_units)
    return model


def read_sbml_with_regimen(path, *, check_units: bool | None = None):
    """Read an SBML file into ``(Model, Regimen or None)``.

    Events of the form ``trigger: time >= c`` (or ``time > c``, ``c`` a number)
    whose assignments are ``S = S + a`` or ``S = S * f`` (``a``, ``f`` numbers,
    ``S`` a state) become :class:`~immunoode.regimen.Dose` / :class:`~immunoode.regimen.Scale`
    items at time ``c``; any other event is refused.
    """
    return _read(path, events="regimen", check_units=check_units)


def _read(path, *, events: str, check_units):
    """Shared import; ``events``: "refuse", "regimen" or "triggered"."""
    ls, doc, m, file = _read_document(path)
    level = doc.getLevel()

    def err(msg, item):
        return ModelError(msg, file=file, section="sbml", item=item)

    # ---------------------------------------------------------- refusals
    for i in range(m.getNumRules()):
        r = m.getRule(i)
        if r.isAlgebraic():
            raise err("algebraic rules are not supported (immunoode integrates ODEs, not DAEs)",
                      r.getId() or r.getMetaId() or f"algebraicRule[{i}]")
    for r in m.getListOfReactions():
        if r.isSetFast() and r.getFast():
            raise err("fast reactions are not supported", r.getId())
    if m.getNumEvents() and events == "refuse":
        ev = m.getEvent(0)
        raise err("SBML events are not supported by read_sbml (use read_sbml_triggered for "
                  "events with state triggers, or read_sbml_with_regimen to turn events "
                  "'time >= c: S = S + a' or 'S = S * f' into a dosing regimen)",
                  ev.getId() or ev.getMetaId() or "event[0]")
    if m.getNumConstraints():
        warnings.warn(f"{file}: {m.getNumConstraints()} SBML constraint(s) ignored (they do not "
                      f"change the dynamics)", stacklevel=3)

    taken = set()
    for coll in (m.getListOfCompartments(), m.getListOfSpecies(), m.getListOfParameters(),
                 m.getListOfReactions(), m.getListOfFunctionDefinitions()):
        for x in coll:
            taken.add(x.getId())
    for r in m.getListOfReactions():
        for refs in (r.getListOfReactants(), r.getListOfProducts(), r.getListOfModifiers()):
            for sr in refs:
                if sr.isSetId():
                    taken.add(sr.getId())
    renamed = {}
    for x in ("t", "time"):
        if x in taken:
            # immunoode reserves these names for time; SBML allows them as ids (the time
            # csymbol is a different node): rename the element and every reference to it
            new = _sanitize(f"{x}_", taken)
            el = m.getElementBySId(x)
            if el is None:
                raise err(f"the id {x!r} is reserved for time in immunoode", x)
            m.renameSIdRefs(x, new)
            for item in m.getListOfAllElements():
                item.renameSIdRefs(x, new)
            el.setId(new)
            renamed[x] = new
            taken.discard(x)
            warnings.warn(f"{file}: SBML id {x!r} renamed to {new!r} ({x!r} means time in "
                          f"immunoode)", stacklevel=3)
    conv = _MathConverter(ls, {f.getId(): f for f in m.getListOfFunctionDefinitions()}, file)
    units = _Units(ls, m, level)
    time_unit = units.model_default("time")

    rate_rules, assign_rules = {}, {}
    for i in range(m.getNumRules()):
        r = m.getRule(i)
        var = r.getVariable()
        if r.getMath() is None:  # L3v2: a rule without math has no effect
            continue
        if r.isRate():
            rate_rules[var] = conv.convert(r.getMath(), f"rateRule:{var}")
        elif r.isAssignment():
            assign_rules[var] = conv.convert(r.getMath(), f"assignmentRule:{var}")
    ias = {}
    for ia in m.getListOfInitialAssignments():
        if ia.getMath() is None:
            continue
        ias[ia.getSymbol()] = conv.convert(ia.getMath(), f"initialAssignment:{ia.getSymbol()}")

    event_targets = set()
    if events == "triggered":
        for ev in m.getListOfEvents():
            for ea in ev.getListOfEventAssignments():
                event_targets.add(ea.getVariable())

    # ---------------------------------------------------------- raw initial values
    raw_init: dict[str, sympy.Expr] = {}  # name -> expression giving its value at t0 (no IA)
    unit_of: dict[str, str | None] = {}
    kind_of: dict[str, str] = {}
    comp_dims = {}
    for c in m.getListOfCompartments():
        cid = c.getId()
        size = c.getSize() if c.isSetSize() else (c.getVolume() if level < 3 and c.isSetVolume()
                                                  else (None if cid in ias or cid in assign_rules
                                                        else 1.0))
        if size is not None:
            raw_init[cid] = sympy.Float(size)
        dims = c.getSpatialDimensionsAsDouble() if level >= 3 else c.getSpatialDimensions()
        comp_dims[cid] = dims
        u = units.resolve(c.getUnits()) if c.isSetUnits() else (
            units.model_default({3: "volume", 2: "area", 1: "length"}[int(dims)])
            if dims in (1, 2, 3) else ("1" if dims == 0 else None))
        unit_of[cid] = u
        kind_of[cid] = "compartment"
    varying = {cid for cid in comp_dims
               if cid in rate_rules or cid in assign_rules or cid in event_targets}

    species_info = {}
    for s in m.getListOfSpecies():
        sid = s.getId()
        comp = s.getCompartment()
        hosu = s.getHasOnlySubstanceUnits()
        if s.isSetConversionFactor() or (level >= 3 and m.isSetConversionFactor()):
            cf = s.getConversionFactor() if s.isSetConversionFactor() else m.getConversionFactor()
        else:
            cf = None
        V = _sym(comp)
        if s.isSetInitialAmount():
            raw_init[sid] = sympy.Float(s.getInitialAmount()) * (1 if hosu else 1 / V)
        elif s.isSetInitialConcentration():
            raw_init[sid] = sympy.Float(s.getInitialConcentration()) * (V if hosu else 1)
        subst = (units.resolve(s.getSubstanceUnits()) if s.isSetSubstanceUnits()
                 else units.model_default("substance"))
        amount_unit = subst
        if subst is not None and not hosu:
            cu = unit_of.get(comp)
            subst = None if cu is None else f"{_paren(subst)}/{_paren(cu)}"
        unit_of[sid] = subst
        kind_of[sid] = "species"
        # a concentration species in a compartment whose size changes is kept as its amount
        # (the conserved quantity); the species id becomes the assignment amount/size
        by_amount = (not hosu and comp in varying and sid not in assign_rules
                     and sid not in rate_rules)
        species_info[sid] = dict(comp=comp, hosu=hosu, boundary=s.getBoundaryCondition(),
                                 constant=s.getConstant(), cf=cf, amount_unit=amount_unit,
                                 amount=_sanitize(f"{sid}_amount", taken) if by_amount else None)

    for p in m.getListOfParameters():
        pid = p.getId()
        if p.isSetValue():
            raw_init[pid] = sympy.Float(p.getValue())
        unit_of[pid] = units.resolve(p.getUnits()) if p.isSetUnits() else None
        kind_of[pid] = "parameter"

    # ---------------------------------------------------------- reactions
    reaction_rates: dict[str, sympy.Expr] = {}
    local_params: dict[str, tuple[float, str | None, str]] = {}
    contributions: dict[str, list] = {}
    stoich_ids: dict[str, float] = {}  # species-reference id -> its stoichiometry attribute
    for r in m.getListOfReactions():
        rid = r.getId()
        kl = r.getKineticLaw()
        if kl is None or kl.getMath() is None:
            raise err("reaction has no kinetic law", rid)
        env = {}
        lps = list(kl.getListOfLocalParameters()) if level >= 3 else list(kl.getListOfParameters())
        for lp in lps:
            new = _sanitize(f"{rid}_{lp.getId()}", taken)
            if not lp.isSetValue():
                raise err(f"local parameter {lp.getId()!r} has no value", rid)
            local_params[new] = (lp.getValue(),
                                 units.resolve(lp.getUnits()) if lp.isSetUnits() else None, rid)
            env[lp.getId()] = _sym(new)
        reaction_rates[rid] = conv.convert(kl.getMath(), f"reaction:{rid}", env)
        for refs, sign in ((r.getListOfReactants(), -1), (r.getListOfProducts(), 1)):
            for sr in refs:
                sp = sr.getSpecies()
                st = sr.getStoichiometry() if (level < 3 or sr.isSetStoichiometry()) else 1.0
                if not math.isfinite(st):
                    st = 1.0
                st = sympy.Float(st) if st != int(st) else sympy.Integer(int(st))
                if level < 3 and sr.isSetStoichiometryMath() and \
                        sr.getStoichiometryMath().getMath() is not None:
                    st = conv.convert(sr.getStoichiometryMath().getMath(),
                                      f"reaction:{rid} (stoichiometryMath of {sp})")
                elif sr.isSetId() and sr.getId():
                    # the id names the stoichiometry in math; rules, initial assignments
                    # and events may change it like any variable
                    srid = sr.getId()
                    stoich_ids[srid] = float(st)
                    raw_init[srid] = st
                    unit_of[srid] = "1"
                    kind_of[srid] = "stoichiometry"
                    st = _sym(srid)
                info = species_info[sp]
                if info["boundary"]:
                    continue
                if info["constant"]:
                    raise err(f"species {sp!r} is constant but not a boundary species, yet a "
                              f"reaction changes it", rid)
                contributions.setdefault(sp, []).append((sign * st, rid))

    # ---------------------------------------------------------- classify variables
    for sid in contributions:
        if sid in rate_rules or sid in assign_rules:
            raise err("species is changed by both a rule and a reaction", sid)
    for name in event_targets:
        if name in assign_rules:
            raise err("an event assigns a variable that an assignment rule defines", name)
        if name not in kind_of:
            raise err("an event assigns an unknown variable", name)

    amount_of = {sid: info["amount"] for sid, info in species_info.items() if info["amount"]}
    state_names = []
    param_names = set()
    for name, kind in kind_of.items():
        if name in assign_rules or name in amount_of:
            continue
        dynamic = name in rate_rules or name in contributions
        if not dynamic:
            param_names.add(name)
    for k in local_params:
        param_names.add(k)
    for sid, amt in amount_of.items():
        if sid not in contributions:
            param_names.add(amt)

    # right-hand sides (SBML meaning: concentration states change by rate/size)
    odes: dict[str, sympy.Expr] = {}
    for name, kind in kind_of.items():
        if name in param_names or name in assign_rules or name in amount_of:
            continue
        state_names.append(name)
        if name in rate_rules:
            odes[name] = rate_rules[name]
            continue
        odes[name] = _species_rate(species_info[name], contributions.get(name, []), by_size=True)
    for sid, amt in amount_of.items():
        if sid in contributions:
            state_names.append(amt)
            odes[amt] = _species_rate(species_info[sid], contributions[sid], by_size=False)
    amount_assign = {sid: _sym(amt) / _sym(species_info[sid]["comp"])
                     for sid, amt in amount_of.items()}

    # rateOf(x): the right-hand side of x (states), its time derivative (assignments), 0 else
    defined = dict(reaction_rates)
    defined.update(assign_rules)
    defined.update(amount_assign)
    resolve = _RateOfResolver(odes, defined, file)
    reaction_rates = {k: resolve(e, f"reaction:{k}") for k, e in reaction_rates.items()}
    assign_rules = {k: resolve(e, f"assignmentRule:{k}") for k, e in assign_rules.items()}
    odes = {k: resolve(e, f"rateRule:{k}") for k, e in odes.items()}
    ias = {k: resolve(e, f"initialAssignment:{k}") for k, e in ias.items()}

    values: dict[str, float] = {}
    for k, v in local_params.items():
        values[k] = v[0]
    init_exprs = {}
    for name in kind_of:
        if name in assign_rules:
            init_exprs[name] = assign_rules[name]
        elif name in ias:
            init_exprs[name] = ias[name]
        elif name in raw_init:
            init_exprs[name] = raw_init[name]
        else:
            raise err(f"{kind_of[name]} has no initial value (no value, initial assignment or "
                      f"rule)", name)
    for rid, e in reaction_rates.items():
        init_exprs[rid] = e
    for sid, amt in amount_of.items():
        init_exprs[amt] = _sym(sid) * _sym(species_info[sid]["comp"])
    for name in ias:
        if name not in kind_of:
            raise err("initial assignment to a symbol that is not a compartment, species, "
                      "parameter or species reference is not supported", name)
    init_exprs = {k: e.xreplace({TIME: sympy.Integer(0)}) for k, e in init_exprs.items()}
    values = _topo_eval(init_exprs, values, file)

    # ---------------------------------------------------------- build
    mname = m.getId() or file.stem
    if not mname.isidentifier():
        mname = file.stem
    unknown_units = []

    def unit(name):
        u = unit_of.get(name)
        if u is None:
            unknown_units.append(name)
            return UNKNOWN_UNIT
        return u

    for sid, amt in amount_of.items():
        unit_of[amt] = species_info[sid]["amount_unit"]

    b = ModelBuilder(mname, time_unit=time_unit or UNKNOWN_UNIT,
                     description=(m.getName() or "") + f" (imported from SBML {file.name})")
    if time_unit is None:
        unknown_units.append("time")

    def initial_expr(name):
        e = ias.get(name, raw_init.get(name))
        if e is not None and e.free_symbols and all(s.name in param_names for s in e.free_symbols):
            return e
        return sympy.Float(values[name])

    # immunoode parameters are finite numbers; a constant inf/NaN becomes a fixed assignment
    nonfinite = {n for n in param_names if n in kind_of and not math.isfinite(values[n])
                 and n not in event_targets}
    param_names -= nonfinite
    for name in nonfinite:
        v = values[name]
        b.add_assignment(name, sympy.oo if v > 0 else -sympy.oo if v < 0 else sympy.nan,
                         description=f"SBML {kind_of[name]} (non-finite constant)")
    for name, kind in kind_of.items():
        if name in param_names:
            b.add_parameter(name, values[name], unit(name),
                            description=f"SBML {kind}", source=f"SBML {file.name}")
    for k, (v, u, rid) in local_params.items():
        unit_of[k] = u
        b.add_parameter(k, values[k], unit(k), description=f"local parameter of reaction {rid}",
                        source=f"SBML {file.name}")
    for sid, amt in amount_of.items():
        if amt in param_names:
            b.add_parameter(amt, values[amt], unit(amt), description=f"amount of SBML species "
                            f"{sid}", source=f"SBML {file.name}")
    for name in state_names:
        if name in kind_of:
            b.add_state(name, initial_expr(name), unit(name), description=f"SBML {kind_of[name]}")
        else:
            b.add_state(name, sympy.Float(values[name]), unit(name),
                        description="amount of SBML species (its compartment changes size)")
    if not state_names:
        # immunoode models integrate at least one state; SBML models may have none
        ph = _sanitize("sbml_no_state", taken)
        b.add_state(ph, 0.0, "1", description="placeholder: the SBML model has no ODE")
        odes[ph] = sympy.Integer(0)
        state_names.append(ph)
    for rid, e in reaction_rates.items():
        b.add_assignment(rid, e, description=f"rate of SBML reaction {rid}")
    for name, e in assign_rules.items():
        if name not in kind_of:
            raise err("assignment rule for an unknown variable", name)
        b.add_assignment(name, e, unit_of.get(name) if not unknown_units else None,
                         description=f"SBML {kind_of[name]} (assignment rule)")
    for sid, e in amount_assign.items():
        b.add_assignment(sid, e, unit_of.get(sid) if not unknown_units else None,
                         description="SBML species concentration (amount / compartment size)")
    for name in state_names:
        b.add_ode(name, odes[name])
    for name in rate_rules:
        if name not in kind_of:
            raise err("rate rule for an unknown variable", name)

    extra = None
    if events == "regimen":
        extra = _events_to_regimen(ls, m, conv, set(state_names), values, file)
    elif events == "triggered":
        extra = (_events_triggered(ls, m, conv, level, species_info, rate_rules, resolve, file),
                 renamed)

    if check_units is False or unknown_units:
        if unknown_units and check_units is not False:
            shown = ", ".join(unknown_units[:6]) + (" ..." if len(unknown_units) > 6 else "")
            warnings.warn(f"{file}: units unknown or not expressible for {shown}; the unit check "
                          f"was skipped (these are marked with unit {UNKNOWN_UNIT!r})", stacklevel=3)
        return b.build(check_units=False), extra
    try:
        return b.build(check_units=True), extra
    except UnitError as exc:
        if check_units:
            raise
        warnings.warn(f"{file}: the SBML units are not consistent ({exc}); the unit check was "
                      f"skipped", stacklevel=3)
        return b.build(check_units=False), extra


def _species_rate(info, contributions, *, by_size: bool):
    """Σ stoichiometry · rate (· conversion factor) (/ compartment size for concentrations)."""
    terms = []
    for st, rid in contributions:
        term = st * _sym(rid)
        if info["cf"]:
            term = term * _sym(info["cf"])
        if by_size and not info["hosu"]:
            term = term / _sym(info["comp"])
        terms.append(term)
    return sympy.Add(*terms) if terms else sympy.Integer(0)


class _RateOfResolver:
    """Replace ``rateOf(x)`` by dx/dt: the ODE of a state, the chain-rule time derivative
    of an assignment, 0 for anything constant between events."""

    def __init__(self, odes: dict, defined: dict, file):
        self.odes = odes
        self.defined = defined
        self.file = file

    def rate(self, name: str, element: str, stack: tuple) -> sympy.Expr:
        if name in stack:
            raise ModelError("rateOf is circular: " + " -> ".join(stack + (name,)),
                             file=self.file, section="sbml", item=element)
        if name in self.odes:
            return self.resolve(self.odes[name], element, stack + (name,))
        if name in self.defined:
            e = self.resolve(self.defined[name], element, stack + (name,))
            d = sympy.diff(e, TIME)
            for s in e.free_symbols:
                if s is TIME:
                    continue
                ds = sympy.diff(e, s)
                if ds != 0:
                    d = d + ds * self.rate(s.name, element, stack + (name,))
            return d
        return sympy.Integer(0)

    def resolve(self, e, element: str, stack: tuple = ()):
        if not isinstance(e, sympy.Basic) or not e.has(RateOf):
            return e
        return e.replace(lambda x: isinstance(x, RateOf),
                         lambda x: self.rate(x.args[0].name, element, stack))

    def __call__(self, e, element):
        return self.resolve(e, element)


def _events_triggered(ls, m, conv, level, species_info, rate_rules, resolve, file):
    """SBML events -> :class:`~immunoode.triggered.Event` tuple."""
    from .triggered import Event
    out = []
    for k, ev in enumerate(m.getListOfEvents()):
        eid = ev.getId() or ev.getMetaId() or f"event[{k}]"
        el = f"event:{eid}"
        trig = ev.getTrigger()
        if trig is None or trig.getMath() is None:
            continue  # L3v2: an event without trigger math never fires
        trigger = conv.cond(conv._conv(trig.getMath(), el, {}, 0))
        trigger = resolve(trigger, el)
        delay = None
        if ev.isSetDelay() and ev.getDelay().getMath() is not None:
            delay = resolve(conv.convert(ev.getDelay().getMath(), el), el)
        prio = None
        if ev.isSetPriority() and ev.getPriority().getMath() is not None:
            prio = resolve(conv.convert(ev.getPriority().getMath(), el), el)
        assigns = []
        for ea in ev.getListOfEventAssignments():
            var = ea.getVariable()
            if ea.getMath() is None:
                continue
            e = resolve(conv.convert(ea.getMath(), el), el)
            info = species_info.get(var)
            if info is not None and info["amount"]:
                assigns.append((info["amount"], e * _sym(info["comp"])))
            else:
                assigns.append((var, e))
        # a compartment resized by the event keeps the amounts of its concentration species;
        # those integrated as concentrations (rate rules) are rescaled by old size / new size
        # (a concentration assigned by the same event is taken at the old size, as the
        # SBML Test Suite expects)
        sizes = {v: e for v, e in assigns if v in {i["comp"] for i in species_info.values()}}
        rescaled = {}
        for sid, info in species_info.items():
            if info["comp"] in sizes and not info["hosu"] and not info["amount"] \
                    and sid in rate_rules:
                rescaled[sid] = _sym(info["comp"]) / sizes[info["comp"]]
        assigns = [(v, e * rescaled.pop(v) if v in rescaled else e) for v, e in assigns]
        assigns += [(sid, _sym(sid) * f) for sid, f in rescaled.items()]
        out.append(Event(
            eid, trigger, tuple(assigns), delay, prio,
            persistent=bool(trig.getPersistent()) if level >= 3 else True,
            initial_value=bool(trig.getInitialValue()) if level >= 3 else True,
            use_values_from_trigger_time=bool(ev.getUseValuesFromTriggerTime())))
    return tuple(out)


def _events_to_regimen(ls, m, conv, states: set, values, file):
    from .regimen import Dose, Regimen, Scale
    if not m.getNumEvents():
        return None
    items = []
    for k, ev in enumerate(m.getListOfEvents()):
        eid = ev.getId() or ev.getMetaId() or f"event[{k}]"

        def refuse(why):
            return ModelError(f"event not supported: {why} (only 'time >= c' triggers with "
                              f"'S = S + a' or 'S = S * f' assignments become regimen items)",
                              file=file, section="sbml", item=eid)
        if ev.isSetDelay():
            raise refuse("it has a delay")
        trig = ev.getTrigger()
        if trig is None or trig.getMath() is None:
            raise refuse("it has no trigger")
        tm = trig.getMath()
        if tm.getType() not in (ls.AST_RELATIONAL_GEQ, ls.AST_RELATIONAL_GT) or \
                tm.getNumChildren() != 2 or tm.getChild(0).getType() != ls.AST_NAME_TIME:
            raise refuse("the trigger is not 'time >= c'")
        c = conv.convert(tm.getChild(1), f"event:{eid}")
        if c.free_symbols:
            c = c.xreplace({s: sympy.Float(values[s.name]) for s in c.free_symbols
                            if s.name in values})
        if c.free_symbols or not c.is_number:
            raise refuse("the trigger time is not a constant")
        tc = float(c)
        init_true = trig.getInitialValue() if trig.isSetInitialValue() else True
        if tc < 0 or (tc == 0 and tm.getType() == ls.AST_RELATIONAL_GEQ):
            if init_true:
                continue  # true at the start and never becomes true again: never fires
            tc = 0.0
        prio = 0.0
        if ev.isSetPriority() and ev.getPriority().getMath() is not None:
            pe = conv.convert(ev.getPriority().getMath(), f"event:{eid}")
            if pe.free_symbols:
                raise refuse("its priority is not a constant")
            prio = float(pe)
        for ea in ev.getListOfEventAssignments():
            var = ea.getVariable()
            e = conv.convert(ea.getMath(), f"event:{eid}")
            S = _sym(var)
            if var not in states:
                raise refuse(f"it assigns {var!r}, which is not a state")
            rest_add = sympy.expand(e - S)
            if not rest_add.free_symbols and rest_add.is_number:
                items.append((tc, -prio, k, Dose(var, float(rest_add), start=tc, label=eid)))
                continue
            fac = sympy.simplify(e / S)
            if not fac.free_symbols and fac.is_number and float(fac) > 0:
                items.append((tc, -prio, k, Scale(var, factor=float(fac), start=tc, label=eid)))
                continue
            raise refuse(f"the assignment to {var!r} is not 'S + a' or 'S * f'")
    items.sort(key=lambda x: (x[0], x[1], x[2]))
    return Regimen(tuple(i[3] for i in items), name=f"events of {file.name}")


# =========================================================================== export
def _unit_definition(ls, model, ud_id: str, text: str):
    """Add a UnitDefinition for a pint unit string; return its id, or None if inexpressible."""
    from .units import parse_unit
    try:
        q = parse_unit(text)
    except UnitError:
        return None
    root = q.to_root_units()
    mag = float(root.magnitude)
    dims = {"[length]": ("metre", "meter"), "[mass]": ("gram", "gram"),
            "[time]": ("second", "second"), "[substance]": ("mole", "mole"),
            "[current]": ("ampere", "ampere"), "[temperature]": ("kelvin", "kelvin"),
            "[luminosity]": ("candela", "candela"), "[cell_count]": ("item", "cell")}
    comps = []
    for unit_name, exp in root._units.items():
        dimq = (1 * root._REGISTRY.Unit(unit_name)).dimensionality
        if len(dimq) != 1:
            return None
        (dname, dexp), = dimq.items()
        if dname not in dims:
            return None
        kind, pname = dims[dname]
        # size of pint's root unit in the SBML kind (1 for all pint root units used today)
        scale = float((1 * root._REGISTRY.Unit(unit_name)).to(pname).magnitude)
        comps.append((kind, float(exp), scale))
    ud = model.createUnitDefinition()
    ud.setId(ud_id)
    ud.setName(text)
    if not comps:
        u = ud.createUnit()
        u.setKind(ls.UnitKind_forName("dimensionless"))
        u.setExponent(1.0)
        u.setScale(0)
        u.setMultiplier(mag)
        return ud_id
    for i, (kind, exp, scale) in enumerate(comps):
        u = ud.createUnit()
        u.setKind(ls.UnitKind_forName(kind))
        u.setExponent(exp)
        u.setScale(0)
        mult = scale ** 1.0
        if i == 0:
            # overall magnitude M: (m*kind)^e contributes m^e, so m = M^(1/e)
            mult = scale * mag ** (1.0 / exp)
        u.setMultiplier(mult)
    return ud_id


class _ToAST:
    """sympy -> libsbml ASTNode, node by node."""

    def __init__(self, ls):
        self.ls = ls

    def node(self, ty, *children, name=None):
        n = self.ls.ASTNode(ty)
        if name is not None:
            n.setName(name)
        for ch in children:
            n.addChild(ch)
        return n

    def conv(self, e):
        ls = self.ls
        if isinstance(e, Hill):
            e = expand_hill(e)
        if e is TIME or (isinstance(e, sympy.Symbol) and e.name == "t"):
            return self.node(ls.AST_NAME_TIME, name="time")
        if isinstance(e, sympy.Symbol):
            return self.node(ls.AST_NAME, name=e.name)
        if e is sympy.true or e is sympy.false:
            return self.node(ls.AST_CONSTANT_TRUE if e is sympy.true else ls.AST_CONSTANT_FALSE)
        if e is sympy.pi:
            return self.node(ls.AST_CONSTANT_PI)
        if e is sympy.E:
            return self.node(ls.AST_CONSTANT_E)
        if isinstance(e, sympy.Integer):
            n = ls.ASTNode(ls.AST_INTEGER)
            n.setValue(int(e))
            return n
        if isinstance(e, sympy.Rational):
            n = ls.ASTNode(ls.AST_RATIONAL)
            n.setValue(int(e.p), int(e.q))
            return n
        if isinstance(e, sympy.Float) or (e.is_number and e.is_real and not e.free_symbols
                                          and not e.args):
            n = ls.ASTNode(ls.AST_REAL)
            n.setValue(float(e))
            return n
        if isinstance(e, sympy.Add):
            return self.node(ls.AST_PLUS, *[self.conv(a) for a in e.args])
        if isinstance(e, sympy.Mul):
            num, den = [], []
            for a in e.args:
                if a.is_Pow and a.exp.is_Number and a.exp < 0:
                    den.append(sympy.Pow(a.base, -a.exp))
                elif a.is_Rational and a.q != 1:
                    if a.p != 1:
                        num.append(sympy.Integer(a.p))
                    den.append(sympy.Integer(a.q))
                else:
                    num.append(a)
            if num and num[0] == -1:
                num = num[1:]
                inner = self._times_div(num, den)
                return self.node(ls.AST_MINUS, inner)
            return self._times_div(num, den)
        if isinstance(e, sympy.Pow):
            if e.exp == sympy.Rational(1, 2):
                return self.node(ls.AST_FUNCTION_ROOT, self.conv(sympy.Integer(2)), self.conv(e.base))
            if e.exp.is_Number and e.exp < 0:
                return self.node(ls.AST_DIVIDE, self.conv(sympy.Integer(1)),
                                 self.conv(sympy.Pow(e.base, -e.exp)))
            if e.base is sympy.E:
                return self.node(ls.AST_FUNCTION_EXP, self.conv(e.exp))
            return self.node(ls.AST_POWER, self.conv(e.base), self.conv(e.exp))
        if isinstance(e, (_Floor, _Ceiling)):
            ty = ls.AST_FUNCTION_FLOOR if isinstance(e, _Floor) else ls.AST_FUNCTION_CEILING
            return self.node(ty, self.conv(e.args[0]))
        if isinstance(e, _FactorialGamma):
            return self.node(ls.AST_FUNCTION_FACTORIAL, self.conv(e.args[0] - 1))
        funcs = _one_to_one_functions(ls)
        if e.func in funcs:
            if e.func is sympy.log and len(e.args) == 2:
                return self.node(ls.AST_FUNCTION_LOG, self.conv(e.args[1]), self.conv(e.args[0]))
            return self.node(funcs[e.func], *[self.conv(a) for a in e.args])
        if isinstance(e, (sympy.Min, sympy.Max)):
            ty = ls.AST_FUNCTION_MIN if isinstance(e, sympy.Min) else ls.AST_FUNCTION_MAX
            return self.node(ty, *[self.conv(a) for a in e.args])
        if isinstance(e, sympy.Heaviside):
            h0 = e.args[1] if len(e.args) > 1 else sympy.Rational(1, 2)
            x = e.args[0]
            return self.conv(sympy.Piecewise((1, x > 0), (h0, sympy.Eq(x, 0)), (0, True)))
        if isinstance(e, sympy.sign):
            x = e.args[0]
            return self.conv(sympy.Piecewise((1, x > 0), (-1, x < 0), (0, True)))
        if isinstance(e, sympy.Piecewise):
            kids = []
            for val, cnd in e.args:
                if cnd is sympy.true:
                    kids.append(self.conv(val))
                    break
                kids.append(self.conv(val))
                kids.append(self.conv(cnd))
            return self.node(ls.AST_FUNCTION_PIECEWISE, *kids)
        rel = {sympy.Eq: ls.AST_RELATIONAL_EQ, sympy.Ne: ls.AST_RELATIONAL_NEQ,
               sympy.Lt: ls.AST_RELATIONAL_LT, sympy.Le: ls.AST_RELATIONAL_LEQ,
               sympy.Gt: ls.AST_RELATIONAL_GT, sympy.Ge: ls.AST_RELATIONAL_GEQ}
        if type(e) in rel:
            return self.node(rel[type(e)], self.conv(e.lhs), self.conv(e.rhs))
        logic = {sympy.And: ls.AST_LOGICAL_AND, sympy.Or: ls.AST_LOGICAL_OR,
                 sympy.Not: ls.AST_LOGICAL_NOT, sympy.Xor: ls.AST_LOGICAL_XOR}
        if type(e) in logic:
            return self.node(logic[type(e)], *[self.conv(a) for a in e.args])
        if e.is_number and not e.free_symbols:
            n = ls.ASTNode(ls.AST_REAL)
            n.setValue(float(e))
            return n
        raise ModelError(f"cannot express {sympy.sstr(e)!r} in SBML MathML")

    def _times_div(self, num, den):
        ls = self.ls
        if not num:
            top = self.conv(sympy.Integer(1))
        elif len(num) == 1:
            top = self.conv(num[0])
        else:
            top = self.node(ls.AST_TIMES, *[self.conv(a) for a in num])
        if not den:
            return top
        bottom = self.conv(den[0]) if len(den) == 1 else self.node(
            ls.AST_TIMES, *[self.conv(a) for a in den])
        return self.node(ls.AST_DIVIDE, top, bottom)


def to_sbml(model: Model, path=None, regimen=None, *, t_end: float | None = None) -> str:
    """Write ``model`` as SBML Level 3 Version 2; return the XML text.

    Every state becomes a non-constant ``<parameter>`` with a ``<rateRule>``
    (fluxes folded into the rate); parameters become constant parameters;
    assignments and observables become parameters with ``<assignmentRule>``;
    initial values that are expressions become ``<initialAssignment>``.  Units
    are written as unit definitions wherever pint can express them in SI base
    units.  A ``regimen`` is written as one event per dose/scale time
    (``time >= t_i``; bolus ``S = S + a``, scale ``S = S * f``; infusions switch
    an input-rate parameter ``S_infusion_rate`` on and off), with priorities
    keeping the regimen's order.  The document must pass libsbml's consistency
    checks with no error, else :class:`ModelError`.
    """
    ls = _libsbml()
    doc = ls.SBMLDocument(3, 2)
    m = doc.createModel()
    m.setId(model.name if model.name.isidentifier() else "model")
    if model.description:
        m.setName(model.description[:200])
    ast = _ToAST(ls)
    unit_ids: dict[str, str | None] = {}
    used_ids = set(model.states) | set(model.parameters) | set(model.assignments) | \
        set(model.observables)

    def unit_ref(text):
        if text is None:
            return None
        if text in unit_ids:
            return unit_ids[text]
        base = "u_" + "".join(ch if ch.isalnum() else "_" for ch in text)
        uid = base
        k = 1
        while uid in used_ids or uid in unit_ids.values():
            k += 1
            uid = f"{base}_{k}"
        got = _unit_definition(ls, m, uid, text)
        unit_ids[text] = got
        if got is None:
            warnings.warn(f"unit {text!r} cannot be expressed in SBML; left unset", stacklevel=3)
        return got

    tu = unit_ref(model.time_unit)
    if tu:
        m.setTimeUnits(tu)

    def add_param(name, value, unit, constant, desc=""):
        p = m.createParameter()
        p.setId(name)
        p.setConstant(constant)
        if value is not None:
            p.setValue(float(value))
        u = unit_ref(unit)
        if u:
            p.setUnits(u)
        if desc:
            p.setName(desc[:200])
        return p

    def math_of(expr):
        return ast.conv(expand_hill(expr))

    for p in model.parameters.values():
        add_param(p.name, p.value, p.unit, True, p.description)
    pvals = model.parameter_values
    for s in model.states.values():
        init = s.initial
        if init.free_symbols:
            add_param(s.name, None, s.unit, False, s.description)
            ia = m.createInitialAssignment()
            ia.setSymbol(s.name)
            ia.setMath(math_of(init))
        else:
            add_param(s.name, float(init), s.unit, False, s.description)
    for name in model.assignment_order:
        a = model.assignments[name]
        add_param(name, None, a.unit, False, a.description)
        r = m.createAssignmentRule()
        r.setVariable(name)
        r.setMath(math_of(a.expr))
    for o in model.observables.values():
        add_param(o.name, None, o.unit, False, o.description)
        r = m.createAssignmentRule()
        r.setVariable(o.name)
        r.setMath(math_of(o.expr))

    rhs = model.rhs()
    infusion_params = {}
    table = None
    if regimen is not None and len(regimen):
        table = regimen.events(state_units={s.name: s.unit for s in model.states.values()},
                               parameters=pvals, t_end=t_end)
        for (_, kind, target, _, _) in table.rows():
            if kind == 1 and target not in infusion_params:
                pname = f"{target}_infusion_rate"
                while pname in used_ids:
                    pname += "_"
                used_ids.add(pname)
                infusion_params[target] = pname
                st = model.states[target]
                add_param(pname, 0.0, f"({st.unit})/({model.time_unit})", False,
                          f"infusion input rate into {target}")
    for name, e in rhs.items():
        if name in infusion_params:
            e = e + _sym(infusion_params[name])
        r = m.createRateRule()
        r.setVariable(name)
        r.setMath(math_of(e))

    if table is not None:
        rows = table.rows()
        n = len(rows)
        for i, (tt, kind, target, value, label) in enumerate(rows):
            ev = m.createEvent()
            ev.setId(f"dose_{i + 1}" if kind != 2 else f"scale_{i + 1}")
            while ev.getId() in used_ids:
                ev.setId(ev.getId() + "_")
            if label:
                ev.setName(str(label))
            ev.setUseValuesFromTriggerTime(True)
            trig = ev.createTrigger()
            trig.setInitialValue(False)
            trig.setPersistent(True)
            trig.setMath(ast.node(ls.AST_RELATIONAL_GEQ, ast.node(ls.AST_NAME_TIME, name="time"),
                                  ast.conv(sympy.Float(tt))))
            pr = ev.createPriority()
            pr.setMath(ast.conv(sympy.Integer(n - i)))
            ea = ev.createEventAssignment()
            if kind == 0:
                ea.setVariable(target)
                ea.setMath(math_of(_sym(target) + sympy.Float(value)))
            elif kind == 1:
                pn = infusion_params[target]
                ea.setVariable(pn)
                ea.setMath(math_of(_sym(pn) + sympy.Float(value)))
            else:
                ea.setVariable(target)
                ea.setMath(math_of(_sym(target) * sympy.Float(value)))

    doc.setConsistencyChecks(ls.LIBSBML_CAT_UNITS_CONSISTENCY, False)
    doc.checkConsistency()
    errs = [doc.getError(i) for i in range(doc.getNumErrors())]
    bad = [e for e in errs if e.getSeverity() >= ls.LIBSBML_SEV_ERROR]
    if bad:
        raise ModelError("SBML export failed libsbml's consistency check: "
                         + "; ".join(e.getMessage().strip() for e in bad[:3]))
    text = ls.writeSBMLToString(doc)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


# =========================================================================== CLI helpers
def load_any_model(path, *, check_units: bool | None = None) -> Model:
    """Load a model file by suffix: ``.xml``/``.sbml`` -> :func:`read_sbml`, else TOML."""
    p = Path(path)
    if p.suffix.lower() in (".xml", ".sbml"):
        return read_sbml(p, check_units=check_units)
    from .modelfile import load_model
    return load_model(p) if check_units is None else load_model(p, check_units=check_units)


def _toml_value(v) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ModelError(f"value {v!r} cannot be written to TOML")
        return repr(v)
    return str(v)


def _expr_text(e) -> str:
    """sympy -> immunoode expression text (parsed back by immunoode.expr)."""
    from sympy.printing.str import StrPrinter

    class P(StrPrinter):
        def _print_Piecewise(self, expr):
            parts = []
            for val, cnd in expr.args:
                if cnd is sympy.true:
                    parts.append(self._print(val))
                    return "piecewise(" + ", ".join(parts) + ")"
                parts += [self._print(val), self._print(cnd)]
            return "piecewise(" + ", ".join(parts + ["nan_undefined"]) + ")"

        def _print_And(self, expr):
            return "(" + " and ".join(self._print(a) for a in expr.args) + ")"

        def _print_Or(self, expr):
            return "(" + " or ".join(self._print(a) for a in expr.args) + ")"

        def _print_Not(self, expr):
            return "(not " + self._print(expr.args[0]) + ")"

        def _print_Relational(self, expr):
            return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

        def _print_Abs(self, expr):
            return f"abs({self._print(expr.args[0])})"

        def _print_Exp1(self, expr):
            return "exp(1)"

        def _print_Pi(self, expr):
            return repr(math.pi)

        def _print_Float(self, expr):
            return repr(float(expr))

        def _print_Heaviside(self, expr):
            return f"heaviside({self._print(expr.args[0])})"

        def _print_Min(self, expr):
            return "min(" + ", ".join(self._print(a) for a in expr.args) + ")"

        def _print_Max(self, expr):
            return "max(" + ", ".join(self._print(a) for a in expr.args) + ")"

        def _print_Function(self, expr):
            name = type(expr).__name__
            allowed = {"exp", "log", "sin", "cos", "tan", "tanh"}
            if name == "Hill":
                return "hill(" + ", ".join(self._print(a) for a in expr.args) + ")"
            if name not in allowed:
                raise ModelError(f"function {name!r} cannot be written to a TOML model file")
            return name + "(" + ", ".join(self._print(a) for a in expr.args) + ")"

    text = P().doprint(e)
    if "nan_undefined" in text or "zoo" in text or " nan" in text:
        raise ModelError(f"expression {e} cannot be written to a TOML model file")
    return text


def to_toml(model: Model) -> str:
    """TOML model-file text for ``model`` (used by ``immunoode import-sbml``)."""
    from .expr import parse_expression
    lines = ["[model]", f"name = {_toml_value(model.name)}",
             f"time_unit = {_toml_value(model.time_unit)}"]
    if model.description:
        lines.append(f"description = {_toml_value(model.description)}")

    def ex(e):
        text = _expr_text(e)
        if sympy.simplify(expand_hill(parse_expression(text)) - expand_hill(e)) != 0:
            # the round trip through text must be exact
            raise ModelError(f"expression {e} cannot be written to TOML faithfully")
        return _toml_value(text)

    for s in model.states.values():
        lines += ["", f"[states.{s.name}]",
                  f"initial = {_toml_value(float(s.initial)) if not s.initial.free_symbols else ex(s.initial)}",
                  f"unit = {_toml_value(s.unit)}"]
        if s.description:
            lines.append(f"description = {_toml_value(s.description)}")
    lines += ["", "[parameters]"]
    for p in model.parameters.values():
        extra = f", description = {_toml_value(p.description)}" if p.description else ""
        extra += f", source = {_toml_value(p.source)}" if p.source else ""
        lines.append(f"{p.name} = {{ value = {_toml_value(float(p.value))}, unit = "
                     f"{_toml_value(p.unit)}{extra} }}")
    if model.assignments:
        lines += ["", "[assignments]"]
        for name in model.assignment_order:
            a = model.assignments[name]
            unit = f", unit = {_toml_value(a.unit)}" if a.unit else ""
            lines.append(f"{name} = {{ expr = {ex(a.expr)}{unit} }}")
    lines += ["", "[odes]"]
    for k, e in model.rhs().items():
        lines.append(f"{k} = {ex(e)}")
    if model.observables:
        lines += ["", "[observables]"]
        for o in model.observables.values():
            unit = f", unit = {_toml_value(o.unit)}" if o.unit else ""
            lines.append(f"{o.name} = {{ expr = {ex(o.expr)}{unit} }}")
    return "\n".join(lines) + "\n"


def cmd_import_sbml(args) -> int:
    """``immunoode import-sbml MODEL.xml OUT.toml``."""
    model = read_sbml(args.model)
    out = Path(args.out)
    text = to_toml(model)
    from .modelfile import loads_model
    loads_model(text, check_units=False)  # what we write must load back
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(model.states)} states, {len(model.parameters)} parameters)")
    return 0


def cmd_export_sbml(args) -> int:
    """``immunoode export-sbml MODEL.toml OUT.xml [--regimen R] [--t-end T]``."""
    model = load_any_model(args.model)
    regimen = None
    if getattr(args, "regimen", None):
        from .cli import resolve_regimen_path
        from .regimen import load_regimen
        regimen = load_regimen(resolve_regimen_path(args.regimen))
    to_sbml(model, args.out, regimen=regimen, t_end=getattr(args, "t_end", None))
    print(f"wrote {args.out}")
    return 0


def add_sbml_commands(sub) -> None:
    """Register ``import-sbml`` and ``export-sbml`` on an argparse subparsers object."""
    i = sub.add_parser("import-sbml", help="convert an SBML model to an immunoode TOML model file")
    i.add_argument("model", help="SBML file (.xml)")
    i.add_argument("out", help="TOML file to write")
    i.set_defaults(func=cmd_import_sbml)
    e = sub.add_parser("export-sbml", help="write a model (TOML or SBML) as SBML Level 3 Version 2")
    e.add_argument("model", help="model file")
    e.add_argument("out", help="SBML file to write (.xml)")
    e.add_argument("--regimen", help="regimen file (TOML) to write as SBML events")
    e.add_argument("--t-end", type=float, default=None,
                   help="end time bounding open-ended regimen repeats")
    e.set_defaults(func=cmd_export_sbml)


# =========================================================================== events
def read_sbml_triggered(path, *, check_units: bool | None = None):
    """Read an SBML file with any events into a :class:`~immunoode.triggered.TriggeredModel`.

    Events keep their SBML meaning (trigger, delay, priority, persistent,
    initialValue, useValuesFromTriggerTime) and are simulated by
    :func:`immunoode.triggered.simulate_triggered` with root finding.  A file
    without events gives a TriggeredModel with no events.
    """
    from .triggered import TriggeredModel
    model, (events, renamed) = _read(path, events="triggered", check_units=check_units)
    return TriggeredModel(model, events, source=str(path), renamed=tuple(renamed.items()))
