"""``immunoode sweep`` and ``immunoode report``: thin command-line wrappers of
:func:`~immunoode.sweep.run.run_sweep` and :func:`~immunoode.sweep.report.report`."""

from __future__ import annotations

import sys
from pathlib import Path


def _cmd_sweep(args) -> int:
    from ..errors import ImmunoodeError
    from .engines import make_engine
    from .run import run_sweep
    from .spec import load_sweep
    from .summary import ranking
    spec = load_sweep(args.sweep)  # validated before any work
    design = spec.data["sweep"]["design"]
    if design in ("gsa", "optimize"):
        from .gsa import optimize_schedule, run_gsa
        engine = make_engine(workers=args.workers, scheduler=args.scheduler, dask=args.dask)
        with engine:
            if design == "gsa":
                res = run_gsa(spec, engine=engine, progress=not args.quiet)
            else:
                res = optimize_schedule(spec, engine=engine, progress=not args.quiet)
        print(res.report())
        if args.out:
            res.to_dataset().to_netcdf(args.out) if str(args.out).endswith(".nc") else \
                res.to_dataset().to_zarr(args.out, mode="w")
        return 0
    if not args.out:
        raise ImmunoodeError("--out RESULTS.zarr is required for a scenario sweep")
    out = Path(args.out)
    if out.exists() and not args.resume and not args.overwrite:
        raise ImmunoodeError(f"{out} exists: pass --resume to continue it or --overwrite to start again")
    engine = make_engine(workers=args.workers, scheduler=args.scheduler, dask=args.dask)
    with engine:
        ds = run_sweep(spec, out, engine=engine, resume=not args.overwrite,
                       progress=not args.quiet and sys.stderr.isatty(), n=args.n)
    print(f"sweep {spec.name!r}: {ds.sizes['scenario']} scenarios x {ds.sizes['patient']} patients, "
          f"{ds.attrs['chunks_computed']} chunks computed in {ds.attrs['run_wall_time_s']:.1f} s "
          f"({ds.attrs['engine']}); results in {out}")
    with _wide():
        by = args.rank_by or spec.data["sweep"].get("objective", "PFS_2y")
        print(ranking(ds, by=by).to_string(float_format=lambda x: f"{x:.3g}"))
    return 0


class _wide:
    def __enter__(self):
        import pandas as pd
        self.ctx = pd.option_context("display.width", 200, "display.max_columns", 30)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def _cmd_report(args) -> int:
    from .report import report
    by = args.rank_by
    if by is None:
        import json
        from .run import open_sweep
        ds = open_sweep(args.results)
        by = json.loads(ds.attrs["sweep_spec"])["sweep"].get("objective", "PFS_2y")
        args.results = ds
    text, files = report(args.results, plots=args.plots, by=by, reference=args.reference)
    print(text)
    if files:
        print(f"plots: {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def add_sweep_commands(sub):
    """Register ``immunoode sweep SWEEP.toml --out results.zarr [--workers N | --scheduler ADDR]
    [--resume]`` and ``immunoode report results.zarr [--plots DIR]``."""
    s = sub.add_parser("sweep", help="run a scenario sweep (or GSA / schedule optimisation)")
    s.add_argument("sweep", help="sweep file (TOML)")
    s.add_argument("--out", help="results store (.zarr); GSA/optimisation: .nc or .zarr")
    s.add_argument("--workers", type=int, help="local processes (default 2; 1 = this process); "
                   "with --dask: LocalCluster workers")
    s.add_argument("--dask", action="store_true", help="run on a dask LocalCluster of --workers")
    s.add_argument("--scheduler", metavar="ADDRESS", help="dask scheduler address (tcp://host:8786)")
    s.add_argument("--resume", action="store_true", help="continue an existing results store")
    s.add_argument("--overwrite", action="store_true", help="discard an existing results store")
    s.add_argument("--n", type=int, help="number of patients (overrides the file)")
    s.add_argument("--rank-by", help="metric of the ranking table (default: the file's objective, "
                   "else PFS_2y)")
    s.add_argument("--quiet", action="store_true", help="no progress on stderr")
    s.set_defaults(func=_cmd_sweep)
    r = sub.add_parser("report", help="summarise a sweep results store (tables, plots)")
    r.add_argument("results", help="results store written by immunoode sweep")
    r.add_argument("--plots", metavar="DIR", help="write heatmaps, PFS curves and a forest plot here")
    r.add_argument("--rank-by", help="metric of the ranking table (default: the sweep's objective)")
    r.add_argument("--reference", type=int, default=0, help="reference scenario index (forest plot)")
    r.set_defaults(func=_cmd_report)
