"""Stage 4 of a job (queue ``cpu``): send the persisted SR bytes to every destination.

One delivery row and one 110106 Export audit event per attempt. A destination that
already acknowledged an SR is never sent it again; SR UIDs are deterministic, so even a
repeated send after a crash leaves one copy at the PACS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from dicom_node.audit import Action, EventID, Outcome, Participant, Role
from dicom_node.config import DestinationSettings
from dicom_node.db import Delivery, Job, Series
from dicom_node.db.models import utcnow
from dicom_node.dispatch import DicomDestination, is_loopback
from worker.reports import reports_of
from worker.runtime import Runtime

logger = logging.getLogger("brain3d.worker")


class DemoModelGuardError(RuntimeError):
    """The synthetic demo model's SRs may not leave loopback without ``--allow-demo-model``."""


@dataclass(frozen=True)
class DeliveryResult:
    delivered: int
    failures: list[str]

    @property
    def complete(self) -> bool:
        return not self.failures


def destination_label(destination: DestinationSettings) -> str:
    """The destination's name in delivery rows and the audit trail."""
    return destination.name or f"{destination.ae_title}@{destination.host}:{destination.port}"


def _check_demo_guard(runtime: Runtime) -> None:
    if not runtime.model_identity.synthetic_demo or runtime.settings.delivery.allow_demo_model:
        return
    remote = [destination_label(d) for d in runtime.settings.destinations if not is_loopback(d.host)]
    if remote:
        raise DemoModelGuardError(
            "the synthetic demo model's reports would go to "
            + ", ".join(remote)
            + " (not loopback); pass --allow-demo-model to allow it"
        )


def deliver(runtime: Runtime, job: Job) -> DeliveryResult:
    """One attempt to deliver the SRs of ``job``'s outcome to every destination not yet served.

    Raises :class:`DemoModelGuardError`, sending nothing, where the synthetic demo model's SRs
    (reports or not-analysed notes alike) would leave loopback without ``allow_demo_model``."""
    _check_demo_guard(runtime)
    settings = runtime.settings
    reports = reports_of(runtime, job)
    with runtime.database.session() as session:
        done = {
            (row.destination, row.sop_instance_uid)
            for row in session.scalars(select(Delivery).where(Delivery.job_id == job.id, Delivery.succeeded))
        }
        attempts = {
            (row.destination, row.sop_instance_uid): row.attempt
            for row in session.scalars(select(Delivery).where(Delivery.job_id == job.id))
        }
        series = session.get(Series, job.series_id)
        assert series is not None
        study_uid = series.study.study_instance_uid
    delivered, failures = 0, []
    for destination in settings.destinations:
        label = destination_label(destination)
        pending = [report for report in reports if (label, report.sop_instance_uid) not in done]
        if not pending:
            continue
        target = DicomDestination(
            host=destination.host,
            port=destination.port,
            ae_title=destination.ae_title,
            calling_ae=settings.node.ae_title,
        )
        outcome = target.send([Path(report.path) for report in pending])
        with runtime.database.session() as session:
            for report in pending:
                status = outcome.statuses.get(report.sop_instance_uid)
                ok = outcome.stored(report.sop_instance_uid)  # success or a warning: the PACS kept it
                key = (label, report.sop_instance_uid)
                attempt = attempts.get(key, 0) + 1
                attempts[key] = attempt
                session.add(
                    Delivery(
                        job_id=job.id,
                        destination=label,
                        sop_instance_uid=report.sop_instance_uid,
                        attempt=attempt,
                        succeeded=ok,
                        status_code=status,
                        error=None if ok else (outcome.error or f"status 0x{status or 0:04X}"),
                        finished_at=utcnow(),
                    )
                )
                if ok:
                    delivered += 1
                else:
                    failures.append(f"{label}: {outcome.error or f'status 0x{status or 0:04X}'}")
        runtime.audit.record(
            EventID.EXPORT,
            Outcome.SUCCESS if outcome.ok else Outcome.SERIOUS_FAILURE,
            action=Action.READ,
            participants=[
                Participant(role=Role.SOURCE, ae_title=settings.node.ae_title),
                Participant(
                    role=Role.DESTINATION, ae_title=destination.ae_title, network_address=destination.host
                ),
            ],
            study_uid=study_uid,
            series_uid=series.series_instance_uid,
            job_id=job.id,
            detail={
                "destination": label,
                "sop_instance_uids": [report.sop_instance_uid for report in pending],
                "error": outcome.error,
            },
        )
    return DeliveryResult(delivered=delivered, failures=failures)
