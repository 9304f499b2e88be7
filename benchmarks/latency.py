"""End-to-end latency: from the last instance received to the SRs stored in the PACS.

Real parts only: ``brain3d serve`` and ``brain3d worker`` as subprocesses, dcmtk's
``storescu`` as the modality (``TCP_NODELAY=1``), Orthanc as the PACS and destination,
the model checkpoint on the CPU. Each run sends a new study (its own UIDs, so nothing is
a duplicate): a synthetic lesional FLAIR series written with the ``FLAIR_2D`` preset.

Two completion rules are timed in the same session, run after run:

- ``count``: the headers give the series' size (ImagesInAcquisition), so the node
  completes the series as soon as the last instance is stored and storescu released;
- ``timer``: the same series with ImagesInAcquisition removed, so the node waits for
  ``completion.stable_seconds`` of quiet (shipped default 10 s), the anchors' approach.

Each configuration (embedded SQLite + kombu SQL transport; PostgreSQL + Redis) gets its
own Orthanc, database and broker. Milestones are read from the job row (``jobs`` table);
"SRs stored in Orthanc" is the first time Orthanc's REST API lists all the job's SRs
(polled every ``--poll-s``), checked against Orthanc's own ReceptionDate (1 s resolution).

    python benchmarks/latency.py                       # demo checkpoint, both configurations
    python benchmarks/latency.py --random-demo-model --threads 1  # demo preset, random weights
    python benchmarks/latency.py --model /tmp/tiny --runs 3 --configs embedded
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "inference")]

from pacs import Orthanc, free_port  # noqa: E402 - tests/ is put on sys.path just above
from sqlalchemy import create_engine, select, text  # noqa: E402

from dicom_node.config import CompletionSettings  # noqa: E402
from dicom_node.db import Database, JobState  # noqa: E402
from dicom_node.db.models import (  # noqa: E402
    AuditEvent,
    StructuredReport,
    as_utc,
)
from worker.jobs import wait_for_final_job  # noqa: E402

DEMO_CHECKPOINT = REPO / "inference" / "checkpoints" / "demo"
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"
STORED = "SRs stored in Orthanc"
#: Milestones after the last instance received: (label, jobs column); the last is Orthanc's.
MILESTONES = [
    ("series complete", "series_complete_at"),
    ("queued", "queued_at"),
    ("conversion done", "conversion_finished_at"),
    ("inference done", "inference_finished_at"),
    ("SRs built", "sr_built_at"),
    ("SRs delivered (job's delivered_at)", "delivered_at"),
    (STORED, None),
]
#: Where the time goes: (label, from column, to column) of the jobs table.
STEPS = [
    ("completion + job row + enqueue", "last_instance_received_at", "queued_at"),
    ("wait for a worker (queue cpu)", "queued_at", "conversion_started_at"),
    ("conversion (dicom2nifti, geometry, prepare)", "conversion_started_at", "conversion_finished_at"),
    ("hop to queue gpu", "conversion_finished_at", "inference_started_at"),
    ("inference (load volume, generate)", "inference_started_at", "inference_finished_at"),
    ("hop to queue cpu + build and validate SRs", "inference_finished_at", "sr_built_at"),
    ("hop to queue cpu + C-STORE to Orthanc", "sr_built_at", "delivered_at"),
]
TARGET_P95_S = 5.0


@dataclass
class RunResult:
    """One run of one series: seconds after the last instance received, per milestone."""

    configuration: str
    variant: str
    run: int
    seconds: dict[str, float]
    steps: dict[str, float]
    model_timings: dict[str, float]
    reception_dates_consistent: bool


class OrthancSRPoller(threading.Thread):
    """Polls Orthanc for the SR instances of one study; remembers when each count was first seen."""

    def __init__(self, pacs: Orthanc, study_uid: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.pacs = pacs
        self.study_uid = study_uid
        self.interval_s = interval_s
        self.first_seen: dict[int, datetime] = {}
        self.instance_ids: list[str] = []
        self._halt = threading.Event()

    def _sr_instances(self) -> list[str]:
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": self.study_uid, "Modality": "SR"}}
        request = urllib.request.Request(
            self.pacs.url + "/tools/find", data=json.dumps(query).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def run(self) -> None:
        while not self._halt.is_set():
            found = self._sr_instances()
            seen_at = datetime.now(UTC)
            if len(found) not in self.first_seen:
                self.first_seen[len(found)] = seen_at
                self.instance_ids = found
            self._halt.wait(self.interval_s)

    def stored_at(self, count: int, timeout_s: float) -> datetime:
        """When Orthanc first listed ``count`` SRs of the study (waits up to ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            moments = [moment for seen, moment in self.first_seen.items() if seen >= count]
            if moments:
                return min(moments)
            time.sleep(self.interval_s)
        raise TimeoutError(f"Orthanc did not list {count} SRs of study {self.study_uid} in {timeout_s} s")

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)


