"""The node's commands on the ``brain3d`` command line: serve, db, audit, config.

Each package registers its own commands (``register``); ``worker.cli`` assembles
the one ``brain3d`` application, and hands ``inference`` the node's series writer for
``synth --format dicom`` (``inference`` imports nothing of ours).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dicom_node.config import CONFIG_ENV, ConfigError, Settings, load_database_section, load_settings

if TYPE_CHECKING:
    from dicom_node.audit import AuditTrail
    from dicom_node.db import Database

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (else $BRAIN3D_CONFIG, else defaults)."),
]


def settings_or_exit(config: Path | None) -> Settings:
    """The effective settings, or one clear line and exit status 2."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def service_settings_or_exit(config: Path | None, service: str) -> Settings:
    """:func:`settings_or_exit` for a long-running service (``serve``, ``worker``): a refused start
    is also recorded in the audit trail of the database the configuration names, so an admin
    finds it there and not only in a terminal."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        typer.echo(_audit_refused_start(config, service, str(exc)), err=True)
        raise typer.Exit(2) from None


def _audit_refused_start(config: Path | None, service: str, reason: str) -> str:
    """Record the refusal (110100 / 110120, serious failure) where the ``database`` section can be
    read and names a migrated database, its audit key and the folder of its head file: a refused
    start creates no database, key or folder. Returns the line saying where it went, or why nowhere."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from dicom_node.audit import AuditKeyError, AuditTrail, EventTypeCode, Outcome
    from dicom_node.db import Database, migrate

    try:
        section = load_database_section(config)
    except ConfigError as exc:
        return f"not audited: the database section cannot be read either ({exc})"
    head_folder = Path(section.audit_key_file).parent
    if not head_folder.is_dir():
        return f"not audited: the audit folder {head_folder} does not exist"
    try:
        url = make_url(section.url)
    except (SQLAlchemyError, ValueError):  # their messages may quote the URL, password and all
        return "not audited: database.url is not a database URL"
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).is_file()):
        return f"not audited: database {shown} does not exist"
    try:
        if migrate.current_revision(section.url) is None:
            return f"not audited: database {shown} is not initialised"
        database = Database(section.url)
        try:
            AuditTrail.for_database(section, database, create_key=False).record_service_activity(
                service,
                EventTypeCode.APPLICATION_START,
                Outcome.SERIOUS_FAILURE,
                detail={
                    "refused": reason,
                    "config_file": str(config or os.environ.get(CONFIG_ENV) or "") or None,
                },
            )
        finally:
            database.dispose()
    except AuditKeyError as exc:
        return f"not audited: {exc}"
    except (SQLAlchemyError, ImportError, OSError) as exc:  # messages may name hosts and users
        return f"not audited: database {shown} could not be written ({type(exc).__name__})"
    return f"the refused start is recorded in the audit trail of {shown}"


config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration as JSON (secrets masked: the audit key, and the
    passwords in the database and broker URLs)."""
    settings = settings_or_exit(config)
    data = settings.model_dump(mode="json")
    if data["database"].get("audit_key"):
        data["database"]["audit_key"] = "***"
    data["database"]["url"] = _without_password(data["database"]["url"])
    for key in ("broker_url", "result_backend"):
        data["queue"][key] = _without_password(data["queue"][key])
    typer.echo(json.dumps(data, indent=2))


#: Query parameters of a URL that hold a secret (``?password=``), by a word in their name.
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "key")


def _without_password(url: str) -> str:
    """``url`` (a database or broker URL) with its password, if any, shown as ``***``: in its
    user part or as a query parameter (``?password=...``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not a URL: it may still hold a password
        return "***"
    secrets = {key: "***" for key in parsed.query if any(word in key.lower() for word in _SECRET_WORDS)}
    return parsed.update_query_dict(secrets).render_as_string(hide_password=True)


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]
LimitOption = Annotated[
    int, typer.Option("--limit", "-n", min=1, help="Show at most this many rows, newest first.")
]

