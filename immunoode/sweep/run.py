"""Stage 7 — run a sweep.  Consumes a :class:`~immunoode.sweep.spec.SweepSpec` (or sweep file)
and an engine; produces an ``xarray.Dataset`` over ``scenario`` × ``patient`` (× ``scan``,
``drug``) with per-scenario summaries, streamed chunk by chunk to a Zarr store.

Work is cut into chunks of one scenario × one block of patients.  The parent compiles the
model once (the workers then load it from the on-disk cache), samples the virtual population
once (every scenario sees the same patients: common random numbers), sends the chunks to the
engine and writes each result into the store as it arrives, with the chunk marked done.  A
rerun of the same sweep on the same store skips the finished chunks (``resume``).  A chunk
that raises is retried ``retries`` times, then recorded as failed (its patients get
``status = -30``), never dropped.  Ctrl-C cancels what is pending; finished chunks stay in
the store.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import xarray as xr

from .._version import __version__
from ..errors import ImmunoodeError
from ..progress import Progress
from .block import BOR_CODES, PATTERN_CODES, SITC_CODES, block_variables, drug_labels, simulate_block
from .engines import AbstractEngine, SerialEngine
from .spec import FACTORS, SweepSpec, load_sweep

__all__ = ["run_sweep", "open_sweep", "prepare_sweep", "SweepStoreError"]

log = logging.getLogger(__name__)
CHUNK_TODO, CHUNK_DONE, CHUNK_FAILED = 0, 1, 2
STATUS_CHUNK_FAILED = -30


class SweepStoreError(ImmunoodeError):
    """The results store cannot be used for this sweep (different sweep, not a sweep store)."""


# --------------------------------------------------------------------------- preparation
def sweep_model(path: str, lesions: Mapping | None):
    """``(compiled model, LesionModel or None)`` of a sweep: with ``[lesions]`` the multi-lesion
    transform of the model file (:func:`immunoode.trial._build_model`, as a trial builds it)."""
    from ..trial import _build_model
    return _build_model(path, Path(path).parent, lesions)


@functools.lru_cache(maxsize=4)
def _worker_model(path: str, expected_key: str, lesions_json: str = "null",
                  expected_content: str | None = None):
    """Compiled model (and LesionModel) in a worker: loaded from the on-disk compile cache.

    Raises if the model file changed since the sweep started: its structure (compile key)
    or, with ``expected_content``, a parameter value (content hash).
    """
    cm, lm = sweep_model(path, json.loads(lesions_json))
    if expected_content is not None and cm.model.content_hash() != expected_content:
        raise ImmunoodeError(f"{path}: the model's parameter values changed since the sweep "
                             "started; rerun the sweep (a resumed store would mix two models)")
    if cm.key != expected_key:
        raise ImmunoodeError(f"{path}: the model changed since the sweep started "
                             f"(compile key {cm.key} != {expected_key})")
    return cm, lm


def run_chunk(payload: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Worker entry point: simulate one scenario × patient block (picklable payload)."""
    from .policy import make_policy
    spec = payload["spec"]
    cm, lm = _worker_model(payload["model_path"], payload["model_key"],
                           json.dumps(spec["trial"].get("lesions"), sort_keys=True),
                           payload.get("model_content"))
    policy = make_policy(payload["factors"]["policy"], spec, payload["python_policies"])
    t0 = time.perf_counter()
    out = simulate_block(cm, spec, payload["factors"], payload["patients"], payload["columns"],
                         payload["in_subgroup"], payload["scan_days"], policy=policy,
                         lesion_model=lm, present=payload.get("present"))
    out["_wall_s"] = np.array(time.perf_counter() - t0)
    return out


