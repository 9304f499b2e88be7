"""Stage 2 of a job (queue ``gpu``): Brain3D reads the prepared volume and writes the report.

The model is loaded once per worker process and kept warm; its version names the
checkpoint by content hash, so an SR always says exactly which weights wrote it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dicom_node.config import ModelSettings

logger = logging.getLogger("brain3d.worker")

#: The committed checkpoint trained on synthetic data only.
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "inference" / "checkpoints" / "demo"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    version: str
    checkpoint_hash: str
    synthetic_demo: bool
    device: torch.device
    max_new_tokens: int


def checkpoint_hash(path: Path) -> str:
    """SHA-256 over every file of a checkpoint folder (names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_model(settings: ModelSettings) -> LoadedModel:
    from inference.modeling_brain3d import Brain3D

    path = Path(settings.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path} holds no Brain3D checkpoint (config.json missing)")
    device = resolve_device(settings.device)
    model = Brain3D.from_pretrained(path).to(device).eval()
    content_hash = checkpoint_hash(path)
    synthetic = bool(getattr(model.config, "synthetic_demo", False)) or path.resolve() == DEMO_CHECKPOINT
    name = "Brain3D-demo" if synthetic else "Brain3D"
    logger.info("loaded %s from %s on %s (sha256 %s)", name, path, device, content_hash[:12])
    return LoadedModel(
        model=model,
        name=name,
        version=f"{name}@{content_hash[:12]}",
        checkpoint_hash=content_hash,
        synthetic_demo=synthetic,
        device=device,
        max_new_tokens=settings.max_new_tokens,
    )


def generate_report(loaded: LoadedModel, volume: np.ndarray) -> tuple[str, dict[str, float]]:
    """The report text for one prepared ``(1, D, H, W)`` volume, with the model's timings."""
    batch = torch.from_numpy(volume).unsqueeze(0).to(loaded.device)
    with torch.inference_mode():
        output = loaded.model.generate(batch, max_new_tokens=loaded.max_new_tokens)
    return output.reports[0].strip(), dict(output.timings)
