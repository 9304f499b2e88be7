"""The Storage SCP under ``brain3d serve``: allowlist, refusals, conflicts and concurrency."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import require_tool
from pacs import mr_series
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config
from serve_harness import NodeProcess, dataset_bytes, storescu, wait_for
from sqlalchemy import func, select

from dicom_node.db.models import Association, AuditEvent, Instance
from dicom_node.scp import StorageSCP, listen

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


def _send(port: int, datasets: list[Dataset], calling_ae: str = "SCU") -> list[int]:
    """C-STORE each dataset over one association; the statuses answered."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title="BRAIN3D")
    assert association.is_established
    try:
        return [int(association.send_c_store(ds).Status) for ds in datasets]
    finally:
        association.release()


def _audit_documents(node: NodeProcess, event_id: str) -> list[dict]:
    database = node.database()
    try:
        with database.session() as session:
            rows = session.execute(
                select(AuditEvent.document).where(AuditEvent.event_id == event_id)
            ).scalars()
            return [json.loads(row) for row in rows]
    finally:
        database.dispose()


def test_unknown_calling_ae_is_rejected_and_audited(tmp_path: Path) -> None:
    require_tool("storescu")
    series = mr_series(2)
    paths = []
    for index, dataset in enumerate(series):
        paths.append(tmp_path / f"{index}.dcm")
        dataset.save_as(paths[-1], enforce_file_format=True)
    with NodeProcess(tmp_path / "node", allowed_calling_aes=["MODALITY"]) as node:
        refused = storescu(node.port, paths, calling_ae="INTRUDER", check=False)
        assert refused.returncode != 0
        storescu(node.port, paths, calling_ae="MODALITY")

        alerts = wait_for(lambda: _audit_documents(node, "110113"))
        assert len(alerts) == 1
        source = next(p for p in alerts[0]["participants"] if p["requestor"])
        assert (source["ae_title"], source["network_address"]) == ("INTRUDER", "127.0.0.1")
    # Read after the graceful stop: an association's row is closed when its connection closes.
    database = node.database()
    with database.session() as session:
        outcomes = dict(session.execute(select(Association.calling_ae, Association.outcome)).all())
        stored = session.execute(select(func.count(Instance.id))).scalar_one()
    database.dispose()
    assert outcomes == {"INTRUDER": "rejected", "MODALITY": "released"}
    assert stored == 2


def test_malformed_dataset_is_refused_and_audited_while_others_carry_on(tmp_path: Path) -> None:
    good = mr_series(3)
    malformed = mr_series(1)
    del malformed[0].StudyInstanceUID
    with NodeProcess(tmp_path / "node") as node:
        statuses = _send(node.port, [good[0], malformed[0], good[1]])
        assert statuses[0] == 0x0000 and statuses[2] == 0x0000
        assert 0xC000 <= statuses[1] <= 0xCFFF
        assert _send(node.port, [good[2]]) == [0x0000]
        failures = [
            doc for doc in wait_for(lambda: _audit_documents(node, "110104")) if doc["detail"].get("reason")
        ]
        assert len(failures) == 1 and failures[0]["outcome"] == 8
        assert "UID" in failures[0]["detail"]["reason"]
        assert failures[0]["detail"]["sop_instance_uid"] == malformed[0].SOPInstanceUID, "traceable"


