"""Real DICOM peers and sample instances for tests: dcmtk's storescp, Orthanc, MR series.

Reusable by any test folder (``tests/`` is on ``sys.path`` through its conftest):
``from pacs import Orthanc, StoreSCP, mr_series``. Peers listen on free loopback ports in a
temporary folder, are started by the test and stopped by their own process id.
"""

from __future__ import annotations

from datetime import date

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
