"""Stage 7 — reading several lesions at each simulated scan (multi-lesion sweeps).

Consumes one patient's measured lesion sizes scan by scan (mm, 0 below the detection
limit; a lymph node measured by its short axis); produces what a clinician reads at the
scan: RECIST 1.1 progression on the sum of diameters, new lesions and non-target lesions,
and the progression pattern (which lesions progress, oligo vs systemic).

The rules are those of :func:`immunoode.recist.assess_recist` and
:func:`immunoode.resistance.progression_pattern` (targets chosen at baseline with
:func:`immunoode.recist.select_targets`), so the first progression seen here is the first
RECIST PD of the final assessment, with the same pattern.  After a progression the scan
becomes the new reference: the nadirs restart from it and the lesions that were new at it
are followed from then on as non-target lesions (a policy that continues treatment beyond
progression is then told of the *next* progression, not of the same one again).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..recist import select_targets

__all__ = ["LesionReading", "LesionTracker"]

_TOL = 1e-9


def _pd_rule(value, nadir, rel: float, abs_mm: float):
    """RECIST growth rule: ``value - nadir >= rel * nadir`` and ``>= abs_mm`` (mm)."""
    inc = value - nadir
    return (inc >= rel * nadir - _TOL) & (inc >= abs_mm - _TOL)


@dataclass(frozen=True)
class LesionReading:
    """One scan of one patient.

    Attributes
    ----------
    sod_mm : [mm] sum of the target lesions' diameters (short axis for nodes).
    progression : RECIST 1.1 progression (target sum, new lesion or non-target growth).
    pattern : ``"none"``, ``"oligo"`` or ``"systemic"``.
    progressing : 1-based indices of the progressing lesions (empty without progression).
    new : 1-based indices of the lesions that are new at this scan.
    """

    sod_mm: float
    progression: bool
    pattern: str
    progressing: tuple
    new: tuple


class LesionTracker:
    """RECIST 1.1 reading of one patient's lesions, scan by scan.

    Parameters
    ----------
    baseline_mm : (lesion,) [mm] measured sizes at the baseline scan (0 = absent / not seen).
    is_node : (lesion,) lymph node (short axis; measurable from 15 mm, new from 10 mm).
    organ : (lesion,) organ ids (:func:`immunoode.lesions.site_index`).
    nontarget_pd, max_targets, max_targets_per_organ : as :func:`~immunoode.recist.assess_recist`.
    oligo_max_lesions, oligo_max_organs, lesion_pd_rel, lesion_pd_abs : as
        :func:`~immunoode.resistance.progression_pattern`.
    """

    def __init__(self, baseline_mm, is_node, organ, *, nontarget_pd: bool = True,
                 max_targets: int = 5, max_targets_per_organ: int = 2, oligo_max_lesions: int = 3,
                 oligo_max_organs: int = 2, lesion_pd_rel: float = 0.20, lesion_pd_abs: float = 5.0):
        base = np.asarray(baseline_mm, float)
        self.is_node = np.asarray(is_node, bool)
        self.organ = np.asarray(organ, np.int64)
        detected = base > 0
        measurable = detected & np.where(self.is_node, base >= 15.0 - _TOL, base >= 10.0 - _TOL)
        self.target = select_targets(base[None, :], self.is_node[None, :], self.organ[None, :],
                                     measurable[None, :], max_total=max_targets,
                                     max_per_organ=max_targets_per_organ)[0]
        self.known = detected.copy()
        self.nontarget = detected & ~self.target & (~self.is_node | (base >= 10.0 - _TOL))
        self.nontarget_pd = bool(nontarget_pd)
        self.oligo = (int(oligo_max_lesions), int(oligo_max_organs))
        self.lesion_rule = (float(lesion_pd_rel), float(lesion_pd_abs))
        self.baseline_sod = float(base[self.target].sum())
        self.sod_nadir = self.baseline_sod
        self.nt_nadir = float(base[self.nontarget].sum())
        self.les_nadir = base.copy()

    @property
    def measurable(self) -> bool:
        """The patient has at least one target lesion."""
        return bool(self.target.any())

    def read(self, meas_mm) -> LesionReading:
        """Read a follow-up scan (sizes in mm, 0 below detection); does not change the state."""
        m = np.asarray(meas_mm, float)
        sod = float(m[self.target].sum())
        t_pd = self.measurable and bool(_pd_rule(sod, self.sod_nadir, 0.20, 5.0))
        nt_pd = False
        if self.nontarget_pd and self.nontarget.any():
            nt_pd = bool(_pd_rule(float(m[self.nontarget].sum()), self.nt_nadir, 0.20, 5.0))
        new = ~self.known & (m > 0) & np.where(self.is_node, m >= 10.0 - _TOL, True)
        prog = t_pd or nt_pd or bool(new.any())
        if not prog:
            return LesionReading(sod, False, "none", (), ())
        followed = self.target | self.nontarget
        inc = m - self.les_nadir
        rel, abs_mm = self.lesion_rule
        grew = followed & _pd_rule(m, self.les_nadir, rel, abs_mm) & (m > 0)
        lp = grew | new
        if not lp.any():  # PD of the sum without one lesion passing the rule: every grower
            lp = followed & (inc > _TOL)
        n_org = len(set(self.organ[lp].tolist()))
        pattern = "oligo" if (lp.sum() <= self.oligo[0] and n_org <= self.oligo[1]) else "systemic"
        return LesionReading(sod, True, pattern, tuple(int(j) + 1 for j in np.flatnonzero(lp)),
                             tuple(int(j) + 1 for j in np.flatnonzero(new)))

    def update(self, meas_mm, reading: LesionReading) -> None:
        """Advance past a scan: nadirs fall; after a progression the scan is the new reference."""
        m = np.asarray(meas_mm, float)
        if reading.progression:
            for j in reading.new:  # followed from now on (non-target)
                self.known[j - 1] = True
                self.nontarget[j - 1] = True
            self.sod_nadir = float(m[self.target].sum())
            self.nt_nadir = float(m[self.nontarget].sum())
            self.les_nadir = m.copy()
        else:
            self.sod_nadir = min(self.sod_nadir, reading.sod_mm)
            self.nt_nadir = min(self.nt_nadir, float(m[self.nontarget].sum()))
            self.les_nadir = np.minimum(self.les_nadir, m)
