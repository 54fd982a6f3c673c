"""Tests for immunoode.expr (safe expression parser)."""

import builtins
import contextlib
import math
import random

import numpy as np
import pytest
import sympy
import sympy.parsing.sympy_parser as sympy_parser
from hypothesis import HealthCheck, given, settings, strategies as st

from immunoode.errors import ExpressionError, ModelError
from immunoode.expr import (
    FUNCTIONS, MAX_DEPTH, MAX_LENGTH, TIME, Hill, expand_hill, parse_expression,
)


def S(name):
    return sympy.Symbol(name, real=True)


x, y, z, a, b, c = map(S, "xyzabc")
P = parse_expression


# ------------------------------------------------------------------ results

@pytest.mark.parametrize("text, expected", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("2 ** 3 ** 2", 512),
    ("2 ^ 3 ^ 2", 512),
    ("-2 ** 2", -4),
    ("(-2) ** 2", 4),
    ("2 ** -1", sympy.Rational(1, 2)),
    ("8 / 4 / 2", 1),
    ("10 - 4 - 3", 3),
    ("-x**2", -x**2),
    ("-x^2", -x**2),
    ("2*-x", -2 * x),
    ("x - -y", x + y),
    ("+x", x),
    ("2**-x*3", 3 * 2**(-x)),
    ("a/b/c", a / (b * c)),
    ("a-b-c", a - b - c),
    ("a*b^c", a * b**c),
    ("t * x", TIME * x),
    ("pow(x, 3)", x**3),
    ("sqrt(x)", sympy.sqrt(x)),
    ("abs(x)", sympy.Abs(x)),
    ("exp(x) + ln(y) + log(z)", sympy.exp(x) + sympy.log(y) + sympy.log(z)),
    ("log(x, 2)", sympy.log(x, 2)),
    ("log10(x)", sympy.log(x, 10)),
    ("sin(x)+cos(x)+tan(x)+tanh(x)", sympy.sin(x) + sympy.cos(x) + sympy.tan(x) + sympy.tanh(x)),
    ("min(x, y)", sympy.Min(x, y)),
    ("max(x, y, z)", sympy.Max(x, y, z)),
    ("heaviside(t - 5)", sympy.Heaviside(TIME - 5, 1)),
    ("piecewise(x, t < 1, y, t < 2, z)",
     sympy.Piecewise((x, TIME < 1), (y, TIME < 2), (z, True))),
    ("ifelse(x > 0 and y <= 1, a, b)",
     sympy.Piecewise((a, sympy.And(x > 0, y <= 1)), (b, True))),
    ("ifelse(x > 0 && not (y == 1) || z != 2, a, b)",
     sympy.Piecewise((a, sympy.Or(sympy.And(x > 0, sympy.Ne(y, 1)), sympy.Ne(z, 2))), (b, True))),
    ("ifelse(!(x >= 1), a, b)", sympy.Piecewise((a, x < 1), (b, True))),
    ("hill(x, a, b)", Hill(x, a, b)),
    ("  x\t+\n1 ", x + 1),
])
def test_parse_results(text, expected):
    got = P(text)
    assert isinstance(got, sympy.Expr)
    assert sympy.simplify(got - sympy.sympify(expected)) == 0 or got == expected


def test_numbers():
    assert P("3") == 3 and isinstance(P("3"), sympy.Integer)
    assert float(P(".5")) == 0.5
    assert float(P("1e-3")) == 1e-3
    assert float(P("2.5E2")) == 250.0
    assert float(P("1.")) == 1.0


def test_time_symbol():
    assert TIME.name == "t" and TIME.is_real
    assert P("t") is TIME or P("t") == TIME


@pytest.mark.parametrize("name", ["E", "I", "N", "S", "O", "Q", "beta", "gamma", "lambda_",
                                  "pi", "e", "zeta", "exp_", "hill", "Symbol", "oo", "nan"])
def test_names_are_plain_symbols(name):
    got = P(name)
    assert got == sympy.Symbol(name, real=True)
    assert isinstance(got, sympy.Symbol)
    assert P(f"2*{name}").free_symbols == {sympy.Symbol(name, real=True)}


def test_all_symbols_real():
    assert all(s.is_real for s in P("k_el*A1/V1 + t").free_symbols)


def test_functions_constant():
    assert isinstance(FUNCTIONS, frozenset)
    assert {"exp", "log", "hill", "piecewise", "ifelse", "min", "max", "heaviside"} <= FUNCTIONS


def test_hill_derivative_matches_formula():
    h = P("hill(C, K, n)")
    C, K, n = S("C"), S("K"), S("n")
    explicit = C**n / (K**n + C**n)
    assert expand_hill(h) == explicit
    assert h.rewrite(sympy.Pow) == explicit
    pt = {C: 1.7, K: 0.9, n: 2.3}
    for v in (C, K, n):
        d1 = sympy.diff(h, v).subs(pt).evalf()
        d2 = sympy.diff(explicit, v).subs(pt).evalf()
        assert math.isclose(float(d1), float(d2), rel_tol=1e-12)
    assert math.isclose(float(h.subs(pt).evalf()), float(explicit.subs(pt)), rel_tol=1e-12)


