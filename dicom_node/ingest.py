"""Recording received instances in SQL with group commits across associations.

Every SQL change of the node goes through one ``GroupCommitter``: one transaction at a
time, committed inline by the association that finds none running, otherwise batched
with everything else that queued up meanwhile and committed by the writer thread.
Batching needs no artificial delay: the longer a commit takes, the more work the next
one carries. Instances reach it only once their file and its name are durable
(``Spool.store``), and the C-STORE handler answers success only when its future
resolves, i.e. when the row is durable too.

Series state (receiving / complete, generation) changes only inside these serialised
transactions, so the in-memory view of it kept here is authoritative for the process.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from sqlalchemy import Connection, bindparam, insert, select, update

from dicom_node.config import CountRule
from dicom_node.db.models import Association, Instance, Series, SeriesState, Study
from dicom_node.db.session import Database
from dicom_node.identity import is_produced_by_node
from dicom_node.routing import headers_match
from dicom_node.spool import SpooledInstance

log = logging.getLogger(__name__)

# Core tables, not ORM entities: the hot path skips the ORM's per-statement overhead.
INSTANCES = Instance.__table__
SERIES = Series.__table__
# Built once, so that each instance only binds parameters to an already compiled statement.
_HASHES_OF_UID = select(INSTANCES.c.sha256).where(INSTANCES.c.sop_instance_uid == bindparam("uid"))
_INSERT_INSTANCE = insert(INSTANCES)
_TOUCH_SERIES = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("series_id"))
    .values(last_received_at=bindparam("last_received_at"))
)

T = TypeVar("T")

ENHANCED_MR_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)
_LAST_HEADER_TAG = 0x00280008  # NumberOfFrames: every tag read here sorts at or before it
# (keyword, InstanceHeaders field, how its raw value is decoded)
_HEADER_SPEC = (
    ("SOPClassUID", "sop_class_uid", "uid"),
    ("SOPInstanceUID", "sop_instance_uid", "uid"),
    ("Modality", "modality", "text"),
    ("Manufacturer", "manufacturer", "text"),
    ("StationName", "station_name", "text"),
    ("SeriesDescription", "series_description", "text"),
    ("ManufacturerModelName", "manufacturer_model_name", "text"),
    ("ProtocolName", "protocol_name", "text"),
    ("StudyInstanceUID", "study_uid", "uid"),
    ("SeriesInstanceUID", "series_uid", "uid"),
    ("SeriesNumber", "series_number", "integer"),
    ("InstanceNumber", "instance_number", "integer"),
    ("ImagesInAcquisition", "images_in_acquisition", "integer"),
    ("InConcatenationTotalNumber", "in_concatenation_total", "integer"),
    ("NumberOfFrames", "number_of_frames", "integer"),
)
_HEADER_FIELDS = {int(Tag(keyword)): (name, kind) for keyword, name, kind in _HEADER_SPEC}
_TEXT_FIELD_OF_KEYWORD = {keyword: name for keyword, name, kind in _HEADER_SPEC if kind == "text"}
_SPECIFIC_CHARACTER_SET = int(Tag("SpecificCharacterSet"))
_HEADER_TAGS: list[BaseTag | int] = [_SPECIFIC_CHARACTER_SET, *_HEADER_FIELDS]
_TEXT_DELIMITERS = {0x5C}  # backslash, between values


_IS_RANGE = (-(2**31), 2**31 - 1)  # PS3.5 6.2
_UID_LENGTH = 64  # PS3.5 6.2, and the columns UIDs go to


class MalformedDatasetError(ValueError):
    """A received dataset whose header cannot be read or lacks the identifying UIDs."""


def _decode_integer(raw: bytes, vr: str, little_endian: bool) -> int | None:
    """An IS (text) or US/UL (binary) value; None when empty, multi-valued, not a number, or
    outside IS's range (the 32-bit columns it goes to, which PostgreSQL enforces)."""
    if vr in ("US", "UL"):
        width = 2 if vr == "US" else 4
        if len(raw) != width:
            return None
        number = int.from_bytes(raw, "little" if little_endian else "big")
    else:
        text = raw.decode("latin-1").strip(" \0")
        try:
            number = float(text)  # also IS values such as "12.0" from some writers
        except ValueError:
            return None
        if not number.is_integer():
            return None
        number = int(text) if text.lstrip("+-").isdigit() else int(number)
    return number if _IS_RANGE[0] <= number <= _IS_RANGE[1] else None