db_app = typer.Typer(help="Create and migrate the node's SQL database.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOption = None,
    revision: Annotated[str, typer.Option(help="Alembic revision to reach.")] = "head",
) -> None:
    """Apply the migrations to the configured database (safe to repeat)."""
    from dicom_node.db import migrate

    settings = settings_or_exit(config)
    migrate.upgrade(settings.database.url, revision)
    _echo_revision(settings)


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Option(help="Alembic revision to return to; 'base' drops every table.")],
    config: ConfigOption = None,
) -> None:
    """Undo migrations down to REVISION (for development and tests)."""
    from dicom_node.db import migrate

    settings = settings_or_exit(config)
    migrate.downgrade(settings.database.url, revision)
    _echo_revision(settings)


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Print the database's revision and the newest one available."""
    from dicom_node.db import migrate

    settings = settings_or_exit(config)
    typer.echo(f"current: {migrate.current_revision(settings.database.url) or 'none'}")
    typer.echo(f"head:    {migrate.head_revision()}")


def _echo_revision(settings: Settings) -> None:
    from dicom_node.db import migrate

    revision = migrate.current_revision(settings.database.url) or "none"
    typer.echo(f"database {_shown_url(settings)} at revision {revision}")


def _shown_url(settings: Settings) -> str:
    return _without_password(settings.database.url)


def migrated_database_or_exit(settings: Settings) -> Database:
    """The configured database, or one line and exit 2 when it is not at this code's revision."""
    from dicom_node.db import Database, migrate

    current = migrate.current_revision(settings.database.url)
    if current is None:
        typer.echo(
            f"error: database {_shown_url(settings)} is not initialised: run 'brain3d db upgrade'", err=True
        )
        raise typer.Exit(2)
    if current != migrate.head_revision():
        typer.echo(
            f"error: database {_shown_url(settings)} is at revision {current}, this code needs "
            f"{migrate.head_revision()}: run 'brain3d db upgrade'",
            err=True,
        )
        raise typer.Exit(2)
    return Database(settings.database.url)


def _audit_trail_or_exit(settings: Settings, database: Database) -> AuditTrail:
    from dicom_node.audit import AuditKeyError, AuditTrail

    try:
        return AuditTrail.from_settings(settings, database, create_key=False)
    except AuditKeyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _record_audit_log_used(trail: AuditTrail, command: str, detail: dict[str, object]) -> None:
    """PS3.15 asks that reading the audit trail is itself audited (110101 Audit Log Used)."""
    import getpass

    from dicom_node.audit import Action, EventID, Outcome, Participant, Role

    trail.record(
        EventID.AUDIT_LOG_USED,
        Outcome.SUCCESS,
        action=Action.READ,
        participants=[Participant(Role.APPLICATION_LAUNCHER, user_id=getpass.getuser(), requestor=True)],
        detail={"command": command, **detail},
    )


audit_app = typer.Typer(
    help="Inspect what the node did: series, jobs, audit events; verify the chain.", no_args_is_help=True
)


@audit_app.command("series")
def audit_series(config: ConfigOption = None, as_json: JsonOption = False, limit: LimitOption = 100) -> None:
    """Series received: completeness, routing decision and instance count."""
    from dicom_node import admin

    database = migrated_database_or_exit(settings_or_exit(config))
    with database.session() as session:
        rows = admin.series_overview(session, limit=limit)
    database.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    columns = [
        ("series_instance_uid", "series"),
        ("modality", "mod"),
        ("series_description", "description"),
        ("state", "state"),
        ("instances", "inst"),
        ("expected_instances", "expected"),
        ("completion_reason", "completed by"),
        ("eligible", "eligible"),
        ("routing_reason", "reason"),
        ("last_received_at", "last received (UTC)"),
    ]
    typer.echo(admin.render_table(rows, columns))


