"""Straight-line model kernels emitted as LLVM IR inside numba (fast cold compiles).

numba types and lowers every Python operation one by one, at about a millisecond
each; a model's right-hand side, Jacobian and sparse LU are thousands of such
operations and cost most of a cold compile.  These functions have no loops or
branches, so immunoode writes them instead as a *program*: a flat tuple of
single-assignment instructions, produced from sympy at code-generation time
(:func:`program`, :func:`lu_programs`) and stored as a literal in the generated
module.  At numba compile time, :func:`kernel` turns a program into an
``@intrinsic`` whose code generator emits the LLVM instructions directly, so numba
types one call instead of thousands of operations.  The enclosing ``@njit``
function still gets numba's fast-math flags, optimisation and on-disk cache.

An expression with a function the IR backend does not cover (:data:`UNSUPPORTED`
is raised) falls back to numba-compiled Python source for that function.

Instruction set (operands are indices of earlier instructions unless noted)::

    ("arg", k)                 scalar argument k (float64, or int64 for a row index)
    ("ld", k, i)               load  arg_k[i]           (1-D array argument)
    ("ld2", k, r, j)           load  arg_k[arg_r, j]     (2-D C-contiguous array)
    ("st", k, i, v)            store arg_k[i] = v
    ("st2", k, r, j, v)        store arg_k[arg_r, j] = v
    ("st2c", k, r, j, v)       store arg_k[r, j] = v     (constant row r)
    ("const", x)               float constant
    ("add"|"sub"|"mul"|"div"|"pow", a, b)
    ("neg"|"exp"|"log"|"log10"|"sqrt"|"fabs"|"floor"|"ceil"|"sin"|"cos", a)
    ("lt"|"le"|"gt"|"ge"|"eq"|"ne", a, b)   comparisons (bool)
    ("and"|"or", a, b), ("not", a), ("bool", 0|1)
    ("select", c, a, b)        c ? a : b
    ("min"|"max", a, b)        Python's min/max(a, b) semantics
    ("ret", v)                 return v, a bool or a float (else the kernel returns nothing)
"""

from __future__ import annotations

import sympy

from .expr import TIME

__all__ = ["Unsupported", "program", "lu_programs", "step_program", "STEP_ARGS", "kernel"]


class Unsupported(Exception):
    """An expression the IR backend does not cover (the caller falls back to Python source)."""


_UNARY = {sympy.exp: "exp", sympy.log: "log", sympy.Abs: "fabs", sympy.floor: "floor",
          sympy.ceiling: "ceil", sympy.sin: "sin", sympy.cos: "cos"}
_REL = {sympy.StrictLessThan: "lt", sympy.LessThan: "le", sympy.StrictGreaterThan: "gt",
        sympy.GreaterThan: "ge", sympy.Equality: "eq", sympy.Unequality: "ne"}


class _Builder:
    """Accumulates instructions; identical instructions are emitted once."""

    def __init__(self):
        self.ins: list[tuple] = []
        self._memo: dict[tuple, int] = {}

    def op(self, *ins) -> int:
        if ins[0] in ("st", "st2", "st2c", "ret"):
            self.ins.append(ins)
            return len(self.ins) - 1
        try:
            return self._memo[ins]
        except KeyError:
            self.ins.append(ins)
            k = self._memo[ins] = len(self.ins) - 1
            return k

    def const(self, x: float) -> int:
        return self.op("const", float(x))


