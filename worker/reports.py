"""Stage 3 of a job (queue ``cpu``): the two Structured Reports, built, validated and persisted.

The SR codes come from parsing the generated text (never from a second model output),
so text and codes cannot disagree. SR bytes are persisted once; delivery and every
re-delivery send exactly these bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom import Dataset
from sqlalchemy import select

from dicom_node.db import Job, StructuredReport
from dicom_node.spool import UnsafeUIDError, check_uid, filed_under, fsync_dir, write_durably
from dicom_node.sr import (
    AlgorithmIdentity,
    ReportUIDs,
    build_reports,
    not_analysed_report,
    report_uids,
    sr_bytes,
)
from dicom_node.sr.validate import validate_sr
from inference.report_schema import Findings, parse
from worker.convert import SourceInstances
from worker.inference import ModelIdentity
from worker.jobs import analysed
from worker.runtime import Runtime

logger = logging.getLogger("brain3d.worker")

NARRATIVE_KIND, MEASUREMENT_KIND, NOT_ANALYSED_KIND = "narrative", "measurement", "not_analysed"


class InvalidReportError(RuntimeError):
    """An SR that is never sent: it failed validation, or would name another model than the one
    that wrote its report."""


def findings_to_json(findings: Findings) -> str:
    data = asdict(findings)
    data["lobes"] = sorted(lobe.value for lobe in findings.lobes)
    return json.dumps(data, sort_keys=True, default=str)


def _predecessors(runtime: Runtime, job: Job, building: set[str]) -> list[Dataset]:
    """The SRs a new SR of ``job`` supersedes and must cite: those of earlier jobs on the same
    series, and the job's own from before a retry (another outcome, model or input). Not those
    being built again (``building``: their SOP Instance UIDs, where one of a pair was lost): an
    SR does not supersede itself, and citing itself would change the bytes a PACS holds."""
    with runtime.database.session() as session:
        rows = session.scalars(
            select(StructuredReport)
            .join(Job, Job.id == StructuredReport.job_id)
            .where(Job.series_id == job.series_id, Job.id <= job.id)
            .where(StructuredReport.sop_instance_uid.not_in(building))
            .order_by(StructuredReport.id)
        ).all()
    return [pydicom.dcmread(row.path, stop_before_pixels=True) for row in rows if Path(row.path).is_file()]


def _persist(runtime: Runtime, job: Job, kind: str, dataset: Dataset) -> StructuredReport:
    """Validate an SR and write its bytes durably; an invalid SR never reaches the reports folder."""
    try:
        path = (
            Path(runtime.settings.storage.reports_dir)
            / check_uid(dataset.StudyInstanceUID)
            / check_uid(dataset.SeriesInstanceUID)
            / f"{check_uid(dataset.SOPInstanceUID)}.dcm"
        )
    except UnsafeUIDError as error:
        raise InvalidReportError(f"{kind} SR: {error}") from None
    payload = sr_bytes(dataset)
    temporary = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary.unlink(missing_ok=True)  # left by a worker killed mid-write
    write_durably(temporary, payload)
    errors = validate_sr(temporary)
    if errors:
        temporary.unlink()
        raise InvalidReportError(f"{kind} SR failed validation: {errors[0]}")
    os.replace(temporary, path)
    fsync_dir(path.parent)  # the name is durable before SQL records it
    return StructuredReport(
        job_id=job.id,
        kind=kind,
        series_instance_uid=dataset.SeriesInstanceUID,
        sop_instance_uid=dataset.SOPInstanceUID,
        path=str(path),
        sha256=hashlib.sha256(payload).hexdigest(),
    )


def report_kinds(job: Job) -> tuple[str, ...]:
    """The SRs a job delivers: the two reports once the model read the series, else the short
    not-analysed SR. A retried job may hold both kinds; only its current outcome's are sent."""
    return (NARRATIVE_KIND, MEASUREMENT_KIND) if analysed(job) else (NOT_ANALYSED_KIND,)


def reports_of(runtime: Runtime, job: Job) -> list[StructuredReport]:
    """The persisted SRs of the job's current outcome, the latest built of each kind, in the order
    they were built (a retried job keeps the SRs it built before as history)."""
    with runtime.database.session() as session:
        rows = session.scalars(
            select(StructuredReport)
            .where(StructuredReport.job_id == job.id, StructuredReport.kind.in_(report_kinds(job)))
            .order_by(StructuredReport.id)
        ).all()
    latest = {row.kind: row for row in rows}
    return sorted(latest.values(), key=lambda row: row.id)


