"""Compile a symbolic model to fast functions, cached on disk by content hash.

:func:`compile_model` derives the right-hand side, Jacobian, ``∂f/∂t`` and the
record (assignments, observables) with sympy, prints two backends

* ``numpy``: array code vectorised over many parameter sets (columns), and
* ``numba``: scalar code plus a Rosenbrock integrator (:mod:`immunoode.solvers.rosenbrock`),
  compiled to machine code,

and writes both to the cache directory (``$IMMUNOODE_CACHE_DIR``, else
``$XDG_CACHE_HOME/immunoode``, else ``~/.cache/immunoode``) under a name made
from the model's structure hash and the generator's own hash.  A second process
(or a Dask worker) imports the files and loads numba's cached machine code
instead of compiling again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import codegen, llvmgen
from ._version import __version__
from .errors import ModelError
from .solvers.tableaus import TABLEAUS, tableau_source

__all__ = ["CompiledModel", "compile_model", "cache_dir"]

_TEMPLATE = Path(__file__).parent / "solvers" / "rosenbrock.py"
_TABLEAUS = Path(__file__).parent / "solvers" / "tableaus.py"
_MARKER = "# --- template begins ---"
_LOADED: dict[str, object] = {}   # per-process memo of imported generated modules


def cache_dir() -> Path:
    """Directory of generated code and numba's machine-code cache."""
    env = os.environ.get("IMMUNOODE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "immunoode"


def _generator_hash() -> str:
    h = hashlib.sha256(__version__.encode())
    for f in (_TEMPLATE, _TABLEAUS, Path(codegen.__file__), Path(llvmgen.__file__), Path(__file__)):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".py")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _byte_compile(path: Path) -> None:
    """Write the .pyc next to a generated module (read later even where
    PYTHONDONTWRITEBYTECODE forbids Python to write it itself): saves re-parsing
    thousands of generated lines in every new process."""
    import py_compile
    try:
        py_compile.compile(str(path), cfile=importlib.util.cache_from_source(str(path)),
                           doraise=True)
    except (OSError, py_compile.PyCompileError):  # an optimisation only
        pass


def _import(path: Path, name: str):
    if name in _LOADED:
        return _LOADED[name]
    if not Path(importlib.util.cache_from_source(str(path))).exists():
        _byte_compile(path)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _LOADED[name] = mod
    return mod