class _Translator:
    """sympy expression -> instructions, with symbols bound to loads/arguments/values."""

    def __init__(self, b: _Builder, bind: dict):
        self.b = b
        self.bind = bind          # sympy Symbol -> instruction index (or a thunk)
        self._memo: dict = {}

    def sym(self, s):
        v = self.bind.get(s)
        if v is None:
            raise Unsupported(f"unbound symbol {s}")
        if callable(v):
            v = self.bind[s] = v()
        return v

    def __call__(self, e) -> int:
        try:
            return self._memo[e]
        except KeyError:
            pass
        v = self._memo[e] = self._expr(e)
        return v

    def _fold(self, op: str, args) -> int:
        """``op(op(a0, a1), a2) ...`` over an n-ary sympy node's arguments."""
        acc = self(args[0])
        for a in args[1:]:
            acc = self.b.op(op, acc, self(a))
        return acc

    def _expr(self, e) -> int:
        b = self.b
        if e.is_Symbol:
            return self.sym(e)
        if e.is_Number:
            if e.is_infinite or e is sympy.nan:
                return b.const(float(e))
            return b.const(float(e))
        if e is sympy.pi or e is sympy.E:
            return b.const(float(e))
        if e is sympy.true or e is sympy.false:
            return b.op("bool", int(bool(e)))
        if e.is_Add:
            pos, neg = [], []
            for a in e.args:
                c, rest = a.as_coeff_Mul()
                if c.is_Number and c < 0:
                    neg.append(-a)
                else:
                    pos.append(a)
            acc = self(pos[0]) if pos else b.op("neg", self(neg.pop(0)))
            for a in pos[1:]:
                acc = b.op("add", acc, self(a))
            for a in neg:
                acc = b.op("sub", acc, self(a))
            return acc
        if e.is_Mul:
            c, rest = e.as_coeff_Mul()
            if c.is_Number and c < 0:
                return b.op("neg", self(-e))
            num, den = [], []
            for a in e.args:
                bb, ex = a.as_base_exp()
                if ex.is_Number and ex < 0 and not (a.is_Number):
                    den.append(bb if ex == -1 else bb ** (-ex))
                elif a.is_Rational and not a.is_Integer and a.p == 1:
                    den.append(sympy.Integer(a.q))
                else:
                    num.append(a)
            acc = self(num[0]) if num else b.const(1.0)
            for a in num[1:]:
                acc = b.op("mul", acc, self(a))
            if den:
                d = self(den[0])
                for a in den[1:]:
                    d = b.op("mul", d, self(a))
                acc = b.op("div", acc, d)
            return acc
        if e.is_Pow:
            base, ex = e.as_base_exp()
            x = self(base)
            if ex.is_Integer:
                k = int(ex)
                if k == 0:
                    return b.const(1.0)
                if 1 <= abs(k) <= 4:
                    acc = x
                    for _ in range(abs(k) - 1):
                        acc = b.op("mul", acc, x)
                    return acc if k > 0 else b.op("div", b.const(1.0), acc)
            if ex == sympy.Rational(1, 2):
                return b.op("sqrt", x)
            if ex == sympy.Rational(-1, 2):
                return b.op("div", b.const(1.0), b.op("sqrt", x))
            return b.op("pow", x, self(ex))
        if isinstance(e, (sympy.Min, sympy.Max)):
            return self._fold("min" if isinstance(e, sympy.Min) else "max", e.args)
        if isinstance(e, sympy.Piecewise):
            acc = b.const(float("nan"))
            for ex, cond in reversed(e.args):
                if cond is sympy.true:
                    acc = self(ex)
                else:
                    acc = b.op("select", self(cond), self(ex), acc)
            return acc
        if isinstance(e, sympy.Function):
            f = type(e)
            if f in _UNARY and len(e.args) == 1:
                return b.op(_UNARY[f], self(e.args[0]))
            if f is sympy.Heaviside:
                x = self(e.args[0])
                h0 = float(e.args[1]) if len(e.args) > 1 else 0.5
                zero = b.const(0.0)
                at0 = b.op("select", b.op("eq", x, zero), b.const(h0), zero)
                return b.op("select", b.op("gt", x, zero), b.const(1.0), at0)
            if f is sympy.sign:
                x = self(e.args[0])
                zero = b.const(0.0)
                neg = b.op("select", b.op("lt", x, zero), b.const(-1.0), zero)
                return b.op("select", b.op("gt", x, zero), b.const(1.0), neg)
            raise Unsupported(f"function {f.__name__}")
        if type(e) in _REL:
            return b.op(_REL[type(e)], self(e.args[0]), self(e.args[1]))
        if isinstance(e, (sympy.And, sympy.Or)):
            return self._fold("and" if isinstance(e, sympy.And) else "or", e.args)
        if isinstance(e, sympy.Not):
            return b.op("not", self(e.args[0]))
        raise Unsupported(f"{type(e).__name__}")


