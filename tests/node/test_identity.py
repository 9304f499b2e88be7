"""Derived UIDs: the same parts give the same UID in any process; different parts differ."""

from __future__ import annotations

import subprocess
import sys

from pydicom.uid import UID

from dicom_node.identity import derived_uid


def test_derived_uid_is_deterministic_across_processes_and_valid():
    here = derived_uid("1.2.3", "Brain3D@abc", "hash")
    there = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dicom_node.identity import derived_uid; print(derived_uid('1.2.3', 'Brain3D@abc', 'hash'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert here == there
    assert UID(here).is_valid and len(here) <= 64


def test_derived_uid_separates_its_parts():
    assert derived_uid("1.2.3", "4") != derived_uid("1.2.34")
    assert derived_uid("a", "b") != derived_uid("b", "a")
