"""The LLVM-IR kernels (immunoode.llvmgen) against sympy evaluating the same expressions."""

import math

import numpy as np
import pytest
import sympy
from numba import njit

from immunoode import llvmgen
from immunoode.expr import TIME

y0, y1, p0 = sympy.symbols("y_0 y_1 p_0", real=True)

EXPRS = [
    y0 * p0 + y1 ** 2 - 3 * y0 / (1 + y1) + sympy.Rational(1, 3),
    sympy.exp(-p0 * y0) * sympy.log(1 + y1 ** 2) + sympy.sqrt(y1 ** 2 + 1),
    y0 ** 3 - y1 ** -2 + y0 ** sympy.Float(2.7) + y1 ** p0 - 1 / sympy.sqrt(1 + y0 ** 2),
    sympy.Min(y0, y1, p0) + sympy.Max(y0, 2 * y1) + sympy.Abs(y0 - y1),
    sympy.Heaviside(y0 - 0.5) + sympy.Heaviside(y0 - y0, sympy.Rational(1, 4)) + sympy.sign(y1 - 1),
    sympy.Piecewise((y0, sympy.And(y0 > 0.3, y1 <= 2)), (y1, sympy.Or(y0 < -1, sympy.Not(y1 > 0))),
                    (p0 * y0, True)),
    sympy.floor(3 * y0) + sympy.ceiling(y1) + sympy.sin(y0) * sympy.cos(y1) + sympy.pi - sympy.E,
    TIME * y0 + sympy.Piecewise((1.0, sympy.Eq(y1, 1)), (2.0, sympy.Ne(y0, y1)), (3.0, True)),
    -y0 * y1 / p0 - 2 * y1 + y0 ** 4 * y1 ** -1,
]


def _reference(e, y, p, t):
    return float(e.subs({y0: y[0], y1: y[1], p0: p[0], TIME: t}).evalf(30))


@pytest.fixture(scope="module")
def compiled():
    reps, red = sympy.cse(EXPRS, symbols=sympy.numbered_symbols("x"), optimizations=None)
    prog = llvmgen.program(reps, [(3, k) for k in range(len(red))], red,
                           loads={y0: (1, 0), y1: (1, 1), p0: (2, 0)}, scalars={TIME: 0})
    kern = llvmgen.kernel("test_exprs", prog, 4)

    @njit(error_model="numpy")
    def run(t, y, p, out):
        kern(t, y, p, out)

    return prog, run


@pytest.mark.parametrize("seed", range(8))
def test_kernel_matches_sympy_and_interpreter(compiled, seed):
    prog, run = compiled
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.05, 2.5, 2)
    if seed == 0:
        y[:] = [0.5, 1.0]   # the equality branches and Heaviside at 0
    p = rng.uniform(0.2, 2.0, 1)
    t = float(rng.uniform(0, 10))
    out = np.full(len(EXPRS), np.nan)
    run(t, y, p, out)
    ref = np.array([_reference(e, y, p, t) for e in EXPRS])
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    out2 = np.full(len(EXPRS), np.nan)
    llvmgen.interpret(prog, [t, y, p, out2])
    np.testing.assert_allclose(out2, ref, rtol=1e-12, atol=1e-12)


def test_python_min_max_semantics_with_nan(compiled):
    # Python's min(a, b) is b if b < a else a: with a NaN the first argument wins
    b = llvmgen._Builder()
    a = b.op("ld", 0, 0)
    c = b.op("ld", 0, 1)
    b.op("st", 1, 0, b.op("min", a, c))
    b.op("st", 1, 1, b.op("max", a, c))
    kern = llvmgen.kernel("test_minmax", tuple(b.ins), 2)

    @njit
    def run(x, out):
        kern(x, out)

    for x in ([math.nan, 1.0], [1.0, math.nan], [2.0, 1.0]):
        out = np.empty(2)
        run(np.array(x), out)
        want = [min(*x), max(*x)]
        np.testing.assert_array_equal(out, want)


def test_unsupported_function_is_reported():
    with pytest.raises(llvmgen.Unsupported):
        llvmgen.program([], [(1, 0)], [sympy.tanh(y0)], loads={y0: (0, 0)})


def test_model_with_unsupported_function_falls_back(tmp_path):
    # tanh has no LLVM intrinsic here: the rhs is printed as Python for numba instead
    import immunoode as im

    b = im.ModelBuilder("tanh_decay", time_unit="day")
    b.add_state("x", 1.0, "1")
    b.add_parameter("k", 0.5, "1/day")
    b.add_ode("x", "-k * x * (1 + tanh(x))")
    m = b.build()
    cm = im.compile_model(m, directory=tmp_path)
    assert "def rhs(t, y, p, u, out):\n    " in cm.path.read_text()
    assert "_K_rhs" not in cm.path.read_text()
    ds_nb = im.simulate(cm, t_end=5, rtol=1e-10, atol=1e-12)
    ds_sp = im.simulate(cm, t_end=5, method="Radau", rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ds_nb.x.values, ds_sp.x.values, rtol=1e-6)


def test_strided_views_are_read_and_written_correctly(compiled):
    # a column of a C-ordered array is a strided view: the kernel must honour strides
    prog, run = compiled
    rng = np.random.default_rng(11)
    Y = rng.uniform(0.1, 2.0, (2, 5))
    P = rng.uniform(0.2, 2.0, (1, 3))
    OUT = np.full((len(EXPRS), 4), np.nan)
    run(1.5, Y[:, 3], P[:, 1], OUT[:, 2])
    ref = np.array([_reference(e, Y[:, 3], P[:, 1], 1.5) for e in EXPRS])
    np.testing.assert_allclose(OUT[:, 2], ref, rtol=1e-12, atol=1e-12)
    assert np.isnan(OUT[:, [0, 1, 3]]).all()
