"""``brain3d serve``: the node process wiring the SCP, SQL, completeness, hand-off and retention.

Start order makes restarts safe: migrate, clear unacknowledged temporary files, rebuild
open series and their timers from SQL, re-send jobs whose message never reached the
broker, and only then accept associations: in ``node.receiver_processes`` receiver
processes sharing the port (``dicom_node.receivers``), or with 0 in this process.
SIGTERM / SIGINT stop accepting, let running associations finish (a bounded grace),
flush the SQL writer and audit the stop.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from dicom_node.audit import AuditTrail, EventTypeCode
from dicom_node.completeness import CompletenessTracker
from dicom_node.config import Settings
from dicom_node.db.migrate import upgrade
from dicom_node.db.session import Database
from dicom_node.handoff import HandOff
from dicom_node.ingest import Ingest
from dicom_node.receivers import ReceiverPool
from dicom_node.retention import Retention
from dicom_node.scp import StorageSCP, listen
from dicom_node.spool import Spool
from worker.app import create_app

log = logging.getLogger(__name__)

RETENTION_INTERVAL_SECONDS = 60.0
SHUTDOWN_GRACE_SECONDS = 10.0


class NodeServer:
    """Every long-lived part of a running node; ``start`` then ``stop``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stopped = threading.Event()

    def start(self) -> None:
        settings = self.settings
        upgrade(settings.database.url)
        self.database = Database(settings.database.url)
        self.audit = AuditTrail.from_settings(settings, self.database)
        self.spool = Spool(settings.storage.spool_dir)
        leftovers = self.spool.clear_incoming()
        if leftovers:
            log.warning("removed %d unacknowledged temporary files from the spool", leftovers)

        self.celery = create_app(settings)
        self.handoff = HandOff(self.database, self.celery)
        self.ingest = Ingest(self.database, settings.completion.count_rules)
        self.tracker = CompletenessTracker(
            self.ingest, settings.completion, settings.routing, self.handoff, self.audit
        )
        self.ingest.start()
        self.tracker.rebuild()
        self.tracker.start()
        resent = self.handoff.enqueue_pending()
        if resent:
            log.warning("re-sent %d queued jobs the broker never received", len(resent))

        self.retention = Retention(
            self.database,
            self.spool,
            self.audit,
            settings.storage.retention_hours,
            guard_seconds=max(60.0, 2 * settings.completion.stable_seconds),
            job_dir=settings.storage.job_dir,
        )
        self._retention_thread = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
        self._retention_thread.start()

        listener = listen(settings.node.host, settings.node.port)
        if settings.node.receiver_processes:
            self.receivers: ReceiverPool | StorageSCP = ReceiverPool(
                settings.node, settings.storage, self.ingest, self.audit, listener, SHUTDOWN_GRACE_SECONDS
            )
            self.receivers.start()
        else:
            self.receivers = StorageSCP(settings.node, settings.storage, self.spool, self.ingest, self.audit)
            self.receivers.start(listener)
        self._audit_activity(EventTypeCode.APPLICATION_START)

    @property
    def port(self) -> int:
        return self.receivers.port

    def _audit_activity(self, event_type: EventTypeCode) -> None:
        self.audit.record_service_activity(
            "serve",
            event_type,
            ae_title=self.settings.node.ae_title,
            network_address=self.settings.node.host,
            detail={"port": self.settings.node.port},
        )

    def _retention_loop(self) -> None:
        while not self._stopped.wait(RETENTION_INTERVAL_SECONDS):
            try:
                self.retention.run_once()
            except Exception:
                log.exception("retention pass failed")

    def stop(self) -> None:
        """Stop accepting, drain, flush SQL, audit the stop."""
        self._stopped.set()
        self.receivers.stop(SHUTDOWN_GRACE_SECONDS)
        self.tracker.stop()
        self.ingest.stop()
        self._audit_activity(EventTypeCode.APPLICATION_STOP)
        self.database.dispose()
        log.info("node stopped")


def serve(settings: Settings) -> None:
    """Run the node until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    node = NodeServer(settings)
    node.start()
    log.info("node ready: AE %s on %s:%d", settings.node.ae_title, settings.node.host, settings.node.port)
    stop_requested.wait()
    node.stop()
