"""``brain3d demo``: the whole product on one machine, with no services, in under a minute.

It starts ``brain3d serve`` and ``brain3d worker`` as real processes on embedded defaults,
a local destination that plays the PACS, synthesises a study (a FLAIR series with a
lesion and a T1 series), sends it over real C-STORE, and prints what came back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    MRImageStorage,
    Verification,
)

from dicom_node.config import Settings
from dicom_node.db import Database, Job
from inference.report_schema import Findings
from worker.jobs import wait_for_final_job

DEMO_PACS_AE = "DEMO_PACS"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DemoPacs:
    """A minimal Storage SCP on loopback that keeps every SR it receives in a folder."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.received: list[Path] = []
        self._arrived = threading.Condition()
        self._ae = AE(ae_title=DEMO_PACS_AE)
        for sop_class in (
            ComprehensiveSRStorage,
            EnhancedSRStorage,
            Comprehensive3DSRStorage,
            Verification,
        ):
            self._ae.add_supported_context(sop_class)
        self._server = None

    def _on_store(self, event: evt.Event) -> int:
        dataset = event.dataset
        path = self.folder / f"{dataset.SOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        with self._arrived:
            self.received.append(path)
            self._arrived.notify_all()
        return 0x0000

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def wait_for(self, count: int, timeout: float) -> list[Path]:
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.received) >= count, timeout=timeout)
            return list(self.received)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


@dataclass
class DemoResult:
    job: Job
    report_files: list[Path]
    truth: Findings
    wall_seconds: float
    model_card: Path  # the README.md beside the checkpoint that wrote the reports


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with status {process.returncode}; see its log under var/demo/logs"
            )
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{name} did not open port {port} within {timeout:.0f} s")