def test_hill_lambdify_and_codegen():
    h = P("Emax*hill(C, K, n) + 1")
    Emax, C, K, n = S("Emax"), S("C"), S("K"), S("n")
    f = sympy.lambdify([Emax, C, K, n], expand_hill(h), "numpy")
    assert np.allclose(f(2.0, np.array([1.0, 3.0]), 1.0, 2.0), [2.0, 2.8])
    g = sympy.lambdify([Emax, C, K, n], h, "numpy")  # printers expand it too
    assert np.allclose(g(2.0, 3.0, 1.0, 2.0), 2.8)
    assert "Hill" not in sympy.ccode(h)
    assert expand_hill(x + 1) == x + 1


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("text, fragments", [
    ("A1 / (V1))", ["unexpected ')'", "column 10", '"A1 / (V1))"']),
    ("foo(x)", ["unknown function 'foo'", "allowed:", "exp"]),
    ("epx(x)", ["unknown function 'epx'", "did you mean 'exp'?"]),
    ("hill(x, k)", ["hill() takes 3 arguments, got 2"]),
    ("exp(x, y)", ["exp() takes 1 argument, got 2"]),
    ("exp()", ["exp() takes 1 argument, got 0"]),
    ("min(x)", ["min() takes at least 2 arguments, got 1"]),
    ("log(x, y, z)", ["log() takes 1 to 2 arguments, got 3"]),
    ("piecewise(x, t > 1)", ["piecewise()", "odd number"]),
    ("piecewise(x, y, z)", ["argument 2 of piecewise() must be a condition"]),
    ("ifelse(x, y, z)", ["argument 1 of ifelse() must be a condition"]),
    ("ifelse(x > 1, y > 2, z)", ["comparison outside a condition"]),
    ("", ["empty expression"]),
    ("   ", ["empty expression"]),
    ("x > 1", ["comparison outside a condition"]),
    ("(x > 1) + 1", ["comparison outside a condition"]),
    ("exp(x > 1)", ["comparison outside a condition"]),
    ("x and y", ["must be a condition"]),
    ("not x", ["must be a condition"]),
    ("a < b < c", ["chained comparisons"]),
    ("x; y", ["unsupported character ';'"]),
    ("__import__('os')", ["'__'"]),
    ("x[0]", ["unsupported character '['"]),
    ("'abc'", ["string literals"]),
    ('"abc"', ["string literals"]),
    ("lambda: 1", ["reserved word", "'lambda'"]),
    ("x.real", ["attribute access"]),
    ("x = 1", ["use '=='"]),
    ("x & y", ["unsupported character '&'"]),
    ("2x", ["malformed number '2x'"]),
    ("1.2.3", ["malformed number"]),
    ("x +", ["unexpected end of expression"]),
    ("(x", ["expected ')'"]),
    ("x y", ["unexpected 'y'"]),
    ("()", ["empty parentheses"]),
    ("f(x,)", ["unknown function"]),
    ("exp(x,)", ["unexpected ')'"]),
    ("x / 0", ["infinite or undefined"]),
    ("1e400", ["number too large"]),
    ("9 ** 9 ** 9 ** 9", ["out of range"]),
    ("(3*x) ^ 1000000000", ["out of range"]),
    ("1e308 * 10", ["out of floating-point range"]),
    ("x @ y", ["unsupported character '@'"]),
    ("x $ y", ["unsupported character '$'"]),
    ("é", ["unsupported character"]),
])
def test_errors(text, fragments):
    with pytest.raises(ExpressionError) as info:
        P(text)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert isinstance(info.value, ModelError)


@pytest.mark.parametrize("value", [None, 3, 1.5, b"x", ["x"], x])
def test_non_string(value):
    with pytest.raises(ExpressionError, match="must be a string"):
        P(value)


def test_length_limit():
    with pytest.raises(ExpressionError, match="too long"):
        P("x+" * MAX_LENGTH + "x")


