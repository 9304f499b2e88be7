"""Real processes for the worker's end-to-end tests: the node, Celery workers, storescu.

Everything is configured the way a user configures it: environment variables
``BRAIN3D_<SECTION>__<KEY>`` on ``brain3d`` subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from sqlalchemy import select

from dicom_node.config import Settings, load_settings
from dicom_node.db import Database, Job, Series

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class NodeEnvironment:
    """One isolated node installation: its folders, database, broker and destinations."""

    root: Path
    database_url: str
    broker_url: str
    node_port: int = field(default_factory=free_port)
    destinations: list[dict] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        backend = (
            self.broker_url
            if self.broker_url.startswith("redis")
            else f"db+sqlite:///{self.root / 'results.db'}"
        )
        values = {
            "BRAIN3D_NODE__HOST": "127.0.0.1",
            "BRAIN3D_NODE__PORT": str(self.node_port),
            "BRAIN3D_STORAGE__SPOOL_DIR": str(self.root / "spool"),
            "BRAIN3D_STORAGE__WORK_DIR": str(self.root / "work"),
            "BRAIN3D_STORAGE__REPORTS_DIR": str(self.root / "reports"),
            "BRAIN3D_STORAGE__MIN_FREE_BYTES": "0",
            "BRAIN3D_DATABASE__URL": self.database_url,
            "BRAIN3D_DATABASE__AUDIT_KEY_FILE": str(self.root / "audit.key"),
            "BRAIN3D_QUEUE__BROKER_URL": self.broker_url,
            "BRAIN3D_QUEUE__RESULT_BACKEND": backend,
            "BRAIN3D_QUEUE__POLLING_INTERVAL": "0.1",
            "BRAIN3D_DESTINATIONS": json.dumps(self.destinations),
            "BRAIN3D_WORKER__HEARTBEAT_S": "1",
            "BRAIN3D_WORKER__STALE_AFTER_S": "8",
            "BRAIN3D_WORKER__RECONCILE_EVERY_S": "2",
            "BRAIN3D_DELIVERY__RETRY_BACKOFF_S": "1",
            "BRAIN3D_DELIVERY__RETRY_BACKOFF_MAX_S": "4",
            "OMP_NUM_THREADS": "1",
            "TCP_NODELAY": "1",
        }
        return {**os.environ, **values, **self.extra}

    def settings(self) -> Settings:

        previous = dict(os.environ)
        os.environ.update(self.env())
        try:
            return load_settings()
        finally:
            os.environ.clear()
            os.environ.update(previous)

    def database(self) -> Database:
        return Database(self.database_url)


class Brain3DProcess:
    """``brain3d <arguments>`` as a child process, its output kept in a log file."""

    def __init__(self, name: str, arguments: Sequence[str], environment: NodeEnvironment) -> None:
        self.name = name
        self.arguments = list(arguments)
        self.environment = environment
        self.log_path = environment.root / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Brain3DProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed on stop
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *self.arguments],
            env=self.environment.env(),
            cwd=self.environment.root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children(recursive=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (its children are killed too)."""
        if self.process is None:
            return
        children = self.children() if self.process.poll() is None else []
        self.process.kill()
        self.process.wait(timeout=10)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_for_port(port: int, process: Brain3DProcess, timeout: float = 60) -> None:
    def is_open() -> bool:
        if process.process is not None and process.process.poll() is not None:
            raise AssertionError(f"{process.name} exited early:\n{process.log()[-3000:]}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(is_open, timeout, f"{process.name} to listen on port {port}")


def wait_for_worker(process: Brain3DProcess, timeout: float = 90) -> None:
    """A Celery worker is ready once it logs 'ready' and its prefork child exists."""

    def ready() -> bool:
        if process.process is not None and process.process.poll() is not None:
            raise AssertionError(f"{process.name} exited early:\n{process.log()[-3000:]}")
        return " ready." in process.log() and bool(process.children())

    wait_until(ready, timeout, f"{process.name} to be ready")


def storescu(
    files: Sequence[Path], port: int, *, calling_ae: str = "MODALITY", called_ae: str = "BRAIN3D"
) -> None:
    """Send ``files`` with dcmtk's storescu, the modality of the tests."""
    result = subprocess.run(
        ["storescu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def job_of(database: Database, series_uid: str) -> Job | None:
    """The newest job of a series, detached from its session."""
    with database.session() as session:
        job = session.scalars(
            select(Job).join(Series).where(Series.series_instance_uid == series_uid).order_by(Job.id.desc())
        ).first()
        if job is not None:
            session.expunge(job)
        return job


def wait_for_final_job(database: Database, series_uid: str, timeout: float = 120) -> Job:
    def final() -> Job | None:
        job = job_of(database, series_uid)
        return job if job is not None and job.state.is_final else None

    return wait_until(final, timeout, f"the job of series {series_uid} to end")  # type: ignore[return-value]
