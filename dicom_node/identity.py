"""Who the node says it is in what it writes, and how it recognises its own objects."""

from __future__ import annotations

from pydicom.uid import generate_uid

from dicom_node import __version__

MANUFACTURER = "Brain3D Node"
SOFTWARE_VERSION = __version__


def derived_uid(*parts: str) -> str:
    """A UID derived deterministically from ``parts`` (a 2.25 UUID-style UID).

    The same source series, model version and input content always give the same
    SR UIDs, which is what makes re-delivery exactly-once at the PACS.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    return generate_uid(prefix=None, entropy_srcs=list(parts))


def is_produced_by_node(manufacturer: str | None, modality: str | None) -> bool:
    """True for SRs this node wrote and a PACS routed back to it."""
    return modality == "SR" and manufacturer == MANUFACTURER
