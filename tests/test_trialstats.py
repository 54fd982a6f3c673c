"""Trial summary statistics: Clopper-Pearson, Kaplan-Meier, arm summary, resampling."""

import math

import numpy as np
import pytest
import xarray as xr

from immunoode.response import assess_response
from immunoode.trialstats import bootstrap_summary, clopper_pearson, kaplan_meier, summarize


@pytest.mark.parametrize("k, n, lo, hi", [
    # R: binom.test(k, n)$conf.int
    (5, 10, 0.1870860, 0.8129140),
    (0, 10, 0.0, 0.3084971),
    (10, 10, 0.6915029, 1.0),
    (3, 20, 0.03207094, 0.37892683),
    (1, 1, 0.025, 1.0),
])
def test_clopper_pearson_known_values(k, n, lo, hi):
    a, b = clopper_pearson(k, n)
    assert a == pytest.approx(lo, abs=1e-6) and b == pytest.approx(hi, abs=1e-6)


def test_clopper_pearson_closed_forms_and_vectorised():
    n = 30
    assert clopper_pearson(0, n, 0.1)[1] == pytest.approx(1 - 0.05 ** (1 / n))
    lo, hi = clopper_pearson(np.array([0, 5, 30]), np.array([30, 30, 30]))
    assert lo.shape == (3,) and lo[0] == 0 and hi[2] == 1
    assert np.isnan(clopper_pearson(0, 0)[0])
    with pytest.raises(ValueError):
        clopper_pearson(5, 3)


