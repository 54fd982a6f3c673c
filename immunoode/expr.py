"""Safe parser for model expressions (right-hand sides, observables, conditions).

The text is tokenized and parsed by hand (precedence climbing) and sympy objects
are built directly from the tokens. Nothing ever reaches ``eval``, ``exec``,
``compile``, ``sympify`` or ``parse_expr``.

Grammar (loosest binding first)::

    expr       := or_expr
    or_expr    := and_expr (("or" | "||") and_expr)*
    and_expr   := not_expr (("and" | "&&") not_expr)*
    not_expr   := ("not" | "!") not_expr | comparison
    comparison := sum [("<" | "<=" | ">" | ">=" | "==" | "!=") sum]   # not chained
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/") unary)*
    unary      := ("-" | "+") unary | power
    power      := primary [("**" | "^") unary]                       # right-assoc.
    primary    := NUMBER | NAME | NAME "(" args ")" | "(" expr ")"

So ``-x**2 == -(x**2)``, ``2^3^2 == 2^9`` and ``2**-x == 2**(-x)``.

* Numbers: ``3``, ``2.5``, ``.5``, ``1e-3``. Integers become ``sympy.Integer``,
  anything with a point or exponent becomes a 15-digit ``sympy.Float``.
* Names ``[A-Za-z_][A-Za-z0-9_]*`` always become ``Symbol(name, real=True)``;
  ``t`` is :data:`TIME`. There are **no built-in constants**: ``pi``, ``e``,
  ``E``, ``I``, ``N``, ``S``, ``beta``, ``gamma`` ... are ordinary symbols.
  Python keywords (``lambda``, ``if``, ``None`` ...) and names starting with
  ``__`` are rejected.
* Comparisons and ``and``/``or``/``not`` produce sympy booleans and are only
  allowed as conditions of ``piecewise``/``ifelse``.
* Functions (arity checked): see :data:`FUNCTIONS`. ``hill(x, k, n)`` becomes
  the custom :class:`Hill` function (so unit analysis can treat it specially);
  call :func:`expand_hill` to replace it by ``x**n/(k**n + x**n)`` before
  ``lambdify``/code generation (the numeric code printers also expand it on
  their own, but expanding first is the documented contract).
"""

from __future__ import annotations

import difflib
import keyword
import math
import re
from dataclasses import dataclass

import sympy
from sympy.logic.boolalg import Boolean

from .errors import ExpressionError

__all__ = [
    "TIME",
    "FUNCTIONS",
    "MAX_LENGTH",
    "MAX_DEPTH",
    "Hill",
    "expand_hill",
    "parse_expression",
]

#: The time symbol (name ``"t"``).
TIME = sympy.Symbol("t", real=True)

#: Maximum length of an expression text, in characters.
MAX_LENGTH = 10_000
#: Maximum nesting depth (parentheses, unary operators, power chains, calls).
MAX_DEPTH = 200
#: Largest magnitude a numeric constant may have (IEEE double range).
_MAX_MAGNITUDE = sympy.Float("1e308")
#: Limit on |exponent| * (decimal digits of the numeric base) for constant powers.
_MAX_POWER_DIGITS = 700


