"""Durable, decode-free storage of received instances under ``spool/<Study>/<Series>/``.

An instance is written exactly as received (file meta plus the peer's dataset bytes)
to a temporary file in ``spool/.incoming``, fsynced, then renamed into its series
folder, and the rename is made durable by fsyncing the series folder, all in the
receiving association's thread: the associations' fsyncs run side by side (the file
system merges them into shared journal commits) instead of queueing in the SQL writer,
and a row is only ever written for a file already durable. A SOP Instance UID already
stored with the same dataset bytes is not written again; different bytes under the
same UID are kept beside the first file under a content-hash suffix.

Several processes write one spool (the node's receiver processes and its retention), so
the check-and-rename of a series and the removal of its folder are serialised by a lock
that holds across processes: a thread lock plus ``flock`` on one of the stripe files in
``spool/.locks``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

INCOMING_DIR = ".incoming"
LOCKS_DIR = ".locks"
PREAMBLE_AND_PREFIX = 132
# (0002,0000) UL group length in explicit VR little endian: tag, VR, 2-byte length, 4-byte value.
_GROUP_LENGTH_ELEMENT = b"\x02\x00\x00\x00UL\x04\x00"
_LOCK_STRIPES = 64
FREE_BYTES_REFRESH_SECONDS = 0.5
#: Series folders a spool remembers as made before it forgets them all (about 100 B each).
KNOWN_DIRS_LIMIT = 100_000
# Lenient on purpose (some scanners emit non-conformant UIDs) but safe as a path component.
_SAFE_UID = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z._-]{0,63}$")


class UnsafeUIDError(ValueError):
    """A UID that cannot be used as a file name (path traversal, empty, too long)."""


def check_uid(uid: str) -> str:
    """``uid`` when it is safe as a single path component, else UnsafeUIDError."""
    if not _SAFE_UID.match(uid) or ".." in uid:
        raise UnsafeUIDError(f"UID {uid!r} is not usable as a file name")
    return uid


def filed_under(path: Path) -> tuple[str, str]:
    """(study UID, series UID) an instance file was filed under, ``<study>/<series>/<file>``: the
    UIDs the node's own header scan read when it received the instance."""
    return path.parent.parent.name, path.parent.name


