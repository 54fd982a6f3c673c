"""Stage 7 — scenario sweeps over one virtual population: scenario designs, adaptive
treatment policies, toxicity, local and Dask execution with resumable Zarr storage,
summaries and reports, global sensitivity analysis and schedule optimisation.

See ``docs/sweeps.md``.
"""

from .engines import AbstractEngine as AbstractEngine
from .engines import DaskEngine as DaskEngine
from .engines import ProcessEngine as ProcessEngine
from .engines import SerialEngine as SerialEngine
from .gsa import optimize_schedule as optimize_schedule
from .gsa import run_gsa as run_gsa
from .policy import AbstractPolicy as AbstractPolicy
from .policy import Action as Action
from .policy import ScanView as ScanView
from .run import open_sweep as open_sweep
from .run import run_sweep as run_sweep
from .spec import SweepError as SweepError
from .spec import load_sweep as load_sweep
from .summary import ranking as ranking

__all__ = ["AbstractEngine", "DaskEngine", "ProcessEngine", "SerialEngine", "optimize_schedule",
           "run_gsa", "AbstractPolicy", "Action", "ScanView", "open_sweep", "run_sweep",
           "SweepError", "load_sweep", "ranking"]
