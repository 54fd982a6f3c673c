"""Rosenbrock tableaus in the transformed ("Rodas") form used by the integrator.

Stage ``s`` (0-based) solves ``(I/(hγ) − J) K_s = f(t + c_s h, y + Σ_j A[s,j] K_j)
+ h d_s ∂f/∂t + Σ_j C[s,j] K_j / h``; the new solution is the last stage point
plus ``K_last`` and ``K_last`` is the error estimate (stiffly accurate, the
embedded solution is the last stage point).  Dense output:
``y(θ) = (1−θ) y0 + θ (y1 + (1−θ)(D_0 + θ (D_1 + θ D_2 …)))`` with
``D_r = Σ_j H[r,j] K_j``.

Coefficients (numbers, not code) as published:
* Rodas4 — Hairer & Wanner, *Solving ODEs II* (2nd ed., 1996), §VI.4 (RODAS).
* Rodas5P — Steinebach, "Construction of Rosenbrock–Wanner method Rodas5P and
  numerical benchmarks within the Julia Differential Equations package",
  BIT Numer. Math. 63 (2023) 27; values as tabulated in OrdinaryDiffEq.jl.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tableau", "TABLEAUS"]


@dataclass(frozen=True)
class Tableau:
    name: str
    order: int          # order of the method
    error_order: int    # order of the embedded solution
    gamma: float
    A: np.ndarray       # (S, S) strictly lower: stage points
    C: np.ndarray       # (S, S) strictly lower: Jacobian-free coupling terms
    c: np.ndarray       # (S,) stage times
    d: np.ndarray       # (S,) ∂f/∂t coefficients
    H: np.ndarray       # (R, S) dense-output coefficients

    @property
    def stages(self) -> int:
        return self.A.shape[0]


def _lower(rows, s):
    M = np.zeros((s, s))
    for i, r in enumerate(rows, start=1):
        M[i, :len(r)] = r
    return M


_r4a5 = [1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950]
RODAS4 = Tableau(
    "rodas4", 4, 3, 0.25,
    A=_lower([[1.544], [0.9466785280815826, 0.2557011698983284],
              [3.314825187068521, 2.896124015972201, 0.9986419139977817],
              _r4a5, _r4a5 + [1.0]], 6),
    C=_lower([[-5.6688], [-2.430093356833875, -0.2063599157091915],
              [-0.1073529058151375, -9.594562251023355, -20.47028614809616],
              [7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160],
              [8.083246795921522, -7.981132988064893, -31.52159432874371, 16.31930543123136,
               -6.058818238834054]], 6),
    c=np.array([0.0, 0.386, 0.21, 0.63, 1.0, 1.0]),
    d=np.array([0.25, -0.1043, 0.1035, -0.03620000000000023, 0.0, 0.0]),
    H=np.array([[10.12623508344586, -7.487995877610167, -34.80091861555747, -7.992771707568823,
                 1.025137723295662, 0.0],
                [-0.6762803392801253, 6.087714651680015, 16.43084320892478, 24.76722511418386,
                 -6.594389125716872, 0.0]]),
)

_r5a6 = [-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256,
         0.030198172008377946]
RODAS5P = Tableau(
    "rodas5p", 5, 4, 0.21193756319429014,
    A=_lower([[3.0], [2.849394379747939, 0.45842242204463923],
              [-6.954028509809101, 2.489845061869568, -10.358996098473584],
              [2.8029986275628964, 0.5072464736228206, -0.3988312541770524, -0.04721187230404641],
              _r5a6, _r5a6 + [1.0], _r5a6 + [1.0, 1.0]], 8),
    C=_lower([[-14.155112264123755],
              [-17.97296035885952, -2.859693295451294],
              [147.12150275711716, -1.41221402718213, 71.68940251302358],
              [165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306],
              [24.854864614690072, -3.0009227002832186, 47.4931110020768, 5.5814197821558125,
               -0.6610691825249471],
              [30.91273214028599, -3.1208243349937974, 77.79954646070892, 34.28646028294783,
               -19.097331116725623, -28.087943162872662],
              [37.80277123390563, -3.2571969029072276, 112.26918849496327, 66.9347231244047,
               -40.06618937091002, -54.66780262877968, -9.48861652309627]], 8),
    c=np.array([0.0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716,
                0.4288403609558664, 1.0, 1.0, 1.0]),
    d=np.array([0.21193756319429014, -0.42387512638858027, -0.3384627126235924,
                1.8046452872882734, 2.325825639765069, 0.0, 0.0, 0.0]),
    H=np.array([[25.948786856663858, -2.5579724845846235, 10.433815404888879, -2.3679251022685204,
                 0.524948541321073, 1.1241088310450404, 0.4272876194431874, -0.17202221070155493],
                [-9.91568850695171, -0.9689944594115154, 3.0438037242978453, -24.495224566215796,
                 20.176138334709044, 15.98066361424651, -6.789040303419874, -6.710236069923372],
                [11.419903575922262, 2.8879645146136994, 72.92137995996029, 80.12511834622643,
                 -52.072871366152654, -59.78993625266729, -0.15582684282751913,
                 4.883087185713722]]),
)

TABLEAUS = {t.name: t for t in (RODAS4, RODAS5P)}


def tableau_source(tab: Tableau) -> str:
    """Python source defining the tableau constants the integrator template uses."""
    def arr(a):
        return "np.array(" + repr(np.asarray(a).tolist()) + ")"
    return "\n".join([
        f"# Rosenbrock tableau: {tab.name} (order {tab.order}, embedded {tab.error_order})",
        f"_NS = {tab.stages}",
        f"_NH = {tab.H.shape[0]}",
        f"_GAMMA = {float(tab.gamma)!r}",
        f"_ERR_EXP = {-1.0 / (tab.error_order + 1)!r}",
        f"_A = {arr(tab.A)}",
        f"_C = {arr(tab.C)}",
        f"_CS = {arr(tab.c)}",
        f"_DS = {arr(tab.d)}",
        f"_H = {arr(tab.H)}",
        "",
    ])