def _subgroup_mask(pop: xr.Dataset, rule: Mapping | None) -> np.ndarray:
    n = pop.sizes["patient"]
    if rule is None:
        return np.ones(n, bool)
    m = np.ones(n, bool)
    for var, cond in rule.items():
        v = pop[var].values
        if isinstance(cond, list):
            m &= np.isin(v.astype(str) if v.dtype.kind in "OUS" else v, cond)
        else:
            if "min" in cond:
                m &= v >= cond["min"]
            if "max" in cond:
                m &= v <= cond["max"]
    return m


def apply_population_effects(pop: xr.Dataset, effects: Mapping) -> xr.Dataset:
    """Sampled parameters with a covariate effect ``exp(sum beta * covariate)`` on their log
    (``[population_effects]``, e.g. a fitted PD-L1 effect on k_CTL): each patient keeps its
    quantile of the parameter's truncated distribution, now that of the scaled distribution
    truncated to the same bounds (:func:`immunoode.sampling.rescale_at_quantile`), as a
    calibration's shifted, truncated population model has it."""
    from ..sampling import rescale_at_quantile
    if not effects:
        return pop
    pop = pop.copy()
    for par, e in effects.items():
        shift = sum(beta * pop[cov].values.astype(float) for cov, beta in e["effects"].items())
        v = rescale_at_quantile(par, e["dist"], pop[par].values, np.exp(shift))
        pop[par] = (pop[par].dims, v, dict(pop[par].attrs))
    return pop


def lesion_presence(lm, N: int, seed: int) -> np.ndarray:
    """(patient, lesion) lesions present, drawn from their prevalences as a trial draws them
    (one uniform per patient and lesion, index lesion always present) from the sweep's own
    stream ``SeedSequence([seed, 2])``; every scenario sees the same draw."""
    if lm is None:
        return np.ones((N, 1), bool)
    lesion_seed = int(np.random.SeedSequence([int(seed), 2]).generate_state(1)[0])
    return lm.draw_presence(N, lesion_seed)


def lesion_info(spec_data: Mapping, lm) -> dict:
    """Names, sites, node flags and organ ids of the sweep's lesions (one lesion without [lesions])."""
    from ..lesions import site_index
    if lm is None:
        site = str(spec_data["trial"]["trial"].get("lesion_site", "lung"))
        return {"names": [site + "1"], "sites": [site], "is_node": [site == "lymph_node"],
                "organ": [0]}
    return {"names": lm.lesion_names, "sites": lm.sites, "is_node": [les.is_node for les in lm.lesions],
            "organ": [site_index(x) for x in lm.sites]}


def prepare_sweep(spec: SweepSpec, *, n: int | None = None, return_lesions: bool = False):
    """Compile the model (filling the disk cache), sample the population, cut the chunks.

    Returns ``(cm, population Dataset, columns, scan_days, subgroup masks)`` and, with
    ``return_lesions``, also ``(LesionModel or None, present (patient, lesion))``.  With
    ``[lesions]`` the columns are those of the multi-lesion model (local parameters times the
    lesion's factor) and absent lesions have every local state at 0, as in a trial.
    """
    from ..sampling import sample_population
    from ..trial import _absent_lesions_zero, _simulation_columns, scan_times
    d = spec.data
    cm, lm = sweep_model(d["sweep"]["model"], d["trial"].get("lesions"))
    N = int(n if n is not None else d["sweep"]["n"])
    pop_seed = int(np.random.SeedSequence([int(d["sweep"]["seed"]), 1]).generate_state(1)[0])
    pop = sample_population(d["trial"]["population"], N, seed=pop_seed,
                            method=d["trial"]["trial"]["method"])
    pop = apply_population_effects(pop, d.get("population_effects", {}))
    present = lesion_presence(lm, N, int(d["sweep"]["seed"]))
    if lm is None:
        cols = _simulation_columns(cm, pop, d["trial"])
    else:
        cols = lm.expand_columns(_simulation_columns(lm.base, pop, d["trial"]))
        if not present.all():
            cols = _absent_lesions_zero(cm, lm, cols, present)
    T = scan_times(d["trial"])
    masks = {"all": np.ones(N, bool)}
    for name, rule in d["subgroups"].items():
        masks[name] = _subgroup_mask(pop, rule)
    if return_lesions:
        return cm, pop, cols, T, masks, (lm, present)
    return cm, pop, cols, T, masks


