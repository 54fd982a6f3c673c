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

DEFAULT_MODEL = "two_compartment_pk"
DEFAULT_REGIMEN = "pembrolizumab_200mg_q3w"


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
    from .modelfile import load_model
    model = load_model(resolve_model_path(args.model))
    print(model.summary())
    print("ok: units and equations are consistent")
    return 0


def _simulate(model_name, regimen_name, sets, t_end, dt, method, rtol, atol, out):
    from .compile import compile_model
    from .io import write_results
    from .modelfile import load_model
    from .regimen import load_regimen
    from .simulate import simulate

    model = load_model(resolve_model_path(model_name))
    for k in sets:
        if k not in model.parameters:
            from .model import _suggest
            raise ImmunoodeError(f"--set {k}: unknown parameter{_suggest(k, model.parameters)}")
    regimen = load_regimen(resolve_regimen_path(regimen_name)) if regimen_name else None
    cm = compile_model(model)
    print(f"compiled {model.name} in {cm.compile_time:.2f} s"
          f"{' (from cache)' if cm.cache_hit else ''}", file=sys.stderr)
    ds = simulate(cm, regimen, t_end=t_end, dt=dt, parameters=sets, method=method, rtol=rtol,
                  atol=atol)
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = _simulate(DEFAULT_MODEL, DEFAULT_REGIMEN, {}, args.t_end, 1.0, "rodas5p", 1e-8, 1e-10,
                   str(out / "results.nc"))
    from .io import write_results
    write_results(ds, out / "results.csv")
    c = ds["concentration"]
    u = c.attrs["units"]
    print(f"model {ds.attrs['model_name']} (hash {ds.attrs['model_hash'][:12]}), regimen "
          f"{DEFAULT_REGIMEN}, days 0-{args.t_end:g}, {ds.attrs['n_steps']} solver steps")
    for day in (0, 1, 7, 20, 20 + 21 * 5):
        if day <= args.t_end:
            print(f"  day {day:>4}: concentration {float(c.sel(time=day, method='nearest')):8.2f} {u}")
    print(f"results: {out / 'results.nc'} and {out / 'results.csv'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="immunoode",
                                 description="Mechanistic ODE / PK-PD models of the cancer-immunity cycle.")
    ap.add_argument("--version", action="version", version=f"immunoode {__version__}")
    sub = ap.add_subparsers(dest="command")

    r = sub.add_parser("run", help="simulate the built-in default model and regimen")
    r.add_argument("--out", default="immunoode-results", help="output folder")
    r.add_argument("--t-end", type=float, default=147.0, help="end time in days (default 147: seven 3-week cycles)")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("check", help="validate a model file and list its states and parameters")
    c.add_argument("model", help="model file (TOML) or built-in model name")
    c.set_defaults(func=_cmd_check)

    s = sub.add_parser("simulate", help="simulate a model (optionally under a regimen)")
    s.add_argument("model", help="model file (TOML) or built-in model name")
    s.add_argument("--regimen", help="regimen file (TOML) or built-in regimen name")
    s.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a parameter")
    s.add_argument("--t-end", type=float, default=365.0, help="end time in model time units")
    s.add_argument("--dt", type=float, default=1.0, help="output interval")
    s.add_argument("--method", default="rodas5p", choices=["rodas5p", "rodas4", "LSODA", "BDF", "Radau"])
    s.add_argument("--rtol", type=float, default=1e-6)
    s.add_argument("--atol", type=float, default=1e-9)
    s.add_argument("--out", help="results file: .nc (netCDF) or .csv; default CSV on stdout")
    s.set_defaults(func=_cmd_simulate)
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
