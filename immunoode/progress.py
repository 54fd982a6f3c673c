"""A throttled progress line on stderr: done/total, rate and ETA (silent when disabled)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``update(done, failed)`` prints ``done/total LABEL[detail]  RATE UNIT/s  ETA  failed``.

    ``per_item`` converts items to the rate's unit (e.g. patients per chunk); the line
    is redrawn at most every 0.5 s and ends with a newline when ``done == total``.
    """

    def __init__(self, total: int, enabled: bool, label: str = "patients", *,
                 per_item: float = 1.0, rate_unit: str = ""):
        self.total, self.enabled, self.label = total, enabled, label
        self.per_item, self.rate_unit = per_item, rate_unit
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, done: int, failed: int, detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.5 and done < self.total:
            return
        self.last = now
        el = now - self.t0
        rate = done * self.per_item / el if el > 0 else 0.0
        eta = (self.total - done) * self.per_item / rate if rate > 0 else float("inf")
        sys.stderr.write(f"\r{done}/{self.total} {self.label}{detail}  {rate:,.0f}"
                         f"{self.rate_unit}/s  ETA {eta:,.0f} s  failed {failed}   ")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
