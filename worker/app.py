"""The Celery application, defined once: configuration, queue names and task routes.

It imports nothing of ours but the configuration, so that the node can enqueue
``brain3d.run_job`` by name without importing the worker's task code (which lives in
the other ``worker`` modules and is loaded by ``include``).
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Queue

from dicom_node.config import Settings, load_settings

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
RUN_JOB_TASK = "brain3d.run_job"


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (the effective configuration when omitted)."""
    settings = settings or load_settings()
    broker = settings.queue.broker_url
    if broker.startswith("sqla+sqlite:///"):
        # kombu's SQLAlchemy transport does not create the folder of its SQLite file.
        Path(broker.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    app = Celery("brain3d", broker=broker, backend=settings.queue.result_backend)
    app.conf.update(
        task_queues=[Queue(CPU_QUEUE), Queue(GPU_QUEUE)],
        task_default_queue=CPU_QUEUE,
        task_routes={RUN_JOB_TASK: {"queue": CPU_QUEUE}},
        broker_transport_options={"polling_interval": settings.queue.polling_interval},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        enable_utc=True,
        broker_connection_retry_on_startup=True,
    )
    return app
