"""The tamper-evident audit trail: DICOM PS3.15 A.5 / IHE ATNA events, hash-chained in SQL.

Every event is one row of ``audit_events`` whose ``document`` is the event's canonical
JSON (sorted keys, no whitespace, UTC times ending in ``Z``). Rows are chained: each row
stores the previous row's ``chain_hash`` and its own
``chain_hash = HMAC-SHA256(key, previous_hash + document)``, where the key is kept outside
the database. Someone who can write to the database but does not hold the key cannot edit,
insert or delete a row without breaking the chain. Cutting rows off the end keeps the chain
valid, so the current head is also logged (logger ``brain3d.audit``) and written to a head
file outside the database after every append; ``verify`` compares the two.

Appends are serialised across threads and processes (PostgreSQL: a transaction-scoped
advisory lock; SQLite: ``BEGIN IMMEDIATE``) in the same transaction that reads the head
and inserts the row, so concurrent writers never fork the chain.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select, text

from dicom_node.db.models import AuditEvent, as_utc

if TYPE_CHECKING:
    from dicom_node.config import DatabaseSettings, Settings
    from dicom_node.db.session import Database

logger = logging.getLogger("brain3d.audit")

#: ``previous_hash`` of the first row of every chain.
GENESIS_HASH = "0" * 64
#: PostgreSQL advisory lock key that serialises appends ("B3DAUDIT" as a signed 64-bit integer).
ADVISORY_LOCK_KEY = int.from_bytes(b"B3DAUDIT", "big", signed=True)
#: Version of the document layout, so a later layout can be verified alongside this one.
DOCUMENT_VERSION = 1
MIN_KEY_BYTES = 16


class EventID(enum.StrEnum):
    """PS3.15 A.5.3 / CID 400 "Audit Event ID" codes (scheme DCM) that the node emits."""

    APPLICATION_ACTIVITY = "110100"
    AUDIT_LOG_USED = "110101"
    BEGIN_TRANSFERRING_DICOM_INSTANCES = "110102"
    DICOM_INSTANCES_ACCESSED = "110103"
    DICOM_INSTANCES_TRANSFERRED = "110104"
    DICOM_STUDY_DELETED = "110105"
    EXPORT = "110106"
    IMPORT = "110107"
    NETWORK_ENTRY = "110108"
    QUERY = "110112"
    SECURITY_ALERT = "110113"
    USER_AUTHENTICATION = "110114"

    @property
    def meaning(self) -> str:
        return _EVENT_ID_MEANINGS[self]


_EVENT_ID_MEANINGS: dict[EventID, str] = {
    EventID.APPLICATION_ACTIVITY: "Application Activity",
    EventID.AUDIT_LOG_USED: "Audit Log Used",
    EventID.BEGIN_TRANSFERRING_DICOM_INSTANCES: "Begin Transferring DICOM Instances",
    EventID.DICOM_INSTANCES_ACCESSED: "DICOM Instances Accessed",
    EventID.DICOM_INSTANCES_TRANSFERRED: "DICOM Instances Transferred",
    EventID.DICOM_STUDY_DELETED: "DICOM Study Deleted",
    EventID.EXPORT: "Export",
    EventID.IMPORT: "Import",
    EventID.NETWORK_ENTRY: "Network Entry",
    EventID.QUERY: "Query",
    EventID.SECURITY_ALERT: "Security Alert",
    EventID.USER_AUTHENTICATION: "User Authentication",
}


class EventTypeCode(enum.StrEnum):
    """PS3.15 A.5.3 / CID 401 "Audit Event Type Code" codes (scheme DCM) that the node emits.

    Steps with no DCM code (e.g. a routing decision or an inference step) pass their own
    short string as ``event_type``; the document then names the local scheme ``99BRAIN3D``.
    """

    APPLICATION_START = "110120"
    APPLICATION_STOP = "110121"
    NODE_AUTHENTICATION = "110126"
    NETWORK_CONFIGURATION = "110128"
    SECURITY_CONFIGURATION = "110129"
    SOFTWARE_CONFIGURATION = "110131"
    USE_OF_RESTRICTED_FUNCTION = "110132"

    @property
    def meaning(self) -> str:
        return _EVENT_TYPE_MEANINGS[self]


_EVENT_TYPE_MEANINGS: dict[EventTypeCode, str] = {
    EventTypeCode.APPLICATION_START: "Application Start",
    EventTypeCode.APPLICATION_STOP: "Application Stop",
    EventTypeCode.NODE_AUTHENTICATION: "Node Authentication",
    EventTypeCode.NETWORK_CONFIGURATION: "Network Configuration",
    EventTypeCode.SECURITY_CONFIGURATION: "Security Configuration",
    EventTypeCode.SOFTWARE_CONFIGURATION: "Software Configuration",
    EventTypeCode.USE_OF_RESTRICTED_FUNCTION: "Use of Restricted Function",
}

LOCAL_SCHEME = "99BRAIN3D"


class Outcome(enum.IntEnum):
    """PS3.15 A.5.3 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class Action(enum.StrEnum):
    """PS3.15 A.5.3 EventActionCode: Create, Read, Update, Delete, Execute."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Role(enum.StrEnum):
    """PS3.15 A.5.3 / CID 402 "Audit Active Participant Role ID" codes (scheme DCM)."""

    APPLICATION = "110150"
    APPLICATION_LAUNCHER = "110151"
    DESTINATION = "110152"
    SOURCE = "110153"

    @property
    def meaning(self) -> str:
        return _ROLE_MEANINGS[self]


_ROLE_MEANINGS: dict[Role, str] = {
    Role.APPLICATION: "Application",
    Role.APPLICATION_LAUNCHER: "Application Launcher",
    Role.DESTINATION: "Destination Role ID",
    Role.SOURCE: "Source Role ID",
}


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: who took part in the event, never a patient.

    ``user_id`` is the process or user acting (PS3.15 uses the AE title or process id
    for applications); ``requestor`` marks the participant that initiated the event.
    """

    role: Role | str
    ae_title: str | None = None
    network_address: str | None = None
    user_id: str | None = None
    requestor: bool = False

    def to_document(self) -> dict[str, Any]:
        role = Role(self.role)
        return {
            "ae_title": self.ae_title,
            "network_address": self.network_address,
            "requestor": self.requestor,
            "role": {"code": role.value, "meaning": role.meaning, "scheme": "DCM"},
            "user_id": self.user_id,
        }


