"""The Storage SCP: the seam between pynetdicom's events and the node's spool and SQL.

Accepts Verification and Storage of every SOP class (including private ones a PACS
forwards in a whole-study send) in every transfer syntax, with unlimited PDUs. Each
C-STORE is written without decoding (file meta + the peer's bytes), and 0x0000 is
answered only once the file is durable and its SQL row committed. Calling AEs outside
the allowlist are rejected at association time and audited as security alerts; each
accepted association gets one 110104 "instances transferred" audit event when it ends.

The SCP accepts on a listening socket made by ``listen`` (the node binds the port once and
may share the socket with several receiver processes, ``dicom_node.receivers``), and keeps
its SQL rows and audit events behind two small interfaces, ``InstanceBookkeeping`` and
``AuditRecorder``: in the node process they are the ``Ingest`` and the ``AuditTrail``, in a
receiver process proxies that forward each call to the node process.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.audit import Action, EventID, EventTypeCode, Outcome, Participant, Role
from dicom_node.config import NodeSettings, StorageSettings
from dicom_node.ingest import InstanceHeaders, InstanceOutcome, MalformedDatasetError, read_headers
from dicom_node.spool import Spool, SpooledInstance, UnsafeUIDError, file_meta_bytes

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900  # Data Set does not match SOP Class
STATUS_CANNOT_UNDERSTAND = 0xC210  # pynetdicom's "unable to decode the dataset"

# Private and retired storage SOP classes forwarded by a PACS are accepted too: a
# whole-study forward that gets one object rejected is a failed forward.
_config.UNRESTRICTED_STORAGE_SERVICE = True


LISTEN_BACKLOG = 128


class InstanceBookkeeping(Protocol):
    """The SQL rows the SCP writes (``dicom_node.ingest.Ingest`` or a receiver's proxy of it).

    Each future resolves once its rows are committed.
    """

    def open_association(self, calling_ae: str, called_ae: str, address: str, port: int) -> Future[int]: ...

    def close_association(
        self, association_id: int, outcome: str, stored: int, duplicate: int, failed: int
    ) -> Future[None]: ...

    def record_rejected_association(
        self, calling_ae: str, called_ae: str, address: str, port: int
    ) -> Future[int]: ...

    def record_instance(
        self,
        headers: InstanceHeaders,
        spooled: SpooledInstance,
        *,
        transfer_syntax_uid: str,
        association_id: int | None,
        received_at: datetime,
    ) -> Future[InstanceOutcome]: ...


class AuditRecorder(Protocol):
    """Appends audit events (``dicom_node.audit.AuditTrail`` or a receiver's proxy of it)."""

    def record(
        self,
        event_id: EventID | str,
        outcome: Outcome | int,
        *,
        action: Action | str = ...,
        event_type: EventTypeCode | str | None = ...,
        participants: Iterable[Participant] = ...,
        study_uid: str | None = ...,
        series_uid: str | None = ...,
        job_id: int | None = ...,
        detail: Mapping[str, Any] | None = ...,
    ) -> object: ...


def listen(host: str, port: int) -> socket.socket:
    """Bind and listen on the node's port; one socket, however many processes accept on it.

    Non-blocking, so that of several processes woken by one connection the ones that lose
    the race to ``accept`` go back to waiting instead of blocking in it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


class SharedSocketAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, accepting on a socket made by ``listen``."""

    def __init__(self, *args: Any, listener: socket.socket, **kwargs: Any) -> None:
        self._listener = listener
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.socket.close()  # the unbound socket socketserver made; the listener replaces it
        self.socket = self._listener
        self.server_address = self._listener.getsockname()

    def server_activate(self) -> None:
        """Listening already."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        # Blocking, as pynetdicom's association socket expects, but not forever: a peer that sends
        # part of a PDU and stops would otherwise hold its association slot for good, and a few
        # such connections would lock every modality out. pynetdicom closes on the timeout.
        client.settimeout(self.ae.network_timeout)
        return client, address

    def server_close(self) -> None:
        # Close only this process's descriptor: shutdown() would stop every process accepting on it.
        self.socket.close()

    def shutdown(self) -> None:
        """Stop the accept loop and close the descriptor (pynetdicom's also unregisters from its AE,
        which never registered this server)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class SharedContexts(list):
    """The SCP's supported presentation contexts, shared by every association.

    pynetdicom deep-copies them for each association it accepts, in case an application
    changes them while it runs: for all storage classes with every transfer syntax that is
    34 ms of CPU in isolation and 45-50 ms per association in the node (docs/benchmarks.md),
    paid by senders that open one association per instance. This node never changes them
    after start, and negotiation only reads them, so the copy is the list itself.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return self


#: How long a closed connection's audit event waits for C-STOREs still being recorded.
CLOSE_WAIT_S = 60.0


@dataclass
class AssociationLog:
    """What one accepted association did, for its SQL row and its audit event.

    Two threads keep it: the association's, whose C-STORE handlers count into it, and
    pynetdicom's transport thread, which reports the connection closed, after an abort possibly
    while a C-STORE is still being recorded. ``busy`` counts those, so that the close waits for
    them and its counts are final."""

    calling_ae: str
    address: str
    port: int
    opened: Future[int]  # the association's SQL row, being inserted
    busy: int = 0
    idle: threading.Condition = field(default_factory=threading.Condition)
    stored: int = 0
    duplicate: int = 0
    conflicting: int = 0
    failed: int = 0
    out_of_resources_audited: bool = False
    studies: set[str] = field(default_factory=set)
    outcome: str = "aborted"  # until a release is seen

    @property
    def association_id(self) -> int | None:
        """The SQL row's id, once inserted; None where the insert failed."""
        try:
            return self.opened.result()
        except Exception:
            return None

    def done_storing(self) -> None:
        with self.idle:
            self.busy -= 1
            self.idle.notify_all()


class StorageSCP:
    """A running Storage SCP; ``start`` binds the port, ``stop`` drains and closes it."""

    def __init__(
        self,
        node: NodeSettings,
        storage: StorageSettings,
        spool: Spool,
        ingest: InstanceBookkeeping,
        audit: AuditRecorder,
    ) -> None:
        self.node = node
        self.storage = storage
        self.spool = spool
        self.ingest = ingest
        self.audit = audit
        self._server: SharedSocketAssociationServer | None = None
        self._associations: dict[int, AssociationLog] = {}
        self._lock = threading.Lock()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        ae.maximum_pdu_size = self.node.max_pdu_size
        ae.maximum_associations = self.node.max_associations
        ae.require_calling_aet = list(self.node.allowed_calling_aes)
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def start(self, listener: socket.socket) -> None:
        """Serve associations accepted on ``listener`` (from ``listen``) in a background thread."""
        handlers = [
            (evt.EVT_C_ECHO, lambda _event: STATUS_SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
        ]
        server = self.ae.make_server(
            listener.getsockname(),
            evt_handlers=handlers,
            server_class=SharedSocketAssociationServer,
            listener=listener,
        )
        server.contexts = SharedContexts(server.contexts)
        threading.Thread(target=server.serve_forever, name="storage-scp-acceptor", daemon=True).start()
        self._server = server
        log.info("Storage SCP %s listening on %s:%d", self.node.ae_title, self.node.host, self.port)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let running associations finish for a while, then abort the rest."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for association in server.active_associations:
            log.warning("aborting association from %s at shutdown", association.requestor.ae_title)
            association.abort()

    # -- association life cycle -----------------------------------------------------------

    def _participants(self, calling_ae: str, address: str) -> list[Participant]:
        return [
            Participant(Role.SOURCE, ae_title=calling_ae, network_address=address, requestor=True),
            # The receiving process's id as the destination's UserID (PS3.15 A.5.3 for a process).
            Participant(
                Role.DESTINATION,
                ae_title=self.node.ae_title,
                network_address=self.node.host,
                user_id=str(os.getpid()),
            ),
        ]

    def _audit(self, event_id: EventID, outcome: Outcome, **kwargs: object) -> None:
        """Audit without ever failing the DICOM exchange (a failure is logged loudly)."""
        try:
            self.audit.record(event_id, outcome, **kwargs)  # type: ignore[arg-type]
        except Exception:
            log.exception("audit event %s could not be recorded", event_id)

    def _on_accepted(self, event: evt.Event) -> None:
        association = event.assoc
        if not association.is_acceptor:
            return
        requestor = association.requestor
        # Registered before its row is committed: a peer that aborts at once still gets its close.
        record = AssociationLog(
            calling_ae=requestor.ae_title,
            address=requestor.address,
            port=int(requestor.port),
            opened=self.ingest.open_association(
                requestor.ae_title, self.node.ae_title, requestor.address, int(requestor.port)
            ),
        )
        with self._lock:
            self._associations[id(association)] = record

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        calling_ae, address = requestor.ae_title, requestor.address
        allowed = self.node.allowed_calling_aes
        unknown = bool(allowed) and calling_ae not in allowed
        log.warning("rejected association from %s at %s (unknown AE: %s)", calling_ae, address, unknown)
        try:
            self.ingest.record_rejected_association(
                calling_ae, self.node.ae_title, address, int(requestor.port)
            ).result()
        except Exception:
            log.exception("could not record the rejected association")
        if unknown:
            self._audit(
                EventID.SECURITY_ALERT,
                Outcome.MINOR_FAILURE,
                event_type=EventTypeCode.NODE_AUTHENTICATION,
                participants=self._participants(calling_ae, address),
                detail={"reason": "calling AE title not in node.allowed_calling_aes"},
            )

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            record = self._associations.get(id(event.assoc))
        if record is not None:
            record.outcome = "released"

    def _on_connection_closed(self, event: evt.Event) -> None:
        with self._lock:
            record = self._associations.pop(id(event.assoc), None)
        if record is None:
            return
        with record.idle:
            if not record.idle.wait_for(lambda: record.busy == 0, timeout=CLOSE_WAIT_S):
                log.error("association from %s closed with C-STOREs still unrecorded", record.calling_ae)
        association_id = record.association_id
        if record.failed:
            outcome = (
                Outcome.SERIOUS_FAILURE if not (record.stored or record.duplicate) else Outcome.MINOR_FAILURE
            )
        else:
            outcome = Outcome.SUCCESS if record.outcome == "released" else Outcome.MINOR_FAILURE
        studies = sorted(record.studies)
        self._audit(
            EventID.DICOM_INSTANCES_TRANSFERRED,
            outcome,
            action="C",
            participants=self._participants(record.calling_ae, record.address),
            study_uid=studies[0] if len(studies) == 1 else None,
            detail={
                "association_id": association_id,
                "association_outcome": record.outcome,
                "instances_stored": record.stored,
                "instances_duplicate": record.duplicate,
                "instances_conflicting": record.conflicting,
                "instances_failed": record.failed,
                "studies": studies,
            },
        )
        if association_id is None:
            log.error(
                "association from %s was never recorded in SQL (database unavailable)", record.calling_ae
            )
            return
        # The association row is closed last: whoever sees it closed also finds its audit event.
        try:
            self.ingest.close_association(
                association_id, record.outcome, record.stored, record.duplicate, record.failed
            ).result()
        except Exception:
            log.exception("could not close association %d in SQL", association_id)
        log.info(
            "association %d from %s %s: %d stored, %d duplicate, %d failed",
            association_id,
            record.calling_ae,
            record.outcome,
            record.stored,
            record.duplicate,
            record.failed,
        )

    # -- C-STORE --------------------------------------------------------------------------

    def _fail(self, record: AssociationLog | None, reason: str, status: int, request: C_STORE) -> int:
        """Refuse one instance: count it, log it, audit it with the UIDs the request named."""
        if record is not None:
            record.failed += 1
        log.warning("C-STORE refused with 0x%04X: %s", status, reason)
        self._audit(
            EventID.DICOM_INSTANCES_TRANSFERRED,
            Outcome.SERIOUS_FAILURE,
            action="C",
            participants=self._participants(record.calling_ae, record.address) if record else (),
            detail={
                "association_id": record.association_id if record else None,
                "reason": reason,
                "sop_class_uid": str(request.AffectedSOPClassUID),
                "sop_instance_uid": str(request.AffectedSOPInstanceUID).strip(),
                "status": f"0x{status:04X}",
            },
        )
        return status

    def _on_store(self, event: evt.Event) -> int:
        received_at = datetime.now(UTC)
        with self._lock:  # counted busy under the lock its close pops it under
            record = self._associations.get(id(event.assoc))
            if record is not None:
                with record.idle:
                    record.busy += 1
        try:
            return self._store(event, record, received_at)
        finally:
            if record is not None:
                record.done_storing()

    def _store(self, event: evt.Event, record: AssociationLog | None, received_at: datetime) -> int:
        """One C-STORE: refused, or durable in the spool and SQL, and counted in ``record``."""
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        transfer_syntax = event.context.transfer_syntax
        dataset = event.encoded_dataset(include_meta=False)

        try:
            headers = read_headers(dataset, transfer_syntax)
        except MalformedDatasetError as exc:
            return self._fail(record, str(exc), STATUS_CANNOT_UNDERSTAND, request)
        for name, in_dataset, in_request in (
            ("SOP Instance UID", headers.sop_instance_uid, request.AffectedSOPInstanceUID),
            ("SOP Class UID", headers.sop_class_uid, request.AffectedSOPClassUID),
        ):
            # Filed under the request's UIDs, it would be what it is not (a dataset silent on its
            # class is taken at the request's word).
            if in_dataset is not None and in_dataset != str(in_request).strip():
                return self._fail(
                    record, f"{name} differs from the request's", STATUS_DATASET_MISMATCH, request
                )

        if self.spool.free_bytes() - len(dataset) < self.storage.min_free_bytes:
            if record is not None:
                record.failed += 1
                if record.out_of_resources_audited:
                    return STATUS_OUT_OF_RESOURCES
                record.out_of_resources_audited = True
            log.error("free disk below storage.min_free_bytes: answering Out of Resources")
            self._audit(
                EventID.DICOM_INSTANCES_TRANSFERRED,
                Outcome.SERIOUS_FAILURE,
                action="C",
                participants=self._participants(record.calling_ae, record.address) if record else (),
                study_uid=headers.study_uid,
                series_uid=headers.series_uid,
                detail={"reason": "free disk below storage.min_free_bytes", "status": "0xA700"},
            )
            return STATUS_OUT_OF_RESOURCES

        file_meta = file_meta_bytes(sop_class, headers.sop_instance_uid, transfer_syntax)
        try:
            spooled = self.spool.store(
                headers.study_uid, headers.series_uid, headers.sop_instance_uid, file_meta, dataset
            )
        except UnsafeUIDError as exc:
            return self._fail(record, str(exc), STATUS_DATASET_MISMATCH, request)
        except OSError as exc:  # a full or failing disk: transient, so an SCU may send it again
            return self._fail(
                record, f"spool: {exc.strerror or type(exc).__name__}", STATUS_OUT_OF_RESOURCES, request
            )

        try:
            outcome = self.ingest.record_instance(
                headers,
                spooled,
                transfer_syntax_uid=str(transfer_syntax),
                association_id=record.association_id if record else None,
                received_at=received_at,
            ).result()
        except Exception as exc:  # transient too (a database restarting, a lock held): not C0xx
            log.exception("SQL record failed for %s", headers.sop_instance_uid)
            return self._fail(record, f"database: {type(exc).__name__}", STATUS_OUT_OF_RESOURCES, request)

        if record is not None:
            record.studies.add(headers.study_uid)
            if outcome is InstanceOutcome.DUPLICATE:
                record.duplicate += 1
            else:
                record.stored += 1
                record.conflicting += outcome is InstanceOutcome.CONFLICTING
        return STATUS_SUCCESS