# --------------------------------------------------------------------------- store
class _Store:
    """Zarr group: one array per output, chunked (1 scenario, 1 block); ``chunk_status``."""

    def __init__(self, path, spec: SweepSpec, fingerprint: str, shapes: dict, attrs: dict,
                 resume: bool):
        import zarr
        self.path = Path(path)
        exists = (self.path / "zarr.json").exists()
        if exists and resume:
            g = zarr.open_group(str(self.path), mode="a")
            fp = g.attrs.get("sweep_fingerprint")
            if fp is None:
                raise SweepStoreError(f"{self.path}: not an immunoode sweep store")
            if fp != fingerprint:
                raise SweepStoreError(f"{self.path}: holds a different sweep (fingerprint {fp} != "
                                      f"{fingerprint}); use another --out, or --overwrite")
            self.g = g
            return
        self.g = zarr.open_group(str(self.path), mode="w")
        for name, (shape, chunks, dtype, fill, dims) in shapes.items():
            self.g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                                dimension_names=list(dims))
        self.g.attrs.update(attrs)

    def status(self) -> np.ndarray:
        return self.g["chunk_status"][:]

    def write(self, s: int, b: int, sl: slice, res: Mapping[str, np.ndarray], status: int) -> None:
        for k, v in res.items():
            if k.startswith("_"):
                continue
            self.g[k][s, sl] = v
        self.g["chunk_wall_s"][s, b] = float(res.get("_wall_s", np.nan))
        self.g["chunk_status"][s, b] = status  # last: the chunk counts as done only when complete