# --------------------------------------------------------------------------- Hill
class Hill(sympy.Function):
    """Hill function ``Hill(x, k, n) = x**n / (k**n + x**n)`` (dimensionless).

    Kept unexpanded so that unit inference can require ``x`` and ``k`` to share a
    unit while ``n`` is symbolic. Supports ``sympy.diff`` (explicit formula),
    ``evalf``, ``rewrite(sympy.Pow)`` and the numeric code printers; use
    :func:`expand_hill` to obtain the explicit formula.
    """

    nargs = 3

    @staticmethod
    def formula(x, k, n):
        """Explicit expression ``x**n / (k**n + x**n)``."""
        return x**n / (k**n + x**n)

    @classmethod
    def eval(cls, x, k, n):
        if x.is_Number and k.is_Number and n.is_Number:
            return cls.formula(x, k, n)
        return None

    def fdiff(self, argindex=1):
        if not 1 <= argindex <= 3:
            raise sympy.ArgumentIndexError(self, argindex)
        # closed forms that stay finite at x = 0 (the derivative of the expanded
        # formula is n*x**n/x*..., i.e. 0/0 there)
        x, k, n = self.args
        den = (k ** n + x ** n) ** 2
        if argindex == 1:
            return n * x ** (n - 1) * k ** n / den
        if argindex == 2:
            return -n * k ** (n - 1) * x ** n / den
        return x ** n * k ** n * (sympy.log(x) - sympy.log(k)) / den

    def _eval_rewrite_as_Pow(self, x, k, n, **kwargs):
        return self.formula(x, k, n)

    def _eval_evalf(self, prec):
        return self.formula(*self.args)._eval_evalf(prec)

    def _eval_is_real(self):
        return None

    def _print_expanded(self, printer, *args, **kwargs):
        return printer._print(self.formula(*self.args))

    # numeric / code printers: print the explicit formula
    _numpycode = _pythoncode = _lambdacode = _scipycode = _mpmathcode = _print_expanded
    _cupycode = _jaxcode = _ccode = _cxxcode = _fcode = _octave = _julia = _print_expanded
    _jscode = _rust_code = _glsl = _print_expanded


def expand_hill(expr):
    """Replace every :class:`Hill` in ``expr`` by ``x**n/(k**n + x**n)``.

    Call this before ``sympy.lambdify`` or any code generation.
    """
    if not isinstance(expr, sympy.Basic) or not expr.has(Hill):
        return expr
    return expr.replace(lambda e: isinstance(e, Hill), lambda e: Hill.formula(*e.args))


# ---------------------------------------------------------------------- tokenizer
@dataclass(frozen=True)
class _Tok:
    kind: str  # "num", "name", "op", "end"
    text: str
    pos: int


_NUMBER_RE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = ("**", "<=", ">=", "==", "!=", "&&", "||", "+", "-", "*", "/", "^", "<", ">",
        "!", "(", ")", ",")
_WORD_OPS = {"and", "or", "not"}
_HINTS = {
    "=": "use '==' for comparison",
    "&": "use 'and' or '&&'",
    "|": "use 'or' or '||'",
    "'": "string literals are not supported",
    '"': "string literals are not supported",
    "[": "indexing is not supported",
    "]": "indexing is not supported",
    "{": "braces are not supported",
    "}": "braces are not supported",
    ";": "only a single expression is allowed",
    ".": "attribute access is not supported",
    "%": "the modulo operator is not supported",
    "#": "comments are not supported",
}


