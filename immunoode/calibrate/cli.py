"""``immunoode fit FIT.toml --out DIR``: run a calibration from a fit file.

A rate fit (``[fit] kind = "rates"``, the default) runs :func:`~.fit.run_fit` and writes
the outputs of :func:`~.report.write_fit_outputs`; a time-course fit (``kind =
"timecourse"``) is handed to :func:`immunoode.calibrate.timecourse.run_fit_file`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

__all__ = ["add_fit_command", "run_fit_command"]


def run_fit_command(fit_file, out_dir, *, quiet: bool = False, profiles: bool = True) -> int:
    """Run the fit in ``fit_file`` and write its outputs to ``out_dir``; returns an exit code."""
    from .fit import read_fit_kind
    kind = read_fit_kind(fit_file)
    if kind == "timecourse":
        from .timecourse import run_fit_file  # written by the time-course module
        return int(run_fit_file(fit_file, out_dir))
    from .fit import FitFileError, run_fit
    if kind != "rates":
        raise FitFileError(f"unknown kind {kind!r}; use 'rates' or 'timecourse'", file=fit_file,
                           section="fit")
    from .report import fit_report, write_fit_outputs
    t0 = time.perf_counter()

    def say(stage, msg):
        if not quiet:
            print(f"[{time.perf_counter() - t0:7.1f} s] {stage}: {msg}", file=sys.stderr,
                  flush=True)

    result = run_fit(fit_file, progress=not quiet and sys.stderr.isatty(), profiles=profiles,
                     callback=say)
    files = write_fit_outputs(result, out_dir)
    print(fit_report(result))
    if not quiet:
        print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def _cmd_fit(args) -> int:
    if args.verbose:
        logging.basicConfig(level=logging.INFO)
    out = args.out or str(Path(args.fit).with_suffix("")) + "-fit"
    return run_fit_command(args.fit, out, quiet=args.quiet, profiles=not args.no_profiles)


def add_fit_command(sub) -> None:
    """Register ``immunoode fit FIT.toml [--out DIR] [--no-profiles] [--quiet]``."""
    f = sub.add_parser("fit", help="calibrate a model to clinical rates (or time courses) "
                                   "from a fit file")
    f.add_argument("fit", help="fit file (TOML)")
    f.add_argument("--out", help="output folder (default: FIT-fit next to the fit file)")
    f.add_argument("--no-profiles", action="store_true",
                   help="skip the profile-likelihood stage (no intervals)")
    f.add_argument("--quiet", action="store_true", help="no progress on stderr")
    f.add_argument("--verbose", action="store_true", help="log every stage step")
    f.set_defaults(func=_cmd_fit)
