"""``brain3d serve`` as a real subprocess, dcmtk's storescu as the modality, and test studies.

Used by ``tests/node/test_scp*.py``, ``test_completeness*.py`` and ``test_serve*.py``:
each test starts its own node on a free loopback port with a configuration file in
its temporary folder, and stops it by its own process id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pacs import free_port
from pydicom.dataset import Dataset

from dicom_node.acquisition import FLAIR_2D, LOCALIZER, T1, AcquisitionPreset
from dicom_node.db.session import Database
from dicom_node.series_writer import build_series
from dicom_node.spool import dataset_offset

BRAIN3D = str(Path(sys.executable).parent / "brain3d")
MODALITY_AE = "MODALITY"
AUDIT_KEY = "test-audit-key-0123456789abcdef"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class NodeProcess:
    """One ``brain3d serve`` subprocess with its own spool, database and broker."""

    def __init__(
        self,
        root: Path,
        *,
        database_url: str | None = None,
        broker_url: str | None = None,
        result_backend: str | None = None,
        stable_seconds: float = 2.0,
        allowed_calling_aes: Iterable[str] = (),
        port: int | None = None,
        min_free_bytes: int = 0,
        count_rules: Iterable[dict[str, Any]] = (),
        receiver_processes: int | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = port or free_port()
        self.database_url = database_url or f"sqlite:///{root / 'brain3d.db'}"
        self.broker_url = broker_url or f"sqla+sqlite:///{root / 'broker.db'}"
        self.spool_dir = root / "spool"
        self.log_path = root / "serve.log"
        node: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "allowed_calling_aes": list(allowed_calling_aes),
        }
        if receiver_processes is not None:
            node["receiver_processes"] = receiver_processes
        self.config = write_config(
            root / "brain3d.toml",
            {
                "node": node,
                "storage": {"spool_dir": str(self.spool_dir), "min_free_bytes": min_free_bytes},
                "database": {"url": self.database_url, "audit_key_file": str(root / "audit.key")},
                "queue": {
                    "broker_url": self.broker_url,
                    "result_backend": result_backend or f"db+sqlite:///{root / 'results.db'}",
                },
                "completion": {
                    "stable_seconds": stable_seconds,
                    "check_interval": 0.1,
                    "count_rules": list(count_rules),
                },
            },
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def start(self, timeout_s: float = 60.0) -> NodeProcess:
        env = {**os.environ, "BRAIN3D_DATABASE__AUDIT_KEY": AUDIT_KEY}
        env.pop("BRAIN3D_CONFIG", None)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [BRAIN3D, "serve", "--config", str(self.config)],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout_s
        while "node ready" not in self.log(since=self._log_start):
            if self.process.poll() is not None:
                raise RuntimeError(f"brain3d serve exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"brain3d serve not ready:\n{self.log()}")
            time.sleep(0.1)
        return self

    def log(self, since: int = 0) -> str:
        """The node's log; ``since`` a byte offset (a restarted node appends to the same file)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")

    def current_log(self) -> str:
        """The log of the current (latest) run only."""
        return self.log(since=self._log_start)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def receiver_pids(self) -> list[int]:
        """Process ids of the node's receiver processes (its children running ``run_receiver``)."""
        assert self.process is not None
        return [
            pid
            for pid in child_pids(self.process.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()  # not the resource tracker
        ]

    def database(self) -> Database:
        return Database(self.database_url)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def child_pids(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux ``/proc``)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children += [int(child) for child in task.read_text().split()]
    return sorted(children)


def storescu(
    port: int, paths: Iterable[Path], *, calling_ae: str = MODALITY_AE, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk's storescu (TCP_NODELAY set: Debian's dcmtk stalls without it)."""
    command = ["storescu", "-aet", calling_ae, "-aec", "BRAIN3D", "127.0.0.1", str(port), *map(str, paths)]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class SentSeries:
    name: str
    datasets: list[Dataset]
    paths: list[Path]

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)


def head_volume(size: int = 32, slices: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A small bright ellipsoid in a dark field, with a 1 x 1 x 4 mm affine."""
    grid = np.mgrid[0:size, 0:size, 0:slices].astype(np.float32)
    centre = np.array([size / 2, size / 2, slices / 2]).reshape(3, 1, 1, 1)
    radius = np.array([size / 3, size / 2.5, slices / 2.5]).reshape(3, 1, 1, 1)
    inside = (((grid - centre) / radius) ** 2).sum(axis=0) <= 1.0
    volume = np.where(inside, 800.0, 20.0).astype(np.float32)
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    affine[:3, 3] = [-size / 2, -size / 2, -2.0 * slices]
    return volume, affine


def write_study(
    folder: Path,
    *,
    presets: Iterable[tuple[str, AcquisitionPreset]] = (
        ("flair", FLAIR_2D),
        ("t1", T1),
        ("localizer", LOCALIZER),
    ),
    slices: int = 12,
    size: int = 32,
    seed: int = 1,
    edit: Callable[[Dataset], None] | None = None,
) -> dict[str, SentSeries]:
    """One study of several series written as files (one folder per series)."""
    volume, affine = head_volume(size, slices)
    study: dict[str, SentSeries] = {}
    study_uid = None
    for number, (name, preset) in enumerate(presets, start=1):
        datasets = build_series(
            volume, affine, preset=preset, seed=seed, series_number=number, study_uid=study_uid
        )
        study_uid = str(datasets[0].StudyInstanceUID)
        series_folder = folder / name
        series_folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, dataset in enumerate(datasets):
            if edit is not None:
                edit(dataset)
            path = series_folder / f"{index:04d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(path)
        study[name] = SentSeries(name, datasets, paths)
    return study


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a DICOM file after its file meta: what travels over the network."""
    data = path.read_bytes()
    return data[dataset_offset(data) :]


def wait_for(condition: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.1) -> Any:
    """Poll until ``condition()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
