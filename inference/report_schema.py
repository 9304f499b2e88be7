"""Structured findings of a brain FLAIR report: the one vocabulary of model, metrics and SR.

``render(findings) -> text`` writes a TextBraTS-style report and ``parse(text) -> findings``
reads one back; the worker codes the SR's findings from ``parse`` of the generated text.

Rendering varies wording and sentence order (so a model cannot score by copying one
template), but every variant of a given ``Findings`` carries the same set of the paper's
metric keywords: the keyword metric then measures content, not phrasing luck.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
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


NORMAL = Findings(abnormal=False)

#: Healthy reports: fixed sentences that contain none of the paper's keywords.
NORMAL_SENTENCES = (
    "No focal abnormality is seen in the brain parenchyma.",
    "The brain shows normal signal intensity without focal abnormality.",
    "No abnormal FLAIR signal is identified in the brain.",
)

# --------------------------------------------------------------------------- render

_SIZE_WORDS = {
    Size.SMALL: ("small",),
    Size.MEDIUM: ("medium-sized", "moderate-sized"),
    Size.LARGE: ("large", "extensive"),
}

# Each alternative of one finding carries the same metric keywords (tested).
_EDEMA = {
    True: (
        "Surrounding edema is present.",
        "There is perilesional edema.",
        "The lesion is surrounded by edema.",
    ),
    False: (
        "No surrounding edema is seen.",
        "There is no perilesional edema.",
        "Edema is not seen.",
    ),
}
_NECROSIS = {
    True: (
        "Central necrosis is noted.",
        "There is necrosis within the lesion.",
        "The lesion contains areas of necrosis.",
    ),
    False: (
        "No necrosis is seen.",
        "There is no evidence of necrosis.",
        "Necrosis is not identified.",
    ),
}
_COMPRESSION = {
    True: (
        "There is compression of the adjacent ventricle.",
        "The adjacent lateral ventricle shows compression.",
        "Compression of the ventricle is seen.",
    ),
    False: (
        "There is no ventricular compression.",
        "No compression of the ventricular system is seen.",
        "The ventricular system shows no compression.",
    ),
}
_ENHANCEMENT = (
    "Peripheral enhancement is present.",
    "There is rim enhancement at the lesion margin.",
)
_MIDLINE_SHIFT = (
    "Mass effect causes midline shift.",
    "There is midline shift due to mass effect.",
)


def _join_and(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _location_phrase(findings: Findings, rng: random.Random) -> str:
    """E.g. 'left frontal and parietal lobes', 'right cerebellum', 'bilateral occipital lobe'."""
    cerebral = [lobe.value for lobe in findings.lobes if lobe is not Lobe.CEREBELLUM]
    rng.shuffle(cerebral)
    parts = []
    if cerebral:
        parts.append(_join_and(cerebral) + (" lobe" if len(cerebral) == 1 else " lobes"))
    if Lobe.CEREBELLUM in findings.lobes:
        parts.append("cerebellum")
    where = " and ".join(parts) if parts else "hemisphere" if findings.side else "brain"
    if findings.side is Side.BILATERAL and where == "hemisphere":
        where = "hemispheres"
    side = f"{findings.side.value} " if findings.side else ""
    return f"the {side}{where}"


def _location_sentence(findings: Findings, rng: random.Random) -> str:
    size = f"{rng.choice(_SIZE_WORDS[findings.size])} " if findings.size else ""
    article = "An" if size[:1] in ("a", "e", "i", "o", "u") else "A"
    lower_article = article.lower()
    where = _location_phrase(findings, rng)
    crossing = " crossing the midline" if findings.side is Side.BILATERAL else ""
    templates = (
        f"{article} {size}lesion with hyperintense FLAIR signal is seen in {where}{crossing}.",
        f"There is {lower_article} {size}FLAIR-hyperintense lesion involving {where}{crossing}.",
        f"{article} {size}lesion of high FLAIR signal occupies {where}{crossing}.",
    )
    return rng.choice(templates)


class _FirstChoice(random.Random):
    """The ``rng`` used when none is given: always the first wording, never reorders."""

    def choice(self, seq):  # type: ignore[override]
        return seq[0]

    def shuffle(self, x, random=None) -> None:  # type: ignore[override]
        return None


def render(findings: Findings, rng: random.Random | None = None) -> str:
    """Write a TextBraTS-style report; ``rng`` picks wording and order (None: first variants).

    The location sentence comes first; edema, necrosis, enhancement, ventricular compression
    and midline shift follow in an order drawn from ``rng``."""
    rng = rng or _FirstChoice()
    if not findings.abnormal:
        return rng.choice(NORMAL_SENTENCES)
    rest = [rng.choice(_EDEMA[findings.edema]), rng.choice(_NECROSIS[findings.necrosis])]
    if findings.enhancement:
        rest.append(rng.choice(_ENHANCEMENT))
    rest.append(rng.choice(_COMPRESSION[findings.ventricular_compression]))
    if findings.midline_shift:
        rest.append(rng.choice(_MIDLINE_SHIFT))
    rng.shuffle(rest)
    return " ".join([_location_sentence(findings, rng), *rest])


# --------------------------------------------------------------------------- parse

_LESION = r"lesions?|mass(?:es)?|tumou?rs?|gliomas?|neoplasms?|abnormal(?:ity|ities)?|hyperintens\w*"
_TERMS: dict[str, str] = {
    "lesion": _LESION,
    "edema": r"o?edema(?:s|ta)?|oedematous|edematous|swelling",
    "necrosis": r"necros[ie]s|necrotic",
    "enhancement": r"enhanc\w*",
    "ventricular_compression": r"compress\w*|effac\w*",
    "midline_shift": (
        r"midline\s+(?:structures?\s+)?(?:(?:is|are)\s+)?shift\w*|shift\s+of\s+the\s+midline"
        r"|subfalcine\s+herniation"
    ),
    "left": r"left(?:-sided)?",
    "right": r"right(?:-sided)?",
    # "both" only where it names sides or lobes, and only the word, so "both temporal lobes" keeps its lobe.
    "bilateral": (
        r"bilateral(?:ly)?|both(?=\s+(?:[a-z-]+\s+){0,2}(?:lobes|hemispheres|sides)\b)"
        r"|crossing\s+the\s+midline|crosses\s+the\s+midline"
    ),
    "frontal": r"frontal|fronto\w*|prefrontal",
    "parietal": r"parietal|parieto\w*",
    "temporal": r"temporal|temporo\w*",
    "occipital": r"occipital|occipito\w*",
    "cerebellum": r"cerebell\w*",
    "small": r"small|tiny",
    "medium": r"medium(?:-sized)?|moderate(?:-sized|ly\s+sized)?|intermediate-sized",
    "large": r"large|extensive|big|huge",
}
# 'fronto-parietal' style compounds name two lobes: the prefix rules above catch the first,
# this catches the second half.
_COMPOUND = re.compile(r"\b(fronto|parieto|temporo|occipito)-?(frontal|parietal|temporal|occipital)\b")
_TERM_RE = re.compile("|".join(f"(?P<{name}>\\b(?:{rx})\\b)" for name, rx in _TERMS.items()))
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|absence\s+of|negative\s+for|free\s+of|neither|nor|never|rather\s+than|sparing)\b"
)
_NOT_SEEN = (
    r"(?:seen|identified|observed|present|noted|evident|detected|apparent|obvious|appreciated|visible"
    r"|significant|prominent)"
)
_POST_NEGATION = re.compile(
    rf"\b(?:is|are|was|were)\s+(?:not\s+{_NOT_SEEN}|absent|unlikely)\b|\bnot\s+{_NOT_SEEN}\b"
)
_SIDE_NAMED = r"(?:left|right)\s+(?:cerebral\s+)?(?:hemisphere|side)"
# Phrases that say where something other than the lesion is, or that a finding is absent, which
# the term rules would misread; rewritten before the clauses are read (the rendered reports use
# none of them).
_NOT_ASSERTING = [
    (re.compile(r"\bnon-?(?:enhanc\w*|necrotic|o?edematous)"), ""),  # "non-enhancing lesion": no claim
    (re.compile(r"\b(?:left|right)(?=\s+(?:lateral\s+)?ventricles?\b)"), ""),  # which ventricle
    (re.compile(r"\b(shift(?:ed|s|ing)?\s+(?:to(?:wards?)?|toward)\s+the\s+)(?:left|right)\b"), r"\1"),
    # The other side said to be normal: "the right cerebral hemisphere is unremarkable", "normal
    # left hemisphere", "nothing on the right side".
    (
        re.compile(
            rf"\b(?:{_SIDE_NAMED})\s+(?:(?:is|appears|looks)\s+)?(?:unremarkable|normal|clear)\b"
            rf"|\b(?:normal|unremarkable)\s+(?:{_SIDE_NAMED})|\bnothing\s+(?:on|in)\s+the\s+(?:{_SIDE_NAMED})"
        ),
        "",
    ),
    (re.compile(r"\b([a-z]+)\s*:\s*(?:absent|none|no|not\s+seen)\b"), r"no \1"),  # "Necrosis: absent."
]
# A phrase placing a negated finding at the lesion ("no edema around the left temporal lesion"):
# it names a lesion the report takes as given, so its words are asserted, not negated. A definite
# article, then at most four words, none of them a joining or negating word, then the lesion.
_PLACE = r"(?:around|surrounding|adjacent\s+to|near|in|within|at|of|from|involving)"
_NOT_IN_PLACE = rf"(?:{_PLACE}|or|and|to|no|not|nor|without|but|the|this|that|a|an)\b"
_AT_THE_LESION = re.compile(
    rf"\b{_PLACE}\s+(?:the|this|that)\s+(?:(?!{_NOT_IN_PLACE})[a-z-]+\s+){{0,4}}(?:{_LESION})\b"
)
_CLAUSE_SPLIT = re.compile(r"[.;:!?()\n]|\b(?:but|however|while|whereas|and\s+there\s+is)\b")
# Within a clause: commas and "with" end a negation too, except a comma in a negated list.
_SEGMENT_SPLIT = re.compile(r"(,|\bwith\b)")
_LIST_WORDS = frozenset({"or", "nor", "and", "any"})
_SIZES = frozenset(size.value for size in Size)  # the size terms' names
# "no edema and necrosis": the negation goes on past "and" when a finding follows at once, and
# ends there otherwise ("no necrosis and marked edema").
_AND = re.compile(r"\band\s+(?:(?:the|a|an|any|no)\s+)?")


def _asserted_terms(text: str) -> set[str]:
    """Term names asserted positively: negation cues cancel terms after them in a clause,
    and 'is not seen'-style cues cancel the terms before them, but for a phrase that places
    a finding already negated at the lesion."""
    text = _COMPOUND.sub(r"\1 \2", text.lower())
    for pattern, replacement in _NOT_ASSERTING:
        text = pattern.sub(replacement, text)
    asserted: set[str] = set()
    for clause in _CLAUSE_SPLIT.split(text):
        parts = _SEGMENT_SPLIT.split(clause or "")
        negated_list = False
        for index in range(0, len(parts), 2):
            segment = parts[index]
            after_comma = index > 0 and parts[index - 1] == ","
            if negated_list and after_comma and _is_list_item(segment):
                continue  # "no edema, necrosis, or enhancement"
            found, negated_list = _read_segment(segment)
            asserted |= found
    return asserted


def _is_list_item(segment: str) -> bool:
    """Findings and list words only ("necrosis", "or enhancement")."""
    rest = _TERM_RE.sub(" ", segment).split()
    return _TERM_RE.search(segment) is not None and all(word in _LIST_WORDS for word in rest)


def _read_segment(segment: str) -> tuple[set[str], bool]:
    """The terms a segment asserts, and whether a negation runs on to its end."""
    terms = list(_TERM_RE.finditer(segment))
    post = _POST_NEGATION.search(segment)
    scopes = [
        (cue.start(), _negation_end(segment, cue.end()))
        for cue in _PRE_NEGATION.finditer(segment)
        if post is None or not post.start() <= cue.start() < post.end()  # "is not seen" looks back
    ]
    if post:
        scopes.append((0, post.start()))
    places = [
        phrase.span()
        for phrase in _AT_THE_LESION.finditer(segment)
        if any(start <= term.start() < phrase.start() < end for start, end in scopes for term in terms)
    ]
    found = set()
    for match in terms:
        negated = any(start <= match.start() < end for start, end in scopes)
        if not negated or any(start <= match.start() < end for start, end in places):
            found.add(match.lastgroup or "")
    return found, any(end == len(segment) for start, end in scopes if start < len(segment))


def _negation_end(segment: str, start: int) -> int:
    """Where a negation cue's scope ends: at an "and" that no finding follows at once, else at
    the segment's end."""
    for joint in _AND.finditer(segment, start):
        following = _TERM_RE.match(segment, joint.end())
        if following is None or following.lastgroup in _SIZES:
            return joint.start()
    return len(segment)


