"""Write results to netCDF (everything, with attributes) or CSV (for spreadsheets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .errors import ImmunoodeError

__all__ = ["write_results", "to_frame"]


def to_frame(ds: xr.Dataset, *, include_assignments: bool = False):
    """A pandas DataFrame: ``time`` (and ``patient``), then states and observables by name."""
    keep = [k for k, v in ds.data_vars.items()
            if "time" in v.dims and (include_assignments or v.attrs.get("kind") != "assignment")]
    sub = ds[keep]
    df = sub.to_dataframe().reset_index()
    lead = [c for c in ("patient", "time") if c in df.columns]
    return df[lead + keep]


def write_results(ds: xr.Dataset, path) -> Path:
    """Write ``ds`` to ``path``: ``.nc`` → netCDF4, ``.csv`` → CSV (see :func:`to_frame`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".nc", ".csv"):
        raise ImmunoodeError(f"{path}: unsupported output format {suffix or '(none)'}; use .nc or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        to_frame(ds).to_csv(path, index=False)
        return path
    out = ds.copy()
    for k, v in out.data_vars.items():
        if v.dtype == object:
            out[k] = v.astype(str)
    out.to_netcdf(path)
    return path
