"""Brain3D: volumes and text in, reports out. Knows nothing of DICOM."""
