"""``brain3d db`` and ``brain3d audit ...`` driven through the real command line on both databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node.audit import AuditTrail, EventID, Outcome, Participant, Role
from dicom_node.config import load_settings
from dicom_node.db import Database, Instance, Job, JobState, Series, Study
from dicom_node.db.migrate import head_revision
from worker.cli import app

T0 = datetime(2026, 3, 2, 8, 0, 0, tzinfo=UTC)


@pytest.fixture
def node_env(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of an admin shell pointing the CLI at this test's database and key file."""
    env = {
        "BRAIN3D_DATABASE__URL": database_url,
        "BRAIN3D_DATABASE__AUDIT_KEY_FILE": str(tmp_path / "secrets" / "audit.key"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("BRAIN3D_CONFIG", raising=False)
    return env


def brain3d(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def database(node_env: dict[str, str]) -> Iterator[Database]:
    code, out, _ = brain3d("db", "upgrade")
    assert code == 0 and f"at revision {head_revision()}" in out
    handle = Database(node_env["BRAIN3D_DATABASE__URL"])
    yield handle
    handle.dispose()


def _record_events(database: Database) -> AuditTrail:
    trail = AuditTrail.from_settings(load_settings(), database)
    trail.record(
        EventID.DICOM_INSTANCES_TRANSFERRED,
        Outcome.SUCCESS,
        action="C",
        participants=[
            Participant(Role.SOURCE, ae_title="SCANNER1", network_address="127.0.0.1", requestor=True),
            Participant(Role.DESTINATION, ae_title="BRAIN3D", network_address="127.0.0.1"),
        ],
        study_uid="1.2.826.1",
        series_uid="1.2.826.1.1",
        detail={"instances_stored": 24},
    )
    trail.record(EventID.SECURITY_ALERT, Outcome.MINOR_FAILURE, detail={"calling_ae": "INTRUDER"})
    trail.record(EventID.EXPORT, Outcome.SUCCESS, action="R", series_uid="1.2.826.1.1", job_id=1)
    return trail


def _tamper(database: Database, statement: str) -> None:
    with database.engine.begin() as connection:
        if database.is_sqlite:
            connection.exec_driver_sql("DROP TRIGGER audit_events_no_update")
            connection.exec_driver_sql("DROP TRIGGER audit_events_no_delete")
        else:
            connection.exec_driver_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
        connection.exec_driver_sql(statement)


def test_verify_passes_untouched(database: Database) -> None:
    _record_events(database)
    code, out, _ = brain3d("audit", "verify")
    assert code == 0, out
    assert out.startswith("audit trail intact: 3 events checked")
    code, out, _ = brain3d("audit", "verify", "--json")  # the first verify was itself audited (110101)
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["rows_checked"] == 4


def test_verify_fails_after_one_row_is_edited(database: Database) -> None:
    _record_events(database)
    _tamper(
        database, "UPDATE audit_events SET document = REPLACE(document, 'INTRUDER', 'FRIEND') WHERE id = 2"
    )
    code, out, _ = brain3d("audit", "verify")
    assert code == 1
    assert out.startswith("audit trail BROKEN: row 2: HMAC does not match its content")
    code, out, _ = brain3d("audit", "verify", "--json")
    report = json.loads(out)
    assert code == 1 and report["problems"][0]["kind"] == "edited" and report["problems"][0]["row_id"] == 2


def test_verify_fails_after_the_last_row_is_deleted(database: Database) -> None:
    _record_events(database)
    _tamper(database, "DELETE FROM audit_events WHERE id = (SELECT MAX(id) FROM audit_events)")
    code, out, _ = brain3d("audit", "verify")
    assert code == 1
    assert "the tail was cut off" in out and "head file records sequence 3" in out


def test_verify_without_the_key_is_a_configuration_error(
    database: Database, node_env: dict[str, str]
) -> None:
    _record_events(database)
    Path(node_env["BRAIN3D_DATABASE__AUDIT_KEY_FILE"]).unlink()
    code, _, err = brain3d("audit", "verify")
    assert code == 2
    assert err.strip().endswith("does not exist (database.audit_key_file)")
    assert not Path(node_env["BRAIN3D_DATABASE__AUDIT_KEY_FILE"]).exists()  # verify never invents a key


def test_events_filters_and_newest_first(database: Database) -> None:
    _record_events(database)
    code, out, _ = brain3d("audit", "events", "--json")
    assert code == 0
    assert [event["event_id"] for event in json.loads(out)] == ["110106", "110113", "110104"]

    _, out, _ = brain3d("audit", "events", "--json", "--event-id", "110104")
    (transfer,) = json.loads(out)
    assert transfer["document"]["participants"][0]["ae_title"] == "SCANNER1"
    assert transfer["recorded_at"].endswith("Z")

    _, out, _ = brain3d("audit", "events", "--json", "--series", "1.2.826.1.1")
    assert {event["event_id"] for event in json.loads(out)} == {"110104", "110106"}
    _, out, _ = brain3d("audit", "events", "--json", "--job", "1")
    assert [event["event_id"] for event in json.loads(out)] == ["110106"]
    _, out, _ = brain3d("audit", "events", "--json", "--limit", "1", "--event-id", "110101")
    (used,) = json.loads(out)  # each listing is itself an Audit Log Used event
    assert used["document"]["detail"]["filters"] == {"job": 1}

    code, out, _ = brain3d("audit", "events", "--study", "1.2.826.1")
    assert code == 0
    assert "DICOM Instances Transferred; source=SCANNER1 destination=BRAIN3D" in out
    assert "Security Alert" not in out


def _seed_series_and_job(database: Database) -> None:
    with database.session() as session:
        study = Study(study_instance_uid="1.2.826.1")
        flair = Series(
            series_instance_uid="1.2.826.1.1",
            study=study,
            modality="MR",
            series_description="AX FLAIR",
            expected_instances=2,
            completion_reason="count",
            eligible=True,
            routing_reason="FLAIR: TI 2500 ms, TE 120 ms, TR 9000 ms",
            last_received_at=T0,
        )
        localizer = Series(
            series_instance_uid="1.2.826.1.2",
            study=study,
            modality="MR",
            series_description="LOC",
            eligible=False,
            routing_reason="localizer",
            last_received_at=T0 - timedelta(minutes=1),
        )
        session.add_all([study, flair, localizer])
        for index, digest in enumerate(["a" * 64, "b" * 64, "c" * 64]):
            uid = f"1.2.826.1.1.{min(index, 1)}"  # the third row is different content under a known UID
            session.add(
                Instance(
                    sop_instance_uid=uid,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    series=flair,
                    path=f"/spool/{uid}.dcm",
                    size_bytes=1000,
                    sha256=digest,
                    conflicting=index > 0,
                )
            )
        session.add(
            Job(
                series=flair,
                state=JobState.FAILED,
                attempts=3,
                error_reason="delivery: association rejected by PACS",
                last_instance_received_at=T0,
                series_complete_at=T0 + timedelta(seconds=0.25),
                queued_at=T0 + timedelta(seconds=0.3),
                conversion_started_at=T0 + timedelta(seconds=0.5),
                conversion_finished_at=T0 + timedelta(seconds=3),
                inference_started_at=T0 + timedelta(seconds=3.1),
                inference_finished_at=T0 + timedelta(seconds=10.1),
                sr_built_at=T0 + timedelta(seconds=10.6),
                finished_at=T0 + timedelta(seconds=12),
            )
        )


def test_series_and_jobs_show_state_and_step_durations(database: Database) -> None:
    _seed_series_and_job(database)
    code, out, _ = brain3d("audit", "series", "--json")
    assert code == 0
    flair, localizer = json.loads(out)
    assert (flair["series_instance_uid"], flair["instances"], flair["expected_instances"]) == (
        "1.2.826.1.1",
        2,
        2,
    )
    assert flair["eligible"] is True and flair["completion_reason"] == "count"
    assert (localizer["eligible"], localizer["routing_reason"], localizer["instances"]) == (
        False,
        "localizer",
        0,
    )

    code, out, _ = brain3d("audit", "jobs", "--json")
    (job,) = json.loads(out)
    assert (job["state"], job["attempts"]) == ("failed", 3)
    assert job["error_reason"] == "delivery: association rejected by PACS"
    assert job["durations_s"] == {
        "completion": 0.25,
        "queue_wait": 0.2,
        "conversion": 2.5,
        "inference": 7.0,
        "sr_build": 0.5,
        "delivery": None,
        "total": 12.0,
    }
    assert job["timestamps"]["conversion_started_at"] == "2026-03-02T08:00:00.500000Z"

    _, out, _ = brain3d("audit", "jobs", "--json", "--state", "succeeded")
    assert json.loads(out) == []
    code, out, _ = brain3d("audit", "jobs")
    assert code == 0
    header, _, row = out.splitlines()
    assert header.split()[:4] == ["job", "series", "state", "tries"]
    assert row.split()[:9] == ["1", "1.2.826.1.1", "failed", "3", "0.25", "0.2", "2.5", "7.0", "0.5"]


def test_commands_on_an_uninitialised_database_say_so(node_env: dict[str, str]) -> None:
    for command in ("series", "jobs", "events", "verify"):
        code, _, err = brain3d("audit", command)
        assert code == 2
        assert "is not initialised: run 'brain3d db upgrade'" in err


def test_db_downgrade_to_base_and_current(database: Database) -> None:
    code, out, _ = brain3d("db", "current")
    head = head_revision()
    assert code == 0 and out.split() == ["current:", head, "head:", head]
    # Code newer than its database (updated, not yet upgraded): a clear refusal, not a traceback.
    code, _, _ = brain3d("db", "downgrade", "--revision", "0001")
    assert code == 0
    code, _, err = brain3d("audit", "jobs")
    assert code == 2 and f"is at revision 0001, this code needs {head}: run 'brain3d db upgrade'" in err
    code, out, _ = brain3d("db", "downgrade", "--revision", "base")
    assert code == 0 and out.strip().endswith("at revision none")
    code, _, _ = brain3d("audit", "verify")
    assert code == 2


def test_installed_console_script_exit_statuses(database: Database, node_env: dict[str, str]) -> None:
    """The ``brain3d`` executable itself, as an admin or a monitoring check would run it."""
    _record_events(database)
    executable = Path(sys.executable).with_name("brain3d")
    environment = os.environ | node_env
    intact = subprocess.run([executable, "audit", "verify"], env=environment, capture_output=True, text=True)
    assert intact.returncode == 0, intact.stderr
    _tamper(database, "UPDATE audit_events SET outcome = 0 WHERE id = 2")
    broken = subprocess.run([executable, "audit", "verify"], env=environment, capture_output=True, text=True)
    assert broken.returncode == 1
    assert "row 2: outcome differs from its document" in broken.stdout
