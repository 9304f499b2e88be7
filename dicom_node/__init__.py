"""The Brain3D DICOM node: receive, track, route, report and audit brain MRI series."""

__version__ = "0.1.0"
