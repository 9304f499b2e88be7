"""Which complete series Brain3D reads: FLAIR of the head, decided from acquisition physics.

The decision uses, in this order (the first that decides wins; ``docs/routing.md``
has the full table):

1. site rules from the configuration (first matching rule forces include/exclude);
2. modality MR; not a localizer; not derived (MPR, ADC, MIP, secondary);
3. head: BodyPartExamined HEAD/BRAIN/..., or, when absent, a head coil or a
   head/brain/neuro word in the study/series description or protocol;
4. not diffusion-weighted (b-value, EPI diffusion sequence name);
5. physics: inversion recovery with TI >= ``min_inversion_time_ms``,
   TE >= ``min_echo_time_ms`` and TR >= ``min_repetition_time_ms``.

SeriesDescription is only a secondary signal: it never makes a series eligible
against its physics, it names a mismatch when physics contradicts it, and it
completes physics only where the inversion time alone is missing.
Classic MR keeps the physics in top-level attributes; Enhanced MR in functional
groups (MR Timing, MR Echo, MR Modifier), which are read as well.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.config import RoutingRule, RoutingSettings

#: BodyPartExamined values that mean the head (DICOM PS3.16 Annex L defined terms and vendor usage).
HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD_NECK", "CEREBRUM", "NEURO"})
_HEAD_WORDS = re.compile(r"head|brain|neuro|skull|cran|cerebr|kopf|sch[aä]del|hirn|cerveau|cabeza", re.I)
_FLAIR_WORDS = re.compile(r"flair|dark[-_ ]?fluid|\bflr\b|_flr_", re.I)
_T1_FLAIR_WORDS = re.compile(r"t1[-_ ]?(w[-_ ]?)?flair", re.I)
_LOCALIZER_WORDS = re.compile(r"locali[sz]er|scout|survey|\bloc\b|3[-_ ]?plane", re.I)
_DIFFUSION_WORDS = re.compile(r"\bdwi\b|diff|trace|\badc\b|\bdti\b", re.I)
# A classic header holds one TI, so double inversion recovery is told by its name (only excludes).
_DIR_WORDS = re.compile(r"(?<![a-z])dir(?![a-z])|double[-_ ]?(?:inv|ir(?![a-z]))|dual[-_ ]?inv", re.I)
# A series that names the spine is not read as a brain where BodyPartExamined is silent, whatever
# its study is called ("MRI Brain and C-Spine") or its coil (a head/neck/spine array).
_SPINE_WORDS = re.compile(r"spine|spinal|cervical|thoracic|lumbar|sacr|(?<![a-z])cord(?![a-z])|myelo", re.I)
_DIFFUSION_SEQUENCE_NAME = re.compile(r"ep_b\d+|ep2d_diff|re_b\d+", re.I)
_DERIVED_IMAGE_TYPES = frozenset(
    {
        "DERIVED",
        "SECONDARY",
        "MPR",
        "REFORMATTED",
        "PROJECTION IMAGE",
        "MIP",
        "MNIP",
        "ADC",
        "EADC",
        "FA",
        "TRACEW",
        "CALC_BVALUE",
        "SUBTRACTION",
        "MOCO",
        "COLLAPSE",
        "CPR",
        "MIN IP",
    }
)
#: Physics bounds below the FLAIR thresholds that name the sequence in the reason.
STIR_MAX_INVERSION_TIME_MS = 400.0
SHORT_ECHO_TIME_MS = 30.0


@dataclass(frozen=True)
class RoutingDecision:
    """The router's verdict; ``reason`` starts with a stable code, then says why."""

    eligible: bool
    reason: str
    sequence: str

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class _Physics:
    """The acquisition parameters the decision rests on, from classic or Enhanced headers."""

    inversion_recovery: bool | None
    inversion_times: tuple[float, ...]
    echo_time: float | None
    repetition_time: float | None
    gradient_echo: bool
    diffusion_b_value: float | None

    @property
    def inversion_time(self) -> float | None:
        return self.inversion_times[0] if self.inversion_times else None


