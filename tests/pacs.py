"""Real DICOM peers and sample instances for tests: dcmtk's storescp, Orthanc, MR series.

Reusable by any test folder (``tests/`` is on ``sys.path`` through its conftest):
``from pacs import Orthanc, StoreSCP, mr_series``. Peers listen on free loopback ports in a
temporary folder, are started by the test and stopped by their own process id.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def _patient_and_study(ds: Dataset, study_uid: str, patient_name: str) -> None:
    ds.PatientName = patient_name
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date(2024, 5, 6).strftime("%Y%m%d")
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "ACME Imaging"
    ds.Modality = "MR"


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta


def mr_series(
    count: int = 3,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 5,
    patient_name: str = "Test^Patient",
    with_pixels: bool = True,
) -> list[Dataset]:
    """A small axial MR series (8x8 slices, 5 mm apart), one Dataset per instance."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    instances = []
    for index in range(count):
        ds = Dataset()
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        _patient_and_study(ds, study_uid, patient_name)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = "AX FLAIR"
        ds.InstanceNumber = index + 1
        ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 60 else generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * index]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 5.0
        ds.ScanningSequence = "SE\\IR"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 120.0
        ds.RepetitionTime = 9000.0
        ds.InversionTime = 2500.0
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if with_pixels:
            ds.PixelData = (np.arange(64, dtype=np.uint16) * (index + 1)).tobytes()
        _file_meta(ds)
        instances.append(ds)
    return instances


def enhanced_mr(frames: int = 10, *, study_uid: str | None = None) -> Dataset:
    """The header of one Enhanced MR instance holding a whole multi-frame series."""
    ds = Dataset()
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid()
    _patient_and_study(ds, study_uid or generate_uid(), "Test^Enhanced")
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 7
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    _file_meta(ds)
    return ds


# --------------------------------------------------------------------------- peers


def free_port() -> int:
    """A TCP port free on loopback right now (the peer binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"peer exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def _stop(process: subprocess.Popen) -> None:
    """Stop the peer by its own process id: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class StoreSCP:
    """dcmtk's ``storescp`` on a free loopback port, writing what it receives to ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "STORESCP") -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = free_port()
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder.parent / f"storescp-{self.port}.log"
        self._process = subprocess.Popen(
            [
                "storescp",
                "--aetitle",
                self.ae_title,
                "--output-directory",
                str(self.folder),
                "+xa",
                str(self.port),
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        _wait_for_port(self.port, self._process, log)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            _stop(self._process)

    def received(self) -> list[Path]:
        return sorted(path for path in self.folder.iterdir() if path.is_file())


class Orthanc:
    """Orthanc from Debian's package as a real PACS, private to one test.

    Own configuration in ``folder`` (storage, index), DICOM and HTTP on free high ports,
    no remote access, no authentication, no plugins; queried through its REST API.
    """

    def __init__(
        self, folder: Path, ae_title: str = "ORTHANC", modalities: dict[str, list] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "brain3d-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "DicomCheckCalledAet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "TcpNoDelay": True,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "StorageCompression": False,
            "SaveJobs": False,
        }
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log = self.folder / "orthanc.log"
        self._process = subprocess.Popen(
            ["/usr/sbin/Orthanc", str(config_path)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        _wait_for_port(self.dicom_port, self._process, log)
        _wait_for_port(self.http_port, self._process, log)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            _stop(self._process)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def find_instance(self, sop_instance_uid: str) -> dict | None:
        """The instance's main tags and parent study UID, or None when Orthanc lacks it."""
        request = urllib.request.Request(
            self.url + "/tools/find",
            data=json.dumps(
                {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}, "Expand": True}
            ).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            found = json.loads(response.read())
        if not found:
            return None
        instance = found[0]
        series = self.get(f"/series/{instance['ParentSeries']}")
        study = self.get(f"/studies/{series['ParentStudy']}")
        return {
            **instance["MainDicomTags"],
            "SeriesInstanceUID": series["MainDicomTags"]["SeriesInstanceUID"],
            "StudyInstanceUID": study["MainDicomTags"]["StudyInstanceUID"],
            "OrthancID": instance["ID"],
        }

    def file_of(self, orthanc_id: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{orthanc_id}/file", timeout=10) as response:
            return response.read()
