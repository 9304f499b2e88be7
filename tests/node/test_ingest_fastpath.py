"""The C-STORE fast paths agree with pydicom: the header scan and the hand-encoded file meta."""

from __future__ import annotations

import io

import pytest
from pacs import enhanced_mr, mr_series
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.ingest import InstanceHeaders, MalformedDatasetError, read_headers
from dicom_node.spool import dataset_offset, file_meta_bytes

SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]


def _dataset_bytes(dataset: Dataset, transfer_syntax: UID) -> bytes:
    """The dataset as a peer sends it in ``transfer_syntax`` (no file meta)."""
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    data = buffer.getvalue()
    return data[dataset_offset(data) :]


def _decoded_by_pydicom(dataset: Dataset) -> dict[str, object]:
    """What a full pydicom decode says the node's header fields are (the reference)."""

    def text(keyword: str) -> str | None:
        value = dataset.get(keyword)
        return str(value).strip() if value not in (None, "") else None

    def integer(keyword: str) -> int | None:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else None

    return {
        "study_uid": text("StudyInstanceUID"),
        "series_uid": text("SeriesInstanceUID"),
        "sop_instance_uid": text("SOPInstanceUID"),
        "sop_class_uid": text("SOPClassUID"),
        "modality": text("Modality"),
        "manufacturer": text("Manufacturer"),
        "series_description": text("SeriesDescription"),
        "series_number": integer("SeriesNumber"),
        "instance_number": integer("InstanceNumber"),
        "images_in_acquisition": integer("ImagesInAcquisition"),
        "in_concatenation_total": integer("InConcatenationTotalNumber"),
        "number_of_frames": integer("NumberOfFrames"),
    }


def _awkward_mr() -> Dataset:
    """An MR header with what trips naive scanners: a non-ASCII character set, an
    undefined-length sequence before the wanted tags, a binary (US) count and odd lengths."""
    dataset = mr_series(1)[0]
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.Manufacturer = "Siemens Healthineers Müller"
    dataset.SeriesDescription = "t2_tirm_tra_dark-fluid Ø 3mm"
    reference = Dataset()
    reference.ReferencedSOPClassUID = MRImageStorage
    reference.ReferencedSOPInstanceUID = "1.2.3.4.5"
    dataset.ReferencedImageSequence = [reference]
    dataset.ReferencedImageSequence.is_undefined_length = True
    dataset.ImagesInAcquisition = 24
    dataset.InConcatenationTotalNumber = 3
    dataset.InstanceNumber = 117
    return dataset


@pytest.mark.parametrize("transfer_syntax", SYNTAXES, ids=lambda uid: uid.name)
@pytest.mark.parametrize(
    "make", [_awkward_mr, lambda: mr_series(1)[0], enhanced_mr], ids=["awkward", "plain", "enhanced"]
)
def test_header_scan_matches_a_full_pydicom_decode(make, transfer_syntax: UID) -> None:  # type: ignore[no-untyped-def]
    dataset = make()
    data = _dataset_bytes(dataset, transfer_syntax)
    file_meta = file_meta_bytes(dataset.SOPClassUID, dataset.SOPInstanceUID, transfer_syntax)
    reference = dcmread(io.BytesIO(file_meta + data))
    headers = read_headers(data, transfer_syntax)
    assert headers == InstanceHeaders(**_decoded_by_pydicom(reference))  # type: ignore[arg-type]
    if make is _awkward_mr:
        assert headers.manufacturer == "Siemens Healthineers Müller"
        assert (headers.in_concatenation_total, headers.expected_instances) == (3, 3)


def test_header_scan_refuses_garbage_and_missing_uids() -> None:
    with pytest.raises(MalformedDatasetError):
        read_headers(b"\x08\x00\x18\x00UI\xff\xff garbage", ExplicitVRLittleEndian)
    # Never inflated, however well formed: a megabyte can inflate to gigabytes.
    with pytest.raises(MalformedDatasetError, match="deflated datasets are not accepted"):
        read_headers(
            _dataset_bytes(mr_series(1)[0], DeflatedExplicitVRLittleEndian), DeflatedExplicitVRLittleEndian
        )
    dataset = mr_series(1)[0]
    del dataset.StudyInstanceUID
    with pytest.raises(MalformedDatasetError):
        read_headers(_dataset_bytes(dataset, ExplicitVRLittleEndian), ExplicitVRLittleEndian)


def test_header_scan_reads_integers_leniently_like_the_decoder() -> None:
    dataset = mr_series(1)[0]
    dataset.InstanceNumber, dataset.SeriesNumber, dataset.ImagesInAcquisition = 9991, 9992, 9993
    data = _dataset_bytes(dataset, ExplicitVRLittleEndian)
    # Values pydicom would not write, swapped in at the same length:
    data = data.replace(b"9991", b"12.0")  # seen from some writers; an integral IS
    data = data.replace(b"9992", b"1\\2 ")  # multi-valued where one is expected: unknown
    data = data.replace(b"9993", b"abc ")
    headers = read_headers(data, ExplicitVRLittleEndian)
    assert (headers.instance_number, headers.series_number, headers.images_in_acquisition) == (12, None, None)


def test_header_scan_drops_integers_outside_is_range_and_refuses_overlong_uids() -> None:
    """Values a scanner may send that no column of the node's database could hold: on PostgreSQL
    they would fail the whole series' inserts."""
    dataset = mr_series(1)[0]
    dataset.InstanceNumber, dataset.SeriesNumber = 9991, 9992
    data = _dataset_bytes(dataset, ExplicitVRLittleEndian)
    data = data.replace(b"9991", b"9e12").replace(b"9992", b"-3e9")
    headers = read_headers(data, ExplicitVRLittleEndian)
    assert (headers.instance_number, headers.series_number) == (None, None)
    for uid in ("1.2." + "9" * 61, "1.2.3.\u00e9"):  # 65 characters; not ASCII
        dataset.SeriesInstanceUID = uid
        with pytest.raises(MalformedDatasetError, match="SeriesInstanceUID is not a UID"):
            read_headers(_dataset_bytes(dataset, ExplicitVRLittleEndian), ExplicitVRLittleEndian)


@pytest.mark.parametrize(
    "sop_instance_uid",
    ["1.2.3", "1.2.34", "1.2.840.113619.2.55.3.604688119.868.1234567890.123"],  # odd and even lengths
)
@pytest.mark.parametrize(
    "transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless]
)
def test_file_meta_bytes_equal_pynetdicoms_encoding(sop_instance_uid: str, transfer_syntax: UID) -> None:
    expected = (
        b"\x00" * 128
        + b"DICM"
        + encode_file_meta(
            create_file_meta(
                sop_class_uid=MRImageStorage,
                sop_instance_uid=UID(sop_instance_uid),
                transfer_syntax=transfer_syntax,
            )
        )
    )
    encoded = file_meta_bytes(MRImageStorage, sop_instance_uid, transfer_syntax)
    assert encoded == expected
    assert dataset_offset(encoded + b"\x08\x00") == len(encoded), "the group length covers the group"


def test_header_scan_drops_nul_characters_from_text() -> None:
    """NUL is no DICOM text character, and PostgreSQL refuses it in every text column: one in a
    SeriesDescription would fail every instance of the series with Out of Resources."""
    dataset = mr_series(1)[0]
    dataset.SeriesDescription = "AX\0FLAIR\0"
    dataset.Modality = "M\0R"
    headers = read_headers(_dataset_bytes(dataset, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert (headers.series_description, headers.modality) == ("AXFLAIR", "MR")
