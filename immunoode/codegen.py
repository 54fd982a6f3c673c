"""Symbolic derivation and source generation for a model.

From a :class:`~immunoode.model.Model` this module derives, with sympy,

* the right-hand side ``f(t, y, p) + u`` (``u``: infusion input rates),
* its analytic Jacobian ``∂f/∂y`` (only the structurally non-zero entries),
* ``∂f/∂t`` when the model uses ``t`` explicitly (needed by Rosenbrock methods),
* the record vector: states, assignments and observables,
* the initial state as a function of the parameters,

eliminates common subexpressions once across all of them, and prints Python
source for two backends: scalar code for numba (``math`` functions) and
array code for numpy, vectorised over many parameter sets at once.

It also performs the symbolic LU factorisation of ``c·I − J`` for the
Jacobian's sparsity pattern (a fill-reducing minimum-degree order, no pivoting)
and prints it as straight-line code; the solver falls back to a dense LU with
partial pivoting whenever a pivot is too small.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.pycode import PythonCodePrinter

from . import llvmgen
from .expr import TIME, expand_hill

__all__ = ["Derivation", "derive", "sparse_lu_plan", "numba_source", "numpy_source"]

#: Above this many straight-line LU operations the dense LU is used instead.
MAX_SPARSE_LU_OPS = 40000


@dataclass
class Derivation:
    """Everything the code printers need, as plain sympy objects."""

    state_names: tuple[str, ...]
    param_names: tuple[str, ...]
    record_names: tuple[str, ...]       # states, then assignments, then observables
    ysyms: tuple[sympy.Symbol, ...]
    psyms: tuple[sympy.Symbol, ...]
    rhs: list
    jac_rows: list[int]
    jac_cols: list[int]
    jac: list
    dfdt: list
    has_t: bool
    record: list                       # expressions for assignments + observables
    initial: list
    derived: list = None               # [(p_k symbol, expression of p)] hoisted out of hot code
    hot_rhs: list = None               # rhs / jac / dfdt with parameter-only terms hoisted
    hot_jac: list = None
    hot_dfdt: list = None


def hoist_parameter_terms(exprs, psyms, start: int):
    """Replace parameter-only subexpressions by new symbols ``p_{start+k}``.

    They are computed once per parameter set instead of at every right-hand-side
    call (e.g. ``EC50**n``, ``1/V1``, products of rate constants).  Returns the
    rewritten expressions and the list of ``(symbol, expression)`` definitions.
    """
    pset = set(psyms)
    memo: dict = {}
    defs: list = []

    def pure(e):
        fs = e.free_symbols
        return bool(fs) and fs <= pset

    def new(e):
        if e not in memo:
            sym = sympy.Symbol(f"p_{start + len(defs)}", real=True)
            memo[e] = sym
            defs.append((sym, e))
        return memo[e]

    def walk(e):
        if e.is_Atom or not e.args:
            return e
        if isinstance(e, sympy.Expr) and pure(e):
            return new(e)
        if isinstance(e, (sympy.Add, sympy.Mul)):
            pp = [a for a in e.args if pure(a)]
            rest = [walk(a) for a in e.args if not pure(a)]
            if len(pp) >= 2 or (len(pp) == 1 and not pp[0].is_Symbol):
                return e.func(new(e.func(*pp)), *rest)
            return e.func(*pp, *rest)
        return e.func(*[walk(a) for a in e.args])

    return [walk(e) for e in exprs], defs


def _clean(e: sympy.Expr) -> sympy.Expr:
    """Tidy a derivative for evaluation.

    * Dirac deltas (derivatives of Heaviside/Min/Max at measure-zero kinks) are dropped;
    * Hill functions, kept whole while differentiating (their closed-form derivative is
      finite at ``x = 0``), are expanded.
    """
    if e.has(sympy.DiracDelta):
        e = e.replace(sympy.DiracDelta, lambda *a: sympy.Integer(0))
    return expand_hill(e)


def derive(model) -> Derivation:
    """Differentiate the model and map names to positional symbols ``y_i``, ``p_j``."""
    snames = model.state_names
    pnames = model.parameter_names
    ysyms = tuple(sympy.Symbol(f"y_{i}", real=True) for i in range(len(snames)))
    psyms = tuple(sympy.Symbol(f"p_{j}", real=True) for j in range(len(pnames)))
    to_pos = {model.symbol(n): s for n, s in zip(snames, ysyms)}
    to_pos.update({model.symbol(n): s for n, s in zip(pnames, psyms)})

    def pos(e):
        return expand_hill(model.substitute_assignments(e)).xreplace(to_pos)

    rhs_h = [e.xreplace(to_pos) for e in model.rhs_substituted()]  # Hill() kept for diff
    rhs = [expand_hill(e) for e in rhs_h]
    rows, cols, jac = [], [], []
    for i, f in enumerate(rhs_h):
        fs = f.free_symbols
        for j, y in enumerate(ysyms):
            if y in fs:
                d = _clean(sympy.diff(f, y))
                if d != 0:
                    rows.append(i)
                    cols.append(j)
                    jac.append(d)
    has_t = any(TIME in f.free_symbols for f in rhs)
    dfdt = [_clean(sympy.diff(f, TIME)) for f in rhs_h] if has_t else []
    record_names = tuple(snames) + tuple(model.assignments) + tuple(model.observables)
    record = [pos(a.expr) for a in model.assignments.values()]
    record += [pos(o.expr) for o in model.observables.values()]
    initial = [expand_hill(s.initial).xreplace(to_pos) for s in model.states.values()]
    hot, derived = hoist_parameter_terms(rhs + jac + dfdt, psyms, len(psyms))
    nr, nj = len(rhs), len(jac)
    return Derivation(tuple(snames), tuple(pnames), record_names, ysyms, psyms, rhs, rows, cols,
                      jac, dfdt, has_t, record, initial, derived, hot[:nr], hot[nr:nr + nj],
                      hot[nr + nj:])


# ------------------------------------------------------------------ sparse LU
@dataclass
class LUPlan:
    """Straight-line LU of ``M = c·I − J`` in a fixed (permuted) order."""

    n: int
    perm: list[int]             # new position k holds original row/col perm[k]
    slots: dict                 # (i, j) in permuted coordinates -> index into the lu array
    jac_slot: list[int]         # for each Jacobian entry, its lu slot
    diag_slot: list[int]        # for each permuted k, slot of (k, k)
    ops: list                   # ("piv", k) / ("scale", ik, kk) / ("update", ij, ik, kj)
    lower: list                 # per row i: [(slot(i,k), k)] with k < i
    upper: list                 # per row i: [(slot(i,j), j)] with j > i
    n_ops: int


def _min_degree_order(n, pattern):
    adj = {i: set() for i in range(n)}
    for i, j in pattern:
        if i != j:
            adj[i].add(j)
            adj[j].add(i)
    order, remaining = [], set(range(n))
    while remaining:
        k = min(remaining, key=lambda v: (len(adj[v] & remaining), v))
        nb = adj[k] & remaining
        for a in nb:
            adj[a] |= nb - {a}
        order.append(k)
        remaining.remove(k)
    return order


def sparse_lu_plan(n: int, rows: list[int], cols: list[int]) -> LUPlan:
    """Symbolic factorisation: fill-in pattern and the operation list."""
    pattern = set(zip(rows, cols)) | {(i, i) for i in range(n)}
    perm = _min_degree_order(n, pattern)
    inv = {o: k for k, o in enumerate(perm)}
    nz = {(inv[i], inv[j]) for i, j in pattern}
    ops = []
    for k in range(n):
        ops.append(("piv", k))
        below = sorted(i for (i, j) in nz if j == k and i > k)
        right = sorted(j for (i, j) in nz if i == k and j > k)
        for i in below:
            ops.append(("scale", (i, k), (k, k)))
            for j in right:
                nz.add((i, j))
                ops.append(("update", (i, j), (i, k), (k, j)))
    slots = {ij: s for s, ij in enumerate(sorted(nz))}
    jac_slot = [slots[(inv[i], inv[j])] for i, j in zip(rows, cols)]
    diag_slot = [slots[(k, k)] for k in range(n)]
    lower = [[(slots[(i, k)], k) for k in range(i) if (i, k) in nz] for i in range(n)]
    upper = [[(slots[(i, j)], j) for j in range(i + 1, n) if (i, j) in nz] for i in range(n)]
    return LUPlan(n, perm, slots, jac_slot, diag_slot, ops, lower, upper, len(ops))


# ------------------------------------------------------------------ printers
class _NumbaPrinter(PythonCodePrinter):
    """Scalar code that numba compiles: ``math`` functions, ternaries."""

    def _print_Heaviside(self, expr):
        h0 = expr.args[1] if len(expr.args) > 1 else sympy.Rational(1, 2)
        x = self._print(expr.args[0])
        return f"(1.0 if ({x}) > 0 else ({self._print(sympy.Float(h0))} if ({x}) == 0 else 0.0))"

    def _print_Min(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"min({out}, {self._print(a)})"
        return out

    def _print_Max(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"max({out}, {self._print(a)})"
        return out

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"(1.0 if ({x}) > 0 else (-1.0 if ({x}) < 0 else 0.0))"

    def _print_Pow(self, expr, rational=False):
        b, e = expr.as_base_exp()
        if e.is_Integer and 2 <= int(e) <= 4:
            bb = self.parenthesize(b, 1000)
            return "(" + "*".join([bb] * int(e)) + ")"
        if e.is_Integer and int(e) == -1:
            return f"(1.0/{self.parenthesize(b, 1000)})"
        if e == sympy.Rational(1, 2):
            return f"math.sqrt({self._print(b)})"
        return super()._print_Pow(expr, rational=rational)


class _ArrayPrinter(NumPyPrinter):
    """Array code (numpy ufuncs), broadcasting over parameter sets."""

    def _print_Min(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"numpy.minimum({out}, {self._print(a)})"
        return out

    def _print_Max(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"numpy.maximum({out}, {self._print(a)})"
        return out

    def _print_Heaviside(self, expr):
        h0 = expr.args[1] if len(expr.args) > 1 else sympy.Rational(1, 2)
        return f"numpy.heaviside({self._print(expr.args[0])}, {self._print(sympy.Float(h0))})"


def _cse(exprs):
    reps, red = sympy.cse(exprs, symbols=sympy.numbered_symbols("x"), optimizations=None,
                          order="none")
    return reps, red


def _fn(printer, name, args, prelude, reps, targets, red, *, decorator="", indent="    "):
    lines = [decorator] if decorator else []
    lines.append(f"def {name}({', '.join(args)}):")
    lines += [indent + p for p in prelude]
    for s, e in reps:
        lines.append(f"{indent}{s} = {printer.doprint(e)}")
    for tgt, e in zip(targets, red):
        lines.append(f"{indent}{tgt} = {printer.doprint(e)}")
    return lines


def _unpack(d: Derivation, exprs, *, array=False, need_t=False):
    used = set().union(*[e.free_symbols for e in exprs]) if exprs else set()
    lines = []
    for i, s in enumerate(d.ysyms):
        if s in used:
            lines.append(f"{s} = y[{i}]")
    for j, s in enumerate(d.psyms):
        if s in used:
            lines.append(f"{s} = p[{j}]")
    if TIME in used:
        # keep the time symbol's name 't'
        pass
    return lines


class _Ext:
    """Symbol view for :func:`_unpack` with the derived parameters appended."""

    def __init__(self, d, dsyms):
        self.ysyms = d.ysyms
        self.psyms = tuple(d.psyms) + tuple(dsyms)


def numba_source(d: Derivation, plan: LUPlan | None, tab=None) -> str:
    """Scalar model functions for the numba solver (see ``solvers/rosenbrock.py``).

    Each function is emitted as an LLVM-IR program (:mod:`.llvmgen`; cheap for numba
    to compile) unless it uses a function that backend does not cover, in which case
    it is printed as Python source for numba to compile."""
    pr = _NumbaPrinter({"fully_qualified_modules": True, "standard": "python3"})
    def dec_(name):
        return "@njit(cache=True, fastmath={'contract', 'arcp', 'nsz'}, error_model='numpy')"

    out = ["from math import inf, nan  # noqa: F401  (literals in the programs)",
           "from immunoode.llvmgen import kernel as _kernel", ""]
    n = len(d.ysyms)
    dsyms = [s_ for s_, _ in d.derived]
    ext = _Ext(d, dsyms)
    y_loads = {s_: (1, i) for i, s_ in enumerate(d.ysyms)}
    pe_loads = {s_: (2, j) for j, s_ in enumerate(ext.psyms)}
    p_loads = {s_: (2, j) for j, s_ in enumerate(d.psyms)}

    def emit(name, args, make_prog, python_lines):
        try:
            prog = make_prog()
        except llvmgen.Unsupported:
            return python_lines()
        call = f"_K_{name}({', '.join(args)})"
        return [f"_P_{name} = {prog!r}", f"_K_{name} = _kernel({name!r}, _P_{name}, {len(args)})",
                dec_(name), f"def {name}({', '.join(args)}):", f"    return {call}", ""]

    # derived parameters (computed once per parameter set); p_j with j >= N_PARAMS
    dexprs = [e for _, e in d.derived]
    reps, red = _cse(dexprs) if dexprs else ([], [])
    npar = len(d.psyms)

    def py_derive():
        lines = _fn(pr, "derive_params", ["p", "pe"], _unpack(d, dexprs), reps,
                    [f"pe[{s_.name[2:]}]" for s_ in dsyms], red, decorator=dec_("derive_params"))
        return lines + [f"    for j in range({npar}):", "        pe[j] = p[j]", ""]

    out += emit("derive_params", ["p", "pe"], lambda: llvmgen.program(
        reps, [(1, int(s_.name[2:])) for s_ in dsyms], red,
        loads={s_: (0, j) for j, s_ in enumerate(d.psyms)},
        stores_after=[(1, j, 0, j) for j in range(npar)]), py_derive)

    # right-hand side f(t, y, p) + u
    reps_f, red_f = _cse(d.hot_rhs)

    def py_rhs():
        lines = _fn(pr, "rhs", ["t", "y", "p", "u", "out"], _unpack(ext, d.hot_rhs), reps_f,
                    [f"out[{i}]" for i in range(n)], list(red_f), decorator=dec_("rhs"))
        lines[-n:] = [ln.replace(" = ", " = (", 1) + f") + u[{i}]" for i, ln in enumerate(lines[-n:])]
        return lines + [""]

    out += emit("rhs", ["t", "y", "p", "u", "out"], lambda: llvmgen.program(
        reps_f, [(4, i, (3, i)) for i in range(n)], red_f, loads={**y_loads, **pe_loads},
        scalars={TIME: 0}), py_rhs)

    # Jacobian (non-zero entries)
    reps_j, red_j = _cse(d.hot_jac) if d.hot_jac else ([], [])
    out += emit("jac", ["t", "y", "p", "out"], lambda: llvmgen.program(
        reps_j, [(3, k) for k in range(len(red_j))], red_j, loads={**y_loads, **pe_loads},
        scalars={TIME: 0}), lambda: _fn(pr, "jac", ["t", "y", "p", "out"],
                                        _unpack(ext, d.hot_jac), reps_j,
                                        [f"out[{k}]" for k in range(len(d.hot_jac))], red_j,
                                        decorator=dec_("jac")) + ["    return", ""])

    # df/dt
    if d.has_t:
        reps_t, red_t = _cse(d.hot_dfdt)
        out += emit("dfdt", ["t", "y", "p", "out"], lambda: llvmgen.program(
            reps_t, [(3, i) for i in range(n)], red_t, loads={**y_loads, **pe_loads},
            scalars={TIME: 0}), lambda: _fn(pr, "dfdt", ["t", "y", "p", "out"],
                                            _unpack(ext, d.hot_dfdt), reps_t,
                                            [f"out[{i}]" for i in range(n)], red_t,
                                            decorator=dec_("dfdt")) + [""])
    else:
        out += [dec_("dfdt"), "def dfdt(t, y, p, out):", "    for i in range(out.shape[0]):",
                "        out[i] = 0.0", ""]

    # record: assignments/observables, then the states copied
    reps_r, red_r = _cse(d.record) if d.record else ([], [])

    def py_record():
        lines = _fn(pr, "record", ["t", "y", "p", "out"], _unpack(d, d.record), reps_r,
                    [f"out[{n + k}]" for k in range(len(d.record))], red_r, decorator=dec_("record"))
        return lines + [f"    for i in range({n}):", "        out[i] = y[i]", ""]

    out += emit("record", ["t", "y", "p", "out"], lambda: llvmgen.program(
        reps_r, [(3, n + k) for k in range(len(red_r))], red_r, loads={**y_loads, **p_loads},
        scalars={TIME: 0}, stores_after=[(3, i, 1, i) for i in range(n)]), py_record)

    # sparse LU
    if plan is not None:
        fac, sol = llvmgen.lu_programs(plan)
        out += emit("lu_factor", ["jv", "c", "lu"], lambda: fac, lambda: [])
        out += emit("lu_solve", ["lu", "B", "r"], lambda: sol, lambda: [])
    else:
        out += [dec_("lu_factor"), "def lu_factor(jv, c, lu):", "    return False", "",
                dec_("lu_solve"), "def lu_solve(lu, B, r):", "    return", ""]
    # the whole Rosenbrock step, unrolled (sparse LU path); tab: solvers.tableaus.Tableau
    step = []
    if plan is not None and tab is not None:
        step = emit("step", list(llvmgen.STEP_ARGS), lambda: llvmgen.step_program(
            tab, plan, d.ysyms, ext.psyms, reps_f, red_f, d.has_t), lambda: [])
    if step:
        out += ["HAS_STEP = True"] + step
    else:
        out += ["HAS_STEP = False", dec_("step"), f"def step({', '.join(llvmgen.STEP_ARGS)}):",
                "    return 0.0", ""]
    return "\n".join(out) + "\n"


def numpy_source(d: Derivation) -> str:
    """Vectorised functions: ``y`` has shape (n_states, N), ``p`` (n_params, N)."""
    pr = _ArrayPrinter({"fully_qualified_modules": True})
    n = len(d.ysyms)
    out = []
    reps, red = _cse(d.rhs)
    out += _fn(pr, "rhs", ["t", "y", "p", "out"], _unpack(d, d.rhs, array=True), reps,
               [f"out[{i}]" for i in range(n)], red)
    out += ["    return out", ""]
    reps, red = _cse(d.jac) if d.jac else ([], [])
    out += _fn(pr, "jac", ["t", "y", "p", "out"], _unpack(d, d.jac, array=True), reps,
               [f"out[{k}]" for k in range(len(d.jac))], red)
    out += ["    return out", ""]
    if d.has_t:
        reps, red = _cse(d.dfdt)
        out += _fn(pr, "dfdt", ["t", "y", "p", "out"], _unpack(d, d.dfdt, array=True), reps,
                   [f"out[{i}]" for i in range(n)], red)
    else:
        out += ["def dfdt(t, y, p, out):", "    out[...] = 0.0"]
    out += ["    return out", ""]
    reps, red = _cse(d.record) if d.record else ([], [])
    out += _fn(pr, "record", ["t", "y", "p", "out"], _unpack(d, d.record, array=True), reps,
               [f"out[{n + k}]" for k in range(len(d.record))], red)
    out += [f"    out[:{n}] = y", "    return out", ""]
    reps, red = _cse(d.initial)
    out += _fn(pr, "initial", ["p", "out"], _unpack(d, d.initial, array=True), reps,
               [f"out[{i}]" for i in range(n)], red)
    out += ["    return out", ""]
    return "\n".join(out) + "\n"
