"""docs/bad-input.md stays true: every test it names exists, and every abusive request of the
server's load test is listed in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-input.md"


def _tables() -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, rows of cells) for each markdown table of the catalogue."""
    tables, header, rows = [], None, []
    for line in DOC.read_text().splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = [c.lower() for c in cells]
            elif not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif header is not None:
            tables.append((header, rows))
            header, rows = None, []
    return tables


def _column(name: str) -> list[str]:
    return [row[header.index(name)] for header, rows in _tables() if name in header
            for row in rows]


def _defined_tests() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        for name in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M):
            found.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_every_test_the_catalogue_names_exists():
    defined = _defined_tests()
    refs = [ref for cell in _column("test") for ref in re.findall(r"`([^`]+)`", cell)]
    assert len(refs) > 40
    missing = []
    for ref in refs:
        if ref.startswith("...["):  # a parameter of the test named above it
            continue
        path, _, name = ref.rpartition("::")
        name = name.split("[")[0]
        if name not in defined or (path and path not in defined[name]):
            missing.append(ref)
    assert not missing, f"docs/bad-input.md names tests that do not exist: {missing}"


def test_every_load_case_is_in_the_catalogue():
    from tests.serve.load import abuse_cases

    listed = {kind for cell in _column("load case") for kind in re.findall(r"`(\w+)`", cell)}
    cases = {c.kind for c in abuse_cases(api_key="k", outside="/x", max_tokens_limit=16,
                                         max_request_bytes=65536, context_length=512)}
    assert cases - listed == set(), "load cases missing from docs/bad-input.md"
    assert listed - cases == set(), "docs/bad-input.md lists load cases that do not exist"
