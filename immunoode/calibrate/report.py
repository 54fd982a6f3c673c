"""Stage 7e — fit report. Consumes a :class:`~.fit.FitResult`; produces files: fitted
parameters as TOML (a population spec for trial files and a model file per arm model that
overrides the fitted mechanistic parameters), the lmfit report, the target-vs-simulated
table (CSV), plots (targets vs simulated per arm, profiles) and a JSON summary with stage
timings and evaluation counts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["fit_report", "write_fit_outputs", "targets_vs_simulated_plot", "profiles_plot"]


def _fmt(x, pct=True):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{100 * x:5.1f}" if pct else f"{x:.4g}"


def fit_report(result) -> str:
    """A text report in the spirit of lmfit's ``fit_report``: fit statistics, parameters
    with profile intervals and flags, every target against its simulation, held-out
    predictions, stage timings and evaluation counts."""
    spec = result.spec
    lines = [f"[[Fit]] {spec.name}  ({spec.file})",
             f"    seed                 = {spec.seed}",
             f"    arms                 = {', '.join(spec.arms)}",
             f"    plausible cohort     = {spec.cohort['n']} per arm ({spec.cohort['method']})",
             f"    2*NLL (deviance)     = {result.chisqr:.4f}",
             f"    fitted terms         = {len(result.table[result.table.role == 'fit'])} targets",
             f"    effective sample size: " + ", ".join(f"{a} {e:.0f}" for a, e in
                                                         result.ess.items())]
    lines += _rounds_lines(result)
    lines.append("[[Variables]]  (95% profile-likelihood intervals, Δχ² = 3.84)")
    for name, p in spec.parameters.items():
        v = result.values[name]
        if not p.vary:
            lines.append(f"    {name:<22} = {v:.5g} (fixed)")
            continue
        lo, hi, flag = result.intervals.get(name, (math.nan, math.nan, "no profile"))
        at = " (at bound)" if (abs(v - p.min) <= 1e-6 * max(1, abs(p.min))
                               or abs(v - p.max) <= 1e-6 * max(1, abs(p.max))) else ""
        note = f"  ** {flag} **" if flag else ""
        lines.append(f"    {name:<22} = {v:.5g}  [{lo:.4g}, {hi:.4g}]  ({p.kind}){at}{note}")
    lower = [(float(df["chisqr"].min()) - result.chisqr, k) for k, df in result.profiles.items()
             if len(df) and float(df["chisqr"].min()) < result.chisqr - 1e-6]
    if lower:
        d, k = min(lower)
        lines.append(f"    Note: the profile of {k} found a chi2 lower than the optimum by {-d:.3g}: "
                     f"the reported optimum is approximate (a local, not the global, minimum).")
    ad = result.attrs.get("adopted_from_profile")
    if ad:
        lines.append(f"    Note: the local stage stopped at {ad['parameter']} = {ad['from']:.4g} "
                     f"(chi2 {ad['chisqr_from']:.3f}); its profile on the same cohorts found "
                     f"{ad['to']:.4g} (chi2 {ad['chisqr_to']:.3f}), adopted as the optimum.")
    unid = [k for k, (_, _, f) in result.intervals.items() if f]
    if unid:
        lines.append("    Not (fully) identified by the targets: " + ", ".join(
            f"{k} ({result.intervals[k][2]})" for k in unid))
    lines.append("[[Targets]]  (percent; interval = published range or exact 95% CI of k/n)")
    val = getattr(result, "validation", None)
    vcols = (f" {'fresh':>6} {'±se':>5} {'met':>4}" if val is not None else "")
    lines.append(f"    {'id':<4} {'arm':<13} {'statistic':<17} {'role':<8} {'observed':>8} "
                 f"{'interval':>15} {'simulated':>9} {'±MC se':>7} {'met':>4}{vcols}")
    vt = val["table"].set_index("id") if val is not None else None
    for _, r in result.table.iterrows():
        extra = ""
        if vt is not None:
            v = vt.loc[r["id"]]
            extra = (f" {_fmt(v['simulated']):>6} {_fmt(v['mc_se']):>5} "
                     f"{'yes' if v['met'] else 'NO':>4}")
        lines.append(f"    {r['id']:<4} {r['arm']:<13} {r['statistic']:<17} {r['role']:<8} "
                     f"{_fmt(r['observed']):>8} {_fmt(r['low']):>7}-{_fmt(r['high']):<7} "
                     f"{_fmt(r['simulated']):>9} {_fmt(r['mc_se']):>7} "
                     f"{'yes' if r['met'] else 'NO':>4}{extra}")
    fit_rows = result.table[result.table.role == "fit"]
    held = result.table[result.table.role == "heldout"]
    lines.append(f"    fitted targets met: {int(fit_rows.met.sum())}/{len(fit_rows)}; held-out "
                 f"predictions inside the published interval: {int(held.met.sum())}/{len(held)}"
                 + (" (in-sample: on the cohorts the fit was tuned on)" if val is not None
                    else ""))
    if val is not None:
        vf, vh = vt[vt.role == "fit"], vt[vt.role == "heldout"]
        lines.append(f"    FRESH COHORT ({val['n']} patients per arm drawn from the fitted "
                     f"population, seed {val['seed']}; ESS " + ", ".join(
                         f"{a} {e:.0f}" for a, e in val["ess"].items()) + "):")
        lines.append(f"    fitted targets met: {int(vf.met.sum())}/{len(vf)}; held-out "
                     f"predictions inside the published interval: {int(vh.met.sum())}/{len(vh)};"
                     f" 2*NLL = {val['chisqr']:.3f}")
    lines += _conflict_lines(result)
    post = getattr(result, "posterior", None)
    if post is not None:
        st = post.settings
        lines.append(f"[[Posterior]]  (emcee on the best cohorts: {st['walkers']} walkers x "
                     f"{st['steps']} steps, burn-in {st['burn']}, thin {st['thin']}; "
                     f"{len(post.samples)} samples; acceptance {post.acceptance:.2f})")
        lines.append(f"    {'parameter':<22} {'2.5%':>10} {'median':>10} {'97.5%':>10} "
                     f"{'autocorr':>9}")
        for name, q in post.summary().items():
            tau = post.autocorr.get(name, math.nan)
            lines.append(f"    {name:<22} {q['q2.5']:>10.4g} {q['q50']:>10.4g} "
                         f"{q['q97.5']:>10.4g} {tau:>9.3g}")
        short = [k for k, t in post.autocorr.items()
                 if not math.isfinite(t) or 50 * t > st["steps"]]
        if short:
            lines.append("    Chains shorter than 50 autocorrelation times (treat the quantiles "
                         "as rough): " + ", ".join(short))
    lines.append("[[Stages]]  (wall-clock seconds)")
    for k, v in result.stages.items():
        lines.append(f"    {k:<62} {v:9.1f}")
    lines.append("[[Counts]]")
    for k, v in result.counts.items():
        lines.append(f"    {k:<36} = {v:.6g}" if isinstance(v, float) else f"    {k:<36} = {v}")
    if result.lmfit_result is not None:
        import lmfit
        lines.append("[[lmfit report of the final local stage (population parameters)]]")
        lines.append(lmfit.fit_report(result.lmfit_result, show_correl=False))
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return repr(float(v))


def fitted_population_toml(result) -> str:
    """The fitted population as a ``[population.parameters]`` spec (one per arm covariate
    setting), loadable by :func:`immunoode.sampling.load_population_spec` and trial files."""
    spec = result.spec
    out = [f"# Fitted population of {spec.name} ({spec.file}), seed {spec.seed}.",
           "# Lognormal target distributions of the re-weighted patient variables, per arm",
           "# (arm covariates applied; zero = share of patients at exactly 0). Each [<arm>]",
           "# table is a sample_population spec:",
           "# sample_population(tomllib.load(f)[arm], n, seed), or paste its variables into a",
           "# trial file's [population.parameters]."]
    patient = sorted({(v.name, c, e) for v in spec.population.variables for c, e in v.effects
                      if not all(c in a.covariates for a in spec.arms.values())})
    for var, cov, eff in patient:
        val = result.values[eff] if isinstance(eff, str) else float(eff)
        out.append(f"# NOT expressible here: the log-median of {var} also shifts by {val:.6g} x "
                   f"{cov} per patient ({eff}); draw {var} per patient with that shift, or use "
                   f"the re-weighted cohort.")
    out.append("")
    vals = result.values
    for arm in spec.arms.values():
        out.append(f"# arm {arm.name}: {arm.label}")
        for v in spec.population.variables:
            loc = vals[v.location] if isinstance(v.location, str) else float(v.location)
            spr = vals[v.spread] if isinstance(v.spread, str) else float(v.spread)
            shift = sum((vals[e] if isinstance(e, str) else float(e)) * float(arm.covariates.get(c, 0))
                        for c, e in v.effects if c in arm.covariates)
            plaus = arm.trial["population"]["parameters"][v.name]
            lo = plaus.get("lower", plaus.get("low"))
            hi = plaus.get("upper", plaus.get("high"))
            out.append(f"[{arm.name}.parameters.{v.name}]")
            if v.dist == "lognormal":
                out += ['dist = "lognormal"', f"median = {_toml_value(loc * math.exp(shift))}",
                        f"cv = {_toml_value(spr)}"]
            else:
                out += ['dist = "normal"', f"mean = {_toml_value(loc + shift)}",
                        f"sd = {_toml_value(spr)}"]
            if lo is not None:
                out.append(f"lower = {_toml_value(lo)}")
            if hi is not None:
                out.append(f"upper = {_toml_value(hi)}")
            if v.zero is not None:
                z = vals[v.zero] if isinstance(v.zero, str) else float(v.zero)
                out.append(f"zero = {_toml_value(z)}")
            out.append("")
    return "\n".join(out)


def fitted_model_toml(result, model_name: str, model_path: str, units: dict) -> str:
    """A model file that includes ``model_path`` and overrides the fitted mechanistic
    parameters (loadable by :func:`immunoode.load_model`)."""
    spec = result.spec
    lines = [f"# {model_name} with the mechanistic parameters fitted by {spec.name}",
             f"# ({Path(spec.file).name}, seed {spec.seed}); 95% profile intervals in 'source'.",
             "[model]", f'name = "{model_name}_fitted"', 'time_unit = "day"',
             f"include = [{json.dumps(model_path)}]", "", "[parameters]"]
    for m in spec.mechanistic:
        lo, hi, flag = result.intervals.get(m, (math.nan, math.nan, ""))
        if not spec.parameters[m].vary:
            src = (f"held fixed by immunoode fit {Path(spec.file).name} (seed {spec.seed}); "
                   f"not fitted")
        else:
            src = (f"fitted by immunoode fit {Path(spec.file).name} (seed {spec.seed}); 95% "
                   f"profile interval [{lo:.4g}, {hi:.4g}]{'; ' + flag if flag else ''}")
        lines.append(f"{m} = {{ value = {_toml_value(result.values[m])}, unit = "
                     f"{json.dumps(units[m])}, override = true, source = {json.dumps(src)} }}")
    return "\n".join(lines) + "\n"


def fitted_parameters_toml(result) -> str:
    """All fitted values with intervals and flags (a plain TOML table per parameter)."""
    lines = [f"# Fitted parameters of {result.spec.name}; 2*NLL = {result.chisqr:.4f}", ""]
    for name, p in result.spec.parameters.items():
        lo, hi, flag = result.intervals.get(name, (math.nan, math.nan, "no profile"))
        lines += [f"[{name}]", f'kind = "{p.kind}"', f"value = {_toml_value(result.values[name])}",
                  f"vary = {_toml_value(p.vary)}"]
        if p.vary and math.isfinite(lo):
            lines += [f"ci95_low = {_toml_value(lo)}", f"ci95_high = {_toml_value(hi)}"]
        lines += [f"flag = {json.dumps(flag)}", ""]
    return "\n".join(lines)


def _conflict_lines(result) -> list[str]:
    """Report lines of the forced re-fits of missed targets, if any."""
    conf = getattr(result, "conflicts", None) or []
    if not conf:
        return []
    lines = ["[[Target conflicts]]  (each missed target forced into its interval by re-fitting "
             "the population parameters on the final cohorts, alone and all together; best of "
             "the optimum's and the two best other mechanistic values; chi2 of all other terms)"]
    for c in conf:
        missed = ", ".join(f"{m['id']} {100 * m['simulated']:.1f} ({100 * m['low']:.1f}-"
                           f"{100 * m['high']:.1f})" for m in c["newly_missed"]) or "none"
        mech = ", ".join(f"{k} {v:.4g}" for k, v in c["mechanistic"].items())
        if c.get("interval") is not None:
            lo, hi = c["interval"]
            what = (f"{100 * c['at_optimum']:.1f} -> {100 * c['forced_value']:.1f} % "
                    f"({100 * lo:.1f}-{100 * hi:.1f}, ")
        else:
            what = ("together -> " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in
                                               c["forced_values"].items()) + " (")
        lines.append(f"    {c['target']}: {what}{'reached' if c['reached'] else 'NOT reached'}"
                     f"); other terms chi2 {c['chisqr_others_optimum']:.2f} -> "
                     f"{c['chisqr_others_forced']:.2f}{' at ' + mech if mech else ''}; "
                     f"newly missed: {missed}")
    return lines


def _rounds_lines(result) -> list[str]:
    """Report lines of the cohort rounds (adaptive plausible cohorts), if any."""
    rounds = getattr(result, "rounds", None) or []
    if len(rounds) < 2:
        return []
    lines = ["[[Cohort rounds]]  (0 = broad plausible cohort; then defensive-mixture cohorts "
             "centred on the previous optimum)"]
    for r in rounds:
        ess = ", ".join(f"{a} {e:.0f}/{r['n'][a]}" for a, e in r["ess"].items())
        prev = r.get("ess_at_previous_optimum")
        extra = ("; at the previous optimum " + ", ".join(f"{e:.0f}" for e in prev.values())
                 if prev else "")
        lines.append(f"    round {r['round']}: 2*NLL {r['chisqr']:.3f}, {r['evaluations']} "
                     f"evaluations, {r['seconds']:.1f} s; ESS {ess}{extra}")
    return lines


def targets_vs_simulated_plot(result, ax=None):
    """Per arm: published value/interval (grey) vs simulated value ± 2 MC se (colour).

    Returns ``(fig, axes)``.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    tab = result.table
    val = getattr(result, "validation", None)
    vt = val["table"].set_index("id") if val is not None else None
    arms = list(result.spec.arms)
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 4.2), squeeze=False)
    for ax_, arm in zip(axes[0], arms):
        rows = tab[tab.arm == arm].reset_index(drop=True)
        for i, r in rows.iterrows():
            ax_.plot([i, i], [100 * r["low"], 100 * r["high"]], color="0.6", lw=6,
                     solid_capstyle="butt")
            ax_.plot(i, 100 * r["observed"], "k_", ms=14)
            col = "tab:blue" if r["role"] == "fit" else "tab:orange"
            se = r["mc_se"] if math.isfinite(r["mc_se"]) else 0.0
            ax_.errorbar(i, 100 * r["simulated"], yerr=200 * se, fmt="o", color=col)
            if vt is not None:
                v = vt.loc[r["id"]]
                vse = v["mc_se"] if math.isfinite(v["mc_se"]) else 0.0
                ax_.errorbar(i + 0.25, 100 * v["simulated"], yerr=200 * vse, fmt="s",
                             color="tab:green", ms=4)
        ax_.set_xticks(range(len(rows)))
        ax_.set_xticklabels([f"{r['id']}\n{r['statistic']}" for _, r in rows.iterrows()],
                            rotation=60, fontsize=7)
        ax_.set_ylim(0, 100)
        ax_.set_title(result.spec.arms[arm].label, fontsize=9)
        ax_.set_ylabel("percent")
    axes[0][0].legend(handles=[
        plt.Line2D([], [], color="0.6", lw=6, label="published range / 95% CI"),
        plt.Line2D([], [], color="tab:blue", marker="o", ls="", label="simulated (fitted)"),
        plt.Line2D([], [], color="tab:orange", marker="o", ls="", label="simulated (held out)")]
        + ([plt.Line2D([], [], color="tab:green", marker="s", ls="",
                       label="fresh cohort (validation)")] if vt is not None else []),
        fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig, axes


def profiles_plot(result):
    """Profile likelihood (Δχ²) of every profiled parameter, with the 3.84 threshold.

    Returns ``(fig, axes)``.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from .fit import CHI2_95
    names = list(result.profiles)
    if not names:
        fig, ax = plt.subplots()
        ax.text(0.5, 0.5, "no profiles", ha="center")
        return fig, np.array([[ax]])
    ncol = min(4, len(names))
    nrow = int(math.ceil(len(names) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.0 * nrow), squeeze=False)
    for ax_, name in zip(axes.flat, names):
        df = result.profiles[name]
        ax_.plot(df["value"], df["chisqr"] - result.chisqr, "o-", ms=3)
        ax_.axhline(CHI2_95, color="r", ls="--", lw=0.8)
        ax_.axvline(result.values[name], color="k", lw=0.8)
        if result.spec.parameters[name].scale == "log":
            from matplotlib.ticker import NullFormatter
            ax_.set_xscale("log")
            ax_.xaxis.set_minor_formatter(NullFormatter())
        ax_.tick_params(labelsize=7)
        flag = result.intervals.get(name, (0, 0, ""))[2]
        ax_.set_title(name + (f"\n({flag})" if flag else ""), fontsize=8)
        ax_.set_ylabel("Δχ²")
    for ax_ in list(axes.flat)[len(names):]:
        ax_.set_visible(False)
    fig.tight_layout()
    return fig, axes


def write_fit_outputs(result, out_dir) -> list[Path]:
    """Write every output of a fit into ``out_dir`` and return the paths.

    Files: ``report.txt``, ``targets_vs_simulated.csv``, ``fitted_parameters.toml``,
    ``fitted_population.toml``, ``fitted_model_<model>.toml`` (one per arm model),
    ``profiles.csv``, ``summary.json`` (timings, counts, provenance),
    ``targets_vs_simulated.png``, ``profiles.png``.
    """
    import matplotlib.pyplot as plt
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []

    def put(name, text):
        p = out / name
        p.write_text(text, encoding="utf-8")
        files.append(p)

    put("report.txt", fit_report(result) + "\n")
    tab = result.table.copy()
    val = getattr(result, "validation", None)
    if val is not None:
        vt = val["table"].set_index("id")
        tab["validation"] = tab["id"].map(vt["simulated"])
        tab["validation_se"] = tab["id"].map(vt["mc_se"])
        tab["validation_met"] = tab["id"].map(vt["met"])
    for c in ("observed", "low", "high", "simulated", "mc_se") + (
            ("validation", "validation_se") if val is not None else ()):
        tab[c + "_pct"] = 100 * tab.pop(c)
    p = out / "targets_vs_simulated.csv"
    tab.to_csv(p, index=False, float_format="%.4g")
    files.append(p)
    put("fitted_parameters.toml", fitted_parameters_toml(result))
    put("fitted_population.toml", fitted_population_toml(result))
    if result.spec.mechanistic:
        from ..modelfile import load_model
        seen = set()
        for arm in result.spec.arms.values():
            model = arm.trial["trial"]["model"]
            from ..cli import resolve_model_path
            base = Path(arm.trial["_base"])
            mp = Path(str(model))
            mp = (base / mp) if (not mp.is_absolute() and (base / mp).exists()) else \
                resolve_model_path(str(model))
            if str(mp) in seen:
                continue
            seen.add(str(mp))
            m = load_model(mp)
            units = {k: m.parameters[k].unit for k in result.spec.mechanistic}
            rel = Path(_relpath(mp, out))
            put(f"fitted_model_{m.name}.toml", fitted_model_toml(result, m.name, rel.as_posix(),
                                                                 units))
    import pandas as pd
    if result.profiles:
        prof = pd.concat([df.assign(parameter=k) for k, df in result.profiles.items()])
        prof["delta_chisqr"] = prof["chisqr"] - result.chisqr
        p = out / "profiles.csv"
        prof[["parameter", "value", "chisqr", "delta_chisqr"]].to_csv(p, index=False,
                                                                       float_format="%.6g")
        files.append(p)
    post = getattr(result, "posterior", None)
    if post is not None:
        p = out / "posterior.csv"
        post.samples.to_csv(p, index=False, float_format="%.6g")
        files.append(p)
    summary = {"fit": result.spec.name, "chisqr": result.chisqr, "values": result.values,
               "intervals": {k: list(v) for k, v in result.intervals.items()},
               "stages_seconds": result.stages, "counts": result.counts, "ess": result.ess,
               "grid": result.grid, "provenance": result.attrs,
               **({"rounds": result.rounds} if len(getattr(result, "rounds", []) or []) > 1
                  else {}),
               **({"validation": {k: v for k, v in val.items() if k != "table"}}
                  if val is not None else {}),
               **({"conflicts": result.conflicts} if getattr(result, "conflicts", None)
                  else {}),
               **({"posterior": {"summary": post.summary(), "acceptance": post.acceptance,
                                 "autocorr": post.autocorr, "settings": post.settings}}
                  if post is not None else {})}
    put("summary.json", json.dumps(summary, indent=1, default=str))
    for name, fn in (("targets_vs_simulated.png", targets_vs_simulated_plot),
                     ("profiles.png", profiles_plot)):
        fig, _ = fn(result)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)
    return files


def _relpath(target: Path, start: Path) -> str:
    import os
    return os.path.relpath(Path(target).resolve(), Path(start).resolve())