def _wait_for_worker(log: Path, process: subprocess.Popen, timeout: float) -> None:
    """Celery logs '<name> ready.' once its pool is up; sending earlier would time the start-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"brain3d worker exited with status {process.returncode}; see {log}")
        if b" ready." in log.read_bytes():
            return
        time.sleep(0.1)
    raise TimeoutError(f"brain3d worker was not ready within {timeout:.0f} s")


def _send(files: list[Path], port: int, called_ae: str) -> None:
    ae = AE(ae_title="DEMO_MR")
    ae.add_requested_context(MRImageStorage)
    association = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not association.is_established:
        raise RuntimeError("the node refused the demo modality's association")
    try:
        for path in files:
            status = association.send_c_store(pydicom.dcmread(path))
            if getattr(status, "Status", None) != 0x0000:
                raise RuntimeError(f"the node did not store {path.name}: {status}")
    finally:
        association.release()


def run_demo(settings: Settings, *, seed: int = 7, timeout: float = 120.0) -> DemoResult:
    """Run the demo end to end and return what the destination received."""
    from dicom_node.acquisition import FLAIR_2D, T1
    from dicom_node.series_writer import write_series
    from inference.synthetic import synthesize_case

    started = time.monotonic()
    var_dir = Path(settings.storage.spool_dir).parent
    demo_dir = var_dir / "demo"
    logs = demo_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    node_port, pacs_port = free_port(), free_port()
    env = {
        **os.environ,
        "BRAIN3D_NODE__HOST": "127.0.0.1",
        "BRAIN3D_NODE__PORT": str(node_port),
        "BRAIN3D_DESTINATIONS": json.dumps(
            [{"host": "127.0.0.1", "port": pacs_port, "ae_title": DEMO_PACS_AE}]
        ),
    }
    pacs = DemoPacs(demo_dir / "received", pacs_port)
    pacs.start()
    command = [sys.executable, "-m", "worker.cli"]
    processes: list[subprocess.Popen] = []
    try:
        for name, arguments in (("serve", ["serve"]), ("worker", ["worker", "--loglevel", "INFO"])):
            with open(logs / f"{name}.log", "wb") as log:
                processes.append(
                    subprocess.Popen(command + arguments, env=env, stdout=log, stderr=subprocess.STDOUT)
                )
        case = synthesize_case(f"demo-{seed}", lesional=True, seed=seed)
        study_dir = demo_dir / "study"
        flair = write_series(
            study_dir / "flair", case.volume, case.affine, preset=FLAIR_2D, seed=seed, series_number=1
        )
        study_uid = pydicom.dcmread(flair[0], stop_before_pixels=True).StudyInstanceUID
        t1 = write_series(
            study_dir / "t1",
            case.volume,
            case.affine,
            preset=T1,
            seed=seed + 1,
            series_number=2,
            study_uid=study_uid,
        )
        _wait_for_port(node_port, processes[0], 30, "brain3d serve")
        _wait_for_worker(logs / "worker.log", processes[1], 60)
        _send(flair + t1, node_port, settings.node.ae_title)
        flair_uid = pydicom.dcmread(flair[0], stop_before_pixels=True).SeriesInstanceUID
        job = wait_for_final_job(Database(settings.database.url), flair_uid, timeout)
        reports = pacs.wait_for(2, timeout=10) if job.state.value == "succeeded" else []
        return DemoResult(
            job=job,
            report_files=reports,
            truth=case.findings,
            wall_seconds=time.monotonic() - started,
            model_card=settings.model.path / "README.md",
        )
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        pacs.stop()


#: Marks a row of the findings table where the SR and the synthetic truth disagree.
DIFFERS = "<- differs"
#: Widths of the findings table's first two columns (finding, coded in the SR).
FINDING_COLUMN, CODED_COLUMN = 26, 25


def _describe(findings: Findings) -> dict[str, str]:
    if not findings.abnormal:
        return {"abnormality": "absent"}
    return {
        "abnormality": "present",
        "side": findings.side.value if findings.side else "-",
        "lobes": ", ".join(sorted(lobe.value for lobe in findings.lobes)) or "-",
        "edema": "yes" if findings.edema else "no",
        "necrosis": "yes" if findings.necrosis else "no",
        "ventricular compression": "yes" if findings.ventricular_compression else "no",
    }


def _step_timings(job: Job) -> list[tuple[str, float]]:
    """Seconds from the last instance received to each later step of the job."""
    start = job.last_instance_received_at
    steps = [
        ("series complete", job.series_complete_at),
        ("queued", job.queued_at),
        ("conversion done", job.conversion_finished_at),
        ("inference done", job.inference_finished_at),
        ("SRs built", job.sr_built_at),
        ("SRs delivered", job.delivered_at),
    ]
    if start is None:
        return []
    return [(name, (moment - start).total_seconds()) for name, moment in steps if moment is not None]


def print_result(result: DemoResult, echo: Callable[[str], None] = print) -> None:
    """What a radiologist and an admin would want to see of the demo run."""
    from dicom_node.sr import read_coded_findings, read_narrative

    job = result.job
    echo(f"job {job.id}: {job.state.value}" + (f" ({job.error_reason})" if job.error_reason else ""))
    if job.report_text:
        echo("\nGenerated report (AI-generated, not reviewed; synthetic demo model, not for clinical use):")
        echo(f"  {job.report_text}")
    measurement = next(
        (
            dataset
            for dataset in (pydicom.dcmread(path) for path in result.report_files)
            if dataset.SOPClassUID == Comprehensive3DSRStorage
        ),
        None,
    )
    coded = _describe(read_coded_findings(measurement)) if measurement is not None else {}
    truth = _describe(result.truth)
    echo(f"\n  {'finding':<{FINDING_COLUMN}}{'coded in the SR':<{CODED_COLUMN}}synthetic truth")
    differing = []
    for key in dict.fromkeys([*truth, *coded]):
        said, true = coded.get(key, "-"), truth.get(key, "-")
        differs = said != true
        if differs:
            differing.append(key)
        marker = DIFFERS if differs else ""
        echo(f"  {key:<{FINDING_COLUMN}}{said:<{CODED_COLUMN}}{true:<{CODED_COLUMN}}{marker}".rstrip())
    if differing:
        echo(
            f"The SR differs from the synthetic truth in: {', '.join(differing)} "
            f"(the checkpoint's known limits: {result.model_card})."
        )
    else:
        echo("The SR's coded findings match the synthetic truth.")
    for path in result.report_files:
        dataset = pydicom.dcmread(path)
        if dataset.SOPClassUID == ComprehensiveSRStorage:
            echo(f"\nSR statements: {' | '.join(read_narrative(dataset).comments)}")
    echo("\nseconds after the last instance was received:")
    for name, seconds in _step_timings(job):
        echo(f"  {name:<18}{seconds:6.2f}")
    echo(f"\nSRs received by the demo destination ({len(result.report_files)}):")
    for path in result.report_files:
        echo(f"  {path}")
    echo(f"demo wall time: {result.wall_seconds:.1f} s")
