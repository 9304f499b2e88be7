"""The node's commands on the ``brain3d`` command line: serve, db, audit, config.

Each package registers its own commands (``register``); ``worker.cli`` assembles
the one ``brain3d`` application, being the only package that may import both
``dicom_node`` and ``inference``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dicom_node.config import ConfigError, Settings, load_settings

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


config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration as JSON (secrets masked)."""
    settings = settings_or_exit(config)
    data = settings.model_dump(mode="json")
    if data["database"].get("audit_key"):
        data["database"]["audit_key"] = "***"
    typer.echo(json.dumps(data, indent=2))


def register(app: typer.Typer) -> None:
    """Add the node's commands to the ``brain3d`` application."""
    app.add_typer(config_app, name="config")