@pytest.mark.parametrize("make", [
    lambda n: "(" * n + "x" + ")" * n,
    lambda n: "-" * n + "x",
    lambda n: "x^" * n + "x",
    lambda n: "exp(" * n + "x" + ")" * n,
    lambda n: "ifelse(" + "not " * n + "x > 1, 1, 2)",
    lambda n: "(-" * n + "x" + ")" * n,
])
def test_depth_limit(make):
    assert isinstance(P(make(MAX_DEPTH // 4)), sympy.Expr)
    for n in (MAX_DEPTH + 5, 1500):
        with pytest.raises(ExpressionError, match="nested too deeply"):
            P(make(n))


def test_deep_but_allowed():
    assert P("(" * (MAX_DEPTH - 2) + "x" + ")" * (MAX_DEPTH - 2)) == x


def test_error_quotes_long_text_excerpt():
    text = "x + " * 100 + "(" + "y + " * 100 + ";"
    with pytest.raises(ExpressionError) as info:
        P(text)
    assert "..." in str(info.value) and len(str(info.value)) < 300


# ------------------------------------------------------------------ fuzzing

@contextlib.contextmanager
def no_python_evaluation(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("Python evaluation reached during parsing")

    with monkeypatch.context() as m:
        m.setattr(builtins, "eval", forbidden)
        m.setattr(builtins, "exec", forbidden)
        m.setattr(builtins, "compile", forbidden)
        m.setattr(sympy, "sympify", forbidden)
        m.setattr(sympy_parser, "parse_expr", forbidden)
        yield


_TOKENS = st.sampled_from(
    list("abxyzEINtS_0123456789.+-*/^()[],'\";<>=!&|e ") +
    ["**", "__import__", "lambda", "exp", "hill", "piecewise", "ifelse", "min", "max", "log",
     " and ", " or ", "not ", "1e", "9", "(", ")", "==", "<=", "os", ".system", "1e308"])


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(st.text(alphabet=st.sampled_from(
    list("abxyzt_0123456789.+-*/^()[]'\";<>=!&| ")), max_size=40),
    st.lists(_TOKENS, max_size=30).map("".join)))
def test_fuzz_never_crashes(monkeypatch, text):
    with no_python_evaluation(monkeypatch):
        try:
            result = P(text)
        except ExpressionError:
            return
    assert isinstance(result, sympy.Expr)


# random valid expression trees: (text, sympy value) pairs
_SYMS = ["x", "y", "z"]
_leaf = st.one_of(
    st.sampled_from(_SYMS).map(lambda s: (s, S(s))),
    st.integers(0, 9).map(lambda i: (str(i), sympy.Integer(i))),
    st.sampled_from(["0.5", "1.25", "2e-1", ".75"]).map(lambda f: (f, sympy.Float(f))),
)


def _extend(children):
    def binop(op):
        def build(pair):
            (ta, va), (tb, vb) = pair
            sym = {"+": sympy.Add, "-": lambda p, q: p - q, "*": sympy.Mul,
                   "/": lambda p, q: p / (1 + q**2)}[op]
            text = f"({ta}) {op} ({tb})" if op != "/" else f"({ta}) / (1 + ({tb})^2)"
            return text, sym(va, vb)
        return st.tuples(children, children).map(build)

    def func(name, f):
        return children.map(lambda p: (f"{name}({p[0]})", f(p[1])))

    return st.one_of(
        binop("+"), binop("-"), binop("*"), binop("/"),
        children.map(lambda p: (f"-({p[0]})", -p[1])),
        children.map(lambda p: (f"({p[0]})^2", p[1] ** 2)),
        func("tanh", sympy.tanh), func("sin", sympy.sin), func("abs", sympy.Abs),
        func("sqrt(1 + abs", lambda v: sympy.sqrt(1 + sympy.Abs(v))).map(
            lambda p: (p[0] + ")", p[1])),
        st.tuples(children, children).map(
            lambda p: (f"max({p[0][0]}, {p[1][0]})", sympy.Max(p[0][1], p[1][1]))),
        st.tuples(children, children).map(
            lambda p: (f"ifelse({p[0][0]} > {p[1][0]}, {p[0][0]}, {p[1][0]})",
                       sympy.Piecewise((p[0][1], p[0][1] > p[1][1]), (p[1][1], True)))),
        st.tuples(children, children).map(
            lambda p: (f"hill(1 + abs({p[0][0]}), 2, 1 + abs({p[1][0]}))",
                       (1 + sympy.Abs(p[0][1])) ** (1 + sympy.Abs(p[1][1]))
                       / (2 ** (1 + sympy.Abs(p[1][1])) + (1 + sympy.Abs(p[0][1])) ** (1 + sympy.Abs(p[1][1]))))),
    )


_trees = st.recursive(_leaf, _extend, max_leaves=12)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(_trees, st.integers(0, 2**32 - 1))
def test_fuzz_round_trip(monkeypatch, tree, seed):
    text, value = tree
    with no_python_evaluation(monkeypatch):
        got = P(text)
    rng = random.Random(seed)
    syms = [S(s) for s in _SYMS]
    for _ in range(3):
        point = {s: rng.uniform(-3, 3) for s in syms}
        v1 = complex(expand_hill(got).subs(point).evalf())
        v2 = complex(value.subs(point).evalf())
        assert abs(v1 - v2) <= 1e-9 * max(1.0, abs(v2)), (text, got, value, point)
