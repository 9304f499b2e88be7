"""The worker's commands on ``brain3d``: ``worker``, ``jobs retry`` and ``jobs reconcile``."""

from __future__ import annotations

import os
import socket
from typing import Annotated

import typer
from sqlalchemy import update

from dicom_node.audit import Action, EventID, EventTypeCode, Outcome
from dicom_node.cli import ConfigOption, service_settings_or_exit, settings_or_exit
from dicom_node.config import CONFIG_ENV
from dicom_node.db import Job, JobState
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import utcnow
from dicom_node.sr.validate import VALIDATOR_PACKAGES, VALIDATORS, available_validators
from worker.app import CPU_QUEUE, GPU_QUEUE, create_app, send_run_job
from worker.jobs import JobBook
from worker.reconciler import Reconciler, reconcile_once
from worker.runtime import configure

jobs_app = typer.Typer(help="Act on jobs: retry a failed one, re-enqueue what the broker lost.")


def worker(
    config: ConfigOption = None,
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues to consume.")
    ] = f"{CPU_QUEUE},{GPU_QUEUE}",
    concurrency: Annotated[int, typer.Option(help="Prefork child processes.")] = 1,
    allow_demo_model: Annotated[
        bool, typer.Option("--allow-demo-model", help="Let the synthetic demo model's SRs leave loopback.")
    ] = False,
    reconcile: Annotated[bool, typer.Option(help="Run the reconciler in this worker.")] = True,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker (prefork pool) with the model loaded once per child process."""
    if allow_demo_model:
        os.environ["BRAIN3D_DELIVERY__ALLOW_DEMO_MODEL"] = "true"
    settings = service_settings_or_exit(config, "worker")
    upgrade(settings.database.url)
    os.environ["BRAIN3D_WORKER_QUEUES"] = queues
    runtime = configure(settings)
    app = create_app(settings)
    reconciler = Reconciler(runtime, app) if reconcile else None
    if reconciler is not None:
        reconciler.start()
    validators = available_validators()
    missing = [name for name in VALIDATORS if name not in validators]
    if missing and CPU_QUEUE in queues.split(","):  # SRs are built on the cpu queue
        packages = " and ".join(VALIDATOR_PACKAGES[name] for name in missing)
        typer.echo(
            f"warning: {', '.join(missing)} not installed: SRs are sent checked by "
            f"{', '.join(validators) or 'no validator'} only (install {packages})",
            err=True,
        )
    ae_title, detail = settings.node.ae_title, {"queues": queues, "sr_validators": list(validators)}
    runtime.audit.record_service_activity(
        "worker", EventTypeCode.APPLICATION_START, ae_title=ae_title, detail=detail
    )
    try:
        app.worker_main(
            [
                "worker",
                f"--queues={queues}",
                "--pool=prefork",
                f"--concurrency={concurrency}",
                f"--loglevel={loglevel}",
                f"--hostname=brain3d-{os.getpid()}@{socket.gethostname()}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        if reconciler is not None:
            reconciler.stop()
        runtime.audit.record_service_activity(
            "worker", EventTypeCode.APPLICATION_STOP, ae_title=ae_title, detail=detail
        )


@jobs_app.command("retry")
def retry(
    job_id: Annotated[int, typer.Argument(help="The job to run again.")],
    config: ConfigOption = None,
) -> None:
    """Re-run a failed (or not analysed) job from the start; audited."""
    settings = settings_or_exit(config)
    runtime = configure(settings)
    book = JobBook(runtime)
    try:
        job = book.get(job_id)
    except LookupError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if not job.state.is_final or job.state == JobState.SUCCEEDED:
        typer.echo(
            f"error: job {job_id} is {job.state.value}; only failed or not analysed jobs are retried",
            err=True,
        )
        raise typer.Exit(2)
    now = utcnow()
    with runtime.database.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=JobState.QUEUED,
                attempts=0,
                error_reason=None,
                heartbeat_at=None,
                queued_at=now,
                conversion_started_at=None,
                conversion_finished_at=None,
                inference_started_at=None,
                inference_finished_at=None,
                sr_build_started_at=None,
                sr_built_at=None,
                delivery_started_at=None,
                delivered_at=None,
                finished_at=None,
            )
        )
    runtime.audit.record(
        EventID.APPLICATION_ACTIVITY,
        Outcome.SUCCESS,
        action=Action.UPDATE,
        event_type="job-retry",
        job_id=job_id,
        detail={"previous_state": job.state.value, "previous_reason": job.error_reason},
    )
    send_run_job(create_app(settings), job_id)
    typer.echo(f"job {job_id} queued again")


@jobs_app.command("reconcile")
def reconcile_command(config: ConfigOption = None) -> None:
    """Re-enqueue, once, jobs SQL holds as queued or running with a stale heartbeat, whose
    queue holds no message (a backlog waits; it is not lost)."""
    settings = settings_or_exit(config)
    resent = reconcile_once(configure(settings), create_app(settings))
    typer.echo(f"re-enqueued {len(resent)} job(s)" + (f": {', '.join(map(str, resent))}" if resent else ""))


def demo(
    config: ConfigOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic case.")] = 7,
) -> None:
    """Run the whole pipeline on one synthetic study, with no services, and print the result."""
    from worker.demo import print_result, run_demo

    settings = settings_or_exit(config)
    if config is not None:  # the node and the worker the demo starts read it too
        os.environ[CONFIG_ENV] = str(config.resolve())
    upgrade(settings.database.url)
    print_result(run_demo(settings, seed=seed))


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    app.command("demo")(demo)
    app.add_typer(jobs_app, name="jobs")