@dataclass(frozen=True)
class InstanceHeaders:
    """The few header values the node needs from an instance, read without its pixels."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None = None
    modality: str | None = None
    instance_number: int | None = None
    images_in_acquisition: int | None = None
    number_of_frames: int | None = None
    in_concatenation_total: int | None = None
    manufacturer: str | None = None
    manufacturer_model_name: str | None = None
    station_name: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    series_number: int | None = None

    @property
    def expected_instances(self) -> int | None:
        """How many instances the series should have, when the headers say so."""
        if self.in_concatenation_total and self.in_concatenation_total > 0:
            return self.in_concatenation_total
        if self.number_of_frames and self.sop_class_uid in ENHANCED_MR_CLASSES:
            return 1  # the whole volume is in one multi-frame instance
        if self.images_in_acquisition and self.images_in_acquisition > 0:
            return self.images_in_acquisition
        return None

    def text(self, keyword: str) -> str:
        """A text header by its DICOM keyword (``""`` when absent), for site rules."""
        field = _TEXT_FIELD_OF_KEYWORD[keyword]
        return getattr(self, field) or ""

    def expected_instances_with(self, count_rules: Sequence[CountRule]) -> int | None:
        """The headers' own count, else that of the first site rule the headers match."""
        if self.expected_instances is not None:
            return self.expected_instances
        for rule in count_rules:
            if headers_match(rule.match, self.text):
                return rule.instances
        return None

    @property
    def produced_by_node(self) -> bool:
        return is_produced_by_node(self.manufacturer, self.modality)


def read_headers(dataset_bytes: bytes, transfer_syntax: UID) -> InstanceHeaders:
    """The node's few header values, scanned from the raw dataset bytes up to NumberOfFrames.

    Only the wanted elements' raw values are decoded (no pydicom Dataset is built, the
    pixels are never reached): this runs once per received instance, on the C-STORE path.
    """
    if transfer_syntax.is_deflated:
        # A deflated dataset of a megabyte can inflate to gigabytes, in the node's memory.
        raise MalformedDatasetError(
            "deflated datasets are not accepted: send it uncompressed, or with compressed pixel data"
        )
    little_endian = transfer_syntax.is_little_endian
    values: dict[str, str | int | None] = {}
    encodings = ["iso8859"]
    try:
        for element in data_element_generator(
            io.BytesIO(dataset_bytes),
            transfer_syntax.is_implicit_VR,
            little_endian,
            stop_when=lambda tag, _vr, _length: tag > _LAST_HEADER_TAG,
            specific_tags=_HEADER_TAGS,
        ):
            raw = element.value
            if not isinstance(raw, bytes) or not raw:
                continue
            tag = int(element.tag)
            if tag == _SPECIFIC_CHARACTER_SET:
                names = [name.strip() for name in raw.decode("latin-1").split("\\")]
                encodings = convert_encodings(names)
                continue
            name, kind = _HEADER_FIELDS[tag]
            if kind == "uid":
                values[name] = raw.decode("latin-1").rstrip("\0 ").strip() or None
            elif kind == "text":
                # NUL is no DICOM text character, and PostgreSQL refuses it in every text column.
                text = decode_bytes(raw, encodings, _TEXT_DELIMITERS).replace("\0", "")
                values[name] = text.strip() or None
            else:
                vr = element.VR if element.VR not in (None, "UN") else dictionary_VR(tag)
                values[name] = _decode_integer(raw, vr, little_endian)
    except Exception as exc:  # pydicom raises many types on garbage input
        raise MalformedDatasetError(f"dataset header does not parse: {type(exc).__name__}: {exc}") from None
    if not (values.get("study_uid") and values.get("series_uid") and values.get("sop_instance_uid")):
        raise MalformedDatasetError("dataset lacks Study, Series or SOP Instance UID")
    for keyword, name, kind in _HEADER_SPEC:
        uid = values.get(name) if kind == "uid" else None
        if isinstance(uid, str) and (len(uid) > _UID_LENGTH or not uid.isascii()):
            raise MalformedDatasetError(
                f"{keyword} is not a UID: over {_UID_LENGTH} characters, or not ASCII"
            )
    return InstanceHeaders(**values)  # type: ignore[arg-type]