def program(reps, targets, red, *, loads: dict, scalars: dict | None = None,
            stores_after: list | None = None) -> tuple:
    """Instructions for CSE output ``reps``/``red`` stored into ``targets``.

    Parameters
    ----------
    reps, red : from :func:`sympy.cse` (common subexpressions, reduced expressions).
    targets : per reduced expression, ``(arg_index, flat_index)`` of the store, or
        ``(arg_index, flat_index, (add_arg, add_index))`` to add a loaded value first.
    loads : sympy Symbol -> ``(arg_index, flat_index)`` of the array element it names.
    scalars : sympy Symbol -> scalar argument index (e.g. time ``t``).
    stores_after : extra ``(dst_arg, dst_index, src_arg, src_index)`` copies appended.

    Raises :class:`Unsupported` for expressions the backend does not cover.
    """
    b = _Builder()
    bind: dict = {}
    for s, (k, i) in loads.items():
        bind[s] = (lambda k=k, i=i: b.op("ld", k, i))
    for s, k in (scalars or {}).items():
        bind[s] = (lambda k=k: b.op("arg", k))
    tr = _Translator(b, bind)
    for s, e in reps:
        bind[s] = tr(e)
    for tgt, e in zip(targets, red):
        v = tr(e)
        if len(tgt) == 3:
            v = b.op("add", v, b.op("ld", *tgt[2]))
        b.op("st", tgt[0], tgt[1], v)
    for dk, di, sk, si in stores_after or []:
        b.op("st", dk, di, b.op("ld", sk, si))
    return tuple(b.ins)


def lu_programs(plan) -> tuple[tuple, tuple]:
    """Straight-line sparse LU of ``c·I − J`` (args ``jv, c, lu``) and the in-place
    solve of row ``r`` of ``B`` (args ``lu, B, r``), for a :class:`~.codegen.LUPlan`.

    The factorisation stores reciprocal pivots and returns ``min |pivot| / c > 1e-10``
    (the caller then falls back to the dense pivoting LU)."""
    s = plan.slots
    b = _Builder()
    cur: dict[int, int] = {}
    jac_of = {slot: k for k, slot in enumerate(plan.jac_slot)}
    diag = set(plan.diag_slot)
    c = b.op("arg", 1)
    zero = b.const(0.0)
    for slot in range(len(s)):
        base = b.op("neg", b.op("ld", 0, jac_of[slot])) if slot in jac_of else zero
        cur[slot] = b.op("add", base, c) if slot in diag else base
    smallest = None
    piv = None
    for op in plan.ops:
        if op[0] == "piv":
            dk = s[(op[1], op[1])]
            a = b.op("fabs", cur[dk])
            smallest = a if smallest is None else b.op("min", smallest, a)
            piv = cur[dk] = b.op("div", b.const(1.0), cur[dk])
        elif op[0] == "scale":
            cur[s[op[1]]] = b.op("mul", cur[s[op[1]]], piv)
        else:
            ij, ik, kj = s[op[1]], s[op[2]], s[op[3]]
            cur[ij] = b.op("sub", cur[ij], b.op("mul", cur[ik], cur[kj]))
    for slot in range(len(s)):
        b.op("st", 2, slot, cur[slot])
    ratio = b.op("div", smallest, c) if smallest is not None else b.const(1.0)
    b.op("ret", b.op("gt", ratio, b.const(1e-10)))
    factor = tuple(b.ins)

    b = _Builder()
    z = _solve_values(b, plan, [b.op("ld2", 1, 2, i) for i in range(plan.n)], 0)
    for i in range(plan.n):
        b.op("st2", 1, 2, i, z[i])
    return factor, tuple(b.ins)


def _solve_values(b: _Builder, plan, rhs_vals: list[int], lu_arg: int) -> list[int]:
    """Solve ``M z = rhs`` with the factors in array ``lu_arg`` on values in registers."""
    n = plan.n
    x = [rhs_vals[o] for o in plan.perm]
    w = []
    for i in range(n):
        acc = x[i]
        for sl, k in plan.lower[i]:
            acc = b.op("sub", acc, b.op("mul", b.op("ld", lu_arg, sl), w[k]))
        w.append(acc)
    z = [None] * n
    for i in reversed(range(n)):
        acc = w[i]
        for sl, j in plan.upper[i]:
            acc = b.op("sub", acc, b.op("mul", b.op("ld", lu_arg, sl), z[j]))
        z[i] = b.op("mul", acc, b.op("ld", lu_arg, plan.diag_slot[i]))
    out = [None] * n
    for k, o in enumerate(plan.perm):
        out[o] = z[k]
    return out


