"""The two-clone synthetic calibration shared by the calibration tests: the example fit of
``fits/examples`` with its targets replaced by rates simulated from known parameters TRUTH."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "fits" / "examples"
TRUTH = {"e_median": 0.01, "e_cv": 0.8, "e_prior": -0.7, "f_median": 0.01, "g_r": 0.01}
ROWS = [dict(id="A1", statistic="orr", arm="a"), dict(id="A2", statistic="bor_pd", arm="a"),
        dict(id="A3", statistic="ar_of_responders", arm="a", landmark_days=365),
        dict(id="A4", statistic="ar_of_responders", arm="a", landmark_days=270),
        dict(id="B1", statistic="orr", arm="b"), dict(id="B2", statistic="bor_pd", arm="b"),
        dict(id="B3", statistic="ar_of_responders", arm="b", landmark_days=365),
        dict(id="H1", statistic="pfs_rate", arm="a", landmark_days=182, role="heldout")]


def synthetic_fit_file(folder: Path, edits) -> tuple[Path, dict, list]:
    """Copy the example fit into ``folder``, write targets simulated from TRUTH (4000 patients
    per arm, observed as n = 400 each) and apply the text ``edits`` (old, new) to the fit file.
    Returns ``(fit file, true rates, targets)``."""
    from immunoode.calibrate.fit import load_fit
    from immunoode.calibrate.synthetic import simulate_true_rates, write_synthetic_targets
    from immunoode.calibrate.targets import Target
    for f in EXAMPLE.iterdir():
        if f.suffix in (".toml", ".csv"):
            shutil.copy(f, folder / f.name)
    spec = load_fit(folder / "two_clone_fit.toml")
    targets = [Target(id=r["id"], statistic=r["statistic"], arm=r["arm"], kind="binomial",
                      role="fit", landmark_days=r.get("landmark_days")) for r in ROWS]
    rates = simulate_true_rates(spec, TRUTH, targets, n=4000, seed=12345)
    write_synthetic_targets(folder / "two_clone_targets.csv", rates, ROWS, n_obs=400)
    f = folder / "two_clone_fit.toml"
    text = f.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    f.write_text(text)
    return f, rates, targets
