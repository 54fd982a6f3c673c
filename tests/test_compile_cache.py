"""Compiled artefacts are cached on disk and reused by a new process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, immunoode as im
cm = im.compile_model(im.load_model({path!r}))
print(json.dumps({{"hit": cm.cache_hit, "t": cm.compile_time, "key": cm.key}}))
"""


def compile_in_new_process(cache: Path, model: Path) -> dict:
    env = dict(os.environ, IMMUNOODE_CACHE_DIR=str(cache))
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(path=str(model))], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_cache(tmp_path):
    model = ROOT / "models" / "two_compartment_pk.toml"
    cold = compile_in_new_process(tmp_path, model)
    warm = compile_in_new_process(tmp_path, model)
    assert not cold["hit"] and warm["hit"] and cold["key"] == warm["key"]
    assert warm["t"] < cold["t"]
    files = {p.name for p in tmp_path.iterdir()}
    assert any(f.startswith("m_") for f in files) and any(f.startswith("np_") for f in files)
    assert any((tmp_path / "__pycache__").glob("*.nbi"))  # numba's machine-code index


def test_key_depends_on_equations_not_values():
    import immunoode as im
    a = im.load_model(ROOT / "models" / "two_compartment_pk.toml")
    b = a.with_parameters(CL=0.5)
    assert a.structure_hash() == b.structure_hash()
    assert a.content_hash() != b.content_hash()