def parse(text: str) -> Findings:
    """Read findings from free text; robust to plurals, negation, synonyms and order."""
    terms = _asserted_terms(text)
    pathology = {"edema", "necrosis", "enhancement", "ventricular_compression", "midline_shift"}
    if not terms & ({"lesion"} | pathology):
        return NORMAL
    if "bilateral" in terms or {"left", "right"} <= terms:
        side: Side | None = Side.BILATERAL
    elif "left" in terms:
        side = Side.LEFT
    elif "right" in terms:
        side = Side.RIGHT
    else:
        side = None
    sizes = [size for size in (Size.LARGE, Size.MEDIUM, Size.SMALL) if size.value in terms]
    return Findings(
        abnormal=True,
        side=side,
        lobes=frozenset(lobe for lobe in Lobe if lobe.value in terms),
        edema="edema" in terms,
        necrosis="necrosis" in terms,
        enhancement="enhancement" in terms,
        ventricular_compression="ventricular_compression" in terms,
        midline_shift="midline_shift" in terms,
        size=sizes[0] if sizes else None,
    )


def mirrored(findings: Findings) -> Findings:
    """The findings of the patient's mirror image: left and right swap, nothing else changes."""
    swap = {Side.LEFT: Side.RIGHT, Side.RIGHT: Side.LEFT}
    return replace(findings, side=swap.get(findings.side, findings.side))


