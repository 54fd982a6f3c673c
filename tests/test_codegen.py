"""Generated code against independent references (numpy's dense LU, sympy)."""

import numpy as np
import pytest
import sympy

from immunoode import codegen, llvmgen


def _load(plan):
    """The generated LU programs, run by the reference interpreter (no numba)."""
    fac, sol = llvmgen.lu_programs(plan)
    return {"lu_factor": lambda jv, c, lu: llvmgen.interpret(fac, [jv, c, lu]),
            "lu_solve": lambda lu, B, r: llvmgen.interpret(sol, [lu, B, r])}


@pytest.mark.parametrize("seed", range(25))
def test_sparse_lu_matches_dense_solve(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 14))
    rows, cols = np.nonzero(rng.random((n, n)) < 0.35)
    if len(rows) == 0:
        rows, cols = np.array([0]), np.array([n - 1])
    plan = codegen.sparse_lu_plan(n, list(rows), list(cols))
    ns = _load(plan)
    jv = rng.standard_normal(len(rows))
    c = float(rng.uniform(0.5, 5.0))
    M = c * np.eye(n)
    M[rows, cols] -= jv
    lu = np.empty(len(plan.slots))
    ok = ns["lu_factor"](jv, c, lu)
    B = rng.standard_normal((3, n))
    ref = np.linalg.solve(M, B[2])
    ns["lu_solve"](lu, B, 2)
    if ok:
        np.testing.assert_allclose(B[2], ref, rtol=1e-8, atol=1e-10)


def test_small_pivot_is_reported():
    # J = [[c, 0], [0, 0]] makes the first pivot c - c = 0: the factorisation must say so
    plan = codegen.sparse_lu_plan(2, [0, 0], [0, 1])
    ns = _load(plan)
    with np.errstate(divide="ignore"):  # the zero pivot's reciprocal is inf, as in numba
        assert not ns["lu_factor"](np.array([2.0, 1.0]), 2.0, np.empty(len(plan.slots)))


def test_hoisting_keeps_values():
    p0, p1, p2, y0 = sympy.symbols("p_0 p_1 p_2 y_0", real=True)
    exprs = [p0 * p1 * y0 / (p2 + y0) + p1 ** p2, sympy.exp(-p0 / p2) * y0]
    hot, defs = codegen.hoist_parameter_terms(exprs, (p0, p1, p2), 3)
    assert defs and all(e.free_symbols <= {p0, p1, p2} for _, e in defs)
    vals = {p0: 0.3, p1: 1.7, p2: 2.2, y0: 0.9}
    full = {**vals, **{s: e.subs(vals) for s, e in defs}}
    for a, b in zip(exprs, hot):
        assert float(a.subs(vals)) == pytest.approx(float(b.subs(full)), rel=1e-14)