@dataclass(frozen=True)
class PreparedSeries:
    variant: str
    files: list[Path]
    study_uid: str
    series_uid: str


def prepare_series(folder: Path, runs: int, seed: int) -> dict[str, list[PreparedSeries]]:
    """``runs`` + 1 (warm-up) studies per variant, each with its own UIDs, written before timing."""
    from dicom_node.acquisition import FLAIR_2D
    from dicom_node.series_writer import write_series
    from inference.synthetic import synthesize_case

    case = synthesize_case(f"latency-{seed}", lesional=True, seed=seed)
    prepared: dict[str, list[PreparedSeries]] = {"count": [], "timer": []}
    for variant in prepared:
        for index in range(runs + 1):
            files = write_series(
                folder / f"{variant}-{index:02d}",
                case.volume,
                case.affine,
                preset=FLAIR_2D,
                seed=seed * 1000 + index * 2 + (variant == "timer"),
                series_number=1,
            )
            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            if variant == "timer":
                for path in files:
                    dataset = pydicom.dcmread(path)
                    del dataset.ImagesInAcquisition
                    dataset.save_as(path, enforce_file_format=True)
            prepared[variant].append(
                PreparedSeries(variant, files, first.StudyInstanceUID, first.SeriesInstanceUID)
            )
    return prepared


@contextlib.contextmanager
def services(configuration: str, redis_db: int) -> Iterator[tuple[str, str, Path]]:
    """The database and broker URLs of one configuration, created for this run and removed after."""
    with tempfile.TemporaryDirectory(prefix=f"brain3d-latency-{configuration}-") as folder:
        root = Path(folder)
        if configuration == "embedded":
            yield f"sqlite:///{root / 'brain3d.db'}", f"sqla+sqlite:///{root / 'broker.db'}", root
            return
        import redis

        name = f"brain3d_latency_{uuid.uuid4().hex[:12]}"
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        client = redis.Redis.from_url(f"{REDIS_URL}/{redis_db}")
        if client.dbsize():
            raise RuntimeError(f"Redis DB {redis_db} is not empty: pick a free index with --redis-db")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", f"{REDIS_URL}/{redis_db}", root
        finally:
            client.flushdb()
            client.close()
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


