"""The Celery application, defined once: configuration, queue names and task routes.

It imports nothing of ours but the configuration, so that the node can enqueue
``brain3d.run_job`` by name without importing the worker's task code (which lives in
``worker.tasks`` and is loaded by ``include``).

Reliability settings, and why:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose worker dies goes back
  to the queue instead of being lost (Redis); kombu's SQL transport never redelivers, so the
  reconciler (``worker.reconciler``) re-enqueues from SQL, which is the source of truth.
- prefetch 1: a long inference never holds other jobs hostage in a worker's buffer.
- visibility timeout longer than the hard time limit, retry countdowns shorter than it:
  Redis never redelivers a task that is still legitimately running.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Queue
from kombu.transport import sqlalchemy as sql_transport

from dicom_node.config import Settings, load_settings

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
RUN_JOB_TASK = "brain3d.run_job"
INFER_TASK = "brain3d.infer"
BUILD_REPORTS_TASK = "brain3d.build_reports"
DELIVER_TASK = "brain3d.deliver"

TASK_QUEUES = {
    RUN_JOB_TASK: CPU_QUEUE,  # claims the job and converts the series
    INFER_TASK: GPU_QUEUE,
    BUILD_REPORTS_TASK: CPU_QUEUE,
    DELIVER_TASK: CPU_QUEUE,  # a slow PACS never holds a GPU
}


def _configure_sql_transport(polling_interval: float) -> None:
    """Prepare kombu's SQLAlchemy transport, the embedded default broker.

    It passes its transport options to ``create_engine``, so its polling interval (1 s by
    default, paid at every hop of a job) is set on the transport class instead.
    """
    sql_transport.Transport.polling_interval = polling_interval


def _create_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite broker or result backend: neither kombu nor Celery does."""
    for prefix in ("sqla+sqlite:///", "db+sqlite:///"):
        if url.startswith(prefix):
            Path(url.removeprefix(prefix)).parent.mkdir(parents=True, exist_ok=True)


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (the effective configuration when omitted)."""
    settings = settings or load_settings()
    broker = settings.queue.broker_url
    hard_limit = settings.worker.hard_time_limit_s
    transport_options: dict[str, float] = {
        "polling_interval": settings.queue.polling_interval,
        "visibility_timeout": int(hard_limit * 2),
    }
    if broker.startswith("sqla+"):
        _configure_sql_transport(settings.queue.polling_interval)
        transport_options = {}  # kombu hands this transport's options to create_engine()
    _create_sqlite_folder(broker)
    _create_sqlite_folder(settings.queue.result_backend)
    app = Celery("brain3d", broker=broker, backend=settings.queue.result_backend, include=["worker.tasks"])
    app.conf.update(
        task_queues=[Queue(CPU_QUEUE), Queue(GPU_QUEUE)],
        task_default_queue=CPU_QUEUE,
        task_routes={name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A child loads the model before it reports up (worker_process_init): allow it the time.
        worker_proc_alive_timeout=settings.worker.process_start_timeout_s,
        task_soft_time_limit=settings.worker.soft_time_limit_s,
        task_time_limit=hard_limit,
        broker_transport_options=transport_options,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        enable_utc=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.conf.brain3d_settings = settings
    return app


def send_run_job(app: Celery, job_id: int) -> None:
    """Send ``brain3d.run_job(job_id)`` on ``cpu``: by name, so the sender needs no task code,
    and without a result, which nothing reads: asking for one makes Celery reach the result
    backend first, and one that is down held the sender about 20 s per job."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=CPU_QUEUE, ignore_result=True)
