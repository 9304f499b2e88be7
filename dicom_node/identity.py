"""Who the node says it is in what it writes, and how it recognises its own objects."""

from __future__ import annotations

import uuid

from dicom_node import __version__

MANUFACTURER = "Brain3D Node"
SOFTWARE_VERSION = __version__


#: Namespace of the name-based (version 5) UUIDs behind the node's derived UIDs.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:brain3d-node:structured-reports")


def derived_uid(*parts: str) -> str:
    """A UID derived deterministically from ``parts``: ``2.25.<UUIDv5 as an integer>`` (PS3.5 B.2).

    The same source series, model version and input content always give the same SR
    UIDs, which is what makes re-delivery exactly-once at the PACS. (pydicom's
    ``generate_uid(prefix=None, entropy_srcs=...)`` ignores its entropy and is random.)
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def is_produced_by_node(manufacturer: str | None, modality: str | None) -> bool:
    """True for SRs this node wrote and a PACS routed back to it."""
    return modality == "SR" and manufacturer == MANUFACTURER