#: Arguments of the unrolled Rosenbrock step (see :func:`step_program`).
STEP_ARGS = ("t", "h", "y", "p", "u", "f0", "dT", "lu", "K", "ynew", "rtol", "atol")


def step_program(tab, plan, ysyms, psyms, reps, red, has_t: bool) -> tuple:
    """One whole Rosenbrock step, unrolled: every stage's right-hand side and sparse
    solve on values held in registers (args :data:`STEP_ARGS`).

    Stage ``s`` solves ``W K_s = f(t + c_s h, y + Σ A[s,j] K_j) + u + h d_s f_t
    + Σ C[s,j] K_j / h`` with the factors of ``W = I/(hγ) − J`` in ``lu``; the stages
    are stored in ``K`` (for dense output), the new solution in ``ynew``, and the
    scaled RMS error estimate ``K_last / (atol + rtol·max(|y|, |ynew|))`` is returned.
    """
    T, H, Y, P, U, F0, DT, LU, K, YNEW, RTOL, ATOL = range(12)
    n = len(ysyms)
    b = _Builder()
    t = b.op("arg", T)
    h = b.op("arg", H)
    hinv = b.op("div", b.const(1.0), h)
    y = [b.op("ld", Y, i) for i in range(n)]
    u = [b.op("ld", U, i) for i in range(n)]
    dT = [b.op("ld", DT, i) for i in range(n)] if has_t else None
    pbind = {s_: (lambda j=j: b.op("ld", P, j)) for j, s_ in enumerate(psyms)}
    A, C, c, d = tab.A, tab.C, tab.c, tab.d
    ks: list[list[int]] = []
    ytmp = y
    for st in range(tab.stages):
        if st == 0:
            du = [b.op("ld", F0, i) for i in range(n)]
        else:
            ytmp = []
            for i in range(n):
                acc = y[i]
                for j in range(st):
                    if A[st, j] != 0.0:
                        acc = b.op("add", acc, b.op("mul", b.const(A[st, j]), ks[j][i]))
                ytmp.append(acc)
            ts = b.op("add", t, b.op("mul", b.const(c[st]), h)) if c[st] != 0.0 else t
            bind = dict(pbind)
            bind.update(zip(ysyms, ytmp))
            bind[TIME] = ts
            tr = _Translator(b, bind)
            for s_, e in reps:
                bind[s_] = tr(e)
            du = [b.op("add", tr(e), u[i]) for i, e in enumerate(red)]
        rhs_vals = []
        hd = b.op("mul", h, b.const(d[st])) if (has_t and d[st] != 0.0) else None
        for i in range(n):
            acc = du[i]
            if hd is not None:
                acc = b.op("add", acc, b.op("mul", hd, dT[i]))
            cc = None
            for j in range(st):
                if C[st, j] != 0.0:
                    term = b.op("mul", b.const(C[st, j]), ks[j][i])
                    cc = term if cc is None else b.op("add", cc, term)
            if cc is not None:
                acc = b.op("add", acc, b.op("mul", cc, hinv))
            rhs_vals.append(acc)
        kst = _solve_values(b, plan, rhs_vals, LU)
        for i in range(n):
            b.op("st2c", K, st, i, kst[i])
        ks.append(kst)
    rtol = b.op("arg", RTOL)
    err = b.const(0.0)
    last = ks[-1]
    for i in range(n):
        yn = b.op("add", ytmp[i], last[i])
        b.op("st", YNEW, i, yn)
        sc = b.op("add", b.op("ld", ATOL, i),
                  b.op("mul", rtol, b.op("max", b.op("fabs", y[i]), b.op("fabs", yn))))
        e = b.op("div", last[i], sc)
        err = b.op("add", err, b.op("mul", e, e))
    b.op("ret", b.op("sqrt", b.op("div", err, b.const(float(n)))))
    return tuple(b.ins)


