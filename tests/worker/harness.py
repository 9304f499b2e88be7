"""Real processes for the worker's end-to-end tests: the node and Celery workers as ``brain3d``
subprocesses, configured the way a user configures them (``BRAIN3D_<SECTION>__<KEY>``), and
synthetic studies written by the node's own series writer.

dcmtk's ``storescu`` (``serve_harness.storescu``) is the modality; Orthanc (``pacs.Orthanc``)
is the PACS.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pydicom
from pacs import free_port
from serve_harness import wait_for

from dicom_node.acquisition import FLAIR_2D, T1
from dicom_node.db import Database
from dicom_node.series_writer import write_series
from inference.report_schema import Findings, Side
from inference.synthetic import Case, synthesize_case

REPO = Path(__file__).resolve().parents[2]
#: The checkpoint the tests run: the committed demo model unless BRAIN3D_TEST_MODEL names another.
MODEL = Path(os.environ.get("BRAIN3D_TEST_MODEL", REPO / "inference" / "checkpoints" / "demo"))


@dataclass
class NodeEnvironment:
    """One isolated installation: its folders, database, broker and destinations."""

    root: Path
    database_url: str
    broker_url: str
    node_port: int = field(default_factory=free_port)
    destinations: list[dict] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        if self.broker_url.startswith("redis"):
            backend = self.broker_url
        else:
            backend = f"db+sqlite:///{self.root / 'results.db'}"
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
            "BRAIN3D_COMPLETION__CHECK_INTERVAL": "0.1",
            "BRAIN3D_DESTINATIONS": json.dumps(self.destinations),
            "BRAIN3D_MODEL__PATH": str(MODEL),
            "BRAIN3D_WORKER__HEARTBEAT_S": "1",
            "BRAIN3D_WORKER__STALE_AFTER_S": "8",
            "BRAIN3D_WORKER__RECONCILE_EVERY_S": "2",
            "BRAIN3D_DELIVERY__RETRY_BACKOFF_S": "1",
            "BRAIN3D_DELIVERY__RETRY_BACKOFF_MAX_S": "4",
            "OMP_NUM_THREADS": "1",
            "TCP_NODELAY": "1",
        }
        environment = {**os.environ, **values, **self.extra}
        environment.pop("BRAIN3D_CONFIG", None)
        return environment

    def database(self) -> Database:
        return Database(self.database_url)


class Brain3DProcess:
    """``brain3d <arguments>`` as a child process, its output kept in a log file."""

    def __init__(self, name: str, arguments: list[str], environment: NodeEnvironment) -> None:
        self.name = name
        self.arguments = arguments
        self.environment = environment
        self.log_path = environment.root / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self._log_start = 0

    def start(self) -> Brain3DProcess:
        self.environment.root.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", *self.arguments],
                env=self.environment.env(),
                cwd=self.environment.root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log(self) -> str:
        """The log of the current run (a restarted process appends to the same file)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def children(self) -> list[psutil.Process]:
        assert self.process is not None
        return psutil.Process(self.process.pid).children(recursive=True)

    def wait_until_logged(self, text: str, timeout: float = 90) -> None:
        def logged() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.log()[-4000:]}")
            return text in self.log()

        wait_for(logged, timeout)

    def kill(self) -> None:
        """SIGKILL the process; its children (a worker's pool) are killed as well."""
        if self.process is None or self.process.poll() is not None:
            return
        children = self.children()
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
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


def start_node(environment: NodeEnvironment) -> Brain3DProcess:
    node = Brain3DProcess("serve", ["serve"], environment).start()
    node.wait_until_logged("node ready")
    return node


def start_worker(environment: NodeEnvironment, name: str = "worker") -> Brain3DProcess:
    """A worker on both queues with one prefork child, ready once its pool is up."""
    worker = Brain3DProcess(name, ["worker", "--concurrency", "1", "--loglevel", "INFO"], environment).start()
    worker.wait_until_logged(" ready.")
    wait_for(lambda: worker.children(), 30)
    return worker


@functools.cache
def lateral_case(side: Side, seed: int = 0) -> Case:
    """The first synthetic lesional case, from ``seed`` on, whose lesion lies on ``side``."""
    for attempt in range(seed, seed + 200):
        case = synthesize_case(f"e2e-{side}-{attempt}", lesional=True, seed=attempt)
        if case.findings.side is side:
            return case
    raise AssertionError(f"no {side} lesion among 200 synthetic cases")


@dataclass
class Study:
    truth: Findings
    flair: list[Path]
    t1: list[Path]

    def uid(self, kind: str = "flair", keyword: str = "SeriesInstanceUID") -> str:
        return str(pydicom.dcmread(getattr(self, kind)[0], stop_before_pixels=True)[keyword].value)


def write_study(folder: Path, case: Case, seed: int, **flair_options: object) -> Study:
    """A FLAIR series (count in its headers) and a T1 series of one synthetic case, one study."""
    flair = write_series(
        folder / "flair",
        case.volume,
        case.affine,
        preset=FLAIR_2D,
        seed=seed,
        series_number=1,
        **flair_options,
    )
    study_uid = pydicom.dcmread(flair[0], stop_before_pixels=True).StudyInstanceUID
    t1 = write_series(
        folder / "t1",
        case.volume,
        case.affine,
        preset=T1,
        seed=seed + 1,
        series_number=2,
        study_uid=study_uid,
    )
    return Study(truth=case.findings, flair=flair, t1=t1)