def canonical_json(value: Any) -> str:
    """The one serialisation the chain signs: sorted keys, no whitespace, UTF-8 text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def format_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a ``Z``; naive datetimes are taken as UTC."""
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def chain_hash(key: bytes, previous_hash: str, document: str) -> str:
    """``HMAC-SHA256(key, previous_hash + document)`` as lowercase hex."""
    return hmac.new(key, (previous_hash + document).encode("utf-8"), hashlib.sha256).hexdigest()


def _event_type_document(event_type: str | None) -> dict[str, str] | None:
    if event_type is None:
        return None
    if event_type in EventTypeCode._value2member_map_:
        code = EventTypeCode(event_type)
        return {"code": code.value, "meaning": code.meaning, "scheme": "DCM"}
    return {"code": str(event_type), "meaning": str(event_type), "scheme": LOCAL_SCHEME}


@dataclass(frozen=True)
class ChainHead:
    """The newest row of a chain; ``origin`` (the first row's hash) names the chain."""

    row_id: int
    sequence: int
    chain_hash: str
    origin: str

    def to_json(self) -> str:
        return canonical_json(
            {
                "chain_hash": self.chain_hash,
                "origin": self.origin,
                "row_id": self.row_id,
                "sequence": self.sequence,
            }
        )

    @classmethod
    def from_json(cls, data: str) -> ChainHead:
        value = json.loads(data)
        return cls(
            row_id=int(value["row_id"]),
            sequence=int(value["sequence"]),
            chain_hash=str(value["chain_hash"]),
            origin=str(value["origin"]),
        )


@dataclass(frozen=True)
class ChainProblem:
    """One way the stored trail differs from what the application wrote."""

    kind: str  # edited, chain_break, sequence_gap, column_mismatch, bad_document, tail_cut, head_mismatch
    row_id: int | None
    sequence: int | None
    message: str


