"""The ``immunoode`` command line.

``immunoode run`` simulates the built-in default model and regimen;
``immunoode check MODEL`` validates a model file; ``immunoode simulate MODEL``
simulates one with an optional regimen and writes netCDF or CSV.  User errors
print one line and exit with status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ._version import __version__
from .errors import ImmunoodeError

DEFAULT_MODEL = "nsclc_io_fitted"
DEFAULT_REGIMEN = "nsclc_pembrolizumab_200mg_q3w"


def builtin_dir() -> Path:
    """Folder of the model files shipped with immunoode (the repository's ``models/``)."""
    from . import models  # the repository's models/ folder, installed as immunoode.models
    return Path(models.__file__).parent


def resolve_model_path(name: str) -> Path:
    """A path as given, or the name of a built-in model (``models/NAME.toml``)."""
    p = Path(name)
    if p.exists() or p.suffix == ".toml" or "/" in name:
        return p
    cand = builtin_dir() / f"{name}.toml"
    if cand.exists():
        return cand
    known = sorted(f.stem for f in builtin_dir().glob("*.toml"))
    raise ImmunoodeError(f"{name}: no such file or built-in model (built-in: {', '.join(known)})")


def resolve_regimen_path(name: str) -> Path:
    p = Path(name)
    if p.exists() or p.suffix == ".toml" or "/" in name:
        return p
    cand = builtin_dir() / "regimens" / f"{name}.toml"
    if cand.exists():
        return cand
    known = sorted(f.stem for f in (builtin_dir() / "regimens").glob("*.toml"))
    raise ImmunoodeError(f"{name}: no such file or built-in regimen (built-in: {', '.join(known)})")


def _parse_set(items) -> dict[str, float]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ImmunoodeError(f"--set {it!r}: expected NAME=VALUE")
        k, v = it.split("=", 1)
        try:
            val = float(v)
        except ValueError:
            raise ImmunoodeError(f"--set {it!r}: {v!r} is not a number") from None
        if not math.isfinite(val):
            raise ImmunoodeError(f"--set {it!r}: value must be finite")
        out[k.strip()] = val
    return out


def _cmd_check(args) -> int:
    from .sbml import load_any_model
    model = load_any_model(resolve_model_path(args.model))
    print(model.summary())
    print("ok: units and equations are consistent")
    return 0


def _simulate(model_name, regimen_name, sets, t_end, dt, method, rtol, atol, out):
    from .compile import compile_model
    from .io import write_results
    from .regimen import load_regimen
    from .sbml import load_any_model
    from .simulate import simulate

    path = resolve_model_path(model_name)
    triggered = None
    if path.suffix.lower() in (".xml", ".sbml"):   # SBML events with state triggers
        from .sbml import read_sbml_triggered
        triggered = read_sbml_triggered(path)
        model = triggered.model
        if not triggered.events:
            triggered = None
    else:
        model = load_any_model(path)
    for k in sets:
        if k not in model.parameters:
            from .model import _suggest
            raise ImmunoodeError(f"--set {k}: unknown parameter{_suggest(k, model.parameters)}")
    regimen = load_regimen(resolve_regimen_path(regimen_name)) if regimen_name else None
    if triggered is not None:
        target = triggered
        print(f"{model.name}: {len(triggered.events)} state-triggered event(s), simulated "
              f"with root finding", file=sys.stderr)
    else:
        target = compile_model(model)
        print(f"compiled {model.name} in {target.compile_time:.2f} s"
              f"{' (from cache)' if target.cache_hit else ''}", file=sys.stderr)
    ds = simulate(target, regimen, t_end=t_end, dt=dt, parameters=sets, method=method,
                  rtol=rtol, atol=atol)
    if out:
        path = write_results(ds, out)
        print(f"wrote {path}", file=sys.stderr)
    return ds


def _cmd_simulate(args) -> int:
    ds = _simulate(args.model, args.regimen, _parse_set(args.set), args.t_end, args.dt, args.method,
                   args.rtol, args.atol, args.out)
    if not args.out:
        from .io import to_frame
        print(to_frame(ds).to_csv(index=False), end="")
    return 0


def _cmd_run(args) -> int:
    """The main job: the library's NSCLC model, untreated vs pembrolizumab 200 mg q3w."""
    from .compile import compile_model
    from .io import write_results
    from .modelfile import load_model
    from .regimen import load_regimen
    from .simulate import simulate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(resolve_model_path(DEFAULT_MODEL))
    regimen = load_regimen(resolve_regimen_path(DEFAULT_REGIMEN))
    print(f"compiling {model.name} ({len(model.states)} states, {len(model.parameters)} "
          f"parameters; once, then cached) ...", file=sys.stderr, flush=True)
    cm = compile_model(model)
    print(f"compiled in {cm.compile_time:.1f} s{' (from cache)' if cm.cache_hit else ''}",
          file=sys.stderr)
    keep = ["tumor_diameter", "tumor_cells", "resistant_fraction", "occ_PD1", "C_pembro"]
    keep = [k for k in keep if k in cm.record_names]
    arms = {"untreated": simulate(cm, None, t_end=args.t_end, dt=1.0, outputs=keep),
            "pembrolizumab": simulate(cm, regimen, t_end=args.t_end, dt=1.0, outputs=keep)}
    for name, ds in arms.items():
        write_results(ds, out / f"{name}.nc")
        write_results(ds, out / f"{name}.csv")
    d0 = float(arms["untreated"]["tumor_diameter"][0])
    print(f"model {model.name} (hash {arms['pembrolizumab'].attrs['model_hash'][:12]}); "
          f"regimen: {regimen.name}")
    print(f"{'day':>5} {'untreated [cm]':>15} {'pembrolizumab [cm]':>19} {'change':>8} "
          f"{'PD-1 occupancy':>15}")
    for day in (0, 42, 84, 182, 365, 547, 730):
        if day > args.t_end:
            continue
        du = float(arms["untreated"]["tumor_diameter"].sel(time=day, method="nearest"))
        dt_ = float(arms["pembrolizumab"]["tumor_diameter"].sel(time=day, method="nearest"))
        occ = (float(arms["pembrolizumab"]["occ_PD1"].sel(time=day, method="nearest"))
               if "occ_PD1" in keep else float("nan"))
        print(f"{day:>5} {du:>15.2f} {dt_:>19.2f} {100 * (dt_ / d0 - 1):>7.0f}% {occ:>15.2f}")
    plot = _plot_run(arms, out / "tumor_diameter.png")
    print(f"results: {out}/untreated.nc|csv, {out}/pembrolizumab.nc|csv"
          + (f", plot {plot}" if plot else ""))
    return 0


def _plot_run(arms, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, ds in arms.items():
        ax.plot(ds["time"] / 7, ds["tumor_diameter"] * 10, label=name)
    base = float(next(iter(arms.values()))["tumor_diameter"][0]) * 10
    ax.axhline(base * 0.7, ls=":", c="grey", lw=1, label="-30% from baseline (RECIST PR)")
    ax.set_xlabel("weeks")
    ax.set_ylabel("tumor diameter [mm]")
    ax.set_title("Virtual NSCLC patient: untreated vs pembrolizumab 200 mg q3w", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="immunoode",
                                 description="Mechanistic ODE / PK-PD models of the cancer-immunity cycle.")
    ap.add_argument("--version", action="version", version=f"immunoode {__version__}")
    sub = ap.add_subparsers(dest="command")

    r = sub.add_parser("run", help="the main job: the built-in NSCLC model, untreated vs "
                                   "pembrolizumab 200 mg q3w for two years")
    r.add_argument("--out", default="immunoode-results", help="output folder")
    r.add_argument("--t-end", type=float, default=730.0, help="end time in days (default 730)")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("check", help="validate a model file and list its states and parameters")
    c.add_argument("model", help="model file (TOML or SBML .xml) or built-in model name")
    c.set_defaults(func=_cmd_check)

    s = sub.add_parser("simulate", help="simulate a model (optionally under a regimen)")
    s.add_argument("model", help="model file (TOML or SBML .xml) or built-in model name")
    s.add_argument("--regimen", help="regimen file (TOML) or built-in regimen name")
    s.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a parameter")
    s.add_argument("--t-end", type=float, default=365.0, help="end time in model time units")
    s.add_argument("--dt", type=float, default=1.0, help="output interval")
    s.add_argument("--method", default="rodas5p", choices=["rodas5p", "rodas4", "LSODA", "BDF", "Radau"])
    s.add_argument("--rtol", type=float, default=1e-6)
    s.add_argument("--atol", type=float, default=1e-9)
    s.add_argument("--out", help="results file: .nc (netCDF) or .csv; default CSV on stdout")
    s.set_defaults(func=_cmd_simulate)

    from .calibrate.cli import add_fit_command
    from .sbml import add_sbml_commands
    from .sweep.cli import add_sweep_commands
    from .trial import add_trial_command
    add_sbml_commands(sub)
    add_trial_command(sub)
    add_fit_command(sub)
    add_sweep_commands(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "command", None):
        ap.print_help()
        return 0
    try:
        return args.func(args)
    except (ImmunoodeError, ValueError, OSError) as exc:
        msg = str(exc).replace("\n", " ")
        print(f"immunoode: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("immunoode: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
