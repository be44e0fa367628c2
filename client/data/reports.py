"""Radiology report parsing: sections, sentences, <region, finding, existence> triplets and the tag vector."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from client.data.errors import Rejected
from client.data.report_lexicon import (
    ANATOMY_LEXICON,
    CLAUSE_BREAK,
    DEFAULT_REGION,
    FINDING_KINDS,
    FINDING_LEXICON,
    LUNG_KINDS,
    MAX_ANATOMY_GAP,
    MODIFIERS,
    NEGATED_ONLY_LEXICON,
    NORMAL_LEXICON,
    NORMAL_STATEMENT,
    PLEURAL_FINDINGS,
    SIDED_KINDS,
    SIDE_ONLY_KIND,
    SIDE_ONLY_RE,
    SIDE_WORDS,
    TRIGGERS,
    ZONE_WORDS,
)
from shared_models.vocab import OBSERVATIONS, REGIONS

EXISTENCE = ("present", "absent", "uncertain")
REGION_INDEX = {name: i for i, name in enumerate(REGIONS)}
OBSERVATION_INDEX = {name: i for i, name in enumerate(OBSERVATIONS)}


@dataclass
class ReportSections:
    findings: str = ""
    impression: str = ""
    other: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Triplet:
    region: str | None
    finding: str
    existence: str
    sentence: int


@dataclass
class ParsedReport:
    sections: ReportSections
    sentences: list[str]
    sentence_section: list[str]
    triplets: list[Triplet]
    sentence_regions: list[int]
    tags: np.ndarray


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

# Canonical section name -> header spellings (upper case, as MIMIC-CXR and IU write them).
SECTION_HEADERS = {
    "findings": ["FINDINGS AND IMPRESSIONS?", "FINDINGS?"],
    "impression": ["IMPRESSIONS?", "CONCLUSIONS?", "INTERPRETATION", "OPINION"],
    "examination": ["EXAMINATION", "EXAM", "TYPE OF EXAMINATION", "PROCEDURE"],
    "indication": ["CLINICAL INDICATIONS?", "INDICATIONS?", "REASON FOR (?:EXAMINATION|EXAM|STUDY)"],
    "history": ["CLINICAL HISTORY", "HISTORY", "CLINICAL INFORMATION"],
    "technique": ["TECHNIQUE"],
    "comparison": ["COMPARISONS?"],
    "notification": ["NOTIFICATIONS?"],
    "recommendation": ["RECOMMENDATIONS?"],
    "wet_read": ["WET READ"],
    "addendum": ["ADDENDUM"],
}
# Short fields: one paragraph of content; a later paragraph under them is unlabelled report text
# (MIMIC puts findings after COMPARISON without a header in some reports).
SHORT_FIELDS = {"examination", "indication", "history", "technique", "comparison"}

_HEADER_NAME = {}
for _name, _variants in SECTION_HEADERS.items():
    for _v in _variants:
        _HEADER_NAME[_v] = _name
_HEADER_ALTERNATION = "|".join(sorted(_HEADER_NAME, key=len, reverse=True))
# Upper-case headers anywhere (mid-line too); title-case ones only at the start of a line.
_HEADER_RE = re.compile(
    rf"(?<![A-Za-z])(?P<upper>{_HEADER_ALTERNATION})[ \t]*:"
    rf"|(?im:^[ \t]*(?P<line>{_HEADER_ALTERNATION})[ \t]*:)"
)
_BANNER_RE = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.M)
_LIST_ITEM_RE = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")


def _header_name(spelling: str) -> str:
    spelling = re.sub(r"\s+", " ", spelling.strip().upper())
    for pattern, name in _HEADER_NAME.items():
        if re.fullmatch(pattern, spelling):
            return name
    raise AssertionError(spelling)  # the regex only matches known spellings


def _blocks(text: str) -> list[str]:
    """Paragraphs and list items with hard line wraps undone and whitespace collapsed."""
    blocks: list[str] = []
    for paragraph in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n").replace("\r", "\n")):
        current: list[str] = []
        for line in paragraph.split("\n"):
            if _LIST_ITEM_RE.match(line) and current:
                blocks.append(" ".join(current))
                current = []
            if line.strip():
                current.append(line.strip())
        if current:
            blocks.append(" ".join(current))
    return [re.sub(r"\s+", " ", b).strip() for b in blocks if b.strip()]


def split_sections(text: str) -> ReportSections:
    """Split report text at its upper-case headers; text under no header goes to other['text']."""
    text = _BANNER_RE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    matches = list(_HEADER_RE.finditer(text))
    bodies: dict[str, list[str]] = {}
    free: list[str] = [text[: matches[0].start()] if matches else text]
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = _header_name(m.group("upper") or m.group("line"))
        body = text[m.end():end]
        if name in SHORT_FIELDS:
            # Only the first paragraph belongs to a short field; later ones are unlabelled text.
            body, *rest = re.split(r"\n[ \t]*\n", body.lstrip(" \t\n"), maxsplit=1)
            free.extend(rest)
        bodies.setdefault(name, []).extend(_blocks(body))
    sections = ReportSections(
        findings="\n\n".join(bodies.pop("findings", [])),
        impression="\n\n".join(bodies.pop("impression", [])),
    )
    sections.other = {name: "\n\n".join(b) for name, b in bodies.items() if b}
    free_text = "\n\n".join(b for part in free for b in _blocks(part))
    if free_text:
        sections.other["text"] = free_text
    return sections


# ---------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------

ABBREVIATIONS = {
    "dr", "drs", "mr", "mrs", "ms", "vs", "approx", "appt", "pt", "pts", "fig",
    "st", "jr", "sr", "prof", "inc", "min", "max", "eg", "ie", "cf", "resp", "hx", "dx", "sx",
}
# A boundary: terminal punctuation, space, then something a sentence can start with.
_BOUNDARY_RE = re.compile(r"(?<=[.?!])[\"')\]]*\s+(?=[A-Z0-9_\"'(\[])")
_LIST_MARKER_RE = re.compile(r"^\(?\d{1,2}[.)]\s+|^[-*\u2022]\s+")


def _ends_with_abbreviation(chunk: str) -> bool:
    word = re.search(r"(\S+)\.[\"')\]]*\s*$", chunk)
    if not word:
        return False
    token = word.group(1).lstrip("([\"'")
    if re.fullmatch(r"\d{1,2}", token) and chunk.strip() == token + ".":
        return True  # a list number on its own ("1.") belongs to the item that follows
    if re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", token):
        return True  # dotted abbreviations: e.g, i.e, a.m, p.m
    if re.fullmatch(r"[A-Z]", token):
        return True  # an initial
    return token.lower() in ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
    """Sentences of a report section; paragraphs and numbered items always end a sentence."""
    sentences: list[str] = []
    for block in _blocks(text):
        pieces: list[str] = []
        start = 0
        for m in _BOUNDARY_RE.finditer(block):
            chunk = block[start:m.start()]
            if _ends_with_abbreviation(chunk):
                continue
            pieces.append(chunk)
            start = m.end()
        pieces.append(block[start:])
        for piece in pieces:
            piece = _LIST_MARKER_RE.sub("", piece.strip()).strip()
            if re.search(r"[A-Za-z0-9]", piece.replace("_", "")):
                sentences.append(piece)
    return sentences


def _combine(patterns: list[str], before: str = r"\b", after: str = r"(?![a-z])") -> re.Pattern:
    """One regex over all entries; `lastgroup` names the entry. At a position earlier entries win."""
    return re.compile(before + "(?:" + "|".join(f"(?P<e{i}>{p})" for i, p in enumerate(patterns)) + ")" + after)


_FINDINGS = _combine([p for _, p in FINDING_LEXICON])
_NORMALS = [_combine([p]) for _, p in NORMAL_LEXICON]  # separately: normal statements may overlap
_NEGATED_ONLY = _combine([p for _, p in NEGATED_ONLY_LEXICON])
_TRIGGERS = _combine([p for *_, p in TRIGGERS], before=r"(?<![a-z])")
_ANATOMY = _combine([entry[-1] for entry in ANATOMY_LEXICON], after=r"(?:\s+bilaterally)?\b")
_MODIFIERS_BEFORE = re.compile(rf"\b{MODIFIERS}$")
for _obs, _ in FINDING_LEXICON + NORMAL_LEXICON + NEGATED_ONLY_LEXICON:
    for _o in _obs:
        assert _o in OBSERVATION_INDEX, f"lexicon names {_o!r}, which is not in shared_models.vocab.OBSERVATIONS"


@dataclass
class _Span:
    start: int
    end: int
    data: tuple


def _scan(text: str, pattern: re.Pattern, entries: list[tuple]) -> list[_Span]:
    """Non-overlapping matches, each with the data of the lexicon entry that matched."""
    return [_Span(m.start(), m.end(), entries[int(m.lastgroup[1:])][:-1]) for m in pattern.finditer(text)]


def _clauses(text: str) -> list[int]:
    """Clause boundaries: a trigger's scope never crosses one."""
    return [0] + [m.start() for m in CLAUSE_BREAK.finditer(text)] + [len(text) + 1]