@dataclass
class VerificationReport:
    """What ``AuditTrail.verify`` found; ``ok`` only when no problem was found."""

    rows_checked: int = 0
    head: ChainHead | None = None
    head_file: ChainHead | None = None
    problems: list[ChainProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> ChainProblem | None:
        return self.problems[0] if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows_checked": self.rows_checked,
            "head": json.loads(self.head.to_json()) if self.head else None,
            "head_file": json.loads(self.head_file.to_json()) if self.head_file else None,
            "problems": [problem.__dict__ for problem in self.problems],
            "notes": list(self.notes),
        }


class AuditKeyError(RuntimeError):
    """The audit HMAC key is missing or unusable; the message says which and where."""


def load_audit_key(key: str | None, key_file: Path, *, create: bool = True) -> bytes:
    """The HMAC key: ``key`` when given, else ``key_file``'s bytes.

    A missing key file is created (when ``create``) with 32 random bytes and mode 0600,
    atomically, so concurrent first starts agree on one key. Verification passes
    ``create=False``: a fresh key would make every existing row look edited.
    """
    if key:
        material = key.encode("utf-8")
        if len(material) < MIN_KEY_BYTES:
            raise AuditKeyError(f"database.audit_key must be at least {MIN_KEY_BYTES} bytes long")
        return material
    key_file = Path(key_file)
    if not key_file.exists():
        if not create:
            raise AuditKeyError(f"audit key file {key_file} does not exist (database.audit_key_file)")
        key_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=key_file.parent, prefix=".audit-key-")
        try:
            os.fchmod(descriptor, 0o600)
            os.write(descriptor, secrets.token_bytes(32))
            os.fsync(descriptor)
            os.close(descriptor)
            with contextlib.suppress(FileExistsError):  # another process won the race: use its key
                os.link(temporary, key_file)
        finally:
            os.unlink(temporary)
        logger.info("created audit key file %s", key_file)
    mode = stat.S_IMODE(key_file.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "audit key file %s is accessible to other users (mode %o); chmod 600 it", key_file, mode
        )
    material = key_file.read_bytes()
    if len(material) < MIN_KEY_BYTES:
        raise AuditKeyError(f"audit key file {key_file} holds fewer than {MIN_KEY_BYTES} bytes")
    return material