@pytest.mark.parametrize(
    ("keyword", "meta_keyword", "reason"),
    [
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID", "SOP Instance UID differs from the request's"),
        ("SOPClassUID", "MediaStorageSOPClassUID", "SOP Class UID differs from the request's"),
    ],
)
def test_a_dataset_that_is_not_what_its_request_names_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keyword: str, meta_keyword: str, reason: str
) -> None:
    """The request names the instance; a dataset that says otherwise is refused with 0xA900,
    audited, and not stored."""
    # pynetdicom's option to send a file as it is, its request taken from the file meta.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    dataset = mr_series(1)[0]
    path = tmp_path / "sent.dcm"
    dataset.save_as(path, enforce_file_format=True)
    sent = pydicom.dcmread(path)
    setattr(sent, keyword, "1.2.3.999" if keyword == "SOPInstanceUID" else CTImageStorage)
    assert getattr(sent.file_meta, meta_keyword) == getattr(dataset, keyword)  # the request's
    sent.save_as(path)
    with NodeProcess(tmp_path / "node") as node:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        association = ae.associate("127.0.0.1", node.port, ae_title="BRAIN3D")
        assert association.is_established
        status = int(association.send_c_store(path).Status)
        association.release()
        failures = [
            doc for doc in wait_for(lambda: _audit_documents(node, "110104")) if doc["detail"].get("reason")
        ]
        database = node.database()
        with database.session() as session:
            stored = session.execute(select(func.count(Instance.id))).scalar_one()
        database.dispose()
    assert status == 0xA900 and stored == 0
    assert [doc["detail"]["reason"] for doc in failures] == [reason]


def test_same_uid_with_different_content_is_kept_and_flagged(tmp_path: Path) -> None:
    original = mr_series(1)[0]
    changed = copy.deepcopy(original)
    changed.ImageComments = "corrected by the technologist"
    with NodeProcess(tmp_path / "node") as node:
        assert _send(node.port, [original, original, changed]) == [0, 0, 0]
    database = node.database()
    with database.session() as session:
        rows = session.execute(select(Instance).order_by(Instance.id)).scalars().all()
        association = session.execute(select(Association)).scalar_one()
    database.dispose()
    assert len(rows) == 2, "the identical re-send is not stored twice"
    assert all(row.conflicting for row in rows)
    assert Path(rows[0].path).name == f"{original.SOPInstanceUID}.dcm"
    assert Path(rows[1].path).name == f"{original.SOPInstanceUID}.{rows[1].sha256[:16]}.dcm"
    assert dataset_bytes(Path(rows[0].path)) != dataset_bytes(Path(rows[1].path))
    assert (association.instances_stored, association.instances_duplicate) == (2, 1)


def test_low_disk_answers_out_of_resources_and_audits(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "node", min_free_bytes=2**62) as node:
        assert _send(node.port, mr_series(2)) == [0xA700, 0xA700]
        documents = wait_for(lambda: _audit_documents(node, "110104"))
        assert any(doc["detail"].get("status") == "0xA700" for doc in documents)
        assert not any((node.spool_dir).glob("*/*/*.dcm"))


def test_a_database_failure_answers_out_of_resources_and_the_node_serves_on(tmp_path: Path) -> None:
    """A write the database refuses is transient: 0xA700, which an SCU may send again, not a C0xx
    "cannot understand"; audited; and once the database takes writes again the re-send is kept."""
    series = mr_series(2)
    with NodeProcess(tmp_path / "node") as node:
        database = node.database()
        with database.engine.begin() as connection:  # a real refusal, from SQLite itself
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON instances BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        assert _send(node.port, series[:1]) == [0xA700]
        with database.engine.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER refuse")
        assert _send(node.port, series) == [0x0000, 0x0000]
        failures = [
            doc for doc in wait_for(lambda: _audit_documents(node, "110104")) if doc["detail"].get("reason")
        ]
        with database.session() as session:
            stored = session.execute(select(Instance.sop_instance_uid)).scalars().all()
        database.dispose()
    assert len(failures) == 1 and failures[0]["detail"]["reason"].startswith("database: ")
    assert failures[0]["detail"]["status"] == "0xA700"
    assert failures[0]["detail"]["sop_instance_uid"] == series[0].SOPInstanceUID
    assert sorted(stored) == sorted(ds.SOPInstanceUID for ds in series)


def test_header_values_too_long_or_large_for_their_columns_are_kept_on_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    """PostgreSQL enforces column sizes where SQLite does not: a non-conformant Modality or
    InstanceNumber must not refuse the instance (nor, through its series row, the whole series)."""
    dataset = mr_series(1)[0]
    dataset.Modality = "MR_FROM_AN_OLD_SCANNER"  # CS holds 16 characters
    dataset.InstanceNumber = "99999999999"  # IS holds 32-bit integers
    with NodeProcess(tmp_path / "node", database_url=postgres_url) as node:
        assert _send(node.port, [dataset]) == [0x0000]
        database = node.database()
        with database.session() as session:
            instance = session.execute(select(Instance)).scalar_one()
            modality = instance.series.modality
        database.dispose()
    assert instance.sop_instance_uid == dataset.SOPInstanceUID and instance.instance_number is None
    assert modality == "MR_FROM_AN_OLD_S"