def _quote(text: str, pos: int | None = None, width: int = 80) -> str:
    if len(text) <= width:
        return '"' + text + '"'
    if pos is None:
        pos = 0
    start = max(0, min(pos - width // 2, len(text) - width))
    piece = text[start:start + width]
    return '"' + ("..." if start > 0 else "") + piece + ("..." if start + width < len(text) else "") + '"'


def _error(text: str, msg: str, pos: int | None = None) -> ExpressionError:
    where = f" at column {pos + 1}" if pos is not None else ""
    return ExpressionError(f"{msg}{where} in {_quote(text, pos)}")


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
            continue
        if c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            m = _NUMBER_RE.match(text, i)
            end = m.end()
            if end < n and (text[end].isalnum() or text[end] in "_."):
                j = end
                while j < n and (text[j].isalnum() or text[j] in "_."):
                    j += 1
                raise _error(text, f"malformed number {text[i:j]!r}", i)
            toks.append(_Tok("num", m.group(), i))
            i = end
            continue
        if c.isascii() and (c.isalpha() or c == "_"):
            m = _NAME_RE.match(text, i)
            word = m.group()
            if word in _WORD_OPS:
                toks.append(_Tok("op", word, i))
            else:
                if keyword.iskeyword(word):
                    raise _error(text, f"{word!r} is a reserved word and cannot be used as a name "
                                       f"(rename it, e.g. {word + '_'!r})", i)
                if word.startswith("__"):
                    raise _error(text, f"names starting with '__' are not allowed ({word!r})", i)
                toks.append(_Tok("name", word, i))
            i = m.end()
            continue
        for op in _OPS:
            if text.startswith(op, i):
                toks.append(_Tok("op", op, i))
                i += len(op)
                break
        else:
            hint = _HINTS.get(c)
            msg = f"unsupported character {c!r}" + (f" ({hint})" if hint else "")
            raise _error(text, msg, i)
    toks.append(_Tok("end", "", n))
    return toks


# ------------------------------------------------------------------------ helpers
def _is_bool(x) -> bool:
    # sympy Symbols are Booleans too; a *condition* is a Boolean that is not an Expr
    return isinstance(x, Boolean) and not isinstance(x, sympy.Expr)


def _coeff_digits(base) -> float:
    """Rough count of decimal digits in the numeric factors of ``base``."""
    total = 0.0
    for f in sympy.Mul.make_args(base):
        if f.is_Rational:
            total += math.log10(abs(int(f.p)) or 1) + math.log10(int(f.q))
        elif f.is_Float:
            if f != 0:
                total += abs(float(sympy.log(abs(f), 10)))
        elif f.is_Pow and f.base.is_Rational and f.exp.is_Rational:
            total += abs(float(f.exp)) * _coeff_digits(f.base)
    return total


def _check_magnitude(value, text, pos):
    """Reject numeric constants (or numeric coefficients) outside double range."""
    c = value if value.is_Number else (value.args[0] if value.is_Mul and value.args[0].is_Number else None)
    if c is not None and c.is_finite and abs(c) > _MAX_MAGNITUDE:
        raise _error(text, "numeric constant out of floating-point range", pos)
    return value


def _unique_sorted(names):
    return ", ".join(sorted(names))


# Function table: name -> (min_args, max_args or None, builder, condition slots)
def _piecewise(args):
    pairs = [(args[i], args[i + 1]) for i in range(0, len(args) - 1, 2)]
    pairs.append((args[-1], sympy.true))
    return sympy.Piecewise(*pairs)


def _log(args):
    return sympy.log(*args)


_FUNCS = {
    "exp": (1, 1, lambda a: sympy.exp(a[0])),
    "log": (1, 2, _log),
    "ln": (1, 1, lambda a: sympy.log(a[0])),
    "log10": (1, 1, lambda a: sympy.log(a[0], 10)),
    "sqrt": (1, 1, lambda a: sympy.sqrt(a[0])),
    "abs": (1, 1, lambda a: sympy.Abs(a[0])),
    "min": (2, None, lambda a: sympy.Min(*a)),
    "max": (2, None, lambda a: sympy.Max(*a)),
    "sin": (1, 1, lambda a: sympy.sin(a[0])),
    "cos": (1, 1, lambda a: sympy.cos(a[0])),
    "tan": (1, 1, lambda a: sympy.tan(a[0])),
    "tanh": (1, 1, lambda a: sympy.tanh(a[0])),
    "pow": (2, 2, None),  # handled by the parser (size guard)
    "hill": (3, 3, lambda a: Hill(*a)),
    "heaviside": (1, 1, lambda a: sympy.Heaviside(a[0], 1)),
    "piecewise": (3, None, _piecewise),
    "ifelse": (3, 3, lambda a: sympy.Piecewise((a[1], a[0]), (a[2], sympy.true))),
}

#: Whitelisted function names.
FUNCTIONS: frozenset[str] = frozenset(_FUNCS)


def _condition_slots(name: str, nargs: int) -> set[int]:
    if name == "piecewise":
        return set(range(1, nargs - 1, 2))
    if name == "ifelse":
        return {0}
    return set()


# ------------------------------------------------------------------------- parser
_CMP = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge,
        "==": sympy.Eq, "!=": sympy.Ne}
_NOT_PREC = 3
_CMP_PREC = 4
_BINARY = {"or": 1, "||": 1, "and": 2, "&&": 2, **{k: _CMP_PREC for k in _CMP},
           "+": 5, "-": 5, "*": 6, "/": 6}


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0

    # -- token helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def err(self, msg, tok: _Tok | None = None) -> ExpressionError:
        return _error(self.text, msg, None if tok is None else tok.pos)

    def unexpected(self, tok: _Tok) -> ExpressionError:
        if tok.kind == "end":
            return self.err("unexpected end of expression", tok)
        return self.err(f"unexpected {tok.text!r}", tok)

    def expect(self, op: str) -> _Tok:
        t = self.tok
        if t.kind != "op" or t.text != op:
            if t.kind == "end":
                raise self.err(f"expected {op!r} but the expression ended", t)
            raise self.err(f"expected {op!r} but found {t.text!r}", t)
        return self.next()

    def enter(self, tok):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.err(f"expression is nested too deeply (more than {MAX_DEPTH} levels)", tok)

    # -- value checks
    def value(self, x, tok, what="an arithmetic operand"):
        if _is_bool(x):
            raise self.err(f"comparison outside a condition: a condition cannot be used as {what} "
                           "(conditions are only allowed inside piecewise() or ifelse())", tok)
        return x

    def cond(self, x, tok, what):
        if not _is_bool(x):
            raise self.err(f"{what} must be a condition (a comparison such as 'x > 0')", tok)
        return x

    # -- grammar (precedence climbing; few Python frames per nesting level)
    def parse(self):
        if self.tok.kind == "end":
            raise ExpressionError(f"empty expression {_quote(self.text)}")
        result = self.parse_binary(0)
        if self.tok.kind != "end":
            raise self.unexpected(self.tok)
        return result

    def parse_binary(self, min_prec: int):
        """Parse binary operators of precedence >= ``min_prec`` (all left-assoc.)."""
        self.enter(self.tok)
        left = self.parse_prefix()
        while True:
            op = self.tok
            prec = _BINARY.get(op.text) if op.kind == "op" else None
            if prec is None or prec < min_prec:
                break
            self.next()
            right = self.parse_binary(prec + 1)
            left = self.combine(op, left, right)
            if prec == _CMP_PREC and self.tok.kind == "op" and self.tok.text in _CMP:
                raise self.err("chained comparisons are not supported (use 'and')", self.tok)
        self.depth -= 1
        return left

    def combine(self, op: _Tok, left, right):
        o = op.text
        if o in ("or", "||", "and", "&&"):
            self.cond(left, op, f"the left side of {o!r}")
            self.cond(right, op, f"the right side of {o!r}")
            return sympy.Or(left, right) if o in ("or", "||") else sympy.And(left, right)
        if o in _CMP:
            self.value(left, op, "a comparison operand")
            self.value(right, op, "a comparison operand")
            return _CMP[o](left, right)
        self.value(left, op)
        self.value(right, op)
        if o == "+":
            result = left + right
        elif o == "-":
            result = left - right
        elif o == "*":
            result = left * right
        else:
            result = left / right
        return _check_magnitude(result, self.text, op.pos)

    def parse_prefix(self):
        """Prefix operators, atoms and the (right-associative) power operator."""
        tok = self.tok
        if tok.kind == "op" and tok.text in ("not", "!"):
            self.next()
            operand = self.parse_binary(_NOT_PREC)
            return sympy.Not(self.cond(operand, tok, f"the operand of {tok.text!r}"))
        if tok.kind == "op" and tok.text in ("-", "+"):
            self.next()
            self.enter(tok)
            operand = self.value(self.parse_prefix(), tok)
            self.depth -= 1
            return -operand if tok.text == "-" else operand
        # atom
        if tok.kind == "num":
            self.next()
            base = self.number(tok)
        elif tok.kind == "name":
            self.next()
            if self.tok.kind == "op" and self.tok.text == "(":
                base = self.call(tok)
            else:
                base = TIME if tok.text == "t" else sympy.Symbol(tok.text, real=True)
        elif tok.kind == "op" and tok.text == "(":
            self.next()
            if self.tok.kind == "op" and self.tok.text == ")":
                raise self.err("empty parentheses", self.tok)
            base = self.parse_binary(0)
            self.expect(")")
        else:
            raise self.unexpected(tok)
        if self.tok.kind == "op" and self.tok.text in ("**", "^"):
            op = self.next()
            self.enter(op)
            exponent = self.parse_prefix()
            self.depth -= 1
            return self.power(base, exponent, op)
        return base

    def power(self, base, exponent, tok):
        self.value(base, tok)
        self.value(exponent, tok)
        if exponent.is_number:
            try:
                e = abs(complex(exponent.evalf(15)))
            except (TypeError, ValueError):
                e = math.inf
            if e > 1 and e * _coeff_digits(base) > _MAX_POWER_DIGITS:
                raise self.err("numeric constant out of range in power", tok)
        return _check_magnitude(sympy.Pow(base, exponent), self.text, tok.pos)

    def number(self, tok):
        s = tok.text
        if re.fullmatch(r"\d+", s):
            digits = s.lstrip("0")
            if len(digits) > 308:
                raise self.err(f"number too large ({len(digits)} digits)", tok)
            return sympy.Integer(int(s))
        if not math.isfinite(float(s)):
            raise self.err("number too large", tok)
        return sympy.Float(s, 15)

    def call(self, name_tok: _Tok):
        name = name_tok.text
        if name not in _FUNCS:
            close = difflib.get_close_matches(name, sorted(_FUNCS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.err(f"unknown function {name!r} (allowed: {_unique_sorted(_FUNCS)}){hint}",
                           name_tok)
        self.enter(name_tok)
        self.expect("(")
        args: list = []
        arg_toks: list[_Tok] = []
        if not (self.tok.kind == "op" and self.tok.text == ")"):
            while True:
                arg_toks.append(self.tok)
                args.append(self.parse_binary(0))
                if self.tok.kind == "op" and self.tok.text == ",":
                    self.next()
                    continue
                break
        self.expect(")")
        self.depth -= 1
        lo, hi, build = _FUNCS[name]
        n = len(args)
        if name == "piecewise" and (n < 3 or n % 2 == 0):
            raise self.err("piecewise() takes an odd number (at least 3) of arguments: "
                           f"value1, condition1, ..., otherwise; got {n}", name_tok)
        if n < lo or (hi is not None and n > hi):
            if hi is None:
                want = f"at least {lo} arguments"
            elif lo == hi:
                want = f"{lo} argument" + ("s" if lo != 1 else "")
            else:
                want = f"{lo} to {hi} arguments"
            raise self.err(f"{name}() takes {want}, got {n}", name_tok)
        conds = _condition_slots(name, n)
        for k, (a, t) in enumerate(zip(args, arg_toks)):
            if k in conds:
                self.cond(a, t, f"argument {k + 1} of {name}()")
            else:
                self.value(a, t, f"argument {k + 1} of {name}()")
        if name == "pow":
            return self.power(args[0], args[1], name_tok)
        return _check_magnitude(build(args), self.text, name_tok.pos)


_BAD_ATOMS = (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)


def parse_expression(text: str) -> sympy.Expr:
    """Parse a model expression into a sympy expression.

    Parameters
    ----------
    text : str
        Expression text, e.g. ``"-CL/V1*A1 + hill(C1, EC50, n)"``; at most
        :data:`MAX_LENGTH` characters and :data:`MAX_DEPTH` nesting levels.

    Returns
    -------
    sympy.Expr
        Symbols are ``Symbol(name, real=True)``; ``t`` is :data:`TIME`.
        May contain :class:`Hill` (see :func:`expand_hill`).

    Raises
    ------
    ExpressionError
        On any syntax error, unknown function, wrong arity, forbidden
        character/name, condition used as a value (or vice versa), or a result
        that is infinite/undefined (e.g. division by the constant 0).
    """
    if not isinstance(text, str):
        raise ExpressionError(f"expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is too long ({len(text)} characters; "
                              f"the limit is {MAX_LENGTH})")
    try:
        result = _Parser(text).parse()
    except ExpressionError:
        raise
    except RecursionError:
        raise ExpressionError(f"expression is nested too deeply in {_quote(text)}") from None
    except (TypeError, ValueError, ArithmeticError, AttributeError, NotImplementedError) as exc:
        raise ExpressionError(f"invalid expression {_quote(text)}: {exc}") from None
    if _is_bool(result):
        raise ExpressionError(
            f"comparison outside a condition in {_quote(text)} (conditions are only allowed "
            "inside piecewise() or ifelse())")
    if not isinstance(result, sympy.Expr):
        raise ExpressionError(f"invalid expression {_quote(text)}")
    if any(result.has(a) for a in _BAD_ATOMS):
        raise ExpressionError(f"expression {_quote(text)} is infinite or undefined "
                              "(division by zero or log of zero?)")
    return result