class HeadFile:
    """The chain head kept outside the database, advanced monotonically under a file lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._thread_lock = threading.Lock()

    def read(self) -> ChainHead | None:
        try:
            return ChainHead.from_json(self.path.read_text())
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened read-only (flock needs no more): a lock file another user made still opens.
        lock = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            with self._thread_lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)

    def advance(self, head: ChainHead) -> None:
        """Record ``head`` unless the file already holds a later head of the same chain.

        Writers commit under the database lock but update this file after commit, so two
        writers may arrive here out of order; the sequence check keeps the file monotonic.
        (``AuditTrail.record`` never advances a file that names rows the table no longer holds.)
        """
        with self._locked():
            current = self.read()
            if current is not None and current.origin == head.origin and current.sequence >= head.sequence:
                return
            descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".audit-head-")
            try:
                with contextlib.suppress(FileNotFoundError):
                    # Keep the file's owner and mode: written by `sudo brain3d audit verify`, a
                    # root-owned head file would stop the service auditing.
                    kept = self.path.stat()
                    os.fchmod(descriptor, kept.st_mode & 0o777)
                    if os.geteuid() == 0:
                        os.fchown(descriptor, kept.st_uid, kept.st_gid)
                os.write(descriptor, head.to_json().encode("utf-8"))
                os.fsync(descriptor)
                os.close(descriptor)
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


class AuditTrail:
    """Append and verify the hash-chained audit trail of one database."""

    def __init__(
        self,
        database: Database,
        key: bytes,
        *,
        head_file: Path | None = None,
        source_id: str = "BRAIN3D",
    ) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise AuditKeyError(f"the audit key must be at least {MIN_KEY_BYTES} bytes long")
        self._database = database
        self._key = key
        self._head_file = HeadFile(head_file) if head_file is not None else None
        self.source_id = source_id

    @classmethod
    def from_settings(cls, settings: Settings, database: Database, *, create_key: bool = True) -> AuditTrail:
        """The trail described by ``settings.database``, its events sourced by the node's AE title."""
        return cls.for_database(
            settings.database, database, source_id=settings.node.ae_title, create_key=create_key
        )

    @classmethod
    def for_database(
        cls,
        database_settings: DatabaseSettings,
        database: Database,
        *,
        source_id: str = "BRAIN3D",
        create_key: bool = True,
    ) -> AuditTrail:
        """The trail of ``database``: key from ``audit_key`` or ``audit_key_file``.

        The head file lives beside the key file (``audit.key`` -> ``audit.head``).
        """
        key_file = Path(database_settings.audit_key_file)
        key = load_audit_key(database_settings.audit_key, key_file, create=create_key)
        return cls(database, key, head_file=key_file.with_suffix(".head"), source_id=source_id)

    @property
    def head_file(self) -> Path | None:
        return self._head_file.path if self._head_file else None

    # -- appending ---------------------------------------------------------------------------

    def record(
        self,
        event_id: EventID | str,
        outcome: Outcome | int,
        *,
        action: Action | str = Action.EXECUTE,
        event_type: EventTypeCode | str | None = None,
        participants: Iterable[Participant] = (),
        study_uid: str | None = None,
        series_uid: str | None = None,
        job_id: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Append one event and return its row; serialised against every other writer.

        ``detail`` is free JSON for what the DICOM vocabulary has no field for (counts,
        reasons, SOP class UIDs); it must never carry patient names or IDs.
        """
        event = EventID(event_id)
        outcome = Outcome(outcome)
        action = Action(action)
        recorded_at = datetime.now(UTC)
        body: dict[str, Any] = {
            "action": action.value,
            "detail": dict(detail) if detail else {},
            "event_id": {"code": event.value, "meaning": event.meaning, "scheme": "DCM"},
            "event_type": _event_type_document(event_type),
            "job_id": job_id,
            "outcome": int(outcome),
            "participants": [participant.to_document() for participant in participants],
            "series_uid": series_uid,
            "source_id": self.source_id,
            "study_uid": study_uid,
            "time": format_utc(recorded_at),
            "version": DOCUMENT_VERSION,
        }
        canonical_json(body)  # fail on unserialisable detail before taking the lock

        with self._database.engine.connect() as connection:
            self._lock_for_append(connection)
            previous = connection.execute(
                select(AuditEvent.id, AuditEvent.chain_hash, AuditEvent.document)
                .order_by(AuditEvent.id.desc())
                .limit(1)
            ).first()
            if previous is None:
                previous_hash, sequence = GENESIS_HASH, 1
            else:
                previous_hash = previous.chain_hash
                sequence = _sequence_after(connection, previous.document)
            body["sequence"] = sequence
            document = canonical_json(body)
            signed = chain_hash(self._key, previous_hash, document)
            values = {
                "recorded_at": recorded_at,
                "event_id": event.value,
                "event_type": str(event_type) if event_type is not None else None,
                "outcome": int(outcome),
                "study_instance_uid": study_uid,
                "series_instance_uid": series_uid,
                "job_id": job_id,
                "document": document,
                "previous_hash": previous_hash,
                "chain_hash": signed,
            }
            row_id = connection.execute(insert(AuditEvent).values(**values)).inserted_primary_key[0]
            origin = signed
            if previous is not None:
                origin = connection.execute(
                    select(AuditEvent.chain_hash).order_by(AuditEvent.id).limit(1)
                ).scalar_one()
            evidence = self._head_file is not None and not _names_a_row(
                connection, self._head_file.read(), origin
            )
            connection.commit()

        head = ChainHead(row_id=row_id, sequence=sequence, chain_hash=signed, origin=origin)
        logger.info(
            "audit head id=%d sequence=%d hash=%s origin=%s event=%s outcome=%d",
            head.row_id,
            head.sequence,
            head.chain_hash,
            head.origin,
            event.value,
            int(outcome),
        )
        if evidence:  # the file names rows the table no longer holds: kept for verify to report
            logger.error(
                "audit head file %s names rows the table no longer holds (cut, emptied or replaced): "
                "kept as evidence, not advanced; `brain3d audit verify` reports it",
                self._head_file.path if self._head_file else None,
            )
        elif self._head_file is not None:
            self._head_file.advance(head)
        return AuditEvent(id=row_id, **values)

    def record_service_activity(
        self,
        service: str,
        event_type: EventTypeCode,
        outcome: Outcome = Outcome.SUCCESS,
        *,
        ae_title: str | None = None,
        network_address: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """110100 Application Activity of one of the node's own processes (``serve``, ``worker``)
        starting, stopping or refusing to start, named by its process id."""
        return self.record(
            EventID.APPLICATION_ACTIVITY,
            outcome,
            event_type=event_type,
            participants=[
                Participant(
                    Role.APPLICATION,
                    ae_title=ae_title,
                    network_address=network_address,
                    user_id=str(os.getpid()),
                )
            ],
            detail={"service": service, **(detail or {})},
        )

    def _lock_for_append(self, connection: Connection) -> None:
        """Take the database-wide append lock inside the connection's transaction."""
        dialect = connection.dialect.name
        if dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        elif dialect == "sqlite":
            # pysqlite opens no transaction before a SELECT, so this BEGIN is the first
            # statement; it takes the write lock now (waiting out busy_timeout) instead of
            # at the INSERT, when another writer could already have moved the head.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            raise NotImplementedError(f"audit appends are not serialised on {dialect}")

    # -- verifying ---------------------------------------------------------------------------

    def verify(self) -> VerificationReport:
        """Re-check every row, the chain links, the sequence and the head file."""
        report = VerificationReport()
        expected_previous = GENESIS_HASH
        expected_sequence = 1
        origin: str | None = None
        last: ChainHead | None = None
        # Read before the rows: an event appended meanwhile leaves the file behind what is scanned
        # (a note), never ahead of it, which would read as a cut tail.
        recorded = self._head_file.read() if self._head_file is not None else None
        hash_at_recorded: str | None = None
        with self._database.engine.connect() as connection:
            rows = connection.execution_options(yield_per=1000).execute(
                select(AuditEvent).order_by(AuditEvent.id)
            )
            for row in rows.mappings():
                report.rows_checked += 1
                row_id = row["id"]
                try:
                    document = json.loads(row["document"])
                    sequence = int(document["sequence"])
                except (ValueError, KeyError, TypeError):
                    document, sequence = None, None
                if chain_hash(self._key, row["previous_hash"], row["document"]) != row["chain_hash"]:
                    report.problems.append(
                        ChainProblem(
                            "edited", row_id, sequence, f"row {row_id}: HMAC does not match its content"
                        )
                    )
                if row["previous_hash"] != expected_previous:
                    report.problems.append(
                        ChainProblem(
                            "chain_break",
                            row_id,
                            sequence,
                            f"row {row_id}: does not follow the row before it (row inserted or deleted)",
                        )
                    )
                if document is None or sequence is None:
                    report.problems.append(
                        ChainProblem(
                            "bad_document", row_id, None, f"row {row_id}: document is not an audit event"
                        )
                    )
                else:
                    if sequence != expected_sequence:
                        report.problems.append(
                            ChainProblem(
                                "sequence_gap",
                                row_id,
                                sequence,
                                f"row {row_id}: sequence {sequence}, expected {expected_sequence}",
                            )
                        )
                    mismatch = _column_mismatch(row, document)
                    if mismatch:
                        report.problems.append(
                            ChainProblem(
                                "column_mismatch",
                                row_id,
                                sequence,
                                f"row {row_id}: {mismatch} differs from its document",
                            )
                        )
                    expected_sequence = sequence + 1
                expected_previous = row["chain_hash"]
                if recorded is not None and row_id == recorded.row_id:
                    hash_at_recorded = row["chain_hash"]
                if origin is None:
                    origin = row["chain_hash"]
                last = ChainHead(row_id, expected_sequence - 1, row["chain_hash"], origin)
        report.head = last
        self._check_head_file(report, recorded, hash_at_recorded)
        return report

    def _check_head_file(
        self, report: VerificationReport, recorded: ChainHead | None, hash_at_recorded: str | None
    ) -> None:
        if self._head_file is None:
            report.notes.append("no head file configured: a cut-off tail cannot be detected")
            return
        report.head_file = recorded
        head = report.head
        if recorded is None:
            if head is not None:
                report.problems.append(
                    ChainProblem(
                        "head_missing",
                        None,
                        None,
                        f"head file {self._head_file.path} is missing but rows exist",
                    )
                )
            return
        if head is None:
            report.problems.append(
                ChainProblem(
                    "tail_cut",
                    None,
                    recorded.sequence,
                    f"the table is empty but the head file records {recorded.sequence} events",
                )
            )
        elif recorded.origin != head.origin:
            report.problems.append(
                ChainProblem(
                    "head_mismatch",
                    None,
                    None,
                    "the head file belongs to another chain (or the first row changed)",
                )
            )
        elif recorded.sequence > head.sequence:
            report.problems.append(
                ChainProblem(
                    "tail_cut",
                    head.row_id,
                    head.sequence,
                    f"the last row is sequence {head.sequence} (row {head.row_id}) but the head file records "
                    f"sequence {recorded.sequence} (row {recorded.row_id}): the tail was cut off",
                )
            )
        elif recorded.sequence == head.sequence and recorded.chain_hash != head.chain_hash:
            report.problems.append(
                ChainProblem(
                    "head_mismatch",
                    head.row_id,
                    head.sequence,
                    f"row {head.row_id} is not the row the head file records at sequence {head.sequence}",
                )
            )
        elif recorded.sequence < head.sequence and hash_at_recorded != recorded.chain_hash:
            report.problems.append(
                ChainProblem(
                    "head_mismatch",
                    recorded.row_id,
                    recorded.sequence,
                    f"row {recorded.row_id} is not the row the head file records at sequence "
                    f"{recorded.sequence}: the rows after an earlier head were replaced",
                )
            )
        elif recorded.sequence < head.sequence:
            report.notes.append(
                f"head file is behind the table (sequence {recorded.sequence} < {head.sequence}): "
                "a writer stopped between commit and head update"
            )


def _sequence_after(connection: Connection, last_document: str) -> int:
    """The next sequence number. A last row edited into no audit event (which ``verify``
    reports) must not stop the node auditing: the rows are counted instead."""
    try:
        return int(json.loads(last_document)["sequence"]) + 1
    except (ValueError, KeyError, TypeError):
        logger.error("the last audit row is not an audit event (edited?): numbering after the row count")
        return int(connection.execute(select(func.count()).select_from(AuditEvent)).scalar_one()) + 1


def _names_a_row(connection: Connection, recorded: ChainHead | None, origin: str) -> bool:
    """Whether the head file's head is a row of the chain that starts at ``origin`` (or there is
    no head file yet): a writer must not overwrite evidence that rows were cut or replaced."""
    if recorded is None:
        return True
    held = connection.execute(
        select(AuditEvent.chain_hash).where(AuditEvent.id == recorded.row_id)
    ).scalar_one_or_none()
    return recorded.origin == origin and held == recorded.chain_hash


def _column_mismatch(row: Mapping[str, Any], document: Mapping[str, Any]) -> str | None:
    """The first indexed column that disagrees with the signed document, if any.

    The columns exist for querying; only the document is signed, so they are checked
    against it rather than trusted.
    """
    event_type = document.get("event_type")
    expected = {
        "event_id": (document.get("event_id") or {}).get("code"),
        "event_type": event_type["code"] if event_type else None,
        "outcome": document.get("outcome"),
        "study_instance_uid": document.get("study_uid"),
        "series_instance_uid": document.get("series_uid"),
        "job_id": document.get("job_id"),
        "recorded_at": document.get("time"),
    }
    for column, value in expected.items():
        stored = row[column]
        if column == "recorded_at" and stored is not None:
            stored = format_utc(stored)
        if stored != value:
            return column
    return None