def node_environment(
    root: Path,
    database_url: str,
    broker_url: str,
    node_port: int,
    pacs: Orthanc,
    arguments: argparse.Namespace,
) -> dict[str, str]:
    """The shipped settings (polling, completion checks, heartbeats), with this run's places and model."""
    backend = broker_url if broker_url.startswith("redis") else f"db+sqlite:///{root / 'results.db'}"
    values = {
        "BRAIN3D_NODE__HOST": "127.0.0.1",
        "BRAIN3D_NODE__PORT": str(node_port),
        "BRAIN3D_STORAGE__SPOOL_DIR": str(root / "spool"),
        "BRAIN3D_STORAGE__WORK_DIR": str(root / "work"),
        "BRAIN3D_STORAGE__REPORTS_DIR": str(root / "reports"),
        "BRAIN3D_STORAGE__MIN_FREE_BYTES": "0",
        "BRAIN3D_DATABASE__URL": database_url,
        "BRAIN3D_DATABASE__AUDIT_KEY_FILE": str(root / "audit.key"),
        "BRAIN3D_QUEUE__BROKER_URL": broker_url,
        "BRAIN3D_QUEUE__RESULT_BACKEND": backend,
        "BRAIN3D_DESTINATIONS": json.dumps(
            [{"host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": pacs.ae_title}]
        ),
        "BRAIN3D_MODEL__PATH": str(arguments.model),
        "BRAIN3D_MODEL__DEVICE": "cpu",
        "BRAIN3D_COMPLETION__STABLE_SECONDS": str(arguments.stable_seconds),
        "TCP_NODELAY": "1",
    }
    if arguments.threads is not None:
        values["OMP_NUM_THREADS"] = str(arguments.threads)
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("BRAIN3D_") and key != "OMP_NUM_THREADS"
    }
    return {**environment, **values}


class Brain3DProcess:
    """``brain3d <arguments>`` as a child process, its output kept in a log file, stopped by its id."""

    def __init__(self, name: str, arguments: list[str], root: Path, environment: dict[str, str]) -> None:
        self.name = name
        self.log_path = root / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", *arguments],
                env=environment,
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_logged(self, marker: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-3000:]}")
            if marker in self.log():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not log {marker!r} within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown stops its pool), SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def storescu(files: list[Path], port: int) -> None:
    """dcmtk's storescu, the modality, on one association."""
    result = subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", "BRAIN3D", "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stdout}{result.stderr}")