def test_kaplan_meier_hand_computed():
    # t: 1 2 2+ 3 4+ 5 ; at risk 6,5,3,2,1
    km = kaplan_meier([1, 2, 2, 3, 4, 5], [1, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(km.time, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(km.n_risk, [6, 6, 5, 3, 2, 1])
    np.testing.assert_array_equal(km.n_event, [0, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(km.n_censored, [0, 0, 1, 0, 1, 0])
    S = [1, 5 / 6, 4 / 6, 4 / 9, 4 / 9, 0]
    np.testing.assert_allclose(km.survival, S)
    # Greenwood: var S(2) = S^2 (1/(6*5) + 1/(5*4))
    assert km.se[2] == pytest.approx(math.sqrt((4 / 6) ** 2 * (1 / 30 + 1 / 20)))
    # log(-log) band at t=1: S^exp(±z sqrt(sum)/|log S|)
    z = 1.959963984540054
    th = math.sqrt(1 / 30) / abs(math.log(5 / 6))
    assert km.lower[1] == pytest.approx((5 / 6) ** math.exp(z * th))
    assert km.upper[1] == pytest.approx((5 / 6) ** math.exp(-z * th))
    assert km.lower[1] == pytest.approx(0.2731, abs=1e-4)  # R survfit(conf.type="log-log")
    assert km.median == 3.0
    assert km.median_ci == (1.0, 5.0)
    assert km.survival_at([0.5, 2.5, 10]).tolist() == pytest.approx([1, 4 / 6, 0])
    plain = kaplan_meier([1, 2, 2, 3, 4, 5], [1, 1, 0, 1, 0, 1], ci="plain")
    assert plain.lower[2] == pytest.approx(4 / 6 - z * km.se[2])
    assert km.to_dataset().attrs["median"] == 3.0


def test_kaplan_meier_without_events_and_bad_input():
    km = kaplan_meier([3, 4, 5], [0, 0, 0])
    assert np.all(km.survival == 1) and math.isnan(km.median)
    with pytest.raises(ValueError):
        kaplan_meier([1, -1], [1, 1])
    with pytest.raises(ValueError):
        kaplan_meier([1, 2], [1])


def test_kaplan_meier_matches_exponential_median():
    rng = np.random.default_rng(0)
    t = rng.exponential(100.0, 20000)
    c = rng.exponential(300.0, 20000)
    km = kaplan_meier(np.minimum(t, c), t <= c)
    assert km.median == pytest.approx(100 * math.log(2), rel=0.03)
    assert km.median_ci[0] < km.median < km.median_ci[1]


def _arm():
    # 10 hand-built single-lesion patients, scans every 6 weeks (8 scans)
    seqs = [
        [50, 30, 30, 30, 30, 30, 30, 30],  # PR, durable
        [50, 30, 30, 30, 30, 30, 30, 45],  # PR, PD day 294 -> secondary
        [50, 70, 70, 70, 70, 70, 70, 70],  # PD day 42 -> primary
        [50, 50, 50, 70, 70, 70, 70, 70],  # SD, PD day 126 -> primary
        [50, 50, 50, 50, 50, 50, 50, 50],  # SD durable
        [50, 0, 0, 0, 0, 0, 0, 0],         # CR
        [50, 58, 58, 58, 58, 58, 58, 58],  # SD (+16 %)
        [50, 75, 75, 75, 75, 75, 75, 75],  # PD
        [50, 45, 45, 45, 45, 45, 45, 60],  # SD, PD day 294 (+15 vs 45) -> secondary
        [8, 8, 8, 8, 8, 8, 8, 8],          # not measurable
    ]
    sizes = np.array(seqs, float)[:, None, :]
    return assess_response(sizes, np.arange(8) * 42.0)


def test_summarize_counts_and_intervals():
    ds = _arm()
    s = summarize(ds)
    assert s.loc["ORR", "k"] == 3 and s.loc["ORR", "n"] == 9
    assert s.loc["DCR", "k"] == 7 and s.loc["BOR_PD", "k"] == 2
    assert s.loc["primary_resistance", "k"] == 3  # PD, PD, SD < 6 months
    assert s.loc["secondary_resistance", "k"] == 2
    assert s.loc["durable_benefit", "k"] == 4
    lo, hi = clopper_pearson(3, 9)
    assert s.loc["ORR", "lower"] == pytest.approx(lo) and s.loc["ORR", "upper"] == pytest.approx(hi)
    assert s.loc["oligo_progression", "n"] == 5 and s.loc["oligo_progression", "k"] == 5
    assert s.loc["median_PFS", "k"] == 5
    km = kaplan_meier(ds.pfs_time.values[:9], ds.pfs_event.values[:9])
    assert s.loc["median_PFS", "estimate"] == km.median


def test_bootstrap_is_seeded_and_sized():
    rng = np.random.default_rng(1)
    P = 2000
    sizes = np.full((P, 1, 8), 50.0)
    shrink = rng.random(P) < 0.3
    sizes[shrink, 0, 1:] = 30.0
    grow = rng.random(P) < 0.2
    sizes[grow, 0, 3:] = 80.0
    ds = assess_response(sizes, np.arange(8) * 42.0)
    a = bootstrap_summary(ds, n=150, n_boot=300, seed=7)
    b = bootstrap_summary(ds, n=150, n_boot=300, seed=7)
    assert a.equals(b)
    c = bootstrap_summary(ds, n=150, n_boot=300, seed=8)
    assert not a.equals(c)
    orr = a.loc["ORR"]
    assert orr["lower"] < orr["estimate"] < orr["upper"]
    # the interval of a 150-patient trial is about binomial width
    p = orr["estimate"]
    half = 1.96 * math.sqrt(p * (1 - p) / 150)
    assert (orr["upper"] - orr["lower"]) / 2 == pytest.approx(half, rel=0.25)
    df, samples = bootstrap_summary(ds, n=150, n_boot=50, seed=1, return_samples=True)
    assert samples.shape[0] == 50 and "median_PFS" in samples
    with pytest.raises(ValueError):
        bootstrap_summary(ds, n=P + 1, seed=1)
    assert bootstrap_summary(ds, n=P + 1, n_boot=5, seed=1, replace=True).shape[0] > 0


def test_summarize_minimal_dataset():
    ds = xr.Dataset({"bor": ("patient", np.array(["PR", "SD", "PD", "PD"]))})
    s = summarize(ds)
    assert s.loc["ORR", "estimate"] == 0.25 and "median_PFS" not in s.index