def _values(value: Any) -> list[str]:
    """A multi-valued string attribute as a list of upper-case, stripped values."""
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v).strip().upper() for v in value if str(v).strip()]
    return [v.strip().upper() for v in str(value).split("\\") if v.strip()]


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        return _number(value[0]) if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _functional_group(ds: Dataset, sequence_keyword: str) -> Dataset | None:
    """The first item of a functional-group macro, shared groups first, then frame 1."""
    for groups_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if groups:
            macro = groups[0].get(sequence_keyword)
            if macro:
                return macro[0]
    return None


def _text(ds: Dataset, *keywords: str) -> str:
    return " ".join(str(ds.get(keyword, "") or "") for keyword in keywords)


def _physics(ds: Dataset) -> _Physics:
    scanning = _values(ds.get("ScanningSequence"))
    options = _values(ds.get("ScanOptions"))
    inversion_recovery: bool | None = None
    # GE names its FLAIR options (T2FLAIR_GEMS, T1FLAIR_GEMS); "RM" (research mode) alone says
    # nothing about an inversion pulse, so a positive TI decides, as where nothing is coded.
    if (scanning or options) and scanning != ["RM"]:
        inversion_recovery = "IR" in scanning or any(
            o == "IR" or o.startswith("IR_") or o.endswith("FLAIR_GEMS") for o in options
        )
    elif any(o.endswith("FLAIR_GEMS") for o in options):
        inversion_recovery = True
    modifier = _functional_group(ds, "MRModifierSequence")
    if modifier is not None and modifier.get("InversionRecovery"):
        inversion_recovery = str(modifier.InversionRecovery).upper() == "YES"
    inversion_times: tuple[float, ...] = ()
    if modifier is not None and modifier.get("InversionTimes") is not None:
        raw = modifier.InversionTimes
        values = raw if isinstance(raw, MultiValue | list | tuple) else [raw]
        inversion_times = tuple(float(v) for v in values)
    elif (ti := _number(ds.get("InversionTime"))) is not None and ti > 0:
        inversion_times = (ti,)
        # A positive TI is itself evidence of an inversion pulse where the coded
        # attributes are silent.
        inversion_recovery = True if inversion_recovery is None else inversion_recovery
    echo = _functional_group(ds, "MREchoSequence")
    timing = _functional_group(ds, "MRTimingAndRelatedParametersSequence")
    echo_time = _number(ds.get("EchoTime"))
    if echo_time is None and echo is not None:
        echo_time = _number(echo.get("EffectiveEchoTime"))
    repetition_time = _number(ds.get("RepetitionTime"))
    if repetition_time is None and timing is not None:
        repetition_time = _number(timing.get("RepetitionTime"))
    echo_pulse = str(ds.get("EchoPulseSequence", "") or "").upper()
    gradient_echo = echo_pulse == "GRADIENT" or (bool(scanning) and "GR" in scanning and "SE" not in scanning)
    diffusion = _functional_group(ds, "MRDiffusionSequence")
    b_value = _number(ds.get("DiffusionBValue"))
    if b_value is None and diffusion is not None:
        b_value = _number(diffusion.get("DiffusionBValue"))
    return _Physics(inversion_recovery, inversion_times, echo_time, repetition_time, gradient_echo, b_value)


def headers_match(match: Mapping[str, str], value_of: Callable[[str], str]) -> bool:
    """A site rule's test: every ``match`` entry (keyword -> case-insensitive glob) holds for
    ``value_of(keyword)``; a missing attribute is ``""``, which ``""`` and ``*`` match."""
    return all(
        fnmatch.fnmatchcase(value_of(keyword).upper(), pattern.upper()) for keyword, pattern in match.items()
    )


def _rule_matches(rule: RoutingRule, ds: Dataset) -> bool:
    """Multi-valued attributes are compared in their DICOM form (``SE\\IR``)."""
    return headers_match(rule.match, lambda keyword: "\\".join(_values(ds.get(keyword))))


def _format_ms(value: float | None) -> str:
    return "absent" if value is None else f"{value:g} ms"


