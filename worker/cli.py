"""The ``brain3d`` console script: assembles the commands of every package."""

from __future__ import annotations

import typer

from dicom_node import cli as node_cli
from dicom_node.series_writer import write_series
from inference import cli as inference_cli
from worker import commands as worker_commands

app = typer.Typer(
    name="brain3d",
    help="Brain3D Node: a DICOM node that reads brain FLAIR MRI and returns Structured Reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
node_cli.register(app)
inference_cli.register(app, series_writer=write_series)
worker_commands.register(app)

if __name__ == "__main__":
    app()
