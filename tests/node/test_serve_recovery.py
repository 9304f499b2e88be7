"""Crashes, restarts and late instances: nothing acknowledged is lost, nothing is dropped silently."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
from conftest import require_tool
from pacs import mr_series
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.dsutils import encode
from serve_harness import NodeProcess, dataset_bytes, storescu, wait_for, write_study
from sqlalchemy import select

from dicom_node.acquisition import FLAIR_2D
from dicom_node.db import Database
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import Instance, Job, Series, SeriesState, Study

pytestmark = [pytest.mark.slow]


def _series_row(node: NodeProcess, series_uid: str) -> Series | None:
    database = node.database()
    try:
        with database.session() as session:
            return session.execute(
                select(Series).where(Series.series_instance_uid == series_uid)
            ).scalar_one_or_none()
    finally:
        database.dispose()


def _jobs(node: NodeProcess) -> list[Job]:
    database = node.database()
    try:
        with database.session() as session:
            return list(session.execute(select(Job).order_by(Job.id)).scalars())
    finally:
        database.dispose()


def test_a_node_restarted_while_the_broker_is_down_still_receives(tmp_path: Path) -> None:
    """A job committed but never handed to the broker is sent at start; with the broker down too,
    it waits in SQL for the reconciler, and the node starts and stores rather than exiting."""
    database_url = f"sqlite:///{tmp_path / 'brain3d.db'}"
    upgrade(database_url)
    database = Database(database_url)
    with database.session() as session:
        study = Study(study_instance_uid="1.2.826.0.1.5")
        series = Series(series_instance_uid="1.2.826.0.1.5.1", study=study, modality="MR")
        session.add_all([study, series, Job(series=series)])  # queued, never sent
    node = NodeProcess(tmp_path / "node", database_url=database_url, broker_url="redis://127.0.0.1:1/0")
    with node:
        assert "left to the workers' reconciler" in node.current_log()
        dataset = mr_series(1)[0]
        ae = AE(ae_title="SCU")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        association = ae.associate("127.0.0.1", node.port, ae_title="BRAIN3D")
        assert int(association.send_c_store(dataset).Status) == 0x0000
        association.release()
    with database.session() as session:
        assert session.execute(select(Job.queued_at)).scalar_one() is None, "still waiting in SQL"
        assert session.execute(select(Instance.sop_instance_uid)).scalar_one() == dataset.SOPInstanceUID
    database.dispose()


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    datasets = mr_series(600)
    acknowledged: list[str] = []
    node = NodeProcess(tmp_path / "node", stable_seconds=60).start()

    def send() -> None:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        association = ae.associate("127.0.0.1", node.port, ae_title="BRAIN3D")
        for dataset in datasets:
            status = association.send_c_store(dataset)
            if not association.is_established or "Status" not in status:
                return
            if status.Status == 0x0000:
                acknowledged.append(str(dataset.SOPInstanceUID))
        association.release()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_for(lambda: len(acknowledged) >= 100, timeout_s=60, interval_s=0.01)
    finally:
        node.kill()
    sender.join(30)
    assert 100 <= len(acknowledged) < len(datasets), "the kill must land mid-transfer"

    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    database = node.database()
    with database.session() as session:
        rows = {row.sop_instance_uid: row for row in session.execute(select(Instance)).scalars()}
    database.dispose()
    for uid in acknowledged:
        assert uid in rows, f"acknowledged {uid} missing from SQL"
        spooled = Path(rows[uid].path)
        assert spooled.is_file(), f"acknowledged {uid} missing from the spool"
        assert dataset_bytes(spooled) == encode(by_uid[uid], False, True), f"{uid} bytes differ"

    # The node comes back on the same spool and database, and takes the rest.
    with node:
        assert not any((node.spool_dir / ".incoming").iterdir())


def test_restart_rebuilds_open_series_and_their_timers(tmp_path: Path) -> None:
    require_tool("storescu")
    study = write_study(tmp_path / "study", presets=[("flair", FLAIR_2D)])
    flair = study["flair"]
    untimed = mr_series(3)  # no count in its headers: completes on the stable timer
    untimed_paths = []
    for index, dataset in enumerate(untimed):
        untimed_paths.append(tmp_path / f"untimed{index}.dcm")
        dataset.save_as(untimed_paths[-1], enforce_file_format=True)

    # Longer than the kill and restart take, so the flair series can only complete by its count.
    node = NodeProcess(tmp_path / "node", stable_seconds=20).start()
    storescu(node.port, flair.paths[:6])
    storescu(node.port, untimed_paths)
    node.kill()
    assert _series_row(node, flair.series_uid).state == SeriesState.RECEIVING

    with node:
        assert "rebuilt 2 open series" in node.current_log()
        storescu(node.port, flair.paths[6:])
        row = wait_for(
            lambda: (r := _series_row(node, flair.series_uid)) and r.state == SeriesState.COMPLETE and r, 10
        )
        assert row.completion_reason == "count", "the distinct count survived the restart"
        assert [job.series_id for job in _jobs(node)] == [row.id]
        timed = wait_for(
            lambda: (
                (r := _series_row(node, str(untimed[0].SeriesInstanceUID)))
                and r.state == SeriesState.COMPLETE
                and r
            ),
            40,
        )
        assert timed.completion_reason == "stable"


def test_new_content_after_hand_off_reopens_the_series(tmp_path: Path) -> None:
    require_tool("storescu")
    study = write_study(tmp_path / "study", presets=[("flair", FLAIR_2D)])
    flair = study["flair"]
    corrected = copy.deepcopy(flair.datasets[5])
    corrected.ImageComments = "re-reconstructed"
    corrected_path = tmp_path / "corrected.dcm"
    corrected.save_as(corrected_path, enforce_file_format=True)

    with NodeProcess(tmp_path / "node", stable_seconds=1.5) as node:
        storescu(node.port, flair.paths)
        first = wait_for(lambda: _jobs(node), 10)
        assert [job.series_generation for job in first] == [0]

        storescu(node.port, flair.paths[:3])  # identical re-send: nothing new
        time.sleep(2.5)
        assert _series_row(node, flair.series_uid).generation == 0
        assert len(_jobs(node)) == 1

        sent_at = time.monotonic()
        storescu(node.port, [corrected_path])
        jobs = wait_for(lambda: (jobs := _jobs(node)) and len(jobs) == 2 and jobs, 10)
        waited = time.monotonic() - sent_at
        row = _series_row(node, flair.series_uid)
        assert row.generation == 1 and row.state == SeriesState.COMPLETE
        assert row.completion_reason == "stable", "a re-opened series waits for the re-send to settle"
        assert [job.series_generation for job in jobs] == [0, 1]
        assert waited >= 1.5
