"""Stage 7 — toxicity in the treatment loop.  Consumes the regimen classes a patient is
exposed to; produces the day of each grade >= 3 adverse event and what follows it (a dose
hold or permanent discontinuation).

Model (our choices, marked as such in ``docs/sweeps.md``):

* while on treatment (any systemic course running and not on hold) grade >= 3 treatment-
  related adverse events arrive with a constant hazard ``h = -ln(1 - p) / T_ref`` per day of
  exposure, where ``p`` is the trial's grade >= 3 incidence of the regimen class and
  ``T_ref`` the exposure over which it was reported (``reference_exposure_days``);
* an event discontinues all treatment with probability ``q = discontinuation / g3plus``
  (capped at 1), else the doses are held for ``hold_days`` (no exposure while held);
* every patient carries its own exponential clocks and uniforms, drawn from a stream keyed
  by the sweep seed and the patient index: the same patient meets the same random numbers
  in every scenario (common random numbers).

The rates come from ``toxicity.csv`` next to this module (sources and verification status
carried from the project's treatment table).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

__all__ = ["load_toxicity_table", "combined_class", "table_row", "hazard_per_day", "patient_draws",
           "N_DRAWS"]

_DEFAULT = Path(__file__).with_name("toxicity.csv")
N_DRAWS = 8  #: adverse-event clocks per patient (later events are not simulated)


def load_toxicity_table(path=None) -> dict[str, dict]:
    """Regimen class -> row (``g3plus_pct``, ``discontinuation_pct``, ``reference_exposure_days``,
    ``trial``, ``verification``, ``source``) from the packaged CSV or ``path``."""
    from .spec import SweepError
    p = _DEFAULT if path in (None, "default") else Path(path)
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise SweepError(f"cannot read toxicity table: {exc}", file=p, section="toxicity") from None
    out = {}
    for r in rows:
        try:
            row = dict(r)
            for k in ("g3plus_pct", "discontinuation_pct", "reference_exposure_days"):
                row[k] = float(r[k])
        except (KeyError, ValueError, TypeError):
            raise SweepError("needs numeric g3plus_pct, discontinuation_pct, reference_exposure_days",
                             file=p, section="toxicity", item=r.get("regimen_class")) from None
        if not (0 <= row["g3plus_pct"] < 100 and 0 <= row["discontinuation_pct"] <= 100
                and row["reference_exposure_days"] > 0):
            raise SweepError("rates must be percentages in [0, 100) and the exposure > 0", file=p,
                             section="toxicity", item=r["regimen_class"])
        out[r["regimen_class"]] = row
    return out


def combined_class(classes) -> str:
    """Regimen class of drugs given together: ``["ICI", "chemo"] -> "ICI+chemo"``,
    ``["ICI+ICI"] -> "ICI+ICI"``; ICI first, then the others alphabetically."""
    tokens: list[str] = []
    for c in classes:
        tokens.extend(str(c).split("+"))
    n_ici = tokens.count("ICI")
    others = sorted({t for t in tokens if t != "ICI"})
    return "+".join(["ICI"] * min(n_ici, 2) + others)


def table_row(table: dict, classes) -> dict:
    """The toxicity row of the regimen class of ``classes``.  A class without a row of its own
    (e.g. an anti-angiogenic continued alone after the ICI ended) takes the row of the same
    drugs with an ICI (an upper bound, our choice); KeyError if neither exists."""
    key = combined_class(classes)
    if key in table:
        return table[key]
    return table[combined_class(["ICI", *classes])]


def hazard_per_day(row: dict) -> tuple[float, float]:
    """``(h [1/day], q [1])``: event hazard per exposure day and discontinuation probability."""
    p = row["g3plus_pct"] / 100.0
    h = -math.log1p(-p) / row["reference_exposure_days"]
    q = min(1.0, row["discontinuation_pct"] / row["g3plus_pct"]) if row["g3plus_pct"] > 0 else 0.0
    return h, q


def patient_draws(seed: int, patients) -> tuple[np.ndarray, np.ndarray]:
    """Exponential(1) clocks and U(0,1) draws, ``(len(patients), N_DRAWS)`` each; row ``i``
    depends only on ``seed`` and ``patients[i]`` (common random numbers)."""
    E = np.empty((len(patients), N_DRAWS))
    U = np.empty((len(patients), N_DRAWS))
    for i, p in enumerate(patients):
        rng = np.random.default_rng([int(seed), 0x7a3, int(p)])
        E[i] = rng.exponential(size=N_DRAWS)
        U[i] = rng.random(N_DRAWS)
    return E, U