def _physics_summary(p: _Physics) -> str:
    ti = "/".join(f"{t:g}" for t in p.inversion_times) + " ms" if p.inversion_times else "absent"
    return f"TI {ti}, TE {_format_ms(p.echo_time)}, TR {_format_ms(p.repetition_time)}"


def _is_head(ds: Dataset) -> tuple[bool, str]:
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part:
        return body_part in HEAD_BODY_PARTS, f"BodyPartExamined {body_part}"
    if _SPINE_WORDS.search(_text(ds, "SeriesDescription", "ProtocolName")):
        return False, "BodyPartExamined absent, and the series names the spine"
    coil = str(ds.get("ReceiveCoilName", "") or "")
    receive = _functional_group(ds, "MRReceiveCoilSequence")
    if receive is not None:
        coil += " " + str(receive.get("ReceiveCoilName", "") or "")
    spine_coil = re.search(r"\bsp\d|spine", coil, re.I)  # head/neck/spine elements: no evidence
    if not spine_coil and re.search(r"head|brain|\bhe\d|hnc|neuro", coil, re.I):
        return True, f"BodyPartExamined absent, head coil {coil.strip()!r}"
    descriptions = _text(ds, "StudyDescription", "SeriesDescription", "ProtocolName")
    if _HEAD_WORDS.search(descriptions):
        return True, "BodyPartExamined absent, head named in the descriptions"
    anatomy = _functional_group(ds, "FrameAnatomySequence")
    if anatomy is not None:
        codes = {item.get("CodeValue") for item in anatomy.get("AnatomicRegionSequence", [])}
        if codes & {"12738006", "69536005", "T-A0100", "T-D1100"}:
            return True, "BodyPartExamined absent, frame anatomy is head/brain"
    return False, "BodyPartExamined absent and no head coil, anatomy code or description names the head"