def _clause_of(position: int, bounds: list[int]) -> tuple[int, int]:
    for lo, hi in zip(bounds, bounds[1:]):
        if lo <= position < hi:
            return lo, hi
    return bounds[-2], bounds[-1]


def _existence(mention: _Span, triggers: list[_Span], bounds: list[int]) -> str:
    """The nearest trigger in scope decides; with none the finding is present."""
    lo, hi = _clause_of(mention.start, bounds)
    best, best_gap = "present", None
    for t in triggers:
        kind, direction = t.data
        if kind is None:
            continue
        if mention.start <= t.start < mention.end:
            gap = 0  # "heart is not enlarged": the trigger sits inside the mention
        elif t.end <= mention.start and t.start >= lo and direction in ("pre", "both"):
            gap = mention.start - t.end
        elif t.start >= mention.end and t.end <= hi and direction in ("post", "both"):
            gap = t.start - mention.end
        else:
            continue
        if best_gap is None or gap < best_gap:
            best, best_gap = kind, gap
    return best


def _side_zone_groups(modifiers: str) -> list[dict]:
    """'right upper and left lower' -> [{side: right, zone: upper}, {side: left, zone: lower}]."""
    groups: list[dict] = []
    current = {"side": None, "zone": None}
    for word in reversed(re.findall(r"[a-z]+", modifiers)):
        if word in SIDE_WORDS:
            if current["side"]:
                groups.append(current)
                current = {"side": None, "zone": None}
            current["side"] = SIDE_WORDS[word]
        elif word in ZONE_WORDS:
            if current["side"] or current["zone"]:
                groups.append(current)
                current = {"side": None, "zone": None}
            current["zone"] = ZONE_WORDS[word]
    groups.append(current)
    return groups[::-1]


