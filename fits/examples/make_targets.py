# Build fits/examples/two_clone_targets.csv: rates simulated from known "true" parameters
# (4000 patients per arm drawn from the true population), as binomial targets with n = 400.
# Run from the repository root: python fits/examples/make_targets.py
import time
from immunoode.calibrate.fit import load_fit
from immunoode.calibrate.targets import Target
from immunoode.calibrate.synthetic import simulate_true_rates, write_synthetic_targets
import csv, pathlib
truth = {"e_median": 0.01, "e_cv": 0.8, "e_prior": -0.7, "f_median": 0.01, "g_r": 0.01}
rows = [dict(id="A1", statistic="orr", arm="a"), dict(id="A2", statistic="bor_pd", arm="a"),
        dict(id="A3", statistic="ar_of_responders", arm="a", landmark_days=365),
        dict(id="A4", statistic="ar_of_responders", arm="a", landmark_days=270),
        dict(id="B1", statistic="orr", arm="b"), dict(id="B2", statistic="bor_pd", arm="b"),
        dict(id="B3", statistic="ar_of_responders", arm="b", landmark_days=365),
        dict(id="H1", statistic="pfs_rate", arm="a", landmark_days=182, role="heldout")]
p = pathlib.Path("fits/examples/two_clone_targets.csv")
# placeholder table so the fit file loads
write_synthetic_targets(p, {r["id"]: 0.5 for r in rows}, rows, n_obs=400)
spec = load_fit("fits/examples/two_clone_fit.toml")
targets = [Target(id=r["id"], statistic=r["statistic"], arm=r["arm"], kind="binomial", role="fit",
                  landmark_days=r.get("landmark_days")) for r in rows]
t=time.time()
rates = simulate_true_rates(spec, truth, targets, n=4000, seed=99)
print(time.time()-t, rates)
write_synthetic_targets(p, rates, rows, n_obs=400)