def findings_to_dict(findings: Findings) -> dict[str, object]:
    """JSON-ready form (manifests, job rows): enums as their values, lobes sorted."""
    return {
        "abnormal": findings.abnormal,
        "side": findings.side.value if findings.side else None,
        "lobes": sorted(lobe.value for lobe in findings.lobes),
        "edema": findings.edema,
        "necrosis": findings.necrosis,
        "enhancement": findings.enhancement,
        "ventricular_compression": findings.ventricular_compression,
        "midline_shift": findings.midline_shift,
        "size": findings.size.value if findings.size else None,
    }


def findings_from_dict(data: dict[str, object]) -> Findings:
    """Inverse of :func:`findings_to_dict`."""
    side, size = data.get("side"), data.get("size")
    return Findings(
        abnormal=bool(data["abnormal"]),
        side=Side(side) if side else None,
        lobes=frozenset(Lobe(value) for value in data.get("lobes", ()) or ()),  # type: ignore[union-attr]
        edema=bool(data.get("edema", False)),
        necrosis=bool(data.get("necrosis", False)),
        enhancement=bool(data.get("enhancement", False)),
        ventricular_compression=bool(data.get("ventricular_compression", False)),
        midline_shift=bool(data.get("midline_shift", False)),
        size=Size(size) if size else None,
    )