def _anatomy_mentions(text: str) -> list[_Span]:
    """Anatomy mentions as spans whose data is (kind, [(side, zone), ...])."""
    mentions = []
    for span in _scan(text, _ANATOMY, ANATOMY_LEXICON):
        kind, zone, side, plural = span.data
        core = text[span.start:span.end]
        modifiers = _MODIFIERS_BEFORE.search(text, max(0, span.start - 60), span.start)
        if modifiers:
            span.start = modifiers.start()
        groups = _side_zone_groups(modifiers.group(0) if modifiers else "")
        post_side = "both" if core.endswith("bilaterally") else None
        known_sides = [g["side"] for g in groups if g["side"]]
        known_zones = [g["zone"] for g in groups if g["zone"]]
        parts = []
        for g in groups:
            # Unnamed sides and zones are shared: "right and left lower lobes", "left upper and lower lobes".
            g_side = side or g["side"] or post_side or (known_sides[-1] if known_sides else None)
            if g_side is None and plural:
                g_side = "both"
            g_zone = zone or g["zone"] or (known_zones[-1] if known_zones else None)
            parts.append((g_side, g_zone))
        mentions.append(_Span(span.start, span.end, (kind, parts)))
    taken = [(a.start, a.end) for a in mentions]
    for m in SIDE_ONLY_RE.finditer(text):
        if not any(m.start() < e and s < m.end() for s, e in taken):
            mentions.append(_Span(m.start(), m.end(), (None, [(SIDE_WORDS[m.group(1)], None)])))
    return mentions


