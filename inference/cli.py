"""``brain3d synth``, ``brain3d data import``, ``brain3d train`` and ``brain3d eval``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def synth(
    out: Annotated[Path, typer.Option(help="Folder for cases/ and manifest.jsonl")],
    cases: Annotated[int, typer.Option(min=1)] = 100,
    seed: Annotated[int, typer.Option()] = 0,
    format: Annotated[str, typer.Option("--format", help="nifti or dicom")] = "nifti",
    lesional_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.7,
) -> None:
    """Synthesise brain FLAIR cases (MNI152 anatomy, gliomas, controls) and a manifest."""
    from inference.synthetic import write_dataset

    start = time.perf_counter()
    manifest = write_dataset(out, cases, seed, format, lesional_fraction)
    typer.echo(f"wrote {cases} cases and {manifest} in {time.perf_counter() - start:.1f} s")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the ``brain3d`` application."""
    app.command("synth")(synth)
