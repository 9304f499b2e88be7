"""The coded concepts of the node's Structured Reports, in one place.

Standard codes come from ``pydicom.sr.codedict`` (DICOM PS3.16's tables), so every
code here exists in the standard's own vocabulary. Two concepts a FLAIR report asserts
have no code in those tables (ventricular compression, midline shift): they use a
private coding scheme, as PS3.16 section 8.2 allows, declared in the SR's Coding
Scheme Identification Sequence so a receiver can tell them apart from standard codes.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.report_schema import Lobe, Side

#: Private coding scheme for concepts absent from DCM / SNOMED CT / LOINC in PS3.16.
LOCAL_SCHEME = "99BRAIN3D"
LOCAL_SCHEME_NAME = "Brain3D Node local codes"

# --- document titles and headings (CID 7000, CID 7001, CID 7002)
DIAGNOSTIC_IMAGING_REPORT = codes.LN.DiagnosticImagingReport  # 18748-4, CID 7000
FINDINGS_SECTION = codes.LN.Findings  # 59776-5, CID 7001
IMPRESSIONS_SECTION = codes.LN.Impressions  # 19005-8, CID 7001
FINDING = codes.DCM.Finding  # 121071, CID 7002
IMPRESSION = codes.DCM.Impression  # 121073, CID 7002
COMMENT = codes.DCM.Comment  # 121106: the AI / demo disclaimers
IMAGING_MEASUREMENT_REPORT = codes.DCM.ImagingMeasurementReport  # 126000, CID 7021
PROCEDURE_REPORTED = codes.LN.BrainMRI  # 24590-2 "MR Brain"

# --- qualitative evaluations of a FLAIR study (name: CODE present / absent)
LESION = codes.SCT.Lesion  # 52988006
EDEMA = codes.SCT.Edema  # 79654002
NECROSIS = codes.SCT.Necrosis  # 6574001
VENTRICULAR_COMPRESSION = Code("VENTCOMP", LOCAL_SCHEME, "Ventricular compression")
MIDLINE_SHIFT = Code("MIDSHIFT", LOCAL_SCHEME, "Midline shift")
PRESENT = codes.SCT.Present  # 52101004, CID 240
ABSENT = codes.SCT.Absent  # 272519000, CID 240

# --- finding sites (CID 7151 / 7153) and laterality (CID 244)
BRAIN = codes.SCT.Brain  # 12738006
LOBE_CODES: dict[Lobe, Code] = {
    Lobe.FRONTAL: codes.SCT.FrontalLobe,  # 83251001
    Lobe.PARIETAL: codes.SCT.ParietalLobe,  # 16630005
    Lobe.TEMPORAL: codes.SCT.TemporalLobe,  # 78277001
    Lobe.OCCIPITAL: codes.SCT.OccipitalLobe,  # 31065004
    Lobe.CEREBELLUM: codes.SCT.Cerebellum,  # 113305005
}
SIDE_CODES: dict[Side, Code] = {
    Side.LEFT: codes.SCT.Left,  # 7771000
    Side.RIGHT: codes.SCT.Right,  # 24028007
    Side.BILATERAL: codes.SCT.RightAndLeft,  # 51440002
}

#: The boolean findings coded as present / absent, by their ``Findings`` field name.
PRESENCE_CODES: dict[str, Code] = {
    "abnormal": LESION,
    "edema": EDEMA,
    "necrosis": NECROSIS,
    "ventricular_compression": VENTRICULAR_COMPRESSION,
    "midline_shift": MIDLINE_SHIFT,
}