# ----------------------------------------------------------------- numba side
def kernel(name: str, prog: tuple, nargs: int):
    """An ``@intrinsic`` executing ``prog`` on its ``nargs`` arguments (arrays, floats, ints).

    It returns ``v`` (bool or float) if the program ends with ``("ret", v)``, else nothing.
    Call it from an ``@njit`` function (whose fast-math flags then apply)."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    returns = bool(prog) and prog[-1][0] == "ret"
    ret_bool = returns and prog[prog[-1][1]][0] in ("lt", "le", "gt", "ge", "eq", "ne", "and",
                                                    "or", "not", "bool")
    dbl = ir.DoubleType()
    i64 = ir.IntType(64)

    def codegen(context, builder, sig, args):
        arrays = {}   # arg -> (data pointer, row length (C 2-D), byte strides or None)
        for k, ty in enumerate(sig.args):
            if isinstance(ty, types.Array):
                ary = context.make_array(ty)(context, builder, args[k])
                row = cgutils.unpack_tuple(builder, ary.shape)[1] if ty.ndim == 2 else None
                contiguous = ty.layout == "C" or (ty.ndim == 1 and ty.layout == "F")
                strides = None if contiguous else cgutils.unpack_tuple(builder, ary.strides)
                arrays[k] = (ary.data, row, strides)
        mod = builder.module
        fns: dict[str, object] = {}

        def intr(nm):
            if nm not in fns:
                fns[nm] = mod.declare_intrinsic(f"llvm.{nm}", [dbl])
            return fns[nm]

        def addr(k, i, r=None):
            data, row, strides = arrays[k]
            idx = ir.Constant(i64, i)
            if strides is not None:  # a strided view: byte offsets
                off = builder.mul(idx, strides[-1])
                if r is not None:
                    rr = r if isinstance(r, ir.Constant) else args[r]
                    off = builder.add(off, builder.mul(rr, strides[0]))
                raw = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [off])
                return builder.bitcast(raw, data.type)
            if r is not None:
                rr = r if isinstance(r, ir.Constant) else args[r]
                idx = builder.add(builder.mul(rr, row), idx)
            return builder.gep(data, [idx])

        v: list = [None] * len(prog)
        ret = None
        cmp = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "=="}
        for n, ins in enumerate(prog):
            op = ins[0]
            if op == "ld":
                v[n] = builder.load(addr(ins[1], ins[2]))
            elif op == "ld2":
                v[n] = builder.load(addr(ins[1], ins[3], ins[2]))
            elif op == "st":
                builder.store(v[ins[3]], addr(ins[1], ins[2]))
            elif op == "st2":
                builder.store(v[ins[4]], addr(ins[1], ins[3], ins[2]))
            elif op == "st2c":
                builder.store(v[ins[4]], addr(ins[1], ins[3], ir.Constant(i64, ins[2])))
            elif op == "arg":
                a = args[ins[1]]
                v[n] = builder.sitofp(a, dbl) if isinstance(a.type, ir.IntType) else a
            elif op == "const":
                v[n] = ir.Constant(dbl, ins[1])
            elif op == "add":
                v[n] = builder.fadd(v[ins[1]], v[ins[2]])
            elif op == "sub":
                v[n] = builder.fsub(v[ins[1]], v[ins[2]])
            elif op == "mul":
                v[n] = builder.fmul(v[ins[1]], v[ins[2]])
            elif op == "div":
                v[n] = builder.fdiv(v[ins[1]], v[ins[2]])
            elif op == "neg":
                v[n] = builder.fneg(v[ins[1]])
            elif op == "pow":
                f = fns.get("pow") or fns.setdefault(
                    "pow", mod.declare_intrinsic("llvm.pow", [dbl]))
                v[n] = builder.call(f, [v[ins[1]], v[ins[2]]])
            elif op in ("exp", "log", "log10", "sqrt", "fabs", "floor", "ceil", "sin", "cos"):
                v[n] = builder.call(intr(op), [v[ins[1]]])
            elif op in cmp:
                v[n] = builder.fcmp_ordered(cmp[op], v[ins[1]], v[ins[2]])
            elif op == "ne":
                v[n] = builder.fcmp_unordered("!=", v[ins[1]], v[ins[2]])
            elif op == "and":
                v[n] = builder.and_(v[ins[1]], v[ins[2]])
            elif op == "or":
                v[n] = builder.or_(v[ins[1]], v[ins[2]])
            elif op == "not":
                v[n] = builder.not_(v[ins[1]])
            elif op == "bool":
                v[n] = ir.Constant(ir.IntType(1), ins[1])
            elif op == "select":
                v[n] = builder.select(v[ins[1]], v[ins[2]], v[ins[3]])
            elif op == "min":   # Python: min(a, b) = b if b < a else a
                a, b_ = v[ins[1]], v[ins[2]]
                v[n] = builder.select(builder.fcmp_ordered("<", b_, a), b_, a)
            elif op == "max":   # Python: max(a, b) = b if b > a else a
                a, b_ = v[ins[1]], v[ins[2]]
                v[n] = builder.select(builder.fcmp_ordered(">", b_, a), b_, a)
            elif op == "ret":
                ret = v[ins[1]]
            else:  # pragma: no cover - programs come from this module
                raise ValueError(f"{name}: unknown instruction {op!r}")
        return ret if returns else context.get_dummy_value()

    def typer(typingctx, *args):
        rt = (types.boolean if ret_bool else types.float64) if returns else types.none
        return rt(*args), codegen

    typing = _FIXED_ARITY[nargs](typer)
    typing.__name__ = typing.__qualname__ = f"{name}_kernel"
    return intrinsic(typing)


# intrinsic() reads the typing function's signature, so it needs fixed arity (no *args).
_FIXED_ARITY = {
    1: lambda ty: lambda typingctx, a0: ty(typingctx, a0),
    2: lambda ty: lambda typingctx, a0, a1: ty(typingctx, a0, a1),
    3: lambda ty: lambda typingctx, a0, a1, a2: ty(typingctx, a0, a1, a2),
    4: lambda ty: lambda typingctx, a0, a1, a2, a3: ty(typingctx, a0, a1, a2, a3),
    5: lambda ty: lambda typingctx, a0, a1, a2, a3, a4: ty(typingctx, a0, a1, a2, a3, a4),
    6: lambda ty: lambda typingctx, a0, a1, a2, a3, a4, a5: ty(typingctx, a0, a1, a2, a3, a4, a5),
    12: lambda ty: lambda typingctx, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11: ty(
        typingctx, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11),
}


# --------------------------------------------------------------- reference semantics
def interpret(prog: tuple, args: list):
    """Run ``prog`` in Python on ``args`` (numpy arrays and scalars) — the reference
    semantics of the instruction set, used to test programs without numba."""
    import math

    def pymin(a, b):
        return b if b < a else a

    def pymax(a, b):
        return b if b > a else a

    unary = {"neg": lambda a: -a, "exp": math.exp, "log": math.log, "log10": math.log10,
             "sqrt": math.sqrt, "fabs": abs, "floor": math.floor, "ceil": math.ceil,
             "sin": math.sin, "cos": math.cos, "not": lambda a: not a}
    binary = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
              "mul": lambda a, b: a * b, "div": lambda a, b: a / b if b != 0 else
              math.copysign(math.inf, a) * math.copysign(1.0, b) if a != 0 else math.nan,
              "pow": lambda a, b: a ** b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
              "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "eq": lambda a, b: a == b,
              "ne": lambda a, b: a != b, "and": lambda a, b: a and b,
              "or": lambda a, b: a or b, "min": pymin, "max": pymax}
    v: list = [None] * len(prog)
    for n, ins in enumerate(prog):
        op = ins[0]
        if op == "ld":
            v[n] = float(args[ins[1]][ins[2]])
        elif op == "ld2":
            v[n] = float(args[ins[1]][int(args[ins[2]]), ins[3]])
        elif op == "st":
            args[ins[1]][ins[2]] = v[ins[3]]
        elif op == "st2":
            args[ins[1]][int(args[ins[2]]), ins[3]] = v[ins[4]]
        elif op == "st2c":
            args[ins[1]][ins[2], ins[3]] = v[ins[4]]
        elif op == "arg":
            v[n] = float(args[ins[1]])
        elif op == "const":
            v[n] = ins[1]
        elif op == "bool":
            v[n] = bool(ins[1])
        elif op == "select":
            v[n] = v[ins[2]] if v[ins[1]] else v[ins[3]]
        elif op in unary:
            v[n] = unary[op](v[ins[1]])
        elif op in binary:
            v[n] = binary[op](v[ins[1]], v[ins[2]])
        elif op == "ret":
            return v[ins[1]]
        else:
            raise ValueError(f"unknown instruction {op!r}")
    return None
