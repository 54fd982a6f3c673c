"""Generate the synthetic data of ``fits/timecourse_two_cpt_pk.toml`` (reproducible).

Run from the repository root::

    python fits/timecourse_two_cpt_pk_data.py

It simulates the two-compartment antibody PK model (``models/two_compartment_pk.toml``)
with known parameters ``TRUTH`` for 8 individuals — odd ids receive 200 mg as IV
bolus, even ids as a 30-minute infusion, every 21 days, 3 doses — samples the
concentration at typical PK times, adds combined residual error
(``σ = sqrt(0.5² + (0.1·f)²)`` mg/L) from ``numpy.random.default_rng(SEED)`` and writes
``fits/timecourse_two_cpt_pk.csv`` in NONMEM long format (dose records ``evid = 1``).
Every individual shares the same parameters (no between-subject variability), so a
naive pooled fit should recover ``TRUTH`` within its confidence intervals.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

import immunoode as im

SEED = 20261129
TRUTH = {"CL": 0.22, "V1": 3.48, "Q": 0.795, "V2": 4.06}   # L/day, L, L/day, L
ERROR = {"additive": 0.5, "proportional": 0.1}                # mg/L, fraction
N_IDS = 8
DOSE_MG = 200.0
INFUSION_DAYS = 1.0 / 48                                      # 30 minutes
DOSE_TIMES = (0.0, 21.0, 42.0)
SAMPLE_TIMES = (0.05, 0.25, 1, 3, 7, 14, 20.95, 21.05, 22, 28, 41.95, 42.05, 43, 49, 56, 70, 84)

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().with_suffix("").with_name("timecourse_two_cpt_pk.csv")


def main() -> Path:
    """Simulate, add noise, write the CSV; return its path."""
    cm = im.compile_model(im.load_model(ROOT / "models" / "two_compartment_pk.toml"))
    rng = np.random.default_rng(SEED)
    t = np.array(SAMPLE_TIMES, float)
    rows = []
    for i in range(1, N_IDS + 1):
        infusion = i % 2 == 0
        dur = INFUSION_DAYS if infusion else None
        reg = im.Regimen(tuple(im.Dose("A1", DOSE_MG, start=s, duration=dur) for s in DOSE_TIMES))
        ds = im.simulate(cm, reg, t_eval=np.concatenate([[0.0], t]), parameters=TRUTH,
                         rtol=1e-10, atol=1e-12, outputs=["concentration"])
        f = ds["concentration"].values[1:]
        sd = np.sqrt(ERROR["additive"] ** 2 + (ERROR["proportional"] * f) ** 2)
        dv = f + sd * rng.standard_normal(len(f))
        for s in DOSE_TIMES:
            rate = f"{DOSE_MG / INFUSION_DAYS:g}" if infusion else ""
            rows.append([i, f"{s:g}", "", "", 1, f"{DOSE_MG:g}", "A1", rate])
        for tk, y in zip(t, dv):
            rows.append([i, f"{tk:g}", f"{y:.5g}", "concentration", 0, "", "", ""])
    with OUT.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "time", "dv", "observable", "evid", "amt", "cmt", "rate"])
        w.writerows(rows)
    return OUT


if __name__ == "__main__":
    main()
