"""Configuration: embedded defaults, a TOML file, environment overrides, and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker.cli import app

GOOD_TOML = """
[node]
ae_title = "NEURO_AI"
port = 11113
allowed_calling_aes = ["SCANNER1", "PACS"]

[database]
url = "postgresql+psycopg://postgres@127.0.0.1:5432/brain3d"

[completion]
stable_seconds = 4.5

[[destinations]]
host = "127.0.0.1"
port = 104
ae_title = "PACS"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BRAIN3D_* variable of the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("BRAIN3D_"):
            monkeypatch.delenv(name)


def show(*args: str) -> tuple[int, dict | None, str]:
    result = CliRunner().invoke(app, ["config", "show", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    shown = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, shown, result.stderr


def test_embedded_defaults_need_no_services() -> None:
    code, shown, _ = show()
    assert code == 0 and shown is not None
    assert (shown["node"]["ae_title"], shown["node"]["port"]) == ("BRAIN3D", 11112)
    assert shown["database"]["url"].startswith("sqlite:///var/")
    assert shown["queue"]["broker_url"].startswith("sqla+sqlite:///var/")
    assert shown["storage"]["spool_dir"] == "var/spool"
    assert shown["destinations"] == []


def test_toml_file_given_by_option_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text(GOOD_TOML)
    code, shown, _ = show("--config", str(config))
    assert code == 0 and shown is not None
    assert shown["node"]["ae_title"] == "NEURO_AI"
    assert shown["node"]["allowed_calling_aes"] == ["SCANNER1", "PACS"]
    assert shown["completion"]["stable_seconds"] == 4.5
    assert shown["destinations"] == [{"host": "127.0.0.1", "port": 104, "ae_title": "PACS", "name": ""}]

    monkeypatch.setenv("BRAIN3D_CONFIG", str(config))
    assert show()[1] == shown


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text(GOOD_TOML)
    monkeypatch.setenv("BRAIN3D_NODE__PORT", "4242")
    monkeypatch.setenv("BRAIN3D_NODE__ALLOWED_CALLING_AES", '["ONLY_ME"]')
    monkeypatch.setenv(
        "BRAIN3D_DESTINATIONS",
        '[{"host": "127.0.0.1", "port": 4242, "ae_title": "ORTHANC"},'
        ' {"host": "127.0.0.1", "port": 4343, "ae_title": "ARCHIVE", "name": "archive"}]',
    )
    code, shown, _ = show("--config", str(config))
    assert code == 0 and shown is not None
    assert shown["node"]["port"] == 4242
    assert shown["node"]["ae_title"] == "NEURO_AI"  # untouched keys still come from the file
    assert shown["node"]["allowed_calling_aes"] == ["ONLY_ME"]
    assert [d["ae_title"] for d in shown["destinations"]] == ["ORTHANC", "ARCHIVE"]
    assert shown["destinations"][1]["name"] == "archive"


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRAIN3D_DATABASE__AUDIT_KEY", "a secret that must never be printed")
    monkeypatch.setenv("BRAIN3D_DATABASE__URL", "postgresql+psycopg://brain3d:S3cretPw@db:5432/brain3d")
    monkeypatch.setenv("BRAIN3D_QUEUE__BROKER_URL", "redis://:R3disPw@redis:6379/0")
    monkeypatch.setenv("BRAIN3D_QUEUE__RESULT_BACKEND", "redis://redis:6379/1?password=Qu3ryPw&db=1")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0
    secrets = ("must never be printed", "S3cretPw", "R3disPw", "Qu3ryPw")
    assert not any(secret in result.output for secret in secrets)
    shown = json.loads(result.stdout)
    assert shown["database"]["audit_key"] == "***"
    assert shown["database"]["url"] == "postgresql+psycopg://brain3d:***@db:5432/brain3d"
    assert shown["queue"]["broker_url"] == "redis://:***@redis:6379/0"


@pytest.mark.parametrize(
    ("toml", "environment", "expected"),
    [
        ("[node]\nport = 70000\n", {}, "'node.port'"),
        ("", {"BRAIN3D_NODE__PORT": "eleven"}, "'node.port'"),
        ("[node]\ncolour = 'blue'\n", {}, "'node.colour'"),
        ("[node]\nae_title = 'AN_AE_TITLE_TOO_LONG'\n", {}, "'node.ae_title'"),
        ("[node]\nallowed_calling_aes = ['MODALITY', 'BAD\\\\AE']\n", {}, "'node.allowed_calling_aes.1'"),
        (
            "[[destinations]]\nhost = 'h'\nport = 104\nae_title = 'PACS\u00dc'\n",
            {},
            "'destinations.0.ae_title'",
        ),
        ("[storage]\nretention_hours = inf\n", {}, "'storage.retention_hours'"),
        ("[model]\ndevice = 'gpu'\n", {}, "'model.device'"),
        ("[worker]\nsoft_time_limit_s = 900\nhard_time_limit_s = 600\n", {}, "hard_time_limit_s must exceed"),
        ("[worker]\nheartbeat_s = 60\n", {}, "stale_after_s must exceed heartbeat_s"),
        ("[[destinations]]\nhost = '127.0.0.1'\nport = 104\n", {}, "'destinations.0.ae_title'"),
        ("", {"BRAIN3D_DESTINATIONS": '[{"host": "127.0.0.1"'}, "destinations"),
        ("[completion]\nstable_seconds = -1\n", {}, "'completion.stable_seconds'"),
        ("[node\n", {}, "not valid TOML"),
    ],
)
def test_bad_configuration_is_one_line_naming_the_key_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, environment: dict[str, str], expected: str
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(toml)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    code, shown, err = show("--config", str(config))
    assert code == 2 and shown is None
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err


def test_missing_configuration_file_is_named(tmp_path: Path) -> None:
    code, _, err = show("--config", str(tmp_path / "absent.toml"))
    assert code == 2
    assert err.strip() == f"error: configuration file {tmp_path / 'absent.toml'} does not exist"


def _events(database_url: str) -> list[dict]:
    from dicom_node.db import AuditEvent, Database

    database = Database(database_url)
    with database.session() as session:
        documents = [json.loads(row.document) for row in session.query(AuditEvent).order_by(AuditEvent.id)]
    database.dispose()
    return documents


@pytest.mark.parametrize("service", ["serve", "worker"])
def test_a_service_refused_for_its_configuration_is_audited_in_the_database_it_names(
    tmp_path: Path, database_url: str, service: str
) -> None:
    from dicom_node.audit import load_audit_key
    from dicom_node.db.migrate import upgrade

    upgrade(database_url)
    load_audit_key(None, tmp_path / "audit.key")
    config = tmp_path / "node.toml"
    config.write_text(
        f'[database]\nurl = "{database_url}"\naudit_key_file = "{tmp_path / "audit.key"}"\n\n'
        "[worker]\nmax_attempts = 0\n"
    )
    result = CliRunner().invoke(app, [service, "--config", str(config)])
    assert result.exit_code == 2
    error, where = result.stderr.strip().splitlines()
    assert error.startswith("error: configuration key 'worker.max_attempts'")
    assert where.startswith("the refused start is recorded in the audit trail of ")
    (event,) = _events(database_url)
    assert event["event_id"]["code"] == "110100" and event["event_type"]["code"] == "110120"
    assert event["outcome"] == 8
    assert event["detail"]["service"] == service and "worker.max_attempts" in event["detail"]["refused"]
    assert event["detail"]["config_file"] == str(config)
    good = tmp_path / "good.toml"
    good.write_text(f'[database]\nurl = "{database_url}"\naudit_key_file = "{tmp_path / "audit.key"}"\n')
    verified = CliRunner().invoke(app, ["audit", "verify", "--config", str(good)])
    assert verified.exit_code == 0, verified.output


def test_a_refused_start_creates_nothing_and_says_why_it_was_not_audited(
    tmp_path: Path, postgres_url: str
) -> None:
    """No database, key or folder comes into being for a start that is refused; each reason is named."""
    from dicom_node.db.migrate import upgrade

    key = tmp_path / "audit.key"
    never = tmp_path / "never.db"
    migrated = f"sqlite:///{tmp_path / 'migrated.db'}"
    upgrade(migrated)
    cases = {
        f'url = "sqlite:///{never}"\naudit_key_file = "{key}"': f"database sqlite:///{never} does not exist",
        f'url = "{postgres_url}"\naudit_key_file = "{key}"': "is not initialised",
        f'url = "{migrated}"\naudit_key_file = "{key}"': f"audit key file {key} does not exist",
        f'url = "{migrated}"\naudit_key_file = "{tmp_path / "absent" / "audit.key"}"': "audit folder",
        f'url = "postgresql://user:secret@host:port/db"\naudit_key_file = "{key}"': "not a database URL",
        f'url = "user:secret@host/db"\naudit_key_file = "{key}"': "not a database URL",
    }
    for database, expected in cases.items():
        config = tmp_path / "node.toml"
        config.write_text(f"[database]\n{database}\n\n[node]\nport = 70000\n")
        result = CliRunner().invoke(app, ["serve", "--config", str(config)])
        assert result.exit_code == 2
        _, where = result.stderr.strip().splitlines()
        assert where.startswith("not audited: ") and expected in where, where
        assert "secret" not in result.stderr
    assert not never.exists() and not key.exists() and not (tmp_path / "absent").exists()


def test_a_refused_start_with_an_unreadable_database_section_says_so(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[database]\nurl = 5432\n")
    result = CliRunner().invoke(app, ["worker", "--config", str(config)])
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        .splitlines()[1]
        .startswith(
            "not audited: the database section cannot be read either (configuration key 'database.url'"
        )
    )