def _classify(ds: Dataset, settings: RoutingSettings) -> RoutingDecision:
    """The physics-based decision, without site rules."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality != "MR":
        return RoutingDecision(False, f"not_mr: modality {modality or 'absent'}", "NON_MR")
    image_type = _values(ds.get("ImageType"))
    image_type_text = "\\".join(image_type) or "absent"
    description = str(ds.get("SeriesDescription", "") or "")
    if "LOCALIZER" in image_type or "SCOUT" in image_type or _LOCALIZER_WORDS.search(description):
        return RoutingDecision(
            False, f"localizer: ImageType {image_type_text}, described {description!r}", "LOCALIZER"
        )
    if any(t in _DERIVED_IMAGE_TYPES for t in image_type):
        return RoutingDecision(False, f"derived: ImageType {image_type_text}", "DERIVED")
    head, why = _is_head(ds)
    if not head:
        return RoutingDecision(False, f"not_head: {why}", "UNKNOWN")

    p = _physics(ds)
    sequence_name = str(ds.get("SequenceName", "") or ds.get("PulseSequenceName", "") or "")
    if (p.diffusion_b_value or 0) > 0 or _DIFFUSION_SEQUENCE_NAME.search(sequence_name):
        return RoutingDecision(
            False, f"diffusion: b-value {p.diffusion_b_value}, sequence {sequence_name!r}", "DWI"
        )
    if _DIFFUSION_WORDS.search(description) and "EP" in _values(ds.get("ScanningSequence")):
        return RoutingDecision(False, f"diffusion: echo-planar series described {description!r}", "DWI")

    says_flair = bool(_FLAIR_WORDS.search(description)) and not _T1_FLAIR_WORDS.search(description)
    summary = _physics_summary(p)
    if p.inversion_recovery is None and p.echo_time is None and p.repetition_time is None:
        hint = " although described as FLAIR" if says_flair else ""
        return RoutingDecision(
            False, f"physics_missing: no scanning sequence, TI, TE or TR in the headers{hint}", "UNKNOWN"
        )
    if not p.inversion_recovery:
        sequence = _non_ir_sequence(p, ds)
        if says_flair:
            return RoutingDecision(
                False,
                f"description_physics_mismatch: described {description!r} "
                f"but not inversion recovery ({summary})",
                sequence,
            )
        return RoutingDecision(False, f"not_inversion_recovery: {sequence} ({summary})", sequence)
    named = _text(ds, "SeriesDescription", "ProtocolName", "SequenceName")
    if len(p.inversion_times) > 1 or _DIR_WORDS.search(named):
        return RoutingDecision(False, f"double_inversion_recovery: {summary}", "DIR")

    ti, te, tr = p.inversion_time, p.echo_time, p.repetition_time
    if ti is not None and ti < STIR_MAX_INVERSION_TIME_MS:
        return RoutingDecision(False, f"stir: short-TI inversion recovery ({summary})", "STIR")
    if ti is not None and ti < settings.min_inversion_time_ms:
        three_d_short_te = str(ds.get("MRAcquisitionType", "")).upper() == "3D" and (te or 0) < 10
        if p.gradient_echo or three_d_short_te:
            return RoutingDecision(
                False, f"mprage: gradient-echo T1 inversion recovery ({summary})", "MPRAGE"
            )
        if te is None or te < settings.min_echo_time_ms:
            return RoutingDecision(
                False, f"t1_flair: intermediate-TI, short-TE inversion recovery ({summary})", "T1_FLAIR"
            )
        return RoutingDecision(
            False,
            f"inversion_time_too_short: below {settings.min_inversion_time_ms:g} ms ({summary})",
            "IR_OTHER",
        )
    if te is None or te < settings.min_echo_time_ms:
        return RoutingDecision(
            False, f"echo_time_too_short: long-TI inversion recovery is not T2-FLAIR ({summary})", "IR_OTHER"
        )
    if tr is None or tr < settings.min_repetition_time_ms:
        return RoutingDecision(False, f"repetition_time_too_short: ({summary})", "IR_OTHER")
    dimension = str(ds.get("MRAcquisitionType", "") or "").upper() or "unknown"
    if ti is None:
        if says_flair:
            return RoutingDecision(
                True,
                f"flair: {dimension} inversion recovery, TI absent, TE/TR of FLAIR and described "
                f"{description!r} ({summary})",
                "FLAIR",
            )
        return RoutingDecision(
            False, f"inversion_time_missing: inversion recovery without TI ({summary})", "IR_OTHER"
        )
    return RoutingDecision(True, f"flair: {dimension} T2-FLAIR by physics ({summary})", "FLAIR")


def _non_ir_sequence(p: _Physics, ds: Dataset) -> str:
    """A label for a series without inversion recovery, for the reason only."""
    te, tr = p.echo_time or 0.0, p.repetition_time or 0.0
    text = _text(ds, "SeriesDescription", "SequenceName", "ProtocolName")
    image_type = _values(ds.get("ImageType"))
    if "SWI" in image_type or re.search(r"swi|susc", text, re.I):
        return "SWI"
    if p.gradient_echo:
        return "GRE"
    if te >= SHORT_ECHO_TIME_MS * 2 and tr >= 2000:
        return "T2"
    if te < SHORT_ECHO_TIME_MS and tr < 1500:
        return "T1_POST_CONTRAST" if ds.get("ContrastBolusAgent") else "T1"
    if te < SHORT_ECHO_TIME_MS:
        return "PD"
    return "OTHER"


def route_series(headers: Dataset, settings: RoutingSettings) -> RoutingDecision:
    """Decide whether Brain3D reads this series, from one representative header.

    Site rules come first; the first rule whose every ``match`` entry holds forces
    the decision (``rule_include`` / ``rule_exclude``), keeping the physics'
    sequence label for the audit trail.
    """
    decision = _classify(headers, settings)
    for index, rule in enumerate(settings.rules):
        if _rule_matches(rule, headers):
            why = rule.reason or f"site rule {index + 1} matched {dict(rule.match)}"
            eligible = rule.action == "include"
            return RoutingDecision(eligible, f"rule_{rule.action}: {why}", decision.sequence)
    return decision