def test_an_association_aborted_while_its_store_is_recorded_is_audited_with_it(tmp_path: Path) -> None:
    """The peer gives up while the database is slow (held locked here): its association row is
    closed, and its one 110104 event counts the instance the node went on to keep."""
    dataset = mr_series(1)[0]
    with NodeProcess(tmp_path / "node") as node:
        database_file = node.database_url.removeprefix("sqlite:///")
        holder = sqlite3.connect(database_file, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # every write of the node now waits
        ae = AE(ae_title="IMPATIENT")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        ae.dimse_timeout = 0.5  # then pynetdicom aborts the association
        association = ae.associate("127.0.0.1", node.port, ae_title="BRAIN3D")
        assert association.is_established
        assert "Status" not in association.send_c_store(dataset), "no answer while SQL is held"
        assert association.is_aborted
        time.sleep(0.5)
        holder.execute("COMMIT")
        holder.close()
        events = wait_for(lambda: _audit_documents(node, "110104"))
    database = node.database()
    with database.session() as session:
        row = session.execute(select(Association)).scalar_one()
        stored = session.execute(select(Instance.sop_instance_uid)).scalars().all()
    database.dispose()
    assert stored == [dataset.SOPInstanceUID]
    assert (row.outcome, row.instances_stored) == ("aborted", 1)
    assert len(events) == 1 and events[0]["detail"]["instances_stored"] == 1
    assert events[0]["detail"]["association_id"] == row.id


def test_ten_concurrent_associations_of_200_instances_lose_nothing(tmp_path: Path) -> None:
    require_tool("storescu")
    folders = []
    expected = set()
    for sender in range(10):
        folder = tmp_path / f"sender{sender}"
        folder.mkdir()
        for index, dataset in enumerate(mr_series(200, with_pixels=True)):
            dataset.save_as(folder / f"{index:03d}.dcm", enforce_file_format=True)
            expected.add(str(dataset.SOPInstanceUID))
        folders.append(folder)
    with NodeProcess(tmp_path / "node", stable_seconds=30) as node:
        senders = [
            subprocess.Popen(
                ["storescu", "-aet", f"SENDER{n}", "+sd", "127.0.0.1", str(node.port), str(folder)],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for n, folder in enumerate(folders)
        ]
        for sender in senders:
            _out, errors = sender.communicate(timeout=240)
            assert sender.returncode == 0, errors
    database = node.database()
    with database.session() as session:
        stored = set(session.execute(select(Instance.sop_instance_uid)).scalars())
        counts = session.execute(select(Association.instances_stored)).scalars().all()
    database.dispose()
    assert stored == expected
    assert sorted(counts) == [200] * 10
    spooled = {path.stem for path in node.spool_dir.glob("*/*/*.dcm")}
    assert spooled == expected


def test_one_association_per_instance_shares_the_scps_contexts_and_loses_nothing(tmp_path: Path) -> None:
    """Senders that open an association per instance: every association negotiates from the one
    shared list (pynetdicom would deep-copy it each time), which negotiation leaves unchanged."""
    datasets = mr_series(20, with_pixels=True)
    with NodeProcess(tmp_path / "node", stable_seconds=30) as node:
        statuses = [status for ds in datasets for status in _send(node.port, [ds])]
        echo = AE(ae_title="SCU")
        echo.add_requested_context("1.2.840.10008.1.1")
        association = echo.associate("127.0.0.1", node.port, ae_title="BRAIN3D")
        assert association.is_established and int(association.send_c_echo().Status) == 0
        association.release()
    assert statuses == [0] * 20
    database = node.database()
    with database.session() as session:
        stored = set(session.execute(select(Instance.sop_instance_uid)).scalars())
    database.dispose()
    assert stored == {str(ds.SOPInstanceUID) for ds in datasets}


@contextlib.contextmanager
def _scp_in_process(
    database_url: str, tmp_path: Path, network_timeout_s: float | None = None, **node: object
) -> Iterator[StorageSCP]:
    """A StorageSCP in this process (as a receiver process runs it), on a free loopback port."""
    from dicom_node.audit import AuditTrail
    from dicom_node.config import NodeSettings, StorageSettings
    from dicom_node.db.migrate import upgrade
    from dicom_node.db.session import Database
    from dicom_node.ingest import Ingest
    from dicom_node.spool import Spool

    upgrade(database_url)
    database = Database(database_url)
    ingest = Ingest(database)
    ingest.start()
    storage = StorageSettings(spool_dir=tmp_path / "spool")
    scp = StorageSCP(
        NodeSettings(host="127.0.0.1", **node),
        storage,
        Spool(storage.spool_dir),
        ingest,
        AuditTrail(database, b"k" * 32),
    )
    if network_timeout_s is not None:
        scp.ae.network_timeout = scp.ae.acse_timeout = network_timeout_s
    scp.start(listen("127.0.0.1", 0))
    try:
        yield scp
    finally:
        scp.stop()
        ingest.stop()
        database.dispose()


def _echo(port: int) -> bool:
    echo = AE(ae_title="SCU")
    echo.add_requested_context("1.2.840.10008.1.1")
    association = echo.associate("127.0.0.1", port, ae_title="BRAIN3D")
    if not association.is_established:
        return False
    ok = int(association.send_c_echo().Status) == 0
    association.release()
    return ok


def test_the_scp_hands_every_association_its_one_context_list(sqlite_url: str, tmp_path: Path) -> None:
    """The list pynetdicom would deep-copy per association (tens of ms of CPU each) is shared,
    and negotiating associations leaves it as it was."""
    from dicom_node.scp import SharedContexts

    with _scp_in_process(sqlite_url, tmp_path) as scp:
        contexts = scp._server.contexts
        assert isinstance(contexts, SharedContexts) and copy.deepcopy(contexts) is contexts
        before = [(c.abstract_syntax, list(c.transfer_syntax)) for c in contexts]
        assert _echo(scp.port) and _echo(scp.port)
        assert [(c.abstract_syntax, list(c.transfer_syntax)) for c in scp._server.contexts] == before


def test_connections_that_stall_mid_pdu_do_not_lock_modalities_out(sqlite_url: str, tmp_path: Path) -> None:
    """Three connections that send one byte and stop, against a limit of two associations: they
    are closed after the network timeout, and a modality is served again."""
    with _scp_in_process(sqlite_url, tmp_path, network_timeout_s=1, max_associations=2) as scp:
        stalled = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(3)]
        try:
            for connection in stalled:
                connection.sendall(b"\x01")
            assert wait_for(lambda: _echo(scp.port), 20), "a modality is served again"
        finally:
            for connection in stalled:
                connection.close()


def test_a_deflated_dataset_is_refused_and_the_node_serves_on(sqlite_url: str, tmp_path: Path) -> None:
    """A deflated dataset of a megabyte may inflate to gigabytes in the node's memory: it is
    refused (0xC210) before anything inflates it, nothing is spooled, and the next one is stored."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    deflated, plain = mr_series(2, with_pixels=True)
    with _scp_in_process(sqlite_url, tmp_path) as scp:
        sender = AE(ae_title="SCU")
        sender.add_requested_context(MRImageStorage, DeflatedExplicitVRLittleEndian)
        sender.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        association = sender.associate("127.0.0.1", scp.port, ae_title="BRAIN3D")
        assert association.is_established
        try:
            deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
            refused = association.send_c_store(deflated)
            stored = association.send_c_store(plain)
        finally:
            association.release()
    assert (int(refused.Status), int(stored.Status)) == (0xC210, 0x0000)
    spooled = {path.stem for path in (tmp_path / "spool").glob("*/*/*.dcm")}
    assert spooled == {str(plain.SOPInstanceUID)}