def _region_names(kind: str, side: str | None, zone: str | None) -> list[str | None]:
    if kind not in SIDED_KINDS:
        return [kind]
    if side is None:
        return [None]
    sides = ["right", "left"] if side == "both" else [side]
    if kind in ("lung", "pleura"):
        return [f"{s}_{zone}_zone" if zone else f"{s}_lung" for s in sides]
    suffix = {"apex": "apex", "cpa": "costophrenic_angle", "hilum": "hilum", "hemidiaphragm": "hemidiaphragm"}[kind]
    return [f"{s}_{suffix}" for s in sides]


def _regions_for(finding: str, mention: _Span, anatomy: list[_Span], bounds: list[int]) -> list[str | None]:
    """Regions of the nearest anatomy in the clause that can hold the finding, else its default."""
    allowed = FINDING_KINDS.get(finding, LUNG_KINDS)
    lo, hi = _clause_of(mention.start, bounds)
    best, best_gap = None, None
    for a in anatomy:
        kind, parts = a.data
        if kind is None:
            kind = SIDE_ONLY_KIND.get(finding, "pleura" if finding in PLEURAL_FINDINGS else "lung")
        if kind not in allowed or not (lo <= a.start < hi):
            continue
        # Nearest first; at equal distance a mention that names a side wins.
        gap = (max(0, a.start - mention.end, mention.start - a.end), all(side is None for side, _ in parts))
        if gap[0] <= MAX_ANATOMY_GAP and (best_gap is None or gap < best_gap):
            best, best_gap = (kind, parts), gap
    if best is None:
        return [DEFAULT_REGION.get(finding)]
    kind, parts = best
    if finding in PLEURAL_FINDINGS and kind in ("lung", "pleura", "hemidiaphragm"):
        # An effusion collects at the costophrenic angle unless a higher zone is named.
        kind = "cpa" if all(z is None or z == "lower" for _, z in parts) else kind
    names: list[str | None] = []
    for side, zone in parts:
        for name in _region_names(kind, side, zone):
            if name not in names:
                names.append(name)
    return names


def _sentence_triplets(sentence: str, index: int) -> list[Triplet]:
    text = sentence.lower().replace("-", " ").replace("/", " ")
    triggers = _scan(text, _TRIGGERS, TRIGGERS)
    normals = [span for pattern, entry in zip(_NORMALS, NORMAL_LEXICON) for span in _scan(text, pattern, [entry])]
    # A normal statement overrides the finding words it contains ("vascular engorgement within
    # normal limits") but not other findings in its span ("lungs are hyperinflated but clear").
    mentions = [(s, "normal") for s in normals]
    mentions += [(s, "finding") for s in _scan(text, _FINDINGS, FINDING_LEXICON)
                 if not any(n.start <= s.start and s.end <= n.end and set(s.data[0]) & set(n.data[0]) for n in normals)]
    mentions += [(s, "negated_only") for s in _scan(text, _NEGATED_ONLY, NEGATED_ONLY_LEXICON)
                 if not any(s.start < n.end and n.start < s.end for n, _ in mentions)]
    bounds = _clauses(text)
    anatomy = _anatomy_mentions(text)
    triplets = []
    for span, role in sorted(mentions, key=lambda item: item[0].start):
        observations = span.data[0]
        existence = "absent" if role == "normal" else _existence(span, triggers, bounds)
        if role == "negated_only" and existence != "absent":
            continue
        for finding in observations:
            for region in _regions_for(finding, span, anatomy, bounds):
                triplet = Triplet(region, finding, existence, index)
                if triplet not in triplets:
                    triplets.append(triplet)
    return triplets


