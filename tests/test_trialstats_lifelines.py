"""Kaplan–Meier estimates against lifelines (an independent, well-kept implementation)."""

import numpy as np
import pytest

lifelines = pytest.importorskip("lifelines")

from immunoode.trialstats import kaplan_meier  # noqa: E402


@pytest.mark.parametrize("seed", range(4))
def test_kaplan_meier_matches_lifelines(seed):
    rng = np.random.default_rng(seed)
    n = 200
    t = np.round(rng.exponential(300.0, n), 0)          # ties on whole days
    c = rng.uniform(0, 700, n)
    time = np.minimum(t, c)
    event = t <= c
    ours = kaplan_meier(time, event, alpha=0.05)
    kmf = lifelines.KaplanMeierFitter().fit(time, event, alpha=0.05)
    sf = kmf.survival_function_.iloc[:, 0]
    ci = kmf.confidence_interval_
    for k, tt in enumerate(ours.time):
        if tt not in sf.index:
            continue
        assert ours.survival[k] == pytest.approx(sf.loc[tt], rel=1e-12, abs=1e-12)
        lo, hi = ci.loc[tt].values
        if 0.0 < sf.loc[tt] < 1.0:
            assert ours.lower[k] == pytest.approx(lo, rel=1e-9, abs=1e-12)
            assert ours.upper[k] == pytest.approx(hi, rel=1e-9, abs=1e-12)
    med = kmf.median_survival_time_
    if np.isfinite(med):
        assert ours.median == pytest.approx(med)