@audit_app.command("jobs")
def audit_jobs(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    limit: LimitOption = 100,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
) -> None:
    """Jobs: state, attempts, error reason and how long each step took."""
    from dicom_node import admin

    database = migrated_database_or_exit(settings_or_exit(config))
    with database.session() as session:
        rows = admin.jobs_overview(session, state=state, limit=limit)
    database.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    flat = [row | {f"{name}_s": value for name, value in row["durations_s"].items()} for row in rows]
    columns = [
        ("id", "job"),
        ("series_instance_uid", "series"),
        ("state", "state"),
        ("attempts", "tries"),
        *[(f"{name}_s", f"{name} s") for name, _, _ in admin.JOB_STEPS],
        ("total_s", "total s"),
        ("error_reason", "error"),
    ]
    typer.echo(admin.render_table(flat, columns))


@audit_app.command("events")
def audit_events(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    limit: LimitOption = 100,
    event_id: Annotated[str | None, typer.Option("--event-id", help="DCM code, e.g. 110104.")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    series: Annotated[str | None, typer.Option("--series", help="Series Instance UID.")] = None,
    job: Annotated[int | None, typer.Option("--job", help="Job id.")] = None,
) -> None:
    """Audit events (PS3.15 A.5 vocabulary), newest first."""
    from dicom_node import admin

    settings = settings_or_exit(config)
    database = migrated_database_or_exit(settings)
    trail = _audit_trail_or_exit(settings, database)
    with database.session() as session:
        rows = admin.audit_events(
            session, event_id=event_id, study_uid=study, series_uid=series, job_id=job, limit=limit
        )
    filters = {"event_id": event_id, "study": study, "series": series, "job": job}
    _record_audit_log_used(trail, "events", {"filters": {k: v for k, v in filters.items() if v is not None}})
    database.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["summary"] = admin.summarise_event(row)
    columns = [
        ("id", "id"),
        ("recorded_at", "time (UTC)"),
        ("event_id", "event"),
        ("outcome", "outcome"),
        ("series_instance_uid", "series"),
        ("job_id", "job"),
        ("summary", "what"),
    ]
    typer.echo(admin.render_table(rows, columns, width=100))


@audit_app.command("verify")
def audit_verify(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Check the audit chain: exit 0 when intact, 1 naming the first broken row."""
    settings = settings_or_exit(config)
    database = migrated_database_or_exit(settings)
    trail = _audit_trail_or_exit(settings, database)
    report = trail.verify()
    try:
        _record_audit_log_used(trail, "verify", {"ok": report.ok, "rows_checked": report.rows_checked})
    except Exception as exc:  # the report still goes out: it is what the operator needs now
        typer.echo(f"warning: this verification could not be audited ({type(exc).__name__})", err=True)
    database.dispose()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        head = report.head
        where = f"; head sequence {head.sequence} (row {head.row_id}) {head.chain_hash}" if head else ""
        typer.echo(f"audit trail intact: {report.rows_checked} events checked{where}")
    else:
        first = report.problems[0]
        more = len(report.problems) - 1
        typer.echo(f"audit trail BROKEN: {first.message}" + (f" (and {more} more problems)" if more else ""))
    for note in report.notes if not as_json else []:
        typer.echo(f"note: {note}", err=True)
    if not report.ok:
        raise typer.Exit(1)


def serve(config: ConfigOption = None) -> None:
    """Run the node: Storage SCP, completeness, routing, hand-off (until SIGTERM/SIGINT)."""
    from dicom_node.server import serve as run_node  # heavy imports only for this command

    run_node(service_settings_or_exit(config, "serve"))


def register(app: typer.Typer) -> None:
    """Add the node's commands to the ``brain3d`` application."""
    app.command("serve")(serve)
    app.add_typer(config_app, name="config")
    app.add_typer(db_app, name="db")
    app.add_typer(audit_app, name="audit")