# --------------------------------------------------------------------------- run
def run_sweep(sweep, out=None, *, engine: AbstractEngine | None = None, resume: bool = True,
              progress: bool = False, policies: Mapping[str, Any] | None = None,
              n: int | None = None, retries: int = 1, max_chunks: int | None = None) -> xr.Dataset:
    """Run every scenario of a sweep over the same virtual population.

    Parameters
    ----------
    sweep : sweep file, mapping or :class:`SweepSpec`.
    out : Zarr store path (``results.zarr``); None keeps everything in memory (no resume).
    engine : :class:`SerialEngine` (default), ``ProcessEngine(n)`` or ``DaskEngine(...)``.
    resume : reuse the finished chunks of ``out`` (same sweep only); False starts afresh.
    progress : chunks, scenarios, patients/s and ETA on stderr.
    policies : Python policies (name -> AbstractPolicy or callable) the sweep file names.
    n : override the number of patients.
    retries : times a failing chunk is resubmitted before it is recorded as failed.
    max_chunks : stop after this many chunks in this call (for tests and staged runs).

    Returns
    -------
    Dataset (``scenario``, ``patient``, ``scan``, ``drug``) with per-patient results and the
    per-scenario summaries of :func:`immunoode.sweep.summary.summarize_sweep`; ``attrs`` hold
    provenance and ``chunks_computed`` (chunks run by this call).
    """
    spec = sweep if isinstance(sweep, SweepSpec) else load_sweep(sweep, policies=policies)
    if not spec.scenarios:
        raise ImmunoodeError(f"sweep {spec.name!r} has design {spec.data['sweep']['design']!r}; "
                             "use run_gsa / optimize_schedule for it")
    engine = engine or SerialEngine()
    d = spec.data
    t_start = time.perf_counter()
    cm, pop, cols, T, masks, (lm, present) = prepare_sweep(spec, n=n, return_lesions=True)
    N = pop.sizes["patient"]
    les = lesion_info(d, lm)
    L = len(les["names"])
    B = int(d["sweep"]["block"])
    blocks = [slice(a, min(a + B, N)) for a in range(0, N, B)]
    Sc = len(spec.scenarios)
    drugs = drug_labels(d)
    content = cm.model.content_hash()  # parameter values too: a resume never mixes two models
    fingerprint = spec.fingerprint() + f"-n{N}-{cm.key}-{content[:16]}"
    shapes = {}
    for k, (dims, dt, fill) in block_variables(len(T), len(drugs), L).items():
        extra = tuple({"scan": len(T), "drug": len(drugs), "lesion": L}[x] for x in dims)
        shapes[k] = ((Sc, N) + extra, (1, B) + extra, dt, fill, ("scenario", "patient") + dims)
    shapes["chunk_status"] = ((Sc, len(blocks)), (Sc, len(blocks)), np.int8, 0, ("scenario", "block"))
    shapes["chunk_wall_s"] = ((Sc, len(blocks)), (Sc, len(blocks)), np.float64, np.nan,
                              ("scenario", "block"))
    attrs = _provenance(spec, cm, pop, T, drugs, fingerprint, N, B, les)
    store = _Store(out, spec, fingerprint, shapes, attrs, resume) if out is not None else None
    mem = None
    if store is None:
        mem = {k: np.full(shape, fill, dtype=dt) for k, (shape, _, dt, fill, _) in shapes.items()}
    status = store.status() if store is not None else mem["chunk_status"]

    todo = [(s, b) for s in range(Sc) for b in range(len(blocks)) if status[s, b] != CHUNK_DONE]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    col_names = list(cols)

    def payload(s, b):
        sl = blocks[b]
        sc = spec.scenarios[s]
        return {"model_path": d["sweep"]["model"], "model_key": cm.key, "model_content": content,
                "spec": d,
                "factors": dict(sc.factors), "patients": np.arange(sl.start, sl.stop),
                "columns": {k: cols[k][sl] for k in col_names},
                "in_subgroup": masks[sc.factors["subgroup"]][sl], "scan_days": T,
                "python_policies": dict(policies or {}), "present": present[sl]}

    prog = Progress(len(todo), progress, "chunks", per_item=B, rate_unit=" patients")
    done = failed = 0
    per_scen_left = {s: sum(1 for x in todo if x[0] == s) for s in range(Sc)}
    computed = []
    attempt = 0
    pending = list(todo)
    errors: dict[str, str] = {}
    try:
        while pending:
            again = []
            for (s, b), res in engine.imap_unordered(run_chunk, [((s, b), payload(s, b)) for s, b in pending]):
                if isinstance(res, BaseException):
                    if attempt < retries:
                        again.append((s, b))
                        log.warning("chunk (scenario %d, block %d) failed, retrying: %s", s, b, res)
                        continue
                    failed += 1
                    errors[f"{s},{b}"] = f"{type(res).__name__}: {res}"
                    sl = blocks[b]
                    res = {"status": np.full(sl.stop - sl.start, STATUS_CHUNK_FAILED, np.int16),
                           "in_subgroup": masks[spec.scenarios[s].factors["subgroup"]][sl]}
                    st = CHUNK_FAILED
                else:
                    st = CHUNK_DONE
                    computed.append((s, b))
                if store is not None:
                    store.write(s, b, blocks[b], res, st)
                else:
                    for k, v in res.items():
                        if not k.startswith("_"):
                            mem[k][s, blocks[b]] = v
                    mem["chunk_wall_s"][s, b] = float(res.get("_wall_s", np.nan))
                    mem["chunk_status"][s, b] = st
                done += 1
                per_scen_left[s] -= 1
                n_done = sum(1 for v in per_scen_left.values() if v == 0)
                prog.update(done, failed, f"  scenarios {n_done}/{Sc}")
            pending = again
            attempt += 1
    except KeyboardInterrupt:
        if progress:
            sys.stderr.write(f"\ninterrupted: {done} chunks finished and stored; rerun to resume\n")
        raise
    if store is not None:
        if errors:
            old = json.loads(store.g.attrs.get("failed_chunks", "{}"))
            old.update(errors)
            store.g.attrs["failed_chunks"] = json.dumps(old)
        ds = open_sweep(out)
    else:
        ds = _assemble(mem, attrs)
        ds.attrs["failed_chunks"] = json.dumps(errors)
    ds.attrs["chunks_computed"] = len(computed)
    ds.attrs["chunks_computed_list"] = json.dumps(computed)
    ds.attrs["engine"] = engine.describe()
    ds.attrs["run_wall_time_s"] = time.perf_counter() - t_start
    return ds


