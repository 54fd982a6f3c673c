"""RECIST 1.1 and iRECIST time-point and best-overall response, vectorised over patients.

Input: lesion sizes of shape ``(patient, lesion, scan)`` in mm — the longest
diameter of a non-nodal lesion, the **short axis** of a lymph node — plus
per-lesion flags (``is_node``, ``organ`` id, ``at_baseline``) and scan times in
days.  Scan 0 is the baseline scan.  All work is numpy over the patient axis;
the only Python loops run over scans (iRECIST state) or are tiny (≤ lesions²).

Rules (see ``docs/virtual-trials.md`` and ``shared/clinical/definitions.md``):

* a lesion is detected when its measured size is ≥ ``detect_mm`` (default 5 mm,
  the RECIST "too small to measure" size); below that it counts as 0 mm (gone);
* targets at baseline: measurable (non-node LD ≥ 10 mm, node short axis ≥ 15 mm),
  largest first, ≤ 2 per organ, ≤ 5 in total; non-targets: the other baseline
  lesions (nodes only if short axis ≥ 10 mm);
* new lesion: a lesion absent at baseline that is detected later (a node only
  with short axis ≥ 10 mm);
* SoD = Σ target sizes; target CR = every non-nodal target gone and every nodal
  target < 10 mm; PR: SoD ≤ 0.7·SoD0; PD: SoD − nadir ≥ 0.2·nadir **and** ≥ 5 mm
  where nadir is the smallest SoD of the *earlier* scans (baseline included);
* non-target "unequivocal progression" (implementation choice, switchable): the
  non-target sum rises ≥ 20 % and ≥ 5 mm over its own earlier nadir;
* time point: PD if target PD, new lesion or non-target PD; CR if target CR,
  non-targets gone (nodes < 10 mm) and no new lesion; target CR with residual
  non-target disease → PR; patients without target lesions get NE unless PD;
* RECIST PD is not confirmed: the first PD scan ends the RECIST assessment
  (later scans are ``NA``);
* confirmation (``confirm=True``): a CR (PR) at scan k counts only if the first
  scan ≥ ``confirm_days`` later shows CR (CR or PR);
* BOR: CR > PR (confirmed if required) > SD (any non-PD time point ≥
  ``min_sd_days`` after ``t_start``) > PD > NE;
* iRECIST: the first PD is iUPD; at a scan ≥ ``confirm_days`` later it becomes
  iCPD if the SoD rose ≥ 5 mm more than at iUPD (increases add up), another new
  lesion appeared, the new-lesion sum rose ≥ 5 mm, or non-target disease
  increased further; otherwise it stays iUPD while the PD criteria still hold,
  and resets (iSD/iPR/iCR, a later PD is a new iUPD) when they no longer do.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["assess_recist", "volume_to_diameter", "diameter_to_volume", "select_targets",
           "RESPONSES", "IRESPONSES"]

#: per-scan / best response labels (``NA`` = not assessed: baseline, missing scan, after PD)
RESPONSES = ("NA", "CR", "PR", "SD", "PD", "NE")
IRESPONSES = ("NA", "iCR", "iPR", "iSD", "iUPD", "iCPD", "NE")
NA, CR, PR, SD, PD, NE = range(6)
iUPD, iCPD, iNE = 4, 5, 6

#: bit flags of ``pd_by``: what made the first PD
PD_TARGET, PD_NEW, PD_NONTARGET = 1, 2, 4

_TOL = 1e-9


def volume_to_diameter(volume_mm3):
    """Diameter (mm) of a sphere of the given volume (mm³): ``d = (6 V / π)^(1/3)``."""
    v = np.asarray(volume_mm3, dtype=float)
    return np.cbrt(6.0 * np.clip(v, 0.0, None) / np.pi)


def diameter_to_volume(diameter_mm):
    """Volume (mm³) of a sphere of the given diameter (mm): ``V = π d³ / 6``."""
    d = np.asarray(diameter_mm, dtype=float)
    return np.pi * d ** 3 / 6.0


def _per_lesion(x, P, L, name, dtype):
    if x is None:
        return None
    a = np.asarray(x, dtype=dtype)
    if a.ndim == 1:
        if a.shape != (L,):
            raise ValueError(f"{name} must have shape (lesion,)={L} or (patient, lesion)=({P}, {L}), got {a.shape}")
        a = np.broadcast_to(a, (P, L))
    elif a.shape != (P, L):
        raise ValueError(f"{name} must have shape (lesion,)={L} or (patient, lesion)=({P}, {L}), got {a.shape}")
    return a


def _per_patient(x, P, name, default=None):
    if x is None:
        return default
    a = np.asarray(x, dtype=float)
    if a.ndim == 0:
        return np.full(P, float(a))
    if a.shape != (P,):
        raise ValueError(f"{name} must be a scalar or have shape (patient,)=({P},), got {a.shape}")
    return a


def select_targets(baseline_mm, is_node, organ, eligible, *, max_total=5, max_per_organ=2):
    """Pick target lesions: largest first, ≤ ``max_per_organ`` per organ, ≤ ``max_total``.

    All arguments are ``(patient, lesion)`` arrays; returns a boolean array.
    """
    P, L = baseline_mm.shape
    key = np.where(eligible, baseline_mm, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")
    org_s = np.take_along_axis(organ, order, axis=1)
    el_s = np.take_along_axis(eligible, order, axis=1)
    before = np.tril(np.ones((L, L), dtype=bool), -1)  # [i, j]: j sorted before i
    same = (org_s[:, :, None] == org_s[:, None, :]) & before & el_s[:, None, :]
    rank_in_organ = same.sum(axis=2)
    cand = el_s & (rank_in_organ < max_per_organ)
    sel_s = cand & (np.cumsum(cand, axis=1) <= max_total)
    out = np.zeros((P, L), dtype=bool)
    np.put_along_axis(out, order, sel_s, axis=1)
    return out


def _pd_rule(value, nadir, rel, abs_mm):
    inc = value - nadir
    return (inc >= rel * nadir - _TOL) & (inc >= abs_mm - _TOL)


def assess_recist(sizes, times, *, is_node=None, organ=None, at_baseline=None, t_start=None,
                  death_time=None, detect_mm=5.0, confirm=False, confirm_days=28.0,
                  min_sd_days=42.0, nontarget_pd=True, irecist=True, noise_sd_mm=0.0,
                  noise_cv=0.0, seed=None, max_targets=5, max_targets_per_organ=2,
                  site_names=None) -> xr.Dataset:
    """Classify every patient's scans by RECIST 1.1 (and iRECIST).

    Parameters
    ----------
    sizes : (patient, lesion, scan) array, mm. LD for non-nodal lesions, short
        axis for lymph nodes; NaN or 0 = absent. Scan 0 is the baseline.
    times : (scan,) or (patient, scan) scan times in days; NaN = scan not done.
    is_node : (lesion,) or (patient, lesion) bool, lymph node (default False).
    organ : (lesion,) or (patient, lesion) int organ/site id (default: each lesion
        its own organ).  ``site_names[id]`` labels the ids.
    at_baseline : present at baseline (default: detected at scan 0).  Lesions not
        present at baseline are new lesions once detected.
    t_start : start of treatment (default: baseline scan time), scalar or (patient,).
    death_time : optional (patient,) time of death (NaN = alive); a death before
        PD is a PFS event.
    detect_mm : measured sizes below this are 0 (lesion gone / not detectable).
    confirm, confirm_days : CR/PR confirmation by a scan ≥ confirm_days later.
    min_sd_days : minimum time from ``t_start`` of a non-PD time point for BOR = SD.
    nontarget_pd : apply the non-target progression rule (else non-targets never cause PD).
    irecist : also compute iRECIST responses.
    noise_sd_mm, noise_cv, seed : optional measurement noise (additive sd in mm and
        relative cv) on every present lesion and scan, seeded.

    Returns
    -------
    xarray.Dataset with dims ``patient``, ``lesion``, ``scan``.
    """
    S_arr = np.asarray(sizes, dtype=float)
    if S_arr.ndim != 3:
        raise ValueError(f"sizes must have shape (patient, lesion, scan), got {S_arr.shape}")
    P, L, S = S_arr.shape
    if S < 2:
        raise ValueError("need a baseline scan and at least one follow-up scan")
    T = np.asarray(times, dtype=float)
    if T.ndim == 1:
        if T.shape != (S,):
            raise ValueError(f"times must have shape (scan,)=({S},) or (patient, scan), got {T.shape}")
        T = np.broadcast_to(T, (P, S))
    elif T.shape != (P, S):
        raise ValueError(f"times must have shape (scan,)=({S},) or (patient, scan)=({P}, {S}), got {T.shape}")
    valid = np.isfinite(T)
    if not valid[:, 0].all():
        raise ValueError("every patient needs a baseline scan (times[..., 0] finite)")
    Tv = np.where(valid, T, np.nan)
    run_max = np.fmax.accumulate(Tv, axis=1)
    if np.any(valid[:, 1:] & (T[:, 1:] <= run_max[:, :-1])):
        raise ValueError("scan times must increase")
    node = np.zeros((P, L), bool) if is_node is None else _per_lesion(is_node, P, L, "is_node", bool)
    org = (np.broadcast_to(np.arange(L), (P, L)) if organ is None
           else _per_lesion(organ, P, L, "organ", np.int64))
    if site_names is not None and org.size and int(org.max()) >= len(site_names):
        raise ValueError(f"organ id {int(org.max())} has no name in site_names ({len(site_names)} names)")
    if org.size and int(org.min()) < 0:
        raise ValueError("organ ids must be >= 0")
    t0 = _per_patient(t_start, P, "t_start", default=T[:, 0].copy())
    death = _per_patient(death_time, P, "death_time", default=np.full(P, np.nan))

    # ---- measurements ------------------------------------------------------------
    present = np.nan_to_num(S_arr, nan=0.0) > 0
    meas = np.nan_to_num(S_arr, nan=0.0)
    if noise_sd_mm or noise_cv:
        rng = np.random.default_rng(seed)
        eps = rng.standard_normal((2, P, L, S))
        meas = np.where(present, meas * (1.0 + noise_cv * eps[0]) + noise_sd_mm * eps[1], 0.0)
        meas = np.clip(meas, 0.0, None)
    meas = np.where(meas >= detect_mm, meas, 0.0)
    detected = meas > 0
    base = meas[:, :, 0]
    at_bl = detected[:, :, 0] if at_baseline is None else _per_lesion(at_baseline, P, L, "at_baseline", bool)

    # ---- baseline classification ---------------------------------------------------
    measurable = at_bl & np.where(node, base >= 15.0 - _TOL, base >= 10.0 - _TOL)
    target = select_targets(base, node, org, measurable, max_total=max_targets,
                            max_per_organ=max_targets_per_organ)
    nontarget = at_bl & ~target & (~node | (base >= 10.0 - _TOL))
    new_det = (~at_bl)[:, :, None] & detected & np.where(node[:, :, None], meas >= 10.0 - _TOL, True)
    new_det[:, :, 0] = False
    has_target = target.any(axis=1)
    has_nt = nontarget.any(axis=1)

    tgt3, nt3, node3 = target[:, :, None], nontarget[:, :, None], node[:, :, None]
    sod = np.where(tgt3, meas, 0.0).sum(axis=1)                       # (P, S)
    nt_sum = np.where(nt3, meas, 0.0).sum(axis=1)
    tcr = ~np.any(tgt3 & np.where(node3, meas >= 10.0 - _TOL, meas > 0), axis=1)
    ntcr = ~np.any(nt3 & np.where(node3, meas >= 10.0 - _TOL, meas > 0), axis=1)
    n_new = new_det.sum(axis=1)
    new_sum = np.where(new_det, meas, 0.0).sum(axis=1)

    def nadir_before(x):
        xx = np.where(valid, x, np.inf)
        run = np.minimum.accumulate(xx, axis=1)
        out = np.full_like(xx, np.inf)
        out[:, 1:] = run[:, :-1]
        return out

    nadir_prev = nadir_before(sod)
    sod0 = sod[:, :1]
    t_pd = _pd_rule(sod, nadir_prev, 0.20, 5.0) & has_target[:, None]
    nt_pd = (_pd_rule(nt_sum, nadir_before(nt_sum), 0.20, 5.0) & has_nt[:, None]) if nontarget_pd \
        else np.zeros((P, S), bool)
    new_any = n_new > 0
    is_pd = t_pd | nt_pd | new_any

    cat = np.full((P, S), SD, np.int8)                           # target category w/o PD
    cat[sod <= 0.7 * sod0 + _TOL] = PR
    cat[tcr & ntcr] = CR
    cat[tcr & ~ntcr] = PR
    cat[~has_target] = NE
    raw = np.where(is_pd, PD, cat).astype(np.int8)
    raw[:, 0] = NA
    raw[~valid] = NA

    # ---- RECIST: stop at first PD ------------------------------------------------------
    pd_mask = (raw == PD)
    has_pd = pd_mask.any(axis=1)
    k_pd = np.where(has_pd, pd_mask.argmax(axis=1), S)
    after = np.arange(S)[None, :] > k_pd[:, None]
    resp = np.where(after, NA, raw).astype(np.int8)
    ix = np.arange(P)
    kk = np.minimum(k_pd, S - 1)
    t_first_pd = np.where(has_pd, T[ix, kk], np.nan)
    pd_by = np.where(has_pd, (t_pd[ix, kk] * PD_TARGET) | (new_any[ix, kk] * PD_NEW)
                     | (nt_pd[ix, kk] * PD_NONTARGET), 0).astype(np.int8)

    # ---- confirmation -------------------------------------------------------------------
    is_cr, is_prl = resp == CR, (resp == CR) | (resp == PR)
    if confirm:
        Tm = np.where(valid, T, -np.inf)
        later = (Tm[:, None, :] >= T[:, :, None] + confirm_days - _TOL)  # [p, k, j]
        has_c = later.any(axis=2) & valid
        jc = later.argmax(axis=2)
        rc = np.take_along_axis(resp, jc, axis=1)
        conf_cr = is_cr & has_c & (rc == CR)
        conf_pr = is_prl & has_c & ((rc == CR) | (rc == PR))
    else:
        conf_cr, conf_pr = is_cr, is_prl
    nonpd = (resp == CR) | (resp == PR) | (resp == SD)
    sd_ok = (nonpd & (T - t0[:, None] >= min_sd_days - _TOL)).any(axis=1)
    bor = np.full(P, NE, np.int8)
    bor[has_pd] = PD
    bor[sd_ok] = SD
    bor[conf_pr.any(axis=1)] = PR
    bor[conf_cr.any(axis=1)] = CR
    bor[~has_target & ~has_pd] = NE

    resp_k = conf_pr.any(axis=1)
    k_resp = conf_pr.argmax(axis=1)
    t_resp = np.where(resp_k, T[ix, k_resp], np.nan)
    last_valid = S - 1 - np.argmax(valid[:, ::-1], axis=1)
    t_last = T[ix, last_valid]

    # ---- PFS / TTP / DoR -----------------------------------------------------------------
    ttp = np.where(has_pd, t_first_pd, t_last) - t0
    death_first = np.isfinite(death) & (~has_pd | (death < t_first_pd))
    pfs_type = np.where(death_first, 2, np.where(has_pd, 1, 0)).astype(np.int8)
    pfs_time = np.where(death_first, death, np.where(has_pd, t_first_pd, t_last)) - t0
    dor = np.where(resp_k, np.where(has_pd, t_first_pd, t_last) - t_resp, np.nan)

    pct = np.where(valid & (sod0 > 0), 100.0 * (sod - sod0) / np.where(sod0 > 0, sod0, 1.0), np.nan)
    upto = (np.arange(S)[None, :] <= k_pd[:, None]) & valid
    upto[:, 0] = False
    best_pct = np.nanmin(np.where(upto, pct, np.inf), axis=1)
    best_pct = np.where(np.isfinite(best_pct), best_pct, np.nan)

    lab = np.asarray(RESPONSES)
    nsite = int(org.max()) + 1 if org.size else 0
    data = {
        "response": (("patient", "scan"), lab[resp]),
        "sod": (("patient", "scan"), np.where(valid, sod, np.nan)),
        "pct_change": (("patient", "scan"), pct),
        "nadir": (("patient", "scan"), np.where(valid, np.minimum(nadir_prev, sod), np.nan)),
        "n_new_lesions": (("patient", "scan"), np.where(valid, n_new, 0).astype(np.int16)),
        "new_lesion_detected": (("patient", "lesion", "scan"), new_det),
        "lesion_size": (("patient", "lesion", "scan"), meas),
        "scan_time": (("patient", "scan"), Tv),
        "is_target": (("patient", "lesion"), target),
        "is_nontarget": (("patient", "lesion"), nontarget),
        "is_node": (("patient", "lesion"), np.asarray(node)),
        "organ": (("patient", "lesion"), np.asarray(org)),
        "at_baseline": (("patient", "lesion"), np.asarray(at_bl)),
        "measurable": ("patient", has_target),
        "baseline_sod": ("patient", sod[:, 0]),
        "bor": ("patient", lab[bor]),
        "best_pct_change": ("patient", best_pct),
        "progressed": ("patient", has_pd),
        "pd_scan": ("patient", np.where(has_pd, k_pd, -1)),
        "pd_time": ("patient", t_first_pd),
        "pd_by": ("patient", pd_by),
        "ttp": ("patient", ttp),
        "pfs_time": ("patient", pfs_time),
        "pfs_event": ("patient", pfs_type > 0),
        "pfs_event_type": ("patient", np.asarray(["censored", "progression", "death"])[pfs_type]),
        "response_time": ("patient", t_resp),
        "dor": ("patient", dor),
        "dor_event": ("patient", resp_k & has_pd),
        "t_start": ("patient", t0),
        "last_scan_time": ("patient", t_last),
    }
    if irecist:
        data.update(_irecist(cat, sod, nadir_prev, t_pd, nt_pd, nt_sum, n_new, new_sum, valid, T,
                             t0, t_last, confirm_days, min_sd_days, has_target))
    ds = xr.Dataset(data, coords={"patient": np.arange(P), "lesion": np.arange(L), "scan": np.arange(S)})
    if site_names is not None:
        ds = ds.assign_coords(site=("site", [str(s) for s in site_names]))
    ds.attrs.update(criteria="RECIST 1.1", detect_mm=float(detect_mm), confirm=int(bool(confirm)),
                    confirm_days=float(confirm_days), min_sd_days=float(min_sd_days),
                    nontarget_pd=int(bool(nontarget_pd)), noise_sd_mm=float(noise_sd_mm),
                    noise_cv=float(noise_cv), n_sites=max(nsite, len(site_names or ())),
                    seed=-1 if seed is None else int(seed))
    return ds


def _irecist(cat, sod, nadir_prev, t_pd, nt_pd, nt_sum, n_new, new_sum, valid, T, t0, t_last,
             confirm_days, min_sd_days, has_target):
    """iRECIST state machine, one vectorised step per scan."""
    P, S = sod.shape
    out = np.zeros((P, S), np.int8)
    in_u = np.zeros(P, bool)
    done = np.zeros(P, bool)
    ref_sod = np.zeros(P)
    ref_nnew = np.zeros(P, np.int64)
    ref_newsum = np.zeros(P)
    ref_nt = np.zeros(P)
    nt_trig = np.zeros(P, bool)
    t_u = np.full(P, np.nan)
    t_u_conf = np.full(P, np.nan)
    t_c = np.full(P, np.nan)
    t_u_first = np.full(P, np.nan)
    max_new = n_new[:, 0].copy()
    for k in range(1, S):
        v = valid[:, k] & ~done
        tk = T[:, k]
        crit = t_pd[:, k] | nt_pd[:, k] | (n_new[:, k] > 0)
        newnew = n_new[:, k] > max_new
        can_conf = in_u & v & (tk - t_u >= confirm_days - _TOL)
        further = ((sod[:, k] - ref_sod >= 5.0 - _TOL) | (n_new[:, k] > ref_nnew)
                   | (new_sum[:, k] - ref_newsum >= 5.0 - _TOL)
                   | (nt_trig & (nt_sum[:, k] > ref_nt + _TOL)) | (~nt_trig & nt_pd[:, k]))
        conf = can_conf & further
        still = in_u & v & ~conf & crit
        enter = ~in_u & v & (t_pd[:, k] | nt_pd[:, k] | newnew)
        lab = np.where(cat[:, k] == NE, iNE, cat[:, k])
        lab = np.where(conf, iCPD, np.where(still | enter, iUPD, lab))
        out[:, k] = np.where(v, lab, 0)
        # state update
        t_c = np.where(conf, tk, t_c)
        t_u_conf = np.where(conf, t_u, t_u_conf)
        done |= conf
        reset = in_u & v & ~conf & ~still
        in_u = (in_u & ~reset & ~conf) | enter
        ref_sod = np.where(enter, sod[:, k], ref_sod)
        ref_nnew = np.where(enter, n_new[:, k], ref_nnew)
        ref_newsum = np.where(enter, new_sum[:, k], ref_newsum)
        ref_nt = np.where(enter, nt_sum[:, k], ref_nt)
        nt_trig = np.where(enter, nt_pd[:, k], nt_trig)
        t_u = np.where(enter, tk, t_u)
        t_u_first = np.where(enter & np.isnan(t_u_first), tk, t_u_first)
        max_new = np.maximum(max_new, np.where(valid[:, k], n_new[:, k], 0))
    # iBOR (no confirmation of response): best time point before iCPD
    rank = np.array([99, 0, 1, 2, 3, 4, 98])  # NA, iCR, iPR, iSD, iUPD, iCPD, NE
    r = rank[out]
    early_sd = (out == SD) & (T - t0[:, None] < min_sd_days - _TOL)
    r = np.where(early_sd, 97, r)
    best = r.min(axis=1)
    inv = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5}
    ibor = np.full(P, iNE, np.int8)
    for rk, code in inv.items():
        ibor[best == rk] = code
    ibor[~has_target & ~done & (best > 4)] = iNE
    lab = np.asarray(IRESPONSES)
    ipfs = np.where(done, t_u_conf, t_last) - t0
    return {
        "iresponse": (("patient", "scan"), lab[out]),
        "ibor": ("patient", lab[ibor]),
        "iupd_time": ("patient", t_u_first),
        "icpd_time": ("patient", t_c),
        "ipfs_time": ("patient", ipfs),
        "ipfs_event": ("patient", done),
    }
