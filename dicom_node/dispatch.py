"""Where produced SRs go: each kind of destination a class behind one small interface.

``Destination.send(files) -> DeliveryOutcome`` makes ONE attempt and never raises for a
peer's failure: a destination that is down, rejects the association or refuses an instance
yields an outcome with a clear ``error`` and per-file DIMSE status codes. Retries, backoff
and the audit trail belong to the caller (the Celery delivery task), which can then decide
from the outcome and the SQL rows, not from exceptions.

- ``DicomDestination``: C-STORE over one association (pynetdicom SCU), sending each file's
  bytes as stored, without decoding (so a re-delivery sends exactly the persisted bytes).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, Association, _config, evt
from pynetdicom.presentation import build_context

LOG = logging.getLogger(__name__)

SUCCESS = 0x0000


def is_stored(status: int | None) -> bool:
    """Success, or a warning (0x0001, 0xBxxx): the peer kept the instance (PS3.4 B.2.3)."""
    return status is not None and (status == SUCCESS or status == 0x0001 or 0xB000 <= status <= 0xBFFF)


@dataclass(frozen=True)
class DeliveryOutcome:
    """The result of one attempt: a DIMSE status per SOP Instance UID the peer answered.

    A file absent from ``statuses`` was not delivered (the association failed before it);
    ``error`` explains any failure in one line without patient data.
    """

    destination: str
    statuses: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    attempted: tuple[str, ...] = ()

    def stored(self, sop_instance_uid: str) -> bool:
        return is_stored(self.statuses.get(sop_instance_uid))

    @property
    def ok(self) -> bool:
        """Every attempted file stored and no error."""
        return self.error is None and all(self.stored(uid) for uid in self.attempted)


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _read_meta(files: Sequence[Path]) -> tuple[list[_File], str | None]:
    """File meta of each file (enough to choose contexts and name the instance)."""
    read: list[_File] = []
    for path in files:
        try:
            meta = read_file_meta_info(path)
            read.append(
                _File(
                    path=Path(path),
                    sop_class_uid=str(meta.MediaStorageSOPClassUID),
                    sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                    transfer_syntax_uid=str(meta.TransferSyntaxUID),
                )
            )
        except (OSError, InvalidDicomError, AttributeError) as error:
            return read, f"cannot read {path}: {error.__class__.__name__}: {error}"
    return read, None


class Destination(ABC):
    """Somewhere SR files are delivered to."""

    name: str

    @abstractmethod
    def send(self, files: Sequence[Path]) -> DeliveryOutcome:
        """One delivery attempt of ``files``; failures are reported, not raised."""


class DicomDestination(Destination):
    """A DICOM peer (PACS, viewer, router) reached by C-STORE."""

    def __init__(
        self,
        host: str,
        port: int,
        ae_title: str,
        calling_ae: str = "BRAIN3D",
        *,
        timeout_s: float = 30.0,
        name: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ae_title = ae_title
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.name = name or f"{ae_title}@{host}:{port}"

    def send(self, files: Sequence[Path]) -> DeliveryOutcome:
        entries, error = _read_meta(files)
        attempted = tuple(entry.sop_instance_uid for entry in entries)
        if error is not None:
            return DeliveryOutcome(self.name, error=error, attempted=attempted)
        if not entries:
            return DeliveryOutcome(self.name)
        # Send each file's dataset bytes as stored rather than decoding and re-encoding it.
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        contexts = sorted({(entry.sop_class_uid, entry.transfer_syntax_uid) for entry in entries})
        if len(contexts) > 128:
            return DeliveryOutcome(
                self.name, error="more than 128 presentation contexts", attempted=attempted
            )
        requested = [build_context(sop_class, [syntax]) for sop_class, syntax in contexts]
        connected = threading.Event()
        assoc = ae.associate(
            self.host,
            self.port,
            contexts=requested,
            ae_title=self.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.set())],
        )
        if not assoc.is_established:
            error = self._association_error(assoc, connected.is_set())
            return DeliveryOutcome(self.name, error=error, attempted=attempted)
        statuses: dict[str, int] = {}
        failures: list[str] = []
        try:
            for entry in entries:
                accepted = any(
                    context.abstract_syntax == entry.sop_class_uid
                    and context.transfer_syntax[0] == entry.transfer_syntax_uid
                    for context in assoc.accepted_contexts
                )
                if not accepted:
                    failures.append(f"{self.name} accepted no context for {entry.sop_instance_uid}")
                    continue
                try:
                    status = assoc.send_c_store(entry.path)
                except Exception as exc:  # its file gone or changed since its meta was read
                    failures.append(f"{self.name}: could not send {entry.sop_instance_uid}: {exc!r}")
                    break  # what was stored before it is still reported
                if "Status" not in status:
                    failures.append(f"{self.name}: no C-STORE response (association aborted or timed out)")
                    break
                statuses[entry.sop_instance_uid] = int(status.Status)
                if not is_stored(statuses[entry.sop_instance_uid]):
                    failures.append(
                        f"{self.name} refused {entry.sop_instance_uid}: status 0x{status.Status:04X}"
                    )
                LOG.info("C-STORE %s to %s: status 0x%04X", entry.sop_instance_uid, self.name, status.Status)
        finally:
            if assoc.is_established:
                assoc.release()
        error = "; ".join(failures) or None
        return DeliveryOutcome(self.name, statuses=statuses, error=error, attempted=attempted)

    def _association_error(self, assoc: Association, connected: bool) -> str:
        if not connected:
            return f"could not connect to {self.name} (connection refused, unreachable or timed out)"
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            return (
                f"association rejected by {self.name}: {primitive.result_str}, "
                f"source {primitive.source_str}, reason {primitive.reason_str}"
            )
        return f"association with {self.name} aborted or timed out before it was established"


def is_loopback(host: str) -> bool:
    """True only when every address ``host`` resolves to is a loopback address.

    The demo-model guard relies on it: a name that does not resolve counts as remote.
    """
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(
        ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses
    )