def _provenance(spec: SweepSpec, cm, pop, T, drugs, fingerprint, N, B, les: Mapping) -> dict:
    from .spec import FACTORS as _F
    d = spec.data
    covars = {k: v.values.tolist() for k, v in pop.data_vars.items() if v.dims == ("patient",)}
    return {
        "title": f"immunoode sweep: {spec.name}",
        "sweep_name": spec.name,
        "sweep_file": spec.file or "",
        "sweep_spec": json.dumps(d, sort_keys=True, default=str),
        "sweep_fingerprint": fingerprint,
        "scenarios": json.dumps([{"name": s.name, "factors": dict(s.factors)} for s in spec.scenarios],
                                default=str),
        "factor_names": json.dumps(list(_F)),
        "varied_factors": json.dumps(list(d["factors"])),
        "scan_days": json.dumps(np.asarray(T).tolist()),
        "drugs": json.dumps(drugs),
        "population": json.dumps(covars, default=str),
        "n_patients": int(N),
        "block": int(B),
        "seed": int(d["sweep"]["seed"]),
        "model_name": cm.model.name,
        "model_path": d["sweep"]["model"],
        "model_hash": cm.model.structure_hash(),
        "compile_key": cm.key,
        "parameters": json.dumps(d["sweep"]["parameter_values"]),
        "solver": json.dumps({"method": cm.method, **d["trial"]["solver"]}),
        "immunoode_version": __version__,
        "codes_bor": json.dumps(BOR_CODES),
        "codes_sitc": json.dumps(SITC_CODES),
        "codes_pattern": json.dumps(PATTERN_CODES),
        "lesions": json.dumps(dict(les)),
        "lesions_per_patient": len(les["names"]),
        "lesion_note": ("one lesion per patient: every progression is a one-lesion, one-organ "
                        "(oligo) progression and radiotherapy treats the whole simulated tumor"
                        if d["trial"].get("lesions") is None else
                        f"{len(les['names'])} lesion compartments ({', '.join(les['sites'])}) sharing "
                        "the systemic compartments; absent lesions (prevalence) have no tumor; "
                        "radiotherapy / resection act on single lesions"),
    }


