"""Receiver processes: several StorageSCPs on the node's one socket, bookkeeping in the node process."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from pacs import mr_series
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from serve_harness import NodeProcess, wait_for
from sqlalchemy import func, select

from dicom_node.db.models import AuditEvent, Instance
from dicom_node.receivers import RECEIVER_RESTARTED
from dicom_node.spool import Spool

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


def _write_series(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for index, dataset in enumerate(mr_series(count)):
        paths.append(folder / f"{index:03d}.dcm")
        dataset.save_as(paths[-1], enforce_file_format=True)
    return paths


def _send_concurrently(port: int, folders: list[Path]) -> None:
    senders = [
        subprocess.Popen(
            ["storescu", "+sd", "-aet", "MODALITY", "-aec", "BRAIN3D", "127.0.0.1", str(port), str(folder)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    for sender in senders:
        _out, errors = sender.communicate(timeout=300)
        assert sender.returncode == 0, errors.decode()


def _receiving_pids(node: NodeProcess) -> list[str]:
    """The destination UserID (the receiving process's id) of every 110104 event."""
    database = node.database()
    try:
        with database.session() as session:
            documents = session.execute(
                select(AuditEvent.document).where(AuditEvent.event_id == "110104")
            ).scalars()
            return [
                participant["user_id"]
                for document in documents
                for participant in json.loads(document)["participants"]
                if participant["role"]["code"] == "110152"  # destination
            ]
    finally:
        database.dispose()


def _stored_instances(node: NodeProcess) -> int:
    database = node.database()
    try:
        with database.session() as session:
            return session.execute(select(func.count(Instance.id))).scalar_one()
    finally:
        database.dispose()


def test_associations_are_spread_over_receivers_and_nothing_is_lost(tmp_path: Path) -> None:
    require_tool("storescu")
    folders = []
    for sender in range(8):
        _write_series(tmp_path / f"sender{sender}", 25)
        folders.append(tmp_path / f"sender{sender}")
    with NodeProcess(tmp_path / "node", receiver_processes=2) as node:
        receivers = node.receiver_pids()
        assert len(receivers) == 2
        _send_concurrently(node.port, folders)
        pids = wait_for(lambda: (found := _receiving_pids(node)) and len(found) == 8 and found)
        assert _stored_instances(node) == 8 * 25
        # Every association was received in a receiver process, and both received some.
        assert set(pids) <= {str(pid) for pid in receivers}
        assert len(set(pids)) == 2, pids


def test_without_receiver_processes_the_node_process_receives(tmp_path: Path) -> None:
    require_tool("storescu")
    folder = tmp_path / "series"
    _write_series(folder, 5)
    with NodeProcess(tmp_path / "node", receiver_processes=0) as node:
        assert node.receiver_pids() == []
        _send_concurrently(node.port, [folder])
        pids = wait_for(lambda: _receiving_pids(node))
        assert pids == [str(node.process.pid)]  # type: ignore[union-attr]
        assert _stored_instances(node) == 5


def test_a_killed_receiver_is_audited_and_replaced_and_the_node_keeps_serving(tmp_path: Path) -> None:
    require_tool("storescu")
    with NodeProcess(tmp_path / "node", receiver_processes=2) as node:
        victim = node.receiver_pids()[0]
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(lambda: (pids := node.receiver_pids()) and len(pids) == 2 and victim not in pids)
        assert replaced

        database = node.database()
        try:
            with database.session() as session:
                documents = [
                    json.loads(document)
                    for document in session.execute(
                        select(AuditEvent.document).where(AuditEvent.event_id == "110100")
                    ).scalars()
                ]
        finally:
            database.dispose()
        restarts = [
            d for d in documents if d["event_type"] and d["event_type"]["meaning"] == RECEIVER_RESTARTED
        ]
        assert len(restarts) == 1
        assert restarts[0]["outcome"] == 8
        assert restarts[0]["detail"]["exit_code"] == -signal.SIGKILL

        folders = []
        for sender in range(4):
            _write_series(tmp_path / f"sender{sender}", 10)
            folders.append(tmp_path / f"sender{sender}")
        _send_concurrently(node.port, folders)
        wait_for(lambda: _stored_instances(node) == 40)


def test_a_replacement_receiver_finishes_its_associations_at_stop(tmp_path: Path) -> None:
    """A stop lets open associations finish, on a replacement receiver as on the first ones (the
    kernel kills a receiver whose starting thread ends: the monitor that starts replacements
    must outlive them)."""
    first, second = mr_series(2)
    with NodeProcess(tmp_path / "node", receiver_processes=1) as node:
        (victim,) = node.receiver_pids()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: (pids := node.receiver_pids()) and victim not in pids)
        wait_for(lambda: "starting a replacement" in node.current_log())
        ae = AE(ae_title="SCU")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        association = wait_for(
            lambda: (a := ae.associate("127.0.0.1", node.port, ae_title="BRAIN3D")).is_established and a
        )
        assert int(association.send_c_store(first).Status) == 0x0000
        stopping = threading.Thread(target=node.stop)
        stopping.start()
        time.sleep(2.0)  # stopping: the node accepts no new association, and drains this one
        assert int(association.send_c_store(second).Status) == 0x0000
        association.release()
        stopping.join()
        assert node.process is not None and node.process.returncode == 0
    assert _stored_instances(node) == 2


def test_receivers_die_with_a_killed_node(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", receiver_processes=2).start()
    receivers = node.receiver_pids()
    assert len(receivers) == 2
    node.kill()

    def gone(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state == "Z"  # killed, waiting to be reaped by init

    assert wait_for(lambda: all(gone(pid) for pid in receivers))
    # Nothing holds the port: a new node binds it at once.
    NodeProcess(tmp_path / "node", port=node.port, receiver_processes=2).start().stop()


def _store_in_another_process(root: Path, series_uid: str, done: Any) -> None:
    Spool(root).store("1.2.3", series_uid, "1.2.3.4.5", b"meta", b"dataset")
    done.set()


def test_the_series_lock_excludes_other_processes(tmp_path: Path) -> None:
    """Retention (node process) and a receiver's store (another process) never interleave."""
    spool = Spool(tmp_path / "spool")
    context = multiprocessing.get_context("spawn")
    done = context.Event()
    writer = context.Process(target=_store_in_another_process, args=(spool.root, "1.2.3.4", done))
    with spool._lock("1.2.3.4"):
        writer.start()
        assert not done.wait(3.0), "another process stored into a series whose lock is held"
    assert done.wait(30.0)
    writer.join(10)
    assert writer.exitcode == 0
    assert (spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm").read_bytes() == b"metadataset"
