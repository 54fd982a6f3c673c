"""Run the SBML Test Suite's semantic cases through immunoode's SBML import.

The suite is not part of this repository.  Extract it first, e.g.::

    git --git-dir=<mirror of sbmlteam/sbml-test-suite> archive HEAD cases/semantic \
        | tar -x -C /tmp/sbmlts

then::

    IMMUNOODE_CACHE_DIR=/tmp/immunoode-ts-cache nohup python benchmarks/sbml_test_suite.py \
        /tmp/sbmlts/cases/semantic --out /tmp/sbml_ts.jsonl > /tmp/sbml_ts.log 2>&1 &
    python benchmarks/sbml_test_suite.py --summary /tmp/sbml_ts.jsonl

For every case the runner reads ``NNNNN-settings.txt`` (start, duration, steps,
variables, absolute/relative tolerance, amount/concentration), picks the highest
of the L3v2, L3v1 and L2v4 files, imports it with
:func:`immunoode.sbml.read_sbml_triggered`, simulates it with
:func:`immunoode.triggered.simulate_triggered` (numpy backend: no numba compile
per case) and compares with ``NNNNN-results.csv`` by the suite's rule
``|sim - expected| <= atol + rtol*|expected|`` at every point.  A case is
``pass``, ``fail`` (numbers differ, or the simulation raised), ``refused``
(import raised :class:`~immunoode.errors.ModelError` naming an unsupported
construct), ``timeout`` or ``skipped`` (not a time course: flux balance cases).
Counts are reported per component and test tag (from ``NNNNN-model.m``).

Cases run in a worker subprocess, one after another; the parent restarts the
worker after a case that runs past ``--timeout`` seconds.  Ctrl-C stops cleanly
(results so far are kept in the JSON-lines file, and ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("sbml_test_suite")

PREFERRED = ("l3v2", "l3v1", "l2v4")
#: Tags of the cases libRoadRunner's figures leave out (DAEs, delay equations, fast reactions).
EXCLUDED_TAGS = {"AlgebraicRule", "CSymbolDelay", "FastReaction"}
EVENT_TAGS = {"EventNoDelay", "EventWithDelay"}


# ------------------------------------------------------------------------ case files
def read_settings(path: Path) -> dict:
    """Settings of one case: start, duration, steps, variables, atol, rtol, amount, concentration."""
    out = {"amount": [], "concentration": []}
    for line in path.read_text().splitlines():
        if ":" not in line:
            continue
        k, v = line.split(":", 1)
        k, v = k.strip(), v.strip()
        if k in ("variables", "amount", "concentration"):
            out[k] = [x.strip() for x in v.split(",") if x.strip()]
        elif k in ("start", "duration", "absolute", "relative"):
            out[k] = float(v) if v else None
        elif k == "steps":
            out[k] = int(float(v)) if v else None
    return out


def read_tags(path: Path) -> dict:
    """componentTags, testTags, testType and packagesPresent from the header of ``model.m``."""
    out = {"componentTags": [], "testTags": [], "testType": "", "packagesPresent": []}
    for line in path.read_text(errors="replace").splitlines()[:20]:
        if ":" not in line:
            continue
        k, v = line.split(":", 1)
        k = k.strip()
        if k in ("componentTags", "testTags", "packagesPresent"):
            out[k] = [x.strip() for x in v.split(",") if x.strip()]
        elif k == "testType":
            out[k] = v.strip()
    return out


def read_results(path: Path):
    import numpy as np
    lines = path.read_text().strip().splitlines()
    header = [h.strip() for h in lines[0].split(",")]
    data = np.array([[float(x) if x.strip() not in ("", "NaN", "nan") else math.nan
                      for x in ln.split(",")] for ln in lines[1:]], dtype=float)
    return header, data


def pick_file(case_dir: Path, case: str) -> Path | None:
    for lv in PREFERRED:
        f = case_dir / f"{case}-sbml-{lv}.xml"
        if f.exists():
            return f
    return None


# ---------------------------------------------------------------------- one case
def run_case(case_dir: Path, *, backend: str = "numpy", method: str = "LSODA") -> dict:
    """Import, simulate and compare one case; return a result record."""
    import numpy as np

    from immunoode.errors import ModelError
    from immunoode.sbml import read_sbml_triggered
    from immunoode.triggered import simulate_triggered

    case = case_dir.name
    tags = read_tags(case_dir / f"{case}-model.m")
    rec = {"case": case, "tags": tags["componentTags"] + tags["testTags"]}
    if tags["testType"] != "TimeCourse":
        return {**rec, "result": "skipped", "why": f"testType {tags['testType']}"}
    f = pick_file(case_dir, case)
    if f is None:
        return {**rec, "result": "skipped", "why": "no L2v4/L3 file"}
    rec["file"] = f.name
    st = read_settings(case_dir / f"{case}-settings.txt")
    header, expected = read_results(case_dir / f"{case}-results.csv")
    t_eval = expected[:, 0]
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tm = read_sbml_triggered(f, check_units=False)
    except ModelError as exc:
        return {**rec, "result": "refused", "why": str(exc).replace(str(f), f.name)}
    except Exception as exc:  # an import bug: counted as a failure
        return {**rec, "result": "fail", "why": f"import crashed: {type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-1500:]}
    atol_c = st.get("absolute") or 1e-10
    rtol_c = st.get("relative") or 1e-6
    rtol_i, atol_i = min(1e-10, rtol_c * 1e-4), min(1e-14, atol_c * 1e-6)
    try:
        if backend == "compiled" and not tm.events:
            # the TOML models' path: numba code generation + compiled Rodas5P
            import immunoode as im
            ds = im.simulate(im.compile_model(tm.model), t_eval=t_eval, rtol=rtol_i,
                             atol=atol_i)
        else:
            ds = simulate_triggered(tm, t_eval=t_eval, method=method, rtol=rtol_i, atol=atol_i,
                                    backend="numba" if backend == "compiled" else backend,
                                    include_parameters=True)
    except Exception as exc:
        return {**rec, "result": "fail", "why": f"simulation: {type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-1500:]}
    model = tm.model
    sp = _species_table(f)
    worst = (0.0, "", 0.0)
    for j, var in enumerate(header[1:], start=1):
        try:
            sim = _value(ds, model, sp, var, st, tm)
        except KeyError as exc:
            return {**rec, "result": "fail", "why": f"variable {var!r} not available: {exc}"}
        exp = expected[:, j]
        err = np.abs(sim - exp)
        bound = atol_c + rtol_c * np.abs(exp)
        both_nan = np.isnan(sim) & np.isnan(exp)
        both_inf = np.isinf(sim) & np.isinf(exp) & (np.sign(sim) == np.sign(exp))
        ratio = np.where(both_nan | both_inf, 0.0, np.where(np.isnan(err), np.inf, err / bound))
        k = int(np.argmax(ratio))
        if ratio[k] > worst[0]:
            worst = (float(ratio[k]), var, float(t_eval[k]))
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["worst"] = worst
    rec["result"] = "pass" if worst[0] <= 1.0 else "fail"
    if rec["result"] == "fail":
        rec["why"] = f"{worst[1]} off by {worst[0]:.3g} x tolerance at t={worst[2]:g}"
    return rec


def _species_table(f: Path) -> dict:
    import libsbml
    m = libsbml.readSBMLFromFile(str(f)).getModel()
    return {s.getId(): (s.getCompartment(), s.getHasOnlySubstanceUnits())
            for s in m.getListOfSpecies()}


def _value(ds, model, species: dict, var: str, settings: dict, model_renamed=None):
    """Trajectory of an SBML variable as the case asks for it (amount or concentration)."""
    import numpy as np
    n = len(ds.time)

    alias = dict(getattr(model_renamed, "renamed", ()))

    def raw(name):
        name = alias.get(name, name)
        if name in ds:
            return np.asarray(ds[name].values, float)
        if name in model.parameters:
            return np.full(n, model.parameters[name].value)
        raise KeyError(name)

    v = raw(var)
    if var in species:
        comp, hosu = species[var]
        if var in settings["amount"] and not hosu:
            v = v * raw(comp)
        elif var in settings["concentration"] and hosu:
            v = v / raw(comp)
    return v


# --------------------------------------------------------------------- worker / parent
def worker(root: Path, cases: list[str], out: Path, backend: str, method: str) -> None:
    """Run ``cases`` in order, appending one JSON line per case (preceded by a 'start' line)."""
    # import everything a case needs before the first case's clock starts
    import immunoode.sbml  # noqa: F401
    import immunoode.triggered  # noqa: F401
    import immunoode.unitcheck  # noqa: F401
    with out.open("a") as fh:
        for c in cases:
            fh.write(json.dumps({"start": c}) + "\n")
            fh.flush()
            try:
                rec = run_case(root / c, backend=backend, method=method)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                rec = {"case": c, "result": "fail", "why": f"runner: {exc}", "tags": []}
            fh.write(json.dumps(rec) + "\n")
            fh.flush()


def load_done(out: Path) -> tuple[dict, str | None]:
    done, last_start = {}, None
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "start" in r:
                last_start = r["start"]
            else:
                done[r["case"]] = r
                if last_start == r["case"]:
                    last_start = None
    return done, last_start


def parent(root: Path, cases: list[str], out: Path, timeout: float, backend: str,
           method: str) -> None:
    tags_of = {c: read_tags(root / c / f"{c}-model.m") for c in cases}
    while True:
        done, _ = load_done(out)
        todo = [c for c in cases if c not in done]
        if not todo:
            return
        cmd = [sys.executable, __file__, str(root), "--worker", "--out", str(out),
               "--backend", backend, "--method", method, "--cases", ",".join(todo)]
        proc = subprocess.Popen(cmd)
        last = None
        shown = 0
        since = time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                _, cur = load_done(out)
                if cur != last:
                    last, since = cur, time.monotonic()
                elif cur is not None and time.monotonic() - since > timeout:
                    proc.kill()
                    proc.wait()
                    t = tags_of.get(cur, {})
                    with out.open("a") as fh:
                        fh.write(json.dumps({"case": cur, "result": "timeout",
                                             "why": f"over {timeout:g} s",
                                             "tags": t.get("componentTags", []) +
                                             t.get("testTags", [])}) + "\n")
                    log.warning("case %s timed out", cur)
                    break
                n = len(load_done(out)[0])
                if n // 100 != shown // 100:
                    shown = n
                    log.info("%d/%d cases done", n, len(cases))
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            log.warning("interrupted; results so far are in %s (use --resume)", out)
            raise SystemExit(130)
        if proc.returncode not in (0, -9, None):
            done, cur = load_done(out)
            if cur is not None:
                with out.open("a") as fh:
                    fh.write(json.dumps({"case": cur, "result": "fail",
                                         "why": f"worker died (exit {proc.returncode})",
                                         "tags": []}) + "\n")


def summarize(out: Path) -> str:
    """Table of pass/fail/refused/timeout/skipped counts overall and per tag."""
    done, _ = load_done(out)
    recs = list(done.values())
    kinds = ("pass", "fail", "refused", "timeout", "skipped")
    total = {k: sum(r["result"] == k for r in recs) for k in kinds}
    per = defaultdict(lambda: dict.fromkeys(kinds, 0))
    for r in recs:
        for t in r.get("tags", []):
            per[t][r["result"]] += 1
    groups = {"ODE cases without events": [], "event cases": []}
    for r in recs:
        tags = set(r.get("tags", []))
        if r["result"] == "skipped" or tags & EXCLUDED_TAGS or any(":" in t for t in tags):
            continue
        key = "event cases" if tags & EVENT_TAGS else "ODE cases without events"
        groups[key].append(r["result"])
    lines = [f"{len(recs)} cases: " + ", ".join(f"{k} {v}" for k, v in total.items())]
    for g, res in groups.items():
        lines.append(f"{g} (core SBML; no algebraic rules, delays, fast reactions, packages): "
                     f"{res.count('pass')} of {len(res)} pass"
                     + "".join(f", {k} {res.count(k)}" for k in kinds[1:] if res.count(k)))
    lines += ["",
             "| tag | pass | fail | refused | timeout | skipped |", "|---|---|---|---|---|---|"]
    for t in sorted(per):
        c = per[t]
        lines.append(f"| {t} | " + " | ".join(str(c[k]) for k in kinds) + " |")
    why = defaultdict(int)
    for r in recs:
        if r["result"] in ("refused", "fail"):
            w = r.get("why", "")
            w = w.split(": ", 1)[-1] if r["result"] == "refused" else w
            why[(r["result"], w[:90])] += 1
    lines += ["", "most common reasons:"]
    for (res, w), k in sorted(why.items(), key=lambda x: -x[1])[:40]:
        lines.append(f"{k:5d} {res}: {w}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", help="the suite's cases/semantic folder")
    ap.add_argument("--out", default="/tmp/sbml_ts.jsonl", help="JSON-lines results file")
    ap.add_argument("--range", default=None, help="first-last case numbers, e.g. 1-200")
    ap.add_argument("--cases", default=None, help="comma-separated case names")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    ap.add_argument("--backend", default="numpy", choices=("numpy", "numba", "compiled"),
                    help="numpy: vectorised code, no machine-code compile (default); numba: "
                         "compiled right-hand side in the event path; compiled: cases without "
                         "events on immunoode.simulate (Rodas5P), like TOML models")
    ap.add_argument("--method", default="LSODA", choices=("LSODA", "BDF", "Radau"))
    ap.add_argument("--resume", action="store_true", help="keep results already in --out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--summary", default=None, help="print the summary of a results file")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.summary:
        sys.stdout.write(summarize(Path(a.summary)) + "\n")
        return 0
    root = Path(a.root)
    out = Path(a.out)
    if a.cases:
        cases = a.cases.split(",")
    else:
        cases = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.isdigit())
        if a.range:
            lo, hi = (int(x) for x in a.range.split("-"))
            cases = [c for c in cases if lo <= int(c) <= hi]
    if a.worker:
        worker(root, cases, out, a.backend, a.method)
        return 0
    if out.exists() and not a.resume:
        out.unlink()
    parent(root, cases, out, a.timeout, a.backend, a.method)
    sys.stdout.write(summarize(out) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