def _existing(runtime: Runtime, job: Job, wanted: dict[str, str]) -> list[StructuredReport]:
    """The job's SRs when they are the very ones this build would make (``wanted``: kind -> SOP
    Instance UID, which name the model and the input); else none, and they are built anew."""
    rows = reports_of(runtime, job)
    if {row.kind: row.sop_instance_uid for row in rows} != wanted:
        return []
    return rows if all(Path(row.path).is_file() for row in rows) else []


def _algorithm(identity: ModelIdentity) -> AlgorithmIdentity:
    return AlgorithmIdentity(
        name=identity.name, version=identity.version, checkpoint_sha256=identity.checkpoint_hash
    )


def _sources(sources: SourceInstances) -> list[Dataset]:
    """The sources' headers, each naming the UIDs the node received it under. pydicom reads the
    whole header, the node's scan only its start: a repeated or out-of-order element could name
    another study, and the SR would be filed with another patient's images."""
    datasets = []
    for path, sop_uid in zip(sources.paths, sources.sop_instance_uids, strict=True):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        uids = (str(dataset.get("StudyInstanceUID", "")), str(dataset.get("SeriesInstanceUID", "")))
        if uids != filed_under(path) or str(dataset.get("SOPInstanceUID", "")) != sop_uid:
            raise InvalidReportError(
                f"instance {sop_uid}: its header names other UIDs than the node received it under "
                "(an element repeated or out of order); no SR is built on it"
            )
        datasets.append(dataset)
    return datasets


def _report_uids(sources: SourceInstances, algorithm: AlgorithmIdentity) -> ReportUIDs:
    """The UIDs a build from ``sources`` by ``algorithm`` gives its SRs (every source is of the
    one series it was filed under)."""
    return report_uids(filed_under(sources.paths[0])[1], algorithm, sources.input_hash)


def _record(runtime: Runtime, rows: list[StructuredReport]) -> list[StructuredReport]:
    """Record persisted SRs. One built again under its UIDs (its file was lost) keeps its row,
    with the new file's path and hash: a second row would break the UIDs' uniqueness."""
    recorded = []
    with runtime.database.session() as session:
        for row in rows:
            known = session.scalars(
                select(StructuredReport).where(StructuredReport.sop_instance_uid == row.sop_instance_uid)
            ).one_or_none()
            if known is None:
                session.add(row)
                recorded.append(row)
            else:
                known.path, known.sha256 = row.path, row.sha256
                recorded.append(known)
    return recorded


def build_and_store(
    runtime: Runtime, job: Job, sources: SourceInstances, identity: ModelIdentity, *, content_time: datetime
) -> list[StructuredReport]:
    """Build both SRs for ``job`` from its report text, validate, write and record them.

    ``identity`` is this worker's model, which the SRs name: it must be the one that wrote the
    report (a GPU machine and a CPU machine configured with different ``model.path``)."""
    if job.model_version != identity.version:
        raise InvalidReportError(
            f"the report was written by {job.model_version}, and this worker's model.path is "
            f"{identity.version}: the SR would name the wrong model (give every worker the same model)"
        )
    algorithm = _algorithm(identity)
    uids = _report_uids(sources, algorithm)
    wanted = {NARRATIVE_KIND: uids.narrative, MEASUREMENT_KIND: uids.measurement}
    if existing := _existing(runtime, job, wanted):
        return existing  # already built: keep the persisted bytes
    assert job.report_text is not None
    pair = build_reports(
        _sources(sources),
        job.report_text,
        parse(job.report_text),
        algorithm,
        input_hash=sources.input_hash,
        synthetic_demo=identity.synthetic_demo,
        predecessors=_predecessors(runtime, job, set(wanted.values())),
        content_datetime=content_time,
    )
    return _record(
        runtime,
        [
            _persist(runtime, job, NARRATIVE_KIND, pair.narrative),
            _persist(runtime, job, MEASUREMENT_KIND, pair.measurement),
        ],
    )


def build_not_analysed(
    runtime: Runtime,
    job: Job,
    sources: SourceInstances,
    identity: ModelIdentity,
    reason: str,
    *,
    content_time: datetime,
) -> list[StructuredReport]:
    """The short SR saying the series was not analysed and why (``delivery.not_analysed_report``)."""
    algorithm = _algorithm(identity)
    sop_uid = _report_uids(sources, algorithm).not_analysed
    if existing := _existing(runtime, job, {NOT_ANALYSED_KIND: sop_uid}):
        return existing
    dataset = not_analysed_report(
        _sources(sources),
        reason,
        algorithm,
        input_hash=sources.input_hash,
        content_datetime=content_time,
        synthetic_demo=identity.synthetic_demo,
        predecessors=_predecessors(runtime, job, {sop_uid}),
    )
    return _record(runtime, [_persist(runtime, job, NOT_ANALYSED_KIND, dataset)])