def _assemble(arrays: Mapping[str, np.ndarray], attrs: Mapping) -> xr.Dataset:
    """Dataset from raw arrays + attrs (codes decoded, factor coordinates, summaries)."""
    from .summary import summarize_sweep
    shapes_dims = block_variables(1, 1, 1)
    scen = json.loads(attrs["scenarios"])
    T = np.asarray(json.loads(attrs["scan_days"]))
    drugs = json.loads(attrs["drugs"])
    ds = xr.Dataset()
    for k, (dims, _, _) in shapes_dims.items():
        if k in arrays:  # stores written before a variable existed lack it
            ds[k] = (("scenario", "patient") + dims, np.asarray(arrays[k]))
    ds["chunk_status"] = (("scenario", "block"), np.asarray(arrays["chunk_status"]))
    ds["chunk_wall_s"] = (("scenario", "block"), np.asarray(arrays["chunk_wall_s"]))
    for var, codes in (("bor", BOR_CODES), ("sitc", SITC_CODES), ("pattern", PATTERN_CODES)):
        c = ds[var].values
        lab = np.where(c >= 0, np.asarray(codes, dtype=object)[np.clip(c, 0, None)], "")
        ds[var] = (("scenario", "patient"), lab.astype(str))
    ds = ds.assign_coords(scenario=np.arange(len(scen)), patient=np.arange(ds.sizes["patient"]),
                          scan=np.arange(len(T)), drug=drugs)
    ds = ds.assign_coords(scan_day=("scan", T), scenario_name=("scenario", [s["name"] for s in scen]))
    les = json.loads(attrs.get("lesions", "null")) or {"names": ["lesion1"], "sites": [""]}
    ds = ds.assign_coords(lesion=les["names"], lesion_site=("lesion", les["sites"]))
    for f in FACTORS:
        vals = [s["factors"][f] for s in scen]
        vals = ["regimen" if v is None else v for v in vals]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            arr = np.asarray(vals, dtype=float)
        else:
            arr = np.asarray([str(v) for v in vals])
        ds = ds.assign_coords({f: ("scenario", arr)})
    pop = json.loads(attrs["population"])
    for k, v in pop.items():
        ds[f"population_{k}"] = (("patient",), np.asarray(v))
    ds["failed"] = ds["in_subgroup"] & (ds["status"] != 0)
    _attrs_units(ds)
    ds.attrs.update(attrs)
    ds.attrs.pop("population", None)
    return summarize_sweep(ds)


def _attrs_units(ds: xr.Dataset) -> None:
    u = {"size": ("mm", "measured lesion size at the scan (0 below the detection limit); with "
                  "several lesions the sum of the target lesions' diameters"),
         "lesion_size": ("mm", "measured size of every lesion at the scan (0 below the detection "
                                "limit, NaN absent); lymph nodes: short axis"),
         "lesion_present": ("1", "the patient has the lesion (drawn from its prevalence)"),
         "lesion_progressing": ("1", "the lesion progressed at the first RECIST progression"),
         "lesion_rt_courses": ("1", "radiotherapy courses given to the lesion"),
         "lesion_resected": ("1", "the lesion was resected"),
         "pfs_time": ("day", "progression-free survival time (RECIST 1.1)"),
         "pfs2_time": ("day", "time to the second progression (nadir reset at the first)"),
         "time_on_treatment": ("day", "first dose to last dose plus one interval"),
         "last_dose_day": ("day", "day of the last dose given"),
         "cumulative_dose": ("state unit of the dosed compartment (mg for the antibodies)",
                             "total amount given per drug"),
         "tox_first_day": ("day", "day of the first grade >= 3 adverse event"),
         "best_pct_change": ("%", "best change of the sum of diameters from baseline"),
         "action": ("1", "policy action at the scan: " + json.dumps(
             __import__("immunoode.sweep.policy", fromlist=["ACTION_CODES"]).ACTION_CODES)),
         "status": ("1", "0 = success; < 0 solver failure; -30 = chunk failed; -100 = not in subgroup")}
    for k, (unit, desc) in u.items():
        if k in ds:
            ds[k].attrs.update(units=unit, long_name=desc)
    ds["scan_day"].attrs.update(units="day", long_name="scan day (baseline = 0)")


def open_sweep(path) -> xr.Dataset:
    """Read a sweep results store (complete or not) as a Dataset with summaries."""
    import zarr
    p = Path(path)
    if not (p / "zarr.json").exists():
        raise SweepStoreError(f"{p}: no sweep results store here")
    g = zarr.open_group(str(p), mode="r")
    attrs = dict(g.attrs)
    if "sweep_fingerprint" not in attrs:
        raise SweepStoreError(f"{p}: not an immunoode sweep store")
    arrays = {k: g[k][:] for k in g.array_keys()}
    ds = _assemble(arrays, attrs)
    ds.attrs["store"] = str(p)
    return ds
