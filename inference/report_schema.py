"""Structured findings of a brain FLAIR report: the one vocabulary of model, metrics and SR.

``render(findings) -> text`` writes a TextBraTS-style report and ``parse(text) -> findings``
reads one back; the worker codes the SR's findings from ``parse`` of the generated text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Side(StrEnum):
    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"


class Lobe(StrEnum):
    FRONTAL = "frontal"
    PARIETAL = "parietal"
    TEMPORAL = "temporal"
    OCCIPITAL = "occipital"
    CEREBELLUM = "cerebellum"


class Size(StrEnum):
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"


@dataclass(frozen=True)
class Findings:
    """What a report asserts. A normal study has ``abnormal=False`` and nothing else set."""

    abnormal: bool
    side: Side | None = None
    lobes: frozenset[Lobe] = field(default_factory=frozenset)
    edema: bool = False
    necrosis: bool = False
    enhancement: bool = False
    ventricular_compression: bool = False
    midline_shift: bool = False
    size: Size | None = None