def reception_dates_consistent(pacs: Orthanc, instance_ids: list[str], stored_at: datetime) -> bool:
    """Orthanc's own ReceptionDate (UTC, whole seconds) of every SR is no later than our poll saw it."""
    for instance_id in instance_ids:
        with urllib.request.urlopen(f"{pacs.url}/instances/{instance_id}/metadata/ReceptionDate") as response:
            received = datetime.strptime(response.read().decode(), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
        if received > stored_at:
            return False
    return True


def one_run(
    configuration: str,
    series: PreparedSeries,
    run: int,
    node_port: int,
    pacs: Orthanc,
    database: Database,
    poll_s: float,
) -> RunResult:
    poller = OrthancSRPoller(pacs, series.study_uid, poll_s)
    poller.start()
    try:
        storescu(series.files, node_port)
        job = wait_for_final_job(database, series.series_uid, timeout_s=120)
        if job.state != JobState.SUCCEEDED:
            raise RuntimeError(f"job {job.id} ended {job.state.value}: {job.error_reason}")
        with database.session() as session:
            expected = len(
                session.scalars(select(StructuredReport).where(StructuredReport.job_id == job.id)).all()
            )
        stored_at = poller.stored_at(expected, timeout_s=30)
    finally:
        poller.stop()
    start = as_utc(job.last_instance_received_at)
    seconds = {
        label: (as_utc(getattr(job, column)) - start).total_seconds()
        for label, column in MILESTONES
        if column
    }
    seconds[STORED] = (stored_at - start).total_seconds()
    steps = {
        label: (as_utc(getattr(job, end)) - as_utc(getattr(job, begin))).total_seconds()
        for label, begin, end in STEPS
    }
    return RunResult(
        configuration,
        series.variant,
        run,
        seconds,
        steps,
        model_timings(database, job.id),
        reception_dates_consistent(pacs, poller.instance_ids, stored_at),
    )


def model_timings(database: Database, job_id: int) -> dict[str, float]:
    """The model's own timings (encode, prefill, decode...) as the worker audited them."""
    with database.session() as session:
        documents = session.scalars(
            select(AuditEvent.document).where(
                AuditEvent.job_id == job_id, AuditEvent.event_type == "inference"
            )
        ).all()
    for document in documents:
        timings = json.loads(document).get("detail", {}).get("timings")
        if timings:
            return {key: float(value) for key, value in timings.items() if isinstance(value, int | float)}
    return {}


def run_configuration(
    configuration: str, prepared: dict[str, list[PreparedSeries]], arguments: argparse.Namespace
) -> list[RunResult]:
    results: list[RunResult] = []
    with (
        services(configuration, arguments.redis_db) as (database_url, broker_url, root),
        Orthanc(root / "orthanc") as pacs,
    ):
        node_port = free_port()
        environment = node_environment(root, database_url, broker_url, node_port, pacs, arguments)
        processes: list[Brain3DProcess] = []
        database = Database(database_url)
        try:
            processes.append(Brain3DProcess("serve", ["serve"], root, environment))
            processes[0].wait_until_logged("node ready")
            processes.append(Brain3DProcess("worker", ["worker", "--loglevel", "INFO"], root, environment))
            processes[1].wait_until_logged(" ready.")
            # Warm-up (not counted): the first job pays lazy imports in the worker's child.
            one_run(configuration, prepared["count"][0], -1, node_port, pacs, database, arguments.poll_s)
            for run in range(arguments.runs):
                for variant in arguments.variants:
                    series = prepared[variant][run + 1]
                    result = one_run(configuration, series, run, node_port, pacs, database, arguments.poll_s)
                    results.append(result)
                    print(
                        f"{configuration:<14} {variant:<6} run {run}: "
                        + " ".join(f"{value:6.2f}" for value in result.seconds.values()),
                        flush=True,
                    )
        except Exception:
            for process in processes:
                print(f"--- {process.name} log tail ---\n{process.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            for process in reversed(processes):
                process.stop()
            database.engine.dispose()
            if arguments.logs:
                arguments.logs.mkdir(parents=True, exist_ok=True)
                for process in processes:
                    shutil.copy(process.log_path, arguments.logs / f"{configuration}-{process.name}.log")
    return results


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def p50_p95(values: list[float]) -> str:
    return f"{percentile(values, 50):.2f} / {percentile(values, 95):.2f}" if values else "-"


def markdown(results: list[RunResult], arguments: argparse.Namespace, command: str) -> str:
    """The section for docs/benchmarks.md: one table per configuration, both variants side by side."""
    lines = [
        f"`{command}`: {platform.machine()}, {os.cpu_count()} cores, CPU only, "
        + (
            f"OMP_NUM_THREADS={arguments.threads}"
            if arguments.threads
            else "OMP_NUM_THREADS unset (as shipped: torch takes one thread per core)"
        )
        + ", model "
        + ("`demo` preset, random weights" if arguments.random_demo_model else f"`{arguments.model}`")
        + f", {arguments.runs} runs per "
        f"variant after one warm-up, shipped settings (transport polling, completion check, heartbeats), "
        f"`completion.stable_seconds` = {arguments.stable_seconds:g} s"
        + (" (the default). " if arguments.stable_seconds == CompletionSettings().stable_seconds else ". ")
        + "Seconds after the node stored the last instance (`jobs.last_instance_received_at`); "
        "p95 by linear interpolation.",
        "",
    ]
    labels = [label for label, _ in MILESTONES]
    for configuration in arguments.configs:
        header = "| milestone | " + " | ".join(
            f"{variant} p50 | {variant} p95 | {variant} max" for variant in arguments.variants
        )
        lines += [f"**{configuration}**", "", header + " |", "|---" * (1 + 3 * len(arguments.variants)) + "|"]
        for label in labels:
            cells = []
            for variant in arguments.variants:
                values = [
                    r.seconds[label]
                    for r in results
                    if r.configuration == configuration and r.variant == variant
                ]
                cells += [f"{percentile(values, q):.2f}" for q in (50, 95)] + [f"{max(values):.2f}"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Where the time goes, header-count runs (seconds per step; p50 / p95):",
        "",
        "| step | " + " | ".join(arguments.configs) + " |",
        "|---" * (1 + len(arguments.configs)) + "|",
    ]
    count_runs = {
        c: [r for r in results if r.configuration == c and r.variant == "count"] for c in arguments.configs
    }
    for label, _, _ in STEPS:
        cells = [p50_p95([r.steps[label] for r in runs]) for runs in count_runs.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    timing_keys = sorted({key for runs in count_runs.values() for r in runs for key in r.model_timings})
    for key in timing_keys:
        cells = [
            p50_p95([r.model_timings[key] for r in runs if key in r.model_timings])
            for runs in count_runs.values()
        ]
        lines.append(f"| of which model `{key}` | " + " | ".join(cells) + " |")
    lines.append("")
    for configuration in arguments.configs:
        stored = [
            r.seconds[STORED] for r in results if r.configuration == configuration and r.variant == "count"
        ]
        if stored:
            p95 = percentile(stored, 95)
            verdict = "met" if p95 <= TARGET_P95_S else "**missed**"
            lines.append(
                f"- {configuration}, header count: p95 {p95:.2f} s to {STORED} "
                f"(median {statistics.median(stored):.2f} s): target {TARGET_P95_S:g} s {verdict}."
            )
    consistent = all(r.reception_dates_consistent for r in results)
    lines.append(
        f"- Orthanc's own ReceptionDate of every SR {'agrees' if consistent else 'DISAGREES'} "
        "with the REST poll (at its 1 s resolution)."
    )
    return "\n".join(lines)


def random_demo_model(folder: Path) -> Path:
    """The ``demo`` preset with random weights: the demo checkpoint's compute, when it is absent.

    Random weights rarely emit the end token, so each report decodes up to ``model.max_new_tokens``
    tokens: an upper bound of the trained checkpoint's decode time.
    """
    import torch
    from model_fixtures import report_corpus

    from inference.configuration_brain3d import Brain3DConfig
    from inference.modeling_brain3d import Brain3D
    from inference.tokenization import train_report_tokenizer

    torch.manual_seed(0)
    tokenizer = train_report_tokenizer([*report_corpus(), Brain3DConfig.instruction], vocab_size=1024)
    Brain3D(Brain3DConfig.from_preset("demo", vocab_size=1024), tokenizer).eval().save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, default=DEMO_CHECKPOINT, help="Brain3D checkpoint folder.")
    model.add_argument(
        "--random-demo-model",
        action="store_true",
        help="Time the demo preset with random weights instead (built in a temporary folder).",
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--configs", nargs="+", choices=["embedded", "postgres-redis"], default=["embedded", "postgres-redis"]
    )
    parser.add_argument("--variants", nargs="+", choices=["count", "timer"], default=["count", "timer"])
    parser.add_argument(
        "--stable-seconds",
        type=float,
        default=10.0,
        help="completion.stable_seconds for the node (shipped default 10 s).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS of the node and worker; unset by default, as shipped (torch: one per core).",
    )
    parser.add_argument("--redis-db", type=int, default=15, help="An empty Redis DB index, flushed after.")
    parser.add_argument("--poll-s", type=float, default=0.05, help="Orthanc REST poll interval.")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path, help="Also write every run's figures here.")
    parser.add_argument("--logs", type=Path, help="Keep the node's and worker's logs in this folder.")
    arguments = parser.parse_args()
    command = "python benchmarks/latency.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="brain3d-latency-series-") as folder:
        if arguments.random_demo_model:
            arguments.model = random_demo_model(Path(folder) / "random-demo-model")
        if not (arguments.model / "config.json").is_file():
            parser.error(f"--model {arguments.model} holds no checkpoint (config.json missing)")
        prepared = prepare_series(Path(folder), arguments.runs, arguments.seed)
        for configuration in arguments.configs:
            results += run_configuration(configuration, prepared, arguments)
    if arguments.json:
        arguments.json.write_text(json.dumps([asdict(result) for result in results], indent=1))
    load_after = os.getloadavg()
    print(markdown(results, arguments, command.strip()))
    print(f"- 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after the runs.")


if __name__ == "__main__":
    main()
