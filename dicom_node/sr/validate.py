"""Validate a written SR with the two independent checkers of Debian's packages.

``dciodvfy`` (dicom3tools) checks the IOD: modules, attribute types, value
representations, enumerated values. ``dsrdump`` (dcmtk) reads the document tree and checks
the SR-specific constraints (relationship and value-type rules of the IOD). Each catches
errors the other misses, so an SR is sent only when both report none. A tool that is not
installed is skipped; ``available_validators`` says which ran.

dciodvfy quotes the offending value (a patient's name, a birth date) as ``[n] = <value>``;
those values are withheld from the messages returned, which go to logs and the audit trail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

#: The validators, each with the Debian package it comes in.
VALIDATOR_PACKAGES = {"dciodvfy": "dicom3tools", "dsrdump": "dcmtk"}
VALIDATORS = tuple(VALIDATOR_PACKAGES)
_TIMEOUT_S = 60
# "PN [1] = <DOE^JOHN> - Length invalid ...": the value runs to the ">" that ends the line or
# precedes " - ", so a value holding "<" or ">" itself is withheld whole; a value holding a line
# break leaves its first line without the ">", and the rest of that line is withheld.
_QUOTED_VALUE = re.compile(r"(\[\d+\] = )<(?:.*?>(?= - |\s*$)|[^>]*$)")


def available_validators() -> tuple[str, ...]:
    return tuple(name for name in VALIDATORS if shutil.which(name))


def validate_sr(path: Path | str) -> list[str]:
    """Errors found in the SR file at ``path`` by every installed validator (empty: valid).

    Warnings are not errors (dciodvfy exits 0 when it finds only warnings).
    """
    path = Path(path)
    errors: list[str] = []
    if shutil.which("dciodvfy"):
        errors += _dciodvfy(path)
    if shutil.which("dsrdump"):
        errors += _dsrdump(path)
    return errors


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TCP_NODELAY": "1"}
    # The tools print text values in the SR's own character set, not necessarily UTF-8.
    return subprocess.run(
        argv, capture_output=True, text=True, errors="replace", timeout=_TIMEOUT_S, env=env, check=False
    )


def _dciodvfy(path: Path) -> list[str]:
    result = _run("dciodvfy", str(path))
    lines = (result.stdout + result.stderr).splitlines()
    errors = [
        "dciodvfy: " + _QUOTED_VALUE.sub(r"\1<value withheld>", line.strip())
        for line in lines
        if line.startswith("Error")
    ]
    if result.returncode != 0 and not errors:  # its other lines may quote values: not repeated
        errors.append(f"dciodvfy: exit status {result.returncode} without an error line")
    return errors


def _dsrdump(path: Path) -> list[str]:
    result = _run("dsrdump", "+Pl", str(path))
    lines = result.stderr.splitlines()
    errors = [f"dsrdump: {line.strip()}" for line in lines if line.startswith(("E:", "F:"))]
    if result.returncode != 0 and not errors:  # its other lines may quote values: not repeated
        errors.append(f"dsrdump: exit status {result.returncode} without an error line")
    return errors


def warnings_of(path: Path | str) -> list[str]:
    """Warnings both validators print (for documentation and review, not a gate)."""
    path = Path(path)
    found: list[str] = []
    if shutil.which("dciodvfy"):
        result = _run("dciodvfy", str(path))
        found += [
            f"dciodvfy: {line.strip()}"
            for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Warning")
        ]
    if shutil.which("dsrdump"):
        result = _run("dsrdump", "+Pl", str(path))
        found += [f"dsrdump: {line.strip()}" for line in result.stderr.splitlines() if line.startswith("W:")]
    return found
