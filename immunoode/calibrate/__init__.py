"""Calibration: fit population and mechanistic parameters to clinical rates
(:mod:`.targets`, :mod:`.likelihood`, :mod:`.vpop`, adaptive cohorts in :mod:`.adapt`,
:mod:`.fit`, :mod:`.report`, optional posterior sampling in :mod:`.posterior`) and to
concentration/tumor-size time courses (:mod:`.timecourse`).

Submodules are imported on use, so ``import immunoode.calibrate`` stays cheap.
"""

from __future__ import annotations

__all__ = ["load_targets", "load_fit", "run_fit", "write_fit_outputs", "Likelihood",
           "Cohort", "PopulationModel"]


def __getattr__(name):
    if name == "load_targets":
        from .targets import load_targets
        return load_targets
    if name in ("load_fit", "run_fit"):
        from . import fit
        return getattr(fit, name)
    if name == "write_fit_outputs":
        from .report import write_fit_outputs
        return write_fit_outputs
    if name == "Likelihood":
        from .likelihood import Likelihood
        return Likelihood
    if name in ("Cohort", "PopulationModel"):
        from . import vpop
        return getattr(vpop, name)
    raise AttributeError(f"module 'immunoode.calibrate' has no attribute {name!r}")