class Batch:
    """One transaction of the writer: its connection, staged cache entries, after-commit work."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.staged: dict[tuple[str, str], Any] = {}
        # series id -> column values, written once per batch rather than once per instance
        self.series_updates: dict[int, dict[str, Any]] = {}
        self._after_commit: list[Callable[[], None]] = []

    def flush_series_updates(self) -> None:
        """One UPDATE per series; the usual case (only the time moved) is one prebuilt executemany."""
        times_only = []
        for series_id, values in self.series_updates.items():
            if values.keys() == {"last_received_at"}:
                times_only.append({"series_id": series_id, "last_received_at": values["last_received_at"]})
            else:
                self.connection.execute(update(SERIES).where(SERIES.c.id == series_id).values(**values))
        if times_only:
            self.connection.execute(_TOUCH_SERIES, times_only)
        self.series_updates.clear()

    def after_commit(self, callback: Callable[[], None]) -> None:
        self._after_commit.append(callback)

    def run_after_commit(self) -> None:
        for callback in self._after_commit:
            try:
                callback()
            except Exception:
                log.exception("after-commit callback failed")


Operation = Callable[[Batch], Any]


class GroupCommitter:
    """Commits submitted operations in shared transactions, one transaction at a time.

    A submission that finds no transaction running commits at once in the submitting
    thread: no hand-off, as every thread switch is a round trip through the GIL, which is
    what costs most with several associations on few cores. Whatever is submitted while a
    transaction runs queues up and is committed as the next batch by the writer thread.
    """

    def __init__(self, database: Database, *, max_batch: int = 512, name: str = "sql-writer") -> None:
        self._database = database
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[Operation, Future[Any]]] = collections.deque()
        self._busy = False  # a transaction is running; invariant: not busy => nothing pending
        self._wake: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: drain, False: stop
        self._writer_running = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batches_committed = 0
        self.operations_committed = 0

    def start(self) -> None:
        with self._lock:
            self._writer_running = True
        self._thread.start()

    def submit(self, operation: Callable[[Batch], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            self._pending.append((operation, future))
            if self._busy:
                return future  # the running committer takes it into the next batch
            self._busy = True
        self._commit(self._take())
        self._release_or_hand_over()
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then end the writer thread (later submissions commit inline)."""
        with self._lock:  # ordered against hand-overs: none can follow the stop signal
            self._writer_running = False
            self._wake.put(False)
        self._thread.join(timeout)

    def _take(self) -> list[tuple[Operation, Future[Any]]]:
        with self._lock:
            count = min(len(self._pending), self._max_batch)
            return [self._pending.popleft() for _ in range(count)]

    def _release_or_hand_over(self) -> None:
        """After an inline commit: what queued meanwhile goes to the writer thread (if running)."""
        while True:
            with self._lock:
                if not self._pending:
                    self._busy = False
                    return
                if self._writer_running:
                    self._wake.put(True)
                    return
            self._commit(self._take())

    def _run(self) -> None:
        while self._wake.get():
            while True:
                with self._lock:
                    if not self._pending:
                        self._busy = False
                        break
                self._commit(self._take())

    def _commit(self, work: list[tuple[Operation, Future[Any]]]) -> None:
        try:
            results = self._execute(work)
        except Exception as exc:
            if len(work) == 1:
                log.exception("SQL operation failed")
                work[0][1].set_exception(exc)
                return
            # One bad operation must not fail the others: retry each in its own transaction.
            for item in work:
                self._commit([item])
            return
        for (_operation, future), result in zip(work, results, strict=True):
            future.set_result(result)

    def _execute(self, work: list[tuple[Operation, Future[Any]]]) -> list[Any]:
        with self._database.engine.begin() as connection:
            batch = Batch(connection)
            results = [operation(batch) for operation, _future in work]
            batch.flush_series_updates()
        batch.run_after_commit()
        self.batches_committed += 1
        self.operations_committed += len(work)
        return results


class InstanceOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing new
    CONFLICTING = "conflicting"  # same SOP Instance UID, different bytes: kept and flagged


@dataclass
class SeriesRecord:
    """The committer's view of one series row (mutated only inside its serialised transactions)."""

    id: int
    series_uid: str
    study_uid: str
    state: SeriesState
    generation: int
    expected_instances: int | None
    produced_by_node: bool


@dataclass(frozen=True)
class InstanceRecorded:
    """What listeners (the completeness tracker) learn after an instance's row committed."""

    series: SeriesRecord
    outcome: InstanceOutcome
    new_uid: bool  # a SOP Instance UID the series did not have before
    reopened: bool  # this instance re-opened a series that had been handed on
    received_at: datetime
    association_id: int | None  # the association that sent it (None where its row is missing)


@dataclass(frozen=True)
class AssociationEnded:
    """What listeners learn after an association's row was closed: that sender sends no more."""

    association_id: int
    released: bool  # ended by an A-RELEASE, not aborted


IngestEvent = InstanceRecorded | AssociationEnded


class Ingest:
    """SQL bookkeeping of the Storage SCP: associations, studies, series, instances."""

    #: Studies and series whose rows are cached (SQL has them all; a miss reads the row). A node
    #: that runs for years must not keep every series it ever saw in memory.
    cache_limit = 100_000

    def __init__(self, database: Database, count_rules: Sequence[CountRule] = ()) -> None:
        self.database = database
        self.count_rules = tuple(count_rules)
        self.committer = GroupCommitter(database)
        # Touched by the committing thread only.
        self._study_ids: dict[str, int] = {}
        self._series: dict[str, SeriesRecord] = {}
        self._listeners: list[Callable[[IngestEvent], None]] = []

    def start(self) -> None:
        self.committer.start()

    def stop(self) -> None:
        self.committer.stop()

    def add_listener(self, listener: Callable[[IngestEvent], None]) -> None:
        """Called after each commit by the committing thread, before the next transaction; be quick."""
        self._listeners.append(listener)

    # -- series state shared with the completeness tracker (inside transactions only) -----

    def series_record(self, batch: Batch, series_uid: str) -> SeriesRecord | None:
        """The series as this transaction sees it; mutate it, then ``stage_series``."""
        staged = batch.staged.get(("series", series_uid))
        if staged is not None:
            return staged
        cached = self._series.get(series_uid)
        if cached is None:
            row = batch.connection.execute(
                select(
                    Series.id,
                    Study.study_instance_uid,
                    Series.state,
                    Series.generation,
                    Series.expected_instances,
                    Series.produced_by_node,
                )
                .join(Study, Series.study_id == Study.id)
                .where(Series.series_instance_uid == series_uid)
            ).first()
            if row is None:
                return None
            cached = SeriesRecord(
                id=row.id,
                series_uid=series_uid,
                study_uid=row.study_instance_uid,
                state=SeriesState(row.state),
                generation=row.generation,
                expected_instances=row.expected_instances,
                produced_by_node=row.produced_by_node,
            )
        record = dataclasses.replace(cached)
        self.stage_series(batch, record)
        return record

    def stage_series(self, batch: Batch, record: SeriesRecord) -> None:
        """Make ``record`` the cached view once ``batch`` commits."""
        if ("series", record.series_uid) not in batch.staged:
            batch.after_commit(lambda: self._cache(self._series, record.series_uid, record))
        batch.staged[("series", record.series_uid)] = record

    def _cache(self, cache: dict[str, Any], key: str, value: Any) -> None:
        """Remember a committed row, starting afresh past ``cache_limit`` (rows are re-read)."""
        if len(cache) >= self.cache_limit and key not in cache:
            cache.clear()
        cache[key] = value

    # -- operations --------------------------------------------------------------------------

    def open_association(self, calling_ae: str, called_ae: str, address: str, port: int) -> Future[int]:
        def operation(batch: Batch) -> int:
            return batch.connection.execute(
                insert(Association)
                .values(
                    calling_ae=calling_ae[:16],
                    called_ae=called_ae[:16],
                    peer_address=address[:64],
                    peer_port=port,
                    started_at=datetime.now(UTC),
                    outcome="open",
                )
                .returning(Association.id)
            ).scalar_one()

        return self.committer.submit(operation)

    def close_association(
        self, association_id: int, outcome: str, stored: int, duplicate: int, failed: int
    ) -> Future[None]:
        def operation(batch: Batch) -> None:
            batch.connection.execute(
                update(Association)
                .where(Association.id == association_id)
                .values(
                    ended_at=datetime.now(UTC),
                    outcome=outcome,
                    instances_stored=stored,
                    instances_duplicate=duplicate,
                    instances_failed=failed,
                )
            )
            ended = AssociationEnded(association_id, released=outcome == "released")
            batch.after_commit(lambda: self._notify(ended))

        return self.committer.submit(operation)

    def record_rejected_association(
        self, calling_ae: str, called_ae: str, address: str, port: int
    ) -> Future[int]:
        def operation(batch: Batch) -> int:
            now = datetime.now(UTC)
            return batch.connection.execute(
                insert(Association)
                .values(
                    calling_ae=calling_ae[:16],
                    called_ae=called_ae[:16],
                    peer_address=address[:64],
                    peer_port=port,
                    started_at=now,
                    ended_at=now,
                    outcome="rejected",
                )
                .returning(Association.id)
            ).scalar_one()

        return self.committer.submit(operation)

    def record_instance(
        self,
        headers: InstanceHeaders,
        spooled: SpooledInstance,
        *,
        transfer_syntax_uid: str,
        association_id: int | None,
        received_at: datetime,
    ) -> Future[InstanceOutcome]:
        """Queue the instance's rows; the future resolves once they and its file are durable."""

        def operation(batch: Batch) -> InstanceOutcome:
            return self._record_instance(
                batch, headers, spooled, transfer_syntax_uid, association_id, received_at
            )

        return self.committer.submit(operation)

    def _study_id(self, batch: Batch, study_uid: str, received_at: datetime) -> int:
        key = ("study", study_uid)
        study_id = batch.staged.get(key) or self._study_ids.get(study_uid)
        if study_id is None:
            connection = batch.connection
            study_id = connection.execute(
                select(Study.id).where(Study.study_instance_uid == study_uid)
            ).scalar_one_or_none()
            if study_id is None:
                study_id = connection.execute(
                    insert(Study)
                    .values(study_instance_uid=study_uid, first_received_at=received_at)
                    .returning(Study.id)
                ).scalar_one()
            batch.staged[key] = study_id
            batch.after_commit(lambda: self._cache(self._study_ids, study_uid, study_id))
        return study_id

    def _series_for_instance(
        self, batch: Batch, headers: InstanceHeaders, received_at: datetime
    ) -> SeriesRecord:
        record = self.series_record(batch, headers.series_uid)
        if record is not None:
            return record
        study_id = self._study_id(batch, headers.study_uid, received_at)
        expected = headers.expected_instances_with(self.count_rules)
        series_id = batch.connection.execute(
            insert(Series)
            .values(
                series_instance_uid=headers.series_uid,
                study_id=study_id,
                modality=headers.modality and headers.modality[:16],  # CS: 16 characters at most
                series_number=headers.series_number,
                series_description=(headers.series_description or None) and headers.series_description[:64],
                expected_instances=expected,
                state=SeriesState.RECEIVING,
                generation=0,
                first_received_at=received_at,
                last_received_at=received_at,
                produced_by_node=headers.produced_by_node,
            )
            .returning(Series.id)
        ).scalar_one()
        record = SeriesRecord(
            id=series_id,
            series_uid=headers.series_uid,
            study_uid=headers.study_uid,
            state=SeriesState.RECEIVING,
            generation=0,
            expected_instances=expected,
            produced_by_node=headers.produced_by_node,
        )
        self.stage_series(batch, record)
        return record

    def _record_instance(
        self,
        batch: Batch,
        headers: InstanceHeaders,
        spooled: SpooledInstance,
        transfer_syntax_uid: str,
        association_id: int | None,
        received_at: datetime,
    ) -> InstanceOutcome:
        connection = batch.connection
        series = self._series_for_instance(batch, headers, received_at)
        known_hashes = set(connection.execute(_HASHES_OF_UID, {"uid": headers.sop_instance_uid}).scalars())
        if spooled.sha256 in known_hashes:
            if spooled.written:
                # Its file was gone (retention removed the series' spool) and is back: let
                # retention see the folder again, or the re-sent files would stay forever.
                batch.series_updates.setdefault(series.id, {})["spool_removed_at"] = None
            return InstanceOutcome.DUPLICATE

        conflicting = bool(known_hashes)
        connection.execute(
            _INSERT_INSTANCE,
            {
                "sop_instance_uid": headers.sop_instance_uid,
                "sop_class_uid": headers.sop_class_uid or "",
                "transfer_syntax_uid": transfer_syntax_uid,
                "series_id": series.id,
                "association_id": association_id,
                "instance_number": headers.instance_number,
                "path": str(spooled.path),
                "size_bytes": spooled.size_bytes,
                "sha256": spooled.sha256,
                "conflicting": conflicting,
                "received_at": received_at,
            },
        )
        if conflicting:
            connection.execute(
                update(INSTANCES)
                .where(INSTANCES.c.sop_instance_uid == headers.sop_instance_uid)
                .values(conflicting=True)
            )

        series_values = batch.series_updates.setdefault(series.id, {})
        series_values["last_received_at"] = max(
            received_at, series_values.get("last_received_at", received_at)
        )
        if series.expected_instances is None:  # rules are matched only while the count is unknown
            expected = headers.expected_instances_with(self.count_rules)
            if expected is not None:
                series.expected_instances = series_values["expected_instances"] = expected
        reopened = series.state == SeriesState.COMPLETE
        if reopened:
            # New content after hand-off: the series is processed again, never silently dropped.
            series.state = SeriesState.RECEIVING
            series.generation += 1
            series_values.update(
                state=SeriesState.RECEIVING,
                generation=series.generation,
                completed_at=None,
                completion_reason=None,
                spool_removed_at=None,
            )
            log.info("series %s re-opened (generation %d)", series.series_uid, series.generation)

        outcome = InstanceOutcome.CONFLICTING if conflicting else InstanceOutcome.STORED
        if conflicting:
            log.warning(
                "instance %s received with different content; kept and flagged", headers.sop_instance_uid
            )
        event = InstanceRecorded(
            series=dataclasses.replace(series),
            outcome=outcome,
            new_uid=not conflicting,
            reopened=reopened,
            received_at=received_at,
            association_id=association_id,
        )
        batch.after_commit(lambda: self._notify(event))
        return outcome

    def _notify(self, event: IngestEvent) -> None:
        for listener in self._listeners:
            listener(event)