def _explicit_element(group_element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (UI, SH, UL)."""
    return (
        (group_element >> 16).to_bytes(2, "little")
        + (group_element & 0xFFFF).to_bytes(2, "little")
        + vr
        + len(value).to_bytes(2, "little")
        + value
    )


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


# (0002,0001) FileMetaInformationVersion: OB has a 4-byte length after two reserved bytes.
_META_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"


def file_meta_bytes(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> bytes:
    """Preamble, ``DICM`` and the file meta group, encoded directly from the request's UIDs.

    The same bytes pynetdicom's ``create_file_meta`` + ``encode_file_meta`` produce, without
    building and encoding a pydicom dataset for every received instance.
    """
    body = b"".join(
        (
            _META_VERSION,
            _explicit_element(0x00020002, b"UI", _padded(sop_class_uid, b"\x00")),
            _explicit_element(0x00020003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _explicit_element(0x00020010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
            _explicit_element(0x00020012, b"UI", _padded(implementation_class_uid, b"\x00")),
            _explicit_element(0x00020013, b"SH", _padded(implementation_version, b" ")),
        )
    )
    return b"\x00" * 128 + b"DICM" + _GROUP_LENGTH_ELEMENT + len(body).to_bytes(4, "little") + body


def write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data`` and fsync it, in as few system calls as possible
    (each one releases and re-takes the GIL, which costs most under concurrent associations).
    A write that fails (a full disk) removes what it wrote: a partial file would keep it full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dataset_offset(data: bytes) -> int:
    """Where the dataset starts in a DICOM file written by ``Spool.store``."""
    header = data[PREAMBLE_AND_PREFIX : PREAMBLE_AND_PREFIX + 12]
    if data[128:132] != b"DICM" or header[:8] != _GROUP_LENGTH_ELEMENT:
        raise ValueError("not a DICOM file with a file meta group length")
    return PREAMBLE_AND_PREFIX + 12 + int.from_bytes(header[8:12], "little")


def dataset_sha256_of_file(path: Path) -> str:
    """The SHA-256 of a spooled file's dataset bytes (file meta excluded)."""
    data = path.read_bytes()
    return hashlib.sha256(memoryview(data)[dataset_offset(data) :]).hexdigest()


@dataclass(frozen=True)
class SpooledInstance:
    """Where an instance's bytes are, and whether this call wrote them."""

    path: Path
    size_bytes: int
    sha256: str
    written: bool  # False when identical bytes were already in the spool


class Spool:
    """The folder tree of received instances, safe for concurrent associations."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / INCOMING_DIR
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._lock_files = self.root / LOCKS_DIR
        self._lock_files.mkdir(exist_ok=True)
        self._lock_descriptors: dict[int, int] = {}
        # Series folders known to exist (created or seen here; remove_series forgets them),
        # forgotten all at once past KNOWN_DIRS_LIMIT: a miss only checks the folder again.
        self._known_dirs: set[Path] = set()
        self._temporary_names = itertools.count()
        self._free_lock = threading.Lock()
        self._free_measured_at = -FREE_BYTES_REFRESH_SECONDS
        self._free_measured = 0
        self._stored_since_measure = 0

    def clear_incoming(self) -> int:
        """Remove temporary files a killed process left behind; they were never acknowledged."""
        removed = 0
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / check_uid(study_uid) / check_uid(series_uid)

    def free_bytes(self) -> int:
        """Free disk space for the spool: measured at most every FREE_BYTES_REFRESH_SECONDS,
        less what this spool stored since, so that the per-instance check costs no syscall."""
        with self._free_lock:
            now = time.monotonic()
            if now - self._free_measured_at >= FREE_BYTES_REFRESH_SECONDS:
                stats = os.statvfs(self.root)
                self._free_measured = stats.f_bavail * stats.f_frsize
                self._free_measured_at = now
                self._stored_since_measure = 0
            return self._free_measured - self._stored_since_measure

    def _count_stored(self, size: int) -> None:
        with self._free_lock:
            self._stored_since_measure += size

    @contextlib.contextmanager
    def _lock(self, series_uid: str) -> Iterator[None]:
        """Exclusive use of the series' stripe, against threads and other processes alike.

        The stripe comes from a stable hash (``hash`` of a str differs between processes);
        ``flock`` does not exclude threads sharing a descriptor, hence the thread lock too.
        """
        stripe = zlib.crc32(series_uid.encode()) % _LOCK_STRIPES
        with self._locks[stripe]:
            descriptor = self._lock_descriptors.get(stripe)
            if descriptor is None:
                descriptor = os.open(self._lock_files / f"{stripe:02d}", os.O_RDWR | os.O_CREAT, 0o600)
                self._lock_descriptors[stripe] = descriptor
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(descriptor, fcntl.LOCK_UN)

    def _make_series_dir(self, folder: Path) -> None:
        """Create the series folder and make its (possibly new) parents' entries durable."""
        if folder in self._known_dirs:
            return
        if not folder.is_dir():
            study_existed = folder.parent.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
            if not study_existed:
                fsync_dir(self.root)
        if len(self._known_dirs) >= KNOWN_DIRS_LIMIT:
            self._known_dirs.clear()
        self._known_dirs.add(folder)

    def _existing_match(self, folder: Path, sop_uid: str, sha256: str) -> tuple[Path, bool]:
        """The path these bytes belong at, and whether identical bytes are already there."""
        primary = folder / f"{sop_uid}.dcm"
        if not os.path.exists(primary):
            return primary, False
        if dataset_sha256_of_file(primary) == sha256:
            return primary, True
        variant = folder / f"{sop_uid}.{sha256[:16]}.dcm"
        return variant, variant.exists()

    def store(
        self, study_uid: str, series_uid: str, sop_uid: str, file_meta: bytes, dataset: bytes
    ) -> SpooledInstance:
        """Write one instance durably: its bytes and its name are on disk when this returns."""
        folder = self.series_dir(study_uid, series_uid)
        check_uid(sop_uid)
        sha256 = hashlib.sha256(dataset).hexdigest()
        size = len(file_meta) + len(dataset)
        target, present = self._existing_match(folder, sop_uid, sha256)
        if present:
            # Another association may have renamed it a moment ago and not fsynced the folder yet.
            fsync_dir(folder)
            return SpooledInstance(target, size, sha256, written=False)

        temporary = self.incoming / f"{os.getpid()}-{next(self._temporary_names)}.part"
        write_durably(temporary, file_meta + dataset)
        try:
            with self._lock(series_uid):
                # Re-check under the lock: another association may have stored the same UID meanwhile.
                target, present = self._existing_match(folder, sop_uid, sha256)
                if present:
                    os.unlink(temporary)
                else:
                    self._make_series_dir(folder)
                    try:
                        os.replace(temporary, target)
                    except FileNotFoundError:  # the folder was removed behind this process's back
                        self._known_dirs.discard(folder)
                        self._make_series_dir(folder)
                        os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)  # only cleared at start otherwise: it would fill the disk
            raise
        fsync_dir(folder)
        if not present:
            self._count_stored(size)
        return SpooledInstance(target, size, sha256, written=not present)

    def remove_series(
        self,
        study_uids: Collection[str],
        series_uid: str,
        idle_seconds: float,
        record_removal: Callable[[], None],
    ) -> bool:
        """Delete a series' folders (one per study its instances named: a study UID corrected
        and the series re-sent files it anew) when all were untouched for ``idle_seconds``;
        False if one was written since.

        A folder's mtime changes with every rename into it, and the check, the delete and
        ``record_removal`` (the SQL mark) happen under the lock ``store`` renames under: an
        instance that has just been written (and may be waiting for its SQL commit) is never
        deleted, and one re-sent now lands after the mark, which its SQL row then clears.
        """
        folders = [self.series_dir(study_uid, series_uid) for study_uid in sorted(set(study_uids))]
        with self._lock(series_uid):
            present = [folder for folder in folders if folder.exists()]
            if any(time.time() - folder.stat().st_mtime < idle_seconds for folder in present):
                return False
            for folder in present:
                shutil.rmtree(folder)
                self._known_dirs.discard(folder)
                fsync_dir(folder.parent)
                try:
                    folder.parent.rmdir()  # the study folder, once its last series is gone
                    fsync_dir(self.root)
                except OSError:
                    pass
            record_removal()
        return True
