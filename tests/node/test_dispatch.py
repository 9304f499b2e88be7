"""Delivery of SRs to real peers: dcmtk storescp, Orthanc, a pynetdicom SCP, a folder."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pacs import Orthanc, StoreSCP, free_port, mr_series
from pydicom.uid import ComprehensiveSRStorage, MRImageStorage
from pynetdicom import AE, _config, evt

from dicom_node.dispatch import DicomDestination, is_loopback
from dicom_node.sr import AlgorithmIdentity, build_reports, sr_bytes
from inference.report_schema import Findings, Lobe, Side, render

pytestmark = pytest.mark.dcmtk

FINDINGS = Findings(abnormal=True, side=Side.RIGHT, lobes=frozenset({Lobe.TEMPORAL}), edema=True)
ALGORITHM = AlgorithmIdentity("Brain3D", "0.1.0", "f0" * 32)


@pytest.fixture
def study(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """A three-slice MR series and its two SRs, as files."""
    sources = mr_series(3)
    pair = build_reports(
        sources,
        render(FINDINGS),
        FINDINGS,
        ALGORITHM,
        input_hash="1" * 64,
        content_datetime=datetime(2024, 5, 6, 10, 0),
        synthetic_demo=True,
    )
    folder = tmp_path / "files"
    folder.mkdir()
    source_files = []
    for ds in sources:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        source_files.append(path)
    sr_files = []
    for ds in (pair.narrative, pair.measurement):
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(sr_bytes(ds))
        sr_files.append(path)
    return source_files, sr_files


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_storescp_receives_the_srs_unchanged(tmp_path: Path, study) -> None:
    _, sr_files = study
    with StoreSCP(tmp_path / "storescp") as peer:
        outcome = DicomDestination("127.0.0.1", peer.port, peer.ae_title, "BRAIN3D").send(sr_files)
        received = peer.received()
    assert outcome.ok, outcome.error
    assert outcome.statuses == {_sop_uid(path): 0 for path in sr_files}
    assert len(received) == 2
    sent = {_sop_uid(path): pydicom.dcmread(path) for path in sr_files}
    for path in received:
        got = pydicom.dcmread(path)
        # storescp rewrites the file meta; the dataset must be the one sent, element for element
        assert got == sent[str(got.SOPInstanceUID)]


def test_orthanc_files_the_srs_in_the_source_study(tmp_path: Path, study) -> None:
    source_files, sr_files = study
    with Orthanc(tmp_path / "orthanc") as pacs:
        destination = DicomDestination("127.0.0.1", pacs.dicom_port, pacs.ae_title, "BRAIN3D")
        assert destination.send(source_files).ok
        outcome = destination.send(sr_files)
        assert outcome.ok, outcome.error
        again = destination.send(sr_files)  # re-delivery of the same bytes: still one copy
        assert again.ok
        source_study = pydicom.dcmread(source_files[0], stop_before_pixels=True).StudyInstanceUID
        for path in sr_files:
            stored = pacs.find_instance(_sop_uid(path))
            assert stored is not None
            assert stored["StudyInstanceUID"] == source_study
            assert pydicom.dcmread(
                pydicom.filebase.DicomBytesIO(pacs.file_of(stored["OrthancID"]))
            ) == pydicom.dcmread(path)
        studies = pacs.get("/studies")
        assert len(studies) == 1
        assert len(pacs.get("/instances")) == len(source_files) + len(sr_files)


def test_orthanc_rejects_a_wrong_called_ae_title(tmp_path: Path, study) -> None:
    _, sr_files = study
    with Orthanc(tmp_path / "orthanc") as pacs:
        outcome = DicomDestination("127.0.0.1", pacs.dicom_port, "NOT-ORTHANC", "BRAIN3D").send(sr_files)
    assert not outcome.ok
    assert outcome.statuses == {}
    assert outcome.error is not None and outcome.error.startswith("association rejected by NOT-ORTHANC@")
    assert "Called AE title not recognised" in outcome.error


def test_a_destination_that_is_down_is_a_failure_outcome(study) -> None:
    _, sr_files = study
    port = free_port()  # nothing listens there
    outcome = DicomDestination("127.0.0.1", port, "PACS", "BRAIN3D", timeout_s=5).send(sr_files)
    assert not outcome.ok
    assert outcome.statuses == {}
    assert (
        outcome.error
        == f"could not connect to PACS@127.0.0.1:{port} (connection refused, unreachable or timed out)"
    )
    assert set(outcome.attempted) == {_sop_uid(path) for path in sr_files}


@pytest.fixture
def refusing_scp(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A pynetdicom SCP that accepts SRs but answers C-STORE with 0xA700 (out of resources)."""
    # Restricted to its own contexts, as a PACS is: once dicom_node.scp is imported, this
    # process's pynetdicom accepts every storage class unless told otherwise.
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    ae = AE(ae_title="FULL")
    ae.add_supported_context(ComprehensiveSRStorage)
    ae.add_supported_context(MRImageStorage)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)]
    )
    try:
        yield port
    finally:
        server.shutdown()


def test_a_refused_instance_carries_its_status(refusing_scp: int, study) -> None:
    _, sr_files = study
    outcome = DicomDestination("127.0.0.1", refusing_scp, "FULL", "BRAIN3D").send(sr_files)
    narrative, measurement = (_sop_uid(path) for path in sr_files)
    assert outcome.statuses[narrative] == 0xA700
    assert not outcome.stored(narrative)
    # the peer did not accept Comprehensive 3D SR: no context, so the file is not sent
    assert measurement not in outcome.statuses
    assert not outcome.ok
    assert outcome.error == (
        f"FULL@127.0.0.1:{refusing_scp} refused {narrative}: status 0xA700; "
        f"FULL@127.0.0.1:{refusing_scp} accepted no context for {measurement}"
    )


def test_an_unreadable_file_is_a_failure_outcome(tmp_path: Path) -> None:
    missing = tmp_path / "missing.dcm"
    outcome = DicomDestination("127.0.0.1", free_port(), "PACS").send([missing])
    assert not outcome.ok and outcome.error is not None and "missing.dcm" in outcome.error


def test_a_send_that_raises_still_reports_what_was_stored(tmp_path: Path, study, monkeypatch) -> None:
    """The second SR's file fails while it is sent (a fault caused here by a stand-in: a file
    that changes between reading its meta and sending it). The first SR was stored: the outcome
    says so, and names the second's failure, rather than raise and lose both."""
    from pynetdicom.association import Association

    _, sr_files = study
    send = Association.send_c_store

    def failing_on_the_second(self, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(dataset) == sr_files[1]:
            raise OSError("file changed while it was sent")
        return send(self, dataset, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", failing_on_the_second)
    with StoreSCP(tmp_path / "storescp") as peer:
        outcome = DicomDestination("127.0.0.1", peer.port, peer.ae_title, "BRAIN3D").send(sr_files)
    assert outcome.statuses == {_sop_uid(sr_files[0]): 0}
    assert not outcome.ok and "could not send" in (outcome.error or "")
    assert _sop_uid(sr_files[1]) in (outcome.error or "")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("10.1.2.3", False),
        ("192.168.0.10", False),
        ("pacs.example.invalid", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
