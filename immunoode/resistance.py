"""SITC resistance classes and the progression pattern at first progression.

Both read the Dataset returned by :func:`immunoode.recist.assess_recist` and work
on whole arrays of patients.

SITC (Kluger 2020; ``shared/clinical/definitions.md`` §3.5), times in days from
``t_start``; ``6 months`` = ``benefit_days`` (182.625), ``6 weeks`` =
``min_exposure_days`` (42), ``12 weeks`` = ``off_treatment_days`` (84):

* no measurable disease → ``not_evaluable``;
* PD more than 12 weeks after the last dose (``stop_time``) → ``progression_after_stop``;
* PD on treatment or ≤ 12 weeks after the last dose:

  - ``rule="duration"`` (default, §3.2/§3.5): benefit = time from start to PD;
    BOR PD or benefit < 6 months → ``primary`` (needs exposure ≥ 6 weeks, or PD
    while on drug); benefit ≥ 6 months → ``secondary`` (needs exposure ≥ 6 months);
  - ``rule="bor"`` (SITC table 1 literally): BOR PD, or SD with benefit < 6 months
    → ``primary``; BOR CR/PR, or SD with benefit ≥ 6 months → ``secondary`` (needs
    exposure ≥ 6 months);
  - exposure requirement not met → ``not_evaluable``;
* no PD and PD-free follow-up ≥ 6 months with BOR CR/PR/SD → ``durable_benefit``;
  otherwise ``not_evaluable`` (censored too early).

``pd="recist"`` uses the first RECIST PD (unconfirmed, as most publications);
``pd="irecist"`` uses only iRECIST-confirmed PD (iCPD), dated at its iUPD scan —
the switchable "confirmatory scan" of the SITC table.

Progression pattern at the first RECIST PD: a lesion progresses if it is a new
lesion detected at that scan, or a baseline lesion whose size rose by ≥
``lesion_pd_rel`` (20 %) and ≥ ``lesion_pd_abs`` (5 mm) over its own nadir of the
earlier scans (a lesion that reappears from 0 mm counts).  If no single lesion
qualifies (diffuse growth), every lesion that grew at all counts.  Oligo-progression:
≤ ``max_lesions`` progressing lesions in ≤ ``max_organs`` organs; otherwise systemic.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["classify_sitc", "progression_pattern", "SITC_CLASSES", "PATTERNS"]

SITC_CLASSES = ("not_evaluable", "primary", "secondary", "progression_after_stop", "durable_benefit")
PATTERNS = ("none", "oligo", "systemic")
_TOL = 1e-9


def _pp(x, P, name):
    if x is None:
        return np.full(P, np.inf)
    a = np.asarray(x, dtype=float)
    if a.ndim == 0:
        a = np.full(P, float(a))
    if a.shape != (P,):
        raise ValueError(f"{name} must be a scalar or have shape (patient,)=({P},), got {a.shape}")
    return np.where(np.isnan(a), np.inf, a)


def classify_sitc(rec: xr.Dataset, *, stop_time=None, pd: str = "recist", rule: str = "duration",
                  min_exposure_days: float = 42.0, benefit_days: float = 182.625,
                  off_treatment_days: float = 84.0) -> xr.Dataset:
    """SITC resistance class per patient.

    ``stop_time``: time of the last dose (absolute, same clock as the scan times),
    scalar or (patient,); None/NaN/inf = still on treatment at the end of follow-up.
    Returns a Dataset with ``sitc`` (labels :data:`SITC_CLASSES`), ``exposure``,
    ``benefit`` (start → PD, or PD-free follow-up), ``pd_off_treatment`` (days from
    last dose to PD, ≤ 0 on treatment; NaN without PD or without a stop time).
    """
    if pd not in ("recist", "irecist"):
        raise ValueError(f"pd must be 'recist' or 'irecist', got {pd!r}")
    if rule not in ("duration", "bor"):
        raise ValueError(f"rule must be 'duration' or 'bor', got {rule!r}")
    P = rec.sizes["patient"]
    t0 = rec["t_start"].values
    stop = _pp(stop_time, P, "stop_time")
    bor = rec["bor"].values
    if pd == "recist":
        has_pd = rec["progressed"].values
        t_pd = rec["pd_time"].values
    else:
        if "ipfs_event" not in rec:
            raise ValueError("pd='irecist' needs assess_recist(..., irecist=True)")
        has_pd = rec["ipfs_event"].values
        t_pd = np.where(has_pd, rec["ipfs_time"].values + t0, np.nan)
    t_last = rec["last_scan_time"].values
    t_end = np.where(has_pd, t_pd, t_last)
    exposure = np.minimum(stop, t_end) - t0
    benefit = t_end - t0
    gap = np.where(has_pd, t_pd - stop, np.nan)
    on_drug = has_pd & (gap <= _TOL)
    near = has_pd & (gap <= off_treatment_days + _TOL)

    ctl = np.isin(bor, ("CR", "PR", "SD"))
    long_b = benefit >= benefit_days - _TOL
    if rule == "duration":
        prim_like = (bor == "PD") | ~long_b | ~ctl
    else:
        prim_like = (bor == "PD") | ((bor == "SD") & ~long_b) | ~ctl
    prim = near & prim_like & ((exposure >= min_exposure_days - _TOL) | on_drug)
    sec = near & ~prim_like & (exposure >= benefit_days - _TOL)

    cls = np.zeros(P, np.int8)
    cls[prim] = 1
    cls[sec] = 2
    cls[has_pd & ~near] = 3
    cls[~has_pd & ctl & long_b] = 4
    cls[~rec["measurable"].values] = 0
    out = xr.Dataset({
        "sitc": ("patient", np.asarray(SITC_CLASSES)[cls]),
        "exposure": ("patient", exposure),
        "benefit": ("patient", benefit),
        "pd_off_treatment": ("patient", np.where(np.isfinite(stop), gap, np.nan)),
    }, coords={"patient": rec["patient"].values})
    out.attrs.update(sitc_pd=pd, sitc_rule=rule, min_exposure_days=float(min_exposure_days),
                     benefit_days=float(benefit_days), off_treatment_days=float(off_treatment_days))
    return out


def progression_pattern(rec: xr.Dataset, *, max_lesions: int = 3, max_organs: int = 2,
                        lesion_pd_rel: float = 0.20, lesion_pd_abs: float = 5.0) -> xr.Dataset:
    """Oligo- vs systemic progression at the first RECIST PD, and which sites progressed.

    Returns ``pattern`` (``none``/``oligo``/``systemic``), ``n_progressing_lesions``,
    ``n_progressing_organs``, ``lesion_progressing`` (patient, lesion) and
    ``site_progressed`` (patient, site).
    """
    size = rec["lesion_size"].values            # (P, L, S)
    P, L, S = size.shape
    has_pd = rec["progressed"].values
    k = np.where(has_pd, rec["pd_scan"].values, 0)
    valid = np.isfinite(rec["scan_time"].values)
    ix = np.arange(P)
    before = (np.arange(S)[None, :] < k[:, None]) & valid          # (P, S)
    nadir = np.where(before[:, None, :], size, np.inf).min(axis=2)  # (P, L)
    nadir = np.where(np.isfinite(nadir), nadir, 0.0)
    now = size[ix, :, k]                                            # (P, L)
    base_les = (rec["is_target"].values | rec["is_nontarget"].values)
    inc = now - nadir
    grew = base_les & (inc >= lesion_pd_rel * nadir - _TOL) & (inc >= lesion_pd_abs - _TOL) & (now > 0)
    new_now = rec["new_lesion_detected"].values[ix, :, k]
    prog = (grew | new_now) & has_pd[:, None]
    none = has_pd & ~prog.any(axis=1)
    prog |= none[:, None] & base_les & (inc > _TOL)

    organ = rec["organ"].values
    n_sites = int(max(rec.attrs.get("n_sites", 0), organ.max() + 1 if organ.size else 0))
    site_prog = np.zeros((P, n_sites), bool)
    for s in range(n_sites):  # loop over sites, not patients
        site_prog[:, s] = (prog & (organ == s)).any(axis=1)
    n_les = prog.sum(axis=1)
    n_org = site_prog.sum(axis=1)
    pat = np.where(~has_pd, 0, np.where((n_les <= max_lesions) & (n_org <= max_organs), 1, 2))
    coords = {"patient": rec["patient"].values, "lesion": rec["lesion"].values}
    if "site" in rec.coords and rec.sizes.get("site", -1) == n_sites:
        coords["site"] = rec["site"].values
    else:
        coords["site"] = np.arange(n_sites)
    out = xr.Dataset({
        "pattern": ("patient", np.asarray(PATTERNS)[pat]),
        "n_progressing_lesions": ("patient", n_les.astype(np.int16)),
        "n_progressing_organs": ("patient", n_org.astype(np.int16)),
        "lesion_progressing": (("patient", "lesion"), prog),
        "site_progressed": (("patient", "site"), site_prog),
    }, coords=coords)
    out.attrs.update(oligo_max_lesions=int(max_lesions), oligo_max_organs=int(max_organs),
                     lesion_pd_rel=float(lesion_pd_rel), lesion_pd_abs=float(lesion_pd_abs))
    return out
