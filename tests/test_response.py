"""RECIST 1.1, iRECIST, SITC classes and progression pattern against hand-built scans."""

import numpy as np
import pytest

from immunoode.recist import assess_recist, diameter_to_volume, select_targets, volume_to_diameter
from immunoode.resistance import classify_sitc, progression_pattern
from immunoode.response import assess_response

Q6W = [0.0, 42, 84, 126, 168, 210, 252, 294]


def one(lesions, times=None, **kw):
    """One patient: ``lesions`` is a list of size sequences (mm), one per lesion."""
    s = np.array(lesions, dtype=float)[None]
    t = Q6W[:s.shape[2]] if times is None else times
    return assess_recist(s, t, **kw)


def resp(ds, var="response"):
    return list(ds[var].values[0])


def bor(ds):
    return str(ds["bor"].values[0])


# ------------------------------------------------------------------------------ geometry
def test_volume_to_diameter_sphere():
    assert volume_to_diameter(np.pi / 6 * 1000.0) == pytest.approx(10.0)
    d = np.array([0.0, 3.0, 25.0, 86.0])
    np.testing.assert_allclose(volume_to_diameter(diameter_to_volume(d)), d)
    assert volume_to_diameter(-1.0) == 0.0


# ------------------------------------------------------------------------------ target selection
def test_measurability_and_lymph_node_short_axis():
    # lesion 0: node SA 15 -> target; 1: node SA 14 -> non-target; 2: node SA 9 -> normal (neither)
    # 3: non-node LD 10 -> target; 4: non-node LD 9 -> non-target
    ds = one([[15, 15], [14, 14], [9, 9], [10, 10], [9, 9]], is_node=[1, 1, 1, 0, 0],
             organ=[0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ds.is_target.values[0], [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(ds.is_nontarget.values[0], [0, 1, 0, 0, 1])
    assert ds.baseline_sod.values[0] == 25


def test_at_most_two_per_organ_and_five_in_total():
    sizes = [30, 25, 20, 40, 50, 45, 11, 12, 60]
    organ = [0, 0, 0, 0, 1, 1, 1, 2, 3]
    ds = one([[x, x] for x in sizes], organ=organ)
    # organ 0 -> 40, 30; organ 1 -> 50, 45; organ 3 -> 60: five, so organ 2 (12) misses out
    np.testing.assert_array_equal(ds.is_target.values[0], [1, 0, 0, 1, 1, 1, 0, 0, 1])
    assert ds.baseline_sod.values[0] == 40 + 30 + 50 + 45 + 60
    # with a larger total the largest of organ 2 comes in
    t = select_targets(np.array([sizes], float), None, np.array([organ]),
                       np.ones((1, 9), bool), max_total=6)
    np.testing.assert_array_equal(t[0], [1, 0, 0, 1, 1, 1, 0, 1, 1])


# ------------------------------------------------------------------------------ time points
def test_pr_threshold_is_30_percent_from_baseline():
    assert resp(one([[100, 70]])) == ["NA", "PR"]
    assert resp(one([[100, 71]])) == ["NA", "SD"]


def test_pd_needs_5mm_absolute_as_well_as_20_percent():
    # nadir 20: +4 mm is +20 % but < 5 mm -> not PD; +5 mm -> PD
    assert resp(one([[30, 20, 24]])) == ["NA", "PR", "SD"]
    assert resp(one([[30, 20, 25]])) == ["NA", "PR", "PD"]
    # large lesion: +19 mm is only 19 % -> not PD
    assert resp(one([[100, 100, 119]])) == ["NA", "SD", "SD"]
    assert resp(one([[100, 100, 120]])) == ["NA", "SD", "PD"]


def test_pd_is_measured_from_the_nadir_not_the_baseline():
    # 37 is -26 % vs baseline but +23 % / +7 mm vs the nadir 30
    ds = one([[50, 30, 37]])
    assert resp(ds) == ["NA", "PR", "PD"]
    assert ds.pd_by.values[0] == 1
    # the nadir is taken from earlier scans only: 40 -> 47 is +17.5 %
    assert resp(one([[50, 40, 47]])) == ["NA", "SD", "SD"]
    np.testing.assert_allclose(one([[50, 40, 47]]).nadir.values[0], [50, 40, 40])


def test_new_lesion_is_pd():
    ds = one([[50, 40, 40], [0, 0, 6]])
    assert resp(ds) == ["NA", "SD", "PD"]
    assert ds.pd_by.values[0] == 2 and ds.n_new_lesions.values[0, 2] == 1
    # below the detection limit: not (yet) a new lesion
    assert resp(one([[50, 40, 40], [0, 0, 4]])) == ["NA", "SD", "SD"]
    # a new lymph node counts only from 10 mm short axis
    assert resp(one([[50, 40, 40], [0, 0, 8]], is_node=[0, 1])) == ["NA", "SD", "SD"]
    assert resp(one([[50, 40, 40], [0, 0, 10]], is_node=[0, 1])) == ["NA", "SD", "PD"]
    # at_baseline overrides detection: a flagged-absent lesion present at scan 0 is new later
    assert one([[50, 40, 40], [6, 6, 6]], at_baseline=[1, 0]).n_new_lesions.values[0, 1] == 1


def test_complete_response_and_node_below_10mm():
    assert resp(one([[30, 0]])) == ["NA", "CR"]
    # nodal target at 9 mm short axis counts as normal: CR although SoD = 9
    ds = one([[30, 0], [16, 9]], is_node=[0, 1], organ=[0, 1])
    assert resp(ds) == ["NA", "CR"] and ds.sod.values[0, 1] == 9
    assert resp(one([[30, 0], [16, 10]], is_node=[0, 1], organ=[0, 1])) == ["NA", "PR"]
    # below the detection limit a lesion is gone
    assert resp(one([[30, 4]])) == ["NA", "CR"]
    # target CR with a persisting non-target lesion -> PR (non-CR/non-PD)
    assert resp(one([[30, 0], [8, 8]])) == ["NA", "PR"]
    assert resp(one([[30, 0], [8, 0]])) == ["NA", "CR"]


def test_reappearance_after_cr_is_pd():
    assert resp(one([[30, 0, 5]])) == ["NA", "CR", "PD"]
    assert resp(one([[30, 0, 0]])) == ["NA", "CR", "CR"]


def test_nontarget_progression_switch():
    ds = one([[50, 50, 50], [8, 8, 20]])
    assert resp(ds) == ["NA", "SD", "PD"] and ds.pd_by.values[0] == 4
    assert resp(one([[50, 50, 50], [8, 8, 20]], nontarget_pd=False)) == ["NA", "SD", "SD"]


def test_scans_after_first_pd_are_not_assessed():
    ds = one([[50, 70, 20, 20]])
    assert resp(ds) == ["NA", "PD", "NA", "NA"] and bor(ds) == "PD"
    assert ds.pd_time.values[0] == 42 and ds.pd_scan.values[0] == 1


def test_no_target_lesion_is_not_evaluable():
    ds = one([[8, 8, 8]])
    assert not ds.measurable.values[0] and bor(ds) == "NE" and resp(ds) == ["NA", "NE", "NE"]
    ds = one([[8, 8, 8], [0, 0, 7]])
    assert bor(ds) == "PD"


# ------------------------------------------------------------------------------ BOR
def test_unconfirmed_response():
    # PR at day 42, SD at day 84: not confirmed -> BOR SD; without confirmation -> PR
    assert bor(one([[100, 60, 80]], confirm=True)) == "SD"
    assert bor(one([[100, 60, 80]], confirm=False)) == "PR"
    assert bor(one([[100, 60, 65]], confirm=True)) == "PR"
    # the confirming scan must be >= 28 days later: day 60 cannot confirm day 42
    assert bor(one([[100, 60, 60]], times=[0, 42, 60], confirm=True)) == "SD"
    assert bor(one([[100, 60, 60, 60]], times=[0, 42, 60, 70], confirm=True)) == "PR"
    # CR confirmed by PR only is a PR; CR confirmed by CR is CR
    # (nodal target: 9 mm short axis is CR, 11 mm is PR and +2 mm is no PD)
    assert resp(one([[16, 9, 11]], is_node=[1])) == ["NA", "CR", "PR"]
    assert bor(one([[16, 9, 11]], is_node=[1], confirm=True)) == "PR"
    assert bor(one([[16, 9, 11]], is_node=[1], confirm=False)) == "CR"
    assert bor(one([[100, 0, 0]], confirm=True)) == "CR"
    # a response followed by PD is not confirmed
    assert bor(one([[100, 60, 90]], confirm=True)) == "SD"


def test_minimum_sd_duration():
    # only non-PD time point at day 35 < 42 -> BOR PD (or NE without PD)
    assert bor(one([[100, 100, 130]], times=[0, 35, 70])) == "PD"
    assert bor(one([[100, 100]], times=[0, 35])) == "NE"
    assert bor(one([[100, 100, 130]], times=[0, 42, 84])) == "SD"
    assert bor(one([[100, 100, 130]], times=[0, 35, 70], min_sd_days=30)) == "SD"
    # t_start after the baseline scan moves the clock
    assert bor(one([[100, 100, 130]], times=[0, 42, 84], t_start=7)) == "PD"


def test_pfs_ttp_dor_and_death():
    ds = one([[100, 60, 60, 80]], confirm=True)  # PD at day 126 (80 vs nadir 60)
    assert ds.pfs_time.values[0] == 126 and ds.pfs_event.values[0]
    assert ds.ttp.values[0] == 126 and ds.response_time.values[0] == 42
    assert ds.dor.values[0] == 84 and ds.dor_event.values[0]
    ds = one([[100, 90, 90, 90]])
    assert ds.pfs_time.values[0] == 126 and not ds.pfs_event.values[0]
    assert str(ds.pfs_event_type.values[0]) == "censored"
    ds = one([[100, 90, 90, 90]], death_time=[100.0])
    assert ds.pfs_time.values[0] == 100 and str(ds.pfs_event_type.values[0]) == "death"
    assert ds.ttp.values[0] == 126  # TTP censors death
    ds = one([[100, 90, 90, 90]], times=[0, 42, 84, np.nan])  # missing last scan
    assert ds.pfs_time.values[0] == 84 and resp(ds)[3] == "NA"
    assert ds.best_pct_change.values[0] == pytest.approx(-10)


def test_measurement_noise_is_seeded():
    s = np.full((50, 2, 6), 40.0)
    a = assess_recist(s, Q6W[:6], noise_sd_mm=3.0, seed=1)
    b = assess_recist(s, Q6W[:6], noise_sd_mm=3.0, seed=1)
    c = assess_recist(s, Q6W[:6], noise_sd_mm=3.0, seed=2)
    np.testing.assert_array_equal(a.sod.values, b.sod.values)
    assert not np.array_equal(a.sod.values, c.sod.values)
    assert np.all(assess_recist(s, Q6W[:6]).sod.values == 80)


def test_bad_inputs():
    with pytest.raises(ValueError, match="patient, lesion, scan"):
        assess_recist(np.ones((2, 3)), [0, 1, 2])
    with pytest.raises(ValueError, match="times"):
        assess_recist(np.ones((1, 1, 3)), [0, 1])
    with pytest.raises(ValueError, match="increase"):
        assess_recist(np.ones((1, 1, 3)), [0, 2, 1])
    with pytest.raises(ValueError, match="is_node"):
        assess_recist(np.ones((1, 2, 3)), [0, 1, 2], is_node=[1, 0, 0])
    with pytest.raises(ValueError, match="site_names"):
        assess_recist(np.ones((1, 2, 3)), [0, 1, 2], organ=[0, 3], site_names=["lung"])


# ------------------------------------------------------------------------------ iRECIST
def test_irecist_confirmed_progression():
    ds = one([[50, 30, 40, 45]])  # iUPD at 40 (+10 vs nadir 30), +5 more -> iCPD
    assert resp(ds, "iresponse") == ["NA", "iPR", "iUPD", "iCPD"]
    assert ds.icpd_time.values[0] == 126 and ds.ipfs_time.values[0] == 84
    assert ds.ipfs_event.values[0]


def test_irecist_increases_add_up_and_new_lesion_confirms():
    ds = one([[50, 30, 40, 44, 46]])  # +4 then +2 = +6 -> iCPD at the second
    assert resp(ds, "iresponse") == ["NA", "iPR", "iUPD", "iUPD", "iCPD"]
    ds = one([[50, 30, 40, 41], [0, 0, 0, 7]])  # another new lesion confirms
    assert resp(ds, "iresponse") == ["NA", "iPR", "iUPD", "iCPD"]


def test_irecist_reset_and_pseudoprogression():
    # pseudo-progression: iUPD then shrinkage -> iPR; RECIST calls it PD
    ds = one([[50, 30, 40, 25, 25]])
    assert resp(ds, "iresponse") == ["NA", "iPR", "iUPD", "iPR", "iPR"]
    assert bor(ds) == "PR" and ds.progressed.values[0] and not ds.ipfs_event.values[0]
    assert str(ds.ibor.values[0]) == "iPR"
    # after a reset a later PD is a new iUPD needing its own confirmation
    ds = one([[50, 30, 40, 25, 35, 41]])
    assert resp(ds, "iresponse") == ["NA", "iPR", "iUPD", "iPR", "iUPD", "iCPD"]
    assert ds.ipfs_time.values[0] == 168 and ds.iupd_time.values[0] == 84


def test_irecist_confirmation_needs_4_weeks():
    ds = one([[50, 30, 40, 50, 50]], times=[0, 42, 84, 100, 126])
    assert resp(ds, "iresponse") == ["NA", "iPR", "iUPD", "iUPD", "iCPD"]


# ------------------------------------------------------------------------------ SITC
def sitc(lesions, times=None, stop_time=None, **kw):
    rec = one(lesions, times=times)
    return str(classify_sitc(rec, stop_time=stop_time, **kw)["sitc"].values[0])


def test_sitc_primary_bor_pd():
    assert sitc([[50, 70]]) == "primary"


def test_sitc_sd_just_under_and_over_six_months():
    t_under = [0, 42, 84, 126, 168, 180]
    t_over = [0, 42, 84, 126, 168, 189]
    seq = [[50, 50, 50, 50, 50, 70]]
    assert sitc(seq, t_under) == "primary"
    assert sitc(seq, t_over) == "secondary"
    assert sitc(seq, t_under, rule="bor") == "primary"
    assert sitc(seq, t_over, rule="bor") == "secondary"


def test_sitc_responder_rules():
    seq = [[50, 30, 30, 45]]  # PR then PD at day 126 (< 6 months)
    assert sitc(seq) == "primary"                     # benefit < 6 months (definitions §3.5)
    assert sitc(seq, rule="bor") == "not_evaluable"   # SITC table: CR/PR, but exposure < 6 months
    late = [[50, 30, 30, 30, 30, 30, 45]]             # PD at day 252
    assert sitc(late) == "secondary" and sitc(late, rule="bor") == "secondary"


def test_sitc_treatment_stop():
    seq = [[50, 50, 50, 50, 50, 50, 50, 70]]           # PD at day 294
    assert sitc(seq, stop_time=100) == "progression_after_stop"   # 194 d off drug
    assert sitc(seq, stop_time=210) == "secondary"    # 84 d off drug, exposure 210 d
    assert sitc(seq, stop_time=150) == "progression_after_stop"
    early = [[50, 50, 70]]                             # PD at day 84
    assert sitc(early, stop_time=70) == "primary"      # exposure 70 >= 42
    assert sitc(early, stop_time=14) == "not_evaluable"  # exposure 14 < 42, off drug at PD
    assert sitc([[50, 70]], stop_time=np.inf) == "primary"


def test_sitc_durable_benefit_and_censoring():
    assert sitc([[50, 40, 40, 40, 40, 40]]) == "durable_benefit"          # 210 d PD-free
    assert sitc([[50, 40, 40, 40]]) == "not_evaluable"                     # 126 d only
    assert sitc([[8, 8, 8, 8, 8, 8]]) == "not_evaluable"                   # not measurable


def test_sitc_irecist_confirmation_switch():
    seq = [[50, 30, 40, 25, 25, 25, 25]]  # pseudo-progression at day 84
    assert sitc(seq) == "primary"
    assert sitc(seq, pd="irecist") == "durable_benefit"


# ------------------------------------------------------------------------------ pattern
def test_oligo_vs_systemic_progression():
    # lung lesion grows, others stable -> oligo, site lung
    base = [[40, 40, 40], [30, 30, 30], [20, 20, 20]]
    grow = [[40, 40, 60], [30, 30, 30], [20, 20, 20]]
    rec = one(grow, organ=[0, 1, 2], site_names=["lung", "liver", "bone"])
    p = progression_pattern(rec)
    assert str(p.pattern.values[0]) == "oligo"
    assert list(p.site_progressed.sel(patient=0).values) == [True, False, False]
    assert list(p.site.values) == ["lung", "liver", "bone"]
    # four new lesions in three organs -> systemic (4 lesions > 3)
    les = base + [[0, 0, 8], [0, 0, 8], [0, 0, 9], [0, 0, 7]]
    rec = one(les, organ=[0, 1, 2, 0, 1, 2, 2])
    p = progression_pattern(rec)
    assert str(p.pattern.values[0]) == "systemic" and p.n_progressing_lesions.values[0] == 4
    assert p.n_progressing_organs.values[0] == 3
    assert str(progression_pattern(rec, max_lesions=5, max_organs=3).pattern.values[0]) == "oligo"
    # two organs is still oligo, three is not (default <= 2 organs)
    rec = one(base + [[0, 0, 8], [0, 0, 8]], organ=[0, 1, 2, 0, 1])
    assert str(progression_pattern(rec).pattern.values[0]) == "oligo"
    rec = one(base + [[0, 0, 8], [0, 0, 8], [0, 0, 8]], organ=[0, 1, 2, 0, 1, 2])
    assert str(progression_pattern(rec).pattern.values[0]) == "systemic"


def test_pattern_none_and_diffuse_growth():
    rec = one([[40, 40, 40]])
    assert str(progression_pattern(rec).pattern.values[0]) == "none"
    # each of 5 lesions +4 mm (none meets +5 mm alone), the sum +20 mm -> PD, diffuse
    rec = one([[20, 20, 24]] * 5, organ=[0, 1, 2, 3, 4])
    assert bor(rec) in ("SD", "PD") and rec.progressed.values[0]
    p = progression_pattern(rec)
    assert p.n_progressing_lesions.values[0] == 5 and str(p.pattern.values[0]) == "systemic"


# ------------------------------------------------------------------------------ vectorised
def test_batch_equals_one_by_one():
    cases = [[[50, 30, 37, 40]], [[30, 20, 24, 24]], [[100, 60, 80, 80]], [[50, 40, 40, 40]],
             [[8, 8, 8, 8]], [[30, 0, 0, 5]]]
    extra = [0, 0, 0, 7]  # new lesion for case 3
    L = 2
    S = np.zeros((len(cases), L, 4))
    for i, c in enumerate(cases):
        S[i, 0] = c[0]
    S[3, 1] = extra
    batch = assess_response(S, Q6W[:4], confirm=True)
    for i in range(len(cases)):
        single = assess_response(S[i:i + 1], Q6W[:4], confirm=True)
        for v in ("response", "bor", "iresponse", "sitc", "pattern", "pfs_time"):
            np.testing.assert_array_equal(batch[v].values[i], single[v].values[0], err_msg=f"{i} {v}")


def test_10000_patients_by_30_scans():
    rng = np.random.default_rng(0)
    P, L, S = 10_000, 6, 30
    sz = rng.lognormal(3, 0.4, (P, L, 1)) * np.exp(np.cumsum(rng.normal(0, 0.08, (P, L, S)), axis=2))
    sz[:, 4:, :8] = 0.0  # two lesions per patient that appear later (new lesions)
    t = np.arange(S) * 42.0
    ds = assess_response(sz, t, organ=[0, 0, 1, 2, 3, 1], confirm=True,
                         stop_time=rng.uniform(100, 800, P))
    assert ds.sizes == {"patient": P, "lesion": L, "scan": S, "site": 4}
    assert set(np.unique(ds.bor.values)) <= {"CR", "PR", "SD", "PD", "NE"}
    assert set(np.unique(ds.sitc.values)) <= {"primary", "secondary", "progression_after_stop",
                                              "durable_benefit", "not_evaluable"}
    assert (ds.pattern.values != "none").sum() == ds.progressed.values.sum()
