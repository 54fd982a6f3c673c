"""Run the documentation, so that it cannot rot.

Every Markdown file in ``docs/`` is read from top to bottom, in a fresh temporary
directory (pytest's ``tmp_path``, made the working directory), and its fenced
blocks are handled by their fence language:

* ```` ```python ```` — executed, in order, in one namespace per document (later
  blocks see the names of earlier ones). Their standard output is captured.
* ```` ```toml ```` preceded by ``<!-- file: NAME -->`` (on the line before the
  fence) — written to ``NAME`` in the working directory *at that point of the
  document*, so the Python blocks and commands after it can read the file.
  A ```` ```toml ```` block without that comment is only an illustration.
* ```` ```text ```` preceded by ``<!-- output -->`` — the expected standard output of
  the Python block just before it. Compared line by line after stripping trailing
  blanks; numbers are compared with a relative tolerance of 1e-3 (so a change in the
  last digits of a solver result does not fail the docs, a changed message does).
  Other ```` ```text ```` blocks are illustrations and are not checked.
* ```` ```console ```` — every line ``$ immunoode ARGS`` is run through
  :func:`immunoode.cli.main` (in-process, same working directory) and must exit with
  status 0. Lines without ``$`` are shown output and are not checked.
* anything else (```` ```bash ````, ```` ```toml ```` without a file comment, ...) is
  not executed. The set of fence languages is checked, so a typo such as
  ```` ```pyhton ```` does not silently skip a block.

Compiling a new model structure costs numba ~15-30 s on a cold cache
(``$IMMUNOODE_CACHE_DIR``); the docs therefore reuse two model structures.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

KNOWN_LANGS = {"python", "toml", "text", "console", "bash", ""}
_FENCE = re.compile(r"^```([A-Za-z]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_COMMENT = re.compile(r"<!--\s*(.*?)\s*-->\s*$")
_NUM = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Block:
    lang: str
    code: str
    directive: str | None  # text of an HTML comment on the line before the fence
    line: int


def blocks(text: str) -> list[Block]:
    out = []
    for m in _FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        c = _COMMENT.match(before.strip())
        out.append(Block(m.group(1), m.group(2), c.group(1) if c else None,
                         text.count("\n", 0, m.start()) + 1))
    return out


def same_output(expected: str, actual: str) -> bool:
    e = [ln.rstrip() for ln in expected.strip("\n").splitlines()]
    a = [ln.rstrip() for ln in actual.strip("\n").splitlines()]
    if len(e) != len(a):
        return False
    for le, la in zip(e, a):
        if _NUM.sub("#", le) != _NUM.sub("#", la):
            return False
        for ne, na in zip(_NUM.findall(le), _NUM.findall(la)):
            x, y = float(ne), float(na)
            if abs(x - y) > 1e-3 * max(abs(x), abs(y)) + 1e-12:
                return False
    return True


def runnable_docs() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md")
                  if any(b.lang in ("python", "console") or (b.directive or "").startswith("file:")
                         for b in blocks(p.read_text(encoding="utf-8"))))


def test_fence_languages_are_known():
    for p in sorted(DOCS.glob("*.md")):
        for b in blocks(p.read_text(encoding="utf-8")):
            assert b.lang in KNOWN_LANGS, f"{p.name}:{b.line}: unknown fence language {b.lang!r}"


def test_there_is_something_to_run():
    names = {p.name for p in runnable_docs()}
    assert {"tutorial.md", "model-file.md"} <= names


@pytest.fixture(autouse=True)
def _restore_numpy_printoptions():
    """A page may set numpy's print options (global state): restore them after each page."""
    import numpy as np
    opts = np.get_printoptions()
    yield
    np.set_printoptions(**opts)


@pytest.mark.parametrize("doc", runnable_docs(), ids=lambda p: p.name)
def test_doc_runs(doc, tmp_path, monkeypatch):
    from immunoode.cli import main

    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__docs__"}
    last_out: str | None = None
    for b in blocks(doc.read_text(encoding="utf-8")):
        where = f"{doc.name}:{b.line}"
        directive = b.directive or ""
        if b.lang == "toml" and directive.startswith("file:"):
            name = directive.split(":", 1)[1].strip()
            (tmp_path / name).write_text(b.code, encoding="utf-8")
        elif b.lang == "python":
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    exec(compile(b.code, where, "exec"), ns)
                except Exception as exc:  # pragma: no cover - reported with location
                    raise AssertionError(f"{where}: python block failed: {exc!r}\n"
                                         f"--- output so far ---\n{buf.getvalue()}") from exc
            last_out = buf.getvalue()
        elif b.lang == "text" and directive == "output":
            assert last_out is not None, f"{where}: <!-- output --> without a python block before"
            assert same_output(b.code, last_out), (
                f"{where}: the documented output differs from the real one\n"
                f"--- documented ---\n{b.code}--- real ---\n{last_out}")
        elif b.lang == "console":
            for ln in b.code.splitlines():
                if ln.startswith("$ immunoode "):
                    args = shlex.split(ln[len("$ immunoode "):])
                    with contextlib.redirect_stdout(io.StringIO()):
                        rc = main(args)
                    assert rc == 0, f"{where}: `{ln[2:]}` exited with {rc}"


def test_output_comparison_is_strict_about_words():
    assert same_output("a 1.0000 b\n", "a 1.00001 b")
    assert not same_output("a 1.0 b\n", "a 1.1 b")
    assert not same_output("unknown symbol 'k'\n", "unknown name 'k'")
    assert not same_output("x\n", "x\ny\n")
