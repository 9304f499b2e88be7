"""Stage 1 of a job (queue ``cpu``): spooled series -> geometry gate -> volume -> model input.

The model input is written to the job's work folder so the inference stage, possibly on
another machine reading the same shared filesystem, picks it up without the DICOM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from dicom_node.conversion import ConversionError, series_to_nifti
from dicom_node.db import Instance, Job
from worker.runtime import Runtime

VOLUME_FILE = "volume.npy"
SOURCES_FILE = "sources.json"  # the Instance rows conversion read, for the SRs' evidence


@dataclass(frozen=True)
class SourceInstances:
    """The instances a job reads: the newest content received for each SOP Instance UID."""

    paths: list[Path]
    sop_instance_uids: list[str]
    instance_ids: list[int]
    input_hash: str


def source_instances(runtime: Runtime, job: Job) -> SourceInstances:
    """The series' instances as received so far, and a hash of their content that names the SRs
    derived from them."""
    with runtime.database.session() as session:
        rows = session.scalars(
            select(Instance)
            .where(Instance.series_id == job.series_id)
            .order_by(Instance.received_at, Instance.id)
        ).all()
    return _newest_of(rows)


def converted_sources(runtime: Runtime, job: Job) -> SourceInstances:
    """Exactly the instances conversion read: instances that arrived since (a series reopened by
    late slices, whose next job reads them) are not what the model saw, so the SRs never cite them."""
    instance_ids = json.loads((work_dir(runtime, job.id) / SOURCES_FILE).read_text())
    with runtime.database.session() as session:
        rows = session.scalars(select(Instance).where(Instance.id.in_(instance_ids))).all()
    return _newest_of(rows)


def _newest_of(rows: Sequence[Instance]) -> SourceInstances:
    newest: dict[str, Instance] = {}
    for row in rows:  # later rows win: different content under one UID keeps the latest
        newest[row.sop_instance_uid] = row
    chosen = sorted(newest.values(), key=lambda row: row.sop_instance_uid)
    digest = hashlib.sha256()
    for row in chosen:
        digest.update(f"{row.sop_instance_uid}:{row.sha256}\n".encode())
    return SourceInstances(
        paths=[Path(row.path) for row in chosen],
        sop_instance_uids=[row.sop_instance_uid for row in chosen],
        instance_ids=[row.id for row in chosen],
        input_hash=digest.hexdigest(),
    )


def work_dir(runtime: Runtime, job_id: int) -> Path:
    path = runtime.settings.storage.job_dir(job_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def convert(runtime: Runtime, job: Job, sources: SourceInstances) -> None:
    """Convert ``sources`` (:func:`source_instances` of the job's series) and write the prepared
    model input, and which instances it read; raises :class:`ConversionError` (bad geometry, an
    image that is no head) for a series the model must not read."""
    from inference.configuration_brain3d import Brain3DConfig
    from inference.preprocessing import prepare

    folder = work_dir(runtime, job.id)
    image = series_to_nifti(sources.paths, folder)
    config = Brain3DConfig.from_pretrained(runtime.settings.model.path)
    try:
        volume = prepare(image, config)
    except ValueError as error:  # in the image itself (constant, no head): not analysed, and why
        raise ConversionError(f"prepare: {error}") from None
    np.save(folder / VOLUME_FILE, volume.numpy().astype(np.float32), allow_pickle=False)
    (folder / SOURCES_FILE).write_text(json.dumps(sources.instance_ids))


def load_volume(runtime: Runtime, job_id: int) -> np.ndarray:
    return np.load(work_dir(runtime, job_id) / VOLUME_FILE, allow_pickle=False)
