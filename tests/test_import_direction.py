"""The packages import one another as contracts.md allows: ``worker`` imports ``dicom_node``
and ``inference``; ``dicom_node`` reaches ``worker`` only through ``worker/app.py`` (it codes
SR findings with ``inference.report_schema``); ``inference`` imports nothing of ours.
Checked on the source, so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("dicom_node", "inference", "worker")
ALLOWED = {
    "inference": {"inference"},
    "dicom_node": {"dicom_node", "inference", "worker.app"},
}


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in modules if m.split(".", 1)[0] in OURS}


def _violations(package: str) -> list[str]:
    allowed = ALLOWED[package]
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in sorted(_imported_modules(path)):
            if not any(module == a or module.startswith(a + ".") for a in allowed) and not any(
                a.startswith(module + ".") for a in allowed
            ):
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_contract_allows(package: str) -> None:
    assert _violations(package) == []


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text("def f():\n    from dicom_node.series_writer import write_series\n")
    assert "dicom_node.series_writer" in _imported_modules(source)
