"""Time response classification (RECIST 1.1 + iRECIST + SITC + progression pattern).

Target (issue 4): 10,000 patients x 30 scans in under a second, vectorised.

    python -m benchmarks.response_speed [--patients 10000] [--lesions 8] [--scans 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from immunoode.recist import assess_recist
from immunoode.response import assess_response
from immunoode.trialstats import bootstrap_summary, summarize


def synthetic(P, L, S, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.lognormal(np.log(20.0), 0.5, (P, L, 1))
    rate = rng.normal(-0.02, 0.06, (P, L, 1))
    walk = np.cumsum(rng.normal(0, 0.05, (P, L, S)), axis=2)
    sizes = base * np.exp(rate * np.arange(S) + walk)
    late = max(L // 4, 1)  # the last lesions are micro-metastases that may appear later
    sizes[:, L - late:, :] *= np.where(rng.random((P, late, 1)) < 0.3, 1.0, 0.0)
    sizes[:, L - late:, :6] = 0.0
    organ = rng.integers(0, 6, (P, L))
    is_node = organ == 1
    return sizes, organ, is_node


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--lesions", type=int, default=8)
    ap.add_argument("--scans", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    sizes, organ, is_node = synthetic(a.patients, a.lesions, a.scans)
    times = np.arange(a.scans) * 42.0
    stop = np.full(a.patients, 730.0)
    kw = dict(organ=organ, is_node=is_node, confirm=True, stop_time=stop,
              site_names=["lung", "lymph_node", "brain", "liver", "bone", "adrenal"])
    assess_response(sizes, times, **kw)  # warm-up
    best = {}
    for label, fn in (
        ("RECIST 1.1 only", lambda: assess_recist(sizes, times, organ=organ, is_node=is_node,
                                                  confirm=True, irecist=False)),
        ("RECIST + iRECIST + SITC + pattern", lambda: assess_response(sizes, times, **kw)),
    ):
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            ds = fn()
            ts.append(time.perf_counter() - t0)
        best[label] = min(ts)
        print(f"{label:36s} {a.patients} x {a.lesions} lesions x {a.scans} scans: "
              f"best {min(ts):.3f} s, median {np.median(ts):.3f} s")
    ds = assess_response(sizes, times, **kw)
    t0 = time.perf_counter()
    print(summarize(ds).round(3).to_string())
    bootstrap_summary(ds, n=150, n_boot=1000, seed=1)
    print(f"summary + 1000-trial bootstrap (n=150): {time.perf_counter() - t0:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
