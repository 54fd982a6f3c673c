"""Response assessment in one call: RECIST 1.1 (+ iRECIST), SITC classes, progression pattern.

The rules live in :mod:`immunoode.recist` (time points, BOR, PFS, iRECIST) and
:mod:`immunoode.resistance` (SITC classes, oligo- vs systemic progression); this
module only chains them::

    ds = assess_response(sizes, times, is_node=..., organ=..., stop_time=...)
"""

from __future__ import annotations

import xarray as xr

from .recist import (IRESPONSES, RESPONSES, assess_recist, diameter_to_volume, select_targets,
                     volume_to_diameter)
from .resistance import PATTERNS, SITC_CLASSES, classify_sitc, progression_pattern

__all__ = ["assess_response", "assess_recist", "classify_sitc", "progression_pattern",
           "volume_to_diameter", "diameter_to_volume", "select_targets", "RESPONSES",
           "IRESPONSES", "SITC_CLASSES", "PATTERNS"]


def assess_response(sizes, times, *, stop_time=None, sitc_pd: str = "recist",
                    sitc_rule: str = "duration", min_exposure_days: float = 42.0,
                    benefit_days: float = 182.625, off_treatment_days: float = 84.0,
                    oligo_max_lesions: int = 3, oligo_max_organs: int = 2,
                    lesion_pd_rel: float = 0.20, lesion_pd_abs: float = 5.0,
                    **recist_options) -> xr.Dataset:
    """RECIST 1.1 + iRECIST + SITC + progression pattern for every patient.

    ``sizes`` (patient, lesion, scan) in mm and ``times`` as for
    :func:`~immunoode.recist.assess_recist`, which receives ``recist_options``
    (``is_node``, ``organ``, ``at_baseline``, ``t_start``, ``death_time``,
    ``detect_mm``, ``confirm``, ``min_sd_days``, noise, ``site_names`` ...).
    ``stop_time`` is the time of the last dose (None = on treatment throughout).
    """
    if sitc_pd == "irecist":
        recist_options.setdefault("irecist", True)
    rec = assess_recist(sizes, times, **recist_options)
    sitc = classify_sitc(rec, stop_time=stop_time, pd=sitc_pd, rule=sitc_rule,
                         min_exposure_days=min_exposure_days, benefit_days=benefit_days,
                         off_treatment_days=off_treatment_days)
    pat = progression_pattern(rec, max_lesions=oligo_max_lesions, max_organs=oligo_max_organs,
                              lesion_pd_rel=lesion_pd_rel, lesion_pd_abs=lesion_pd_abs)
    out = rec.copy()
    for part in (sitc, pat):
        for name, var in part.data_vars.items():
            out[name] = var
        out.attrs.update(part.attrs)
    return out