@dataclass
class CompiledModel:
    """A model with compiled right-hand side, Jacobian, record and solver.

    Attributes
    ----------
    model : the :class:`~immunoode.model.Model`.
    numba : generated module with ``rhs, jac, dfdt, record, integrate, integrate_many``.
    method : the compiled Rosenbrock method (``"rodas5p"`` or ``"rodas4"``).
    numpy : generated module with vectorised ``rhs, jac, dfdt, record, initial``.
    compile_time : seconds spent in :func:`compile_model` (derivation, codegen, machine code).
    cache_hit : True when the generated code came from the on-disk cache.
    timings : seconds per phase.
    """

    model: object
    numba: object
    numpy: object
    key: str
    compile_time: float
    cache_hit: bool
    path: Path
    timings: dict = field(default_factory=dict)
    method: str = "rodas5p"
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, kind: str, key, make, size: int = 16):
        """Small per-model cache of derived, immutable things (events, coordinates, hashes)."""
        table = self._memo.setdefault(kind, {})
        try:
            return table[key]
        except KeyError:
            pass
        except TypeError:  # unhashable key: no caching
            return make()
        if len(table) >= size:
            table.pop(next(iter(table)))
        value = table[key] = make()
        return value

    @property
    def state_names(self) -> tuple[str, ...]:
        return self.model.state_names

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return self.model.parameter_names

    @property
    def record_names(self) -> tuple[str, ...]:
        return tuple(self.numpy.RECORD_NAMES)

    @property
    def jac_pattern(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns of the structurally non-zero Jacobian entries."""
        return np.asarray(self.numpy.JAC_ROWS), np.asarray(self.numpy.JAC_COLS)

    # --------------------------------------------------------- conveniences
    def parameter_vector(self, overrides=None) -> np.ndarray:
        """Nominal parameters (model order) with ``overrides`` (name -> value) applied."""
        if not overrides:
            nominal = self.memo("nominal", None, lambda: np.array(
                [self.model.parameter_values[k] for k in self.parameter_names], dtype=float))
            return nominal.copy()
        vals = self.model.parameter_values
        for k, v in (overrides or {}).items():
            if k not in vals:
                from .model import _suggest
                raise ModelError(f"unknown parameter{_suggest(k, vals)}", section="parameters", item=k)
            vals[k] = float(v)
        return np.array([vals[k] for k in self.parameter_names], dtype=float)

    def extended_parameters(self, p) -> np.ndarray:
        """Parameters followed by the derived parameter-only terms the compiled code uses."""
        pe = np.empty(self.numba.N_PE)
        self.numba.derive_params(np.asarray(p, dtype=float), pe)
        return pe

    def initial_state(self, p) -> np.ndarray:
        """Initial states for parameter vector(s) ``p`` (n_params,) or (n_params, N)."""
        p = np.asarray(p, dtype=float)
        out = np.empty((len(self.state_names),) + p.shape[1:])
        return self.numpy.initial(p, out)

    def rhs(self, t, y, p, backend: str = "numpy") -> np.ndarray:
        """dy/dt at ``(t, y)``; ``y``, ``p`` may carry a trailing batch axis (numpy backend)."""
        y = np.asarray(y, dtype=float)
        p = np.asarray(p, dtype=float)
        if backend == "numba":
            out = np.empty_like(y)
            self.numba.rhs(float(t), y, self.extended_parameters(p), np.zeros_like(y), out)
            return out
        out = np.empty(y.shape)
        return self.numpy.rhs(t, y, p, out)

    def jacobian(self, t, y, p, backend: str = "numpy") -> np.ndarray:
        """Dense Jacobian ∂f/∂y (n, n) at one point."""
        y = np.asarray(y, dtype=float)
        p = np.asarray(p, dtype=float)
        rows, cols = self.jac_pattern
        if backend == "numba":
            vals = np.empty(max(len(rows), 1))
            self.numba.jac(float(t), y, self.extended_parameters(p), vals)
        else:
            vals = self.numpy.jac(t, y, p, np.empty(max(len(rows), 1)))
        J = np.zeros((len(y), len(y)))
        J[rows, cols] = vals[: len(rows)]
        return J

    def record(self, t, y, p) -> np.ndarray:
        """States, assignments and observables (``record_names``) at one or many points."""
        y = np.asarray(y, dtype=float)
        p = np.asarray(p, dtype=float)
        out = np.empty((len(self.record_names),) + np.broadcast_shapes(y.shape[1:], p.shape[1:]))
        return self.numpy.record(t, y, p, out)


def _header(model, d, plan, key) -> str:
    lines = [
        f"# Generated by immunoode {__version__} for model {model.name!r}; key {key}.",
        "# Do not edit: regenerated when the model's equations or immunoode change.",
        "import math",
        "import numpy as np",
        "from numba import njit",
        "",
        f"N_STATES = {len(d.ysyms)}",
        f"N_PARAMS = {len(d.psyms)}",
        f"N_PE = {len(d.psyms) + len(d.derived or [])}",
        f"N_RECORD = {len(d.record_names)}",
        f"NNZ = {len(d.jac)}",
        f"NLU = {len(plan.slots) if plan else 0}",
        f"HAS_T = {bool(d.has_t)}",
        f"HAS_SPARSE_LU = {plan is not None}",
        f"JAC_ROWS = np.array({list(d.jac_rows) or [0]}, dtype=np.int64)",
        f"JAC_COLS = np.array({list(d.jac_cols) or [0]}, dtype=np.int64)",
        f"STATE_NAMES = {tuple(d.state_names)!r}",
        f"PARAM_NAMES = {tuple(d.param_names)!r}",
        f"RECORD_NAMES = {tuple(d.record_names)!r}",
        "",
    ]
    return "\n".join(lines)


def compile_model(model, *, method: str = "rodas5p", cache: bool = True, directory=None,
                  warm: bool = True) -> CompiledModel:
    """Compile ``model`` (or load it from the on-disk cache).

    Parameters
    ----------
    model : :class:`~immunoode.model.Model`.
    method : compiled integrator, ``"rodas5p"`` (default) or ``"rodas4"``.
    cache : reuse generated code and machine code from ``directory``.
    directory : cache location (default :func:`cache_dir`).
    warm : trigger numba compilation / cache loading now, so that the first
        simulation is not charged for it (``compile_time`` then includes it).
    """
    t0 = time.perf_counter()
    timings = {}
    if method not in TABLEAUS:
        raise ValueError(f"unknown compiled method {method!r}; choose one of {', '.join(TABLEAUS)}")
    key = f"{model.structure_hash()[:20]}_{method}_{_generator_hash()}"
    root = Path(directory) if directory is not None else cache_dir()
    nb_path = root / f"m_{key}.py"
    np_path = root / f"np_{key}.py"
    hit = cache and nb_path.exists() and np_path.exists()
    if not hit:
        ts = time.perf_counter()
        d = codegen.derive(model)
        timings["derive"] = time.perf_counter() - ts
        ts = time.perf_counter()
        plan = None
        if d.jac:
            plan = codegen.sparse_lu_plan(len(d.ysyms), d.jac_rows, d.jac_cols)
            if plan.n_ops > codegen.MAX_SPARSE_LU_OPS:
                plan = None
        header = _header(model, d, plan, key)
        template = _TEMPLATE.read_text(encoding="utf-8").split(_MARKER, 1)[1]
        tab = TABLEAUS[method]
        nb_src = header + tableau_source(tab) + codegen.numba_source(d, plan, tab) + "\n" + template
        np_src = header.replace("from numba import njit", "import numpy") + \
            codegen.numpy_source(d)
        timings["codegen"] = time.perf_counter() - ts
        _atomic_write(np_path, np_src)
        _atomic_write(nb_path, nb_src)
    ts = time.perf_counter()
    np_mod = _import(np_path, f"immunoode_gen_np_{key}")
    nb_mod = _import(nb_path, f"immunoode_gen_{key}")
    timings["import"] = time.perf_counter() - ts
    cm = CompiledModel(model, nb_mod, np_mod, key, 0.0, bool(hit), nb_path, timings, method)
    if warm:
        ts = time.perf_counter()
        _warm(cm)
        timings["machine_code"] = time.perf_counter() - ts
    cm.compile_time = time.perf_counter() - t0
    return cm


def _warm(cm: CompiledModel) -> None:
    """Call the compiled kernels once on a trivial problem (compiles or loads from cache)."""
    n = len(cm.state_names)
    p = cm.parameter_vector()[None, :]
    y0 = np.zeros((1, n))
    t = np.array([0.0, 0.0])
    ev = np.full((1, 1), np.inf)
    sel = np.arange(min(1, n), dtype=np.int64)
    out = np.empty((1, len(sel), 2))
    info = np.empty((1, 8))
    status = np.empty(1, dtype=np.int64)
    cm.numba.integrate_many(y0, p, t, ev, np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64),
                            np.zeros((1, 1)), sel, 1e-6, np.full(n, 1e-9), 10, np.inf, out, info,
                            status)
