"""The generated parameter table of docs/models.md is up to date with the model files.

The section between ``<!-- BEGIN GENERATED PARAMETERS -->`` and ``<!-- END GENERATED
PARAMETERS -->`` is produced by :func:`parameter_tables` from ``models/nsclc/*.toml`` (module
order of ``models/cic_nsclc.toml``, then ``models/nsclc_minimal.toml`` and the parameters
defined in ``models/nsclc_io_novel_agents.toml``).  Regenerate it with::

    python tests/test_models_docs.py --write
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DOC = ROOT / "docs" / "models.md"
BEGIN = "<!-- BEGIN GENERATED PARAMETERS -->"
END = "<!-- END GENERATED PARAMETERS -->"


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def module_table(path: Path, title: str) -> str:
    """Markdown section (heading, states, parameter table) of one model file."""
    data = tomllib.loads(path.read_text())
    desc = data.get("model", {}).get("description", "")
    lines = [f"### `{title}` — {_cell(desc)}", ""]
    states = data.get("states", {})
    if states:
        st = "; ".join(f"`{n}` [{s.get('unit', '')}] {_cell(s.get('description', ''))}"
                       for n, s in states.items())
        lines += [f"States: {st}", ""]
    params = data.get("parameters", {})
    if params:
        lines += ["| parameter | value | unit | range | description | source | confidence |",
                  "|---|---|---|---|---|---|---|"]
        for n, p in params.items():
            rng = f"{_num(p['lower'])}–{_num(p['upper'])}" if "lower" in p and "upper" in p else ""
            lines.append(f"| `{n}` | {_num(p['value'])} | {p.get('unit', '')} | {rng} | "
                         f"{_cell(p.get('description', ''))} | {_cell(p.get('source', ''))} | "
                         f"{p.get('confidence', '')} |")
        lines.append("")
    return "\n".join(lines)


def parameter_tables() -> str:
    """All module sections (include order of cic_nsclc.toml), then the minimal and novel-agent models."""
    order = tomllib.loads((MODELS / "cic_nsclc.toml").read_text())["model"]["include"]
    parts = [module_table(MODELS / rel, Path(rel).name) for rel in order]
    for extra in ("nsclc_minimal.toml", "nsclc_io_novel_agents.toml"):
        parts.append(module_table(MODELS / extra, extra))
    return "\n".join(parts)


def _generated_region(text: str) -> str:
    i, j = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[i:j].strip("\n")


def test_docs_parameter_table_is_up_to_date():
    assert _generated_region(DOC.read_text()) == parameter_tables().strip("\n"), (
        "docs/models.md parameter tables are stale: run `python tests/test_models_docs.py --write`")


def test_every_module_is_in_the_generated_table():
    text = _generated_region(DOC.read_text())
    for f in (MODELS / "nsclc").glob("*.toml"):
        assert f"### `{f.name}`" in text, f.name


if __name__ == "__main__" and "--write" in sys.argv:
    doc = DOC.read_text()
    i, j = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:i] + "\n" + parameter_tables().strip("\n") + "\n" + doc[j:])