def extract_triplets(sentences: list[str]) -> list[Triplet]:
    """<region, finding, existence> triplets of each sentence, in reading order."""
    return [t for i, sentence in enumerate(sentences) for t in _sentence_triplets(sentence, i)]


def states_normal(sentences: list[str], triplets: list[Triplet]) -> bool:
    """Whether the report says something is normal or absent (a negated finding, a normal statement).

    A note that names no finding at all ("At the entrance: pO2 = 61.3%") states nothing about the
    image, so it is not a normal study."""
    return any(t.existence == "absent" for t in triplets) or any(
        NORMAL_STATEMENT.search(s.lower().replace("-", " ")) for s in sentences)


def tag_vector(triplets: list[Triplet], normal_stated: bool | None = None) -> np.ndarray:
    """Per observation: 1 present, -1 uncertain, 0 absent or unmentioned; `no_finding` 1 only when the
    report states something normal or absent (`normal_stated`, default: an absent triplet) and names
    no finding present or uncertain."""
    tags = np.zeros(len(OBSERVATIONS), dtype=np.float32)
    for t in triplets:
        i = OBSERVATION_INDEX[t.finding]
        if t.existence == "present":
            tags[i] = 1.0
        elif t.existence == "uncertain" and tags[i] == 0.0:
            tags[i] = -1.0
    if normal_stated is None:
        normal_stated = any(t.existence == "absent" for t in triplets)
    counted = [i for name, i in OBSERVATION_INDEX.items() if name not in ("no_finding", "support_device")]
    tags[OBSERVATION_INDEX["no_finding"]] = float(normal_stated and not np.any(tags[counted]))
    return tags


def _sentence_region(triplets: list[Triplet]) -> int:
    """REGIONS index of the sentence's first placed triplet, preferring findings that are there."""
    for wanted in (("present", "uncertain"), ("absent",)):
        for t in triplets:
            if t.region is not None and t.existence in wanted:
                return REGION_INDEX[t.region]
    return -1


def parse_report(text: str) -> ParsedReport:
    """Sections, sentences, triplets, per-sentence regions and the tag vector of one report."""
    if text is None or not text.strip():
        raise Rejected("empty_report")
    sections = split_sections(text)
    sentences: list[str] = []
    sentence_section: list[str] = []
    parts = [("findings", sections.findings), ("impression", sections.impression)]
    if not (sections.findings or sections.impression):
        parts = [("text", sections.other.get("text", ""))]
    for name, body in parts:
        for sentence in split_sentences(body):
            sentences.append(sentence)
            sentence_section.append(name)
    if not sentences:
        raise Rejected("no_sections", f"no FINDINGS, IMPRESSION or free text in: {text.strip()[:80]!r}")
    triplets = extract_triplets(sentences)
    by_sentence: list[list[Triplet]] = [[] for _ in sentences]
    for t in triplets:
        by_sentence[t.sentence].append(t)
    return ParsedReport(
        sections=sections,
        sentences=sentences,
        sentence_section=sentence_section,
        triplets=triplets,
        sentence_regions=[_sentence_region(ts) for ts in by_sentence],
        tags=tag_vector(triplets, states_normal(sentences, triplets)),
    )
