"""Shared fixtures.  Compiled models are cached on disk (default cache dir), so a
second test run does not pay numba's compile again."""

from pathlib import Path

import pytest

import immunoode as im

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def two_cpt():
    return im.compile_model(im.load_model(ROOT / "models" / "two_compartment_pk.toml"))


@pytest.fixture(scope="session")
def tumor_pd():
    return im.compile_model(im.load_model(DATA / "tumor_pd.toml"))
