"""Stage 2 of a job (queue ``gpu``): Brain3D reads the prepared volume and writes the report.

The model is loaded once per worker process and kept warm; its version names the
checkpoint by content hash, so an SR always says exactly which weights wrote it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dicom_node.config import ModelSettings
from dicom_node.sr import printable_text

logger = logging.getLogger("brain3d.worker")


@dataclass(frozen=True)
class ModelIdentity:
    """Which checkpoint writes the reports: named by content, known without loading weights."""

    name: str
    version: str
    checkpoint_hash: str
    synthetic_demo: bool


@dataclass
class LoadedModel:
    model: torch.nn.Module
    identity: ModelIdentity
    device: torch.device
    max_new_tokens: int


def checkpoint_hash(path: Path) -> str:
    """SHA-256 over every file of a checkpoint folder (names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:  # streamed: a 4B model's weights are gigabytes
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def identify_model(settings: ModelSettings) -> ModelIdentity:
    """The identity of the configured checkpoint; a clear error when there is none."""
    path = Path(settings.path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.path {path} holds no Brain3D checkpoint (config.json missing)")
    content_hash = checkpoint_hash(path)
    synthetic = bool(json.loads(config_file.read_text()).get("synthetic_demo"))
    name = "Brain3D-demo" if synthetic else "Brain3D"
    return ModelIdentity(
        name=name,
        version=f"{name}@{content_hash[:12]}",
        checkpoint_hash=content_hash,
        synthetic_demo=synthetic,
    )


def load_model(settings: ModelSettings, identity: ModelIdentity) -> LoadedModel:
    from inference.modeling_brain3d import Brain3D, inference_dtype, resolve_device

    device = resolve_device(settings.device)
    if device.type == "cpu":
        # Measured (docs/benchmarks.md, end-to-end latency): on a busy 2-core machine two threads
        # decode 4-7x slower than one; workers scale by processes, not threads.
        torch.set_num_threads(settings.cpu_threads)
    dtype = inference_dtype(device)
    model = Brain3D.from_pretrained(settings.path, device=device, dtype=dtype)
    logger.info("loaded %s from %s on %s (%s)", identity.version, settings.path, device, dtype)
    return LoadedModel(model=model, identity=identity, device=device, max_new_tokens=settings.max_new_tokens)


def generate_report(loaded: LoadedModel, volume: np.ndarray) -> tuple[str, dict[str, float]]:
    """The report text for one prepared ``(1, D, H, W)`` volume, with the model's timings."""
    batch = torch.from_numpy(volume).unsqueeze(0).to(loaded.device)
    with torch.inference_mode():
        output = loaded.model.generate(batch, max_new_tokens=loaded.max_new_tokens)
    # Stored, parsed and coded as it will read in the SR: without characters DICOM text may not hold.
    return printable_text(output.reports[0]), dict(output.timings)
