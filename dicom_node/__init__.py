"""The Brain3D DICOM node: receive, track, route, report and audit brain MRI series."""

import pydicom.config

__version__ = "0.1.0"

# pydicom reports a malformed value by quoting it (a birth date "1970-01-31", an age "45 years")
# as a warning, and the node and its workers log warnings: values are read as they are, unquoted.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
