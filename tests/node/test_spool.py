"""The spool's shortcuts keep its guarantees: remembered folders, the free-space estimate, duplicates."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest

from dicom_node.spool import Spool, dataset_offset, file_meta_bytes

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _store(spool: Spool, sop_uid: str, dataset: bytes, series_uid: str = "1.2.3.1"):  # type: ignore[no-untyped-def]
    return spool.store("1.2.3", series_uid, sop_uid, file_meta_bytes(MR, sop_uid, EXPLICIT_LE), dataset)


def test_a_folder_removed_behind_the_spools_back_is_made_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = _store(spool, "1.2.3.1.1", b"\x08\x00\x18\x00" + b"a" * 100)
    shutil.rmtree(first.path.parent)  # e.g. an operator cleaning up by hand
    second = _store(spool, "1.2.3.1.2", b"\x08\x00\x18\x00" + b"b" * 100)
    assert second.written and second.path.is_file()
    data = second.path.read_bytes()
    assert data[dataset_offset(data) :] == b"\x08\x00\x18\x00" + b"b" * 100
    assert list(spool.incoming.iterdir()) == [], "no temporary file left behind"


def test_remove_series_forgets_the_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    stored = _store(spool, "1.2.3.1.1", b"x" * 64)
    assert spool.remove_series(["1.2.3"], "1.2.3.1", idle_seconds=0, record_removal=lambda: None)
    assert not stored.path.parent.exists()
    again = _store(spool, "1.2.3.1.1", b"x" * 64)
    assert again.written and again.path.is_file(), "stored anew once the series was removed"


def test_free_space_estimate_subtracts_what_was_stored_since_it_was_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dicom_node.spool.FREE_BYTES_REFRESH_SECONDS", 3600.0)  # no re-measure mid-test
    spool = Spool(tmp_path)
    measured = spool.free_bytes()
    stored = _store(spool, "1.2.3.1.1", b"y" * 10_000)
    assert spool.free_bytes() == measured - stored.size_bytes
    duplicate = _store(spool, "1.2.3.1.1", b"y" * 10_000)
    assert not duplicate.written
    assert spool.free_bytes() == measured - stored.size_bytes, "a duplicate writes nothing"


@pytest.mark.parametrize("same_bytes", [True, False])
def test_a_resent_uid_is_a_duplicate_or_kept_beside_the_first(tmp_path: Path, same_bytes: bool) -> None:
    spool = Spool(tmp_path)
    first = _store(spool, "1.2.3.1.1", b"z" * 64)
    second = _store(spool, "1.2.3.1.1", b"z" * 64 if same_bytes else b"w" * 64)
    assert second.written is not same_bytes
    assert (second.path == first.path) is same_bytes
    assert len(list(first.path.parent.iterdir())) == (1 if same_bytes else 2)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_store_that_fails_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A full disk or an I/O error fails the store (the SCP answers out of resources) and frees
    what it wrote: kept until the next start, each failure would hold the disk full for the rest."""
    spool = Spool(tmp_path)
    real = getattr(os, failing)

    def full_disk(*args: object) -> None:
        if failing == "fsync" or str(args[0]).endswith(".part"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(os, failing, full_disk)
    for number in range(3):
        with pytest.raises(OSError, match="No space left"):
            _store(spool, f"1.2.3.1.{number}", b"\x08\x00\x18\x00" + b"a" * 1000)
    monkeypatch.undo()
    assert list(spool.incoming.iterdir()) == []
    assert _store(spool, "1.2.3.1.9", b"\x08\x00\x18\x00" + b"b" * 100).written, "and the next store works"


def test_a_series_is_marked_removed_before_a_resend_can_land_in_it(tmp_path: Path) -> None:
    """Retention's SQL mark is made under the lock a store renames under: an instance re-sent while
    its series is removed lands after the mark (its SQL row then clears it), never before it, where
    the mark would hide the re-sent file from retention for good."""
    spool = Spool(tmp_path)
    data = b"\x08\x00\x18\x00" + b"a" * 100
    _store(spool, "1.2.3.1.1", data)
    order: list[str] = []
    resend = threading.Thread(target=lambda: (_store(spool, "1.2.3.1.1", data), order.append("re-sent")))

    def record_removal() -> None:
        resend.start()
        resend.join(timeout=0.3)  # the re-send waits for the lock
        order.append("marked removed")

    assert spool.remove_series(["1.2.3"], "1.2.3.1", idle_seconds=0, record_removal=record_removal)
    resend.join()
    assert order == ["marked removed", "re-sent"]
