"""Radiology report parsing: sections, sentences, <region, finding, existence> triplets and the tag vector."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from client.data.errors import Rejected
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


# ---------------------------------------------------------------------------------------------
# Lexicons. Patterns match lower-case sentence text with '-' and '/' read as spaces.
# ---------------------------------------------------------------------------------------------

_GAP = r"(?: [a-z_]+){0,4}?"  # up to four words between a subject and its predicate

# (observations, pattern). At one position the earlier entry wins, so longer phrases come first.
FINDING_LEXICON: list[tuple[tuple[str, ...], str]] = [
    # Phrases that name no finding although they contain a lexicon word.
    ((), r"pericardial effusions?|joint effusions?|bone density|bone mineral density|sclerotic densit(?:y|ies)"
         r"|breast (?:prosthes[ie]s|implants?)|soft tissue (?:o?edema|swelling)"
         r"|(?:sclerotic|lytic|blastic|bony|bone|osseous|destructive|skin|cutaneous) lesions?"),
    (("nodule", "lung_opacity"), r"nodular (?:opacit(?:y|ies)|densit(?:y|ies))"),
    (("cardiomegaly", "enlarged_cardiomediastinum"),
     r"(?:enlarged|prominent) cardiomediastinal (?:silhouette|contours?)"
     rf"|cardiomediastinal (?:silhouette|contours?)s?{_GAP} (?:enlarged|large|widened|prominent)"),
    (("cardiomegaly",),
     r"cardiomegaly|cardiac enlargement|cardiac hypertrophy|heart enlargement"
     r"|enlargement of the (?:heart|cardiac (?:silhouette|shadow|contour))"
     r"|(?:enlarged|large|prominent) (?:heart|cardiac (?:silhouette|shadow|size|contour))"
     rf"|(?:heart|cardiac (?:silhouette|shadow|size|contour)s?){_GAP}"
     r" (?:enlarged|large|increased|prominent|enlarging|borderline)"
     r"|borderline (?:heart|cardiac) size"),
    (("enlarged_cardiomediastinum",),
     r"(?:widen(?:ed|ing)|enlarged|prominent) (?:superior )?mediast\w*(?: silhouette| contours?)?"
     rf"|mediastin\w*(?: silhouette| contours?)?{_GAP} (?:widen(?:ed|ing)|enlarged|prominent)"),
    (("pneumothorax", "pleural_effusion"), r"hydropneumothora(?:x|ces)"),
    (("pneumothorax",), r"pneumothora(?:x|ces)|pleural air(?: collection)?"),
    (("pleural_effusion",),
     r"(?:pleural )?effusions?|pleural fluid|hydrothora(?:x|ces)|fluid in the (?:\w+ )?fissure"
     r"|blunt(?:ed|ing)(?: of)?(?: the)?(?: \w+){0,2}? (?:costophrenic|cp) (?:angles?|sulc(?:us|i)|recess(?:es)?)"
     r"|(?:costophrenic|cp) (?:angles?|sulc(?:us|i))(?: \w+){0,2}? blunt(?:ed|ing)"),
    (("pleural_thickening",),
     r"pleural (?:thickening|plaques?|scarring|calcifications?)|apical (?:pleural )?cap(?:s|ping)?"
     r"|pleuroparenchymal (?:scarring|thickening|opacit(?:y|ies))"),
    (("granuloma",),
     r"(?:calcified |noncalcified )?granulom(?:a|as|ata)|granulomatous(?: \w+)?"
     r"|calcified (?:pulmonary |lung |parenchymal )?"
     r"(?:nodul(?:e|es|ar densit(?:y|ies)|ar opacit(?:y|ies))|densit(?:y|ies)|foc(?:us|i))"),
    # An interstitial opacity is an opacity; interstitial markings or prominence are not.
    (("interstitial_opacity", "lung_opacity"),
     r"(?:interstitial|reticular|reticulonodular|reticulo nodular)(?: \w+)?"
     r" (?:opacit(?:y|ies)|densit(?:y|ies)|infiltrat(?:e|es|ion))"),
    (("interstitial_opacity",),
     r"(?:interstitial|reticular|reticulonodular|reticulo nodular)(?: \w+)?"
     r" (?:markings?|prominence|pattern|disease|lung disease|abnormalit(?:y|ies)|changes?|thickening)"
     r"|(?:increased|prominent|coarse(?:ned)?|accentuated) (?:\w+ )?"
     r"(?:lung |interstitial |pulmonary |bronchovascular )?markings"
     r"|peribronchial (?:thickening|cuffing)|bronchial wall thickening|bronchitic changes"),
    (("nodule",), r"nodul(?:e|es|arity)|micronodul\w*"),
    (("mass",), r"mass(?:es)?|mass like"),
    (("lung_lesion",), r"lesions?|neoplasms?|tumou?rs?|malignan(?:cy|cies)|metasta(?:sis|ses|tic)|carcinoma|cancer"),
    (("edema",),
     r"(?:pulmonary |interstitial |alveolar |perihilar )?o?edema|fluid overload|(?:congestive )?heart failure|chf"),
    (("vascular_congestion",),
     r"(?:pulmonary |vascular |venous |interstitial )*congest(?:ion|ive changes?)"
     r"|vascular engorgement|engorged|cephali[sz]ation"
     r"|(?:increased|prominent|prominence of the)(?: \w+){0,2}? vascular(?:ity|ture)"
     r"|vascular(?:ity|ture)(?: \w+){0,2}? (?:increased|prominent|indistinct)"),
    (("emphysema",),
     r"emphysema(?:tous)?(?: changes?)?|copd|chronic obstructive(?: \w+){0,2}|bullae|bullous(?: \w+)?|bulla"),
    (("hyperinflation",),
     r"hyper ?(?:inflat|expan|aerat|lucen)\w*|over ?(?:inflat|expan)\w*"
     r"|(?:flatten(?:ed|ing)(?: of)?(?: the)?|flat) (?:hemi)?diaphragms?"
     r"|(?:hemi)?diaphragms?(?: \w+){0,2}? flat(?:tened)?"),
    (("atelectasis",), r"atelectas(?:is|es)|atelectatic(?: \w+)?|(?:lobar |segmental )?collapsed?|volume loss"),
    (("consolidation",), r"consolidat(?:ion|ions|ed|ive|ing)"),
    (("pneumonia",), r"(?:broncho)?pneumoni(?:a|as|tis)|infectious process|infection|aspiration"),
    (("lung_opacity",),
     r"opacit(?:y|ies)|opacifi(?:cation|ed)"
     r"|(?:airspace|air space|alveolar) (?:disease|process|opacit(?:y|ies)|filling)"
     r"|infiltrat(?:e|es|ion|ive(?: \w+)?)|densit(?:y|ies)|haziness|hazy(?: \w+)?|ground glass|shadowing"),
    (("scarring",), r"scar(?:s|ring|red)?|cicatri\w*|fibrotic scar\w*"),
    (("fibrosis",), r"fibros(?:is|es)|fibrotic(?: changes?)?"),
    (("calcification",), r"calcifi(?:cation|cations|ed)(?: \w+)?|atherosclero\w*|atheromatous(?: \w+)?"),
    # A rib or clavicle "deformity" is not called a fracture; a vertebral compression is one.
    (("fracture",),
     r"fractur(?:e|es|ed)|(?:vertebral |wedge )?compression(?: deformit(?:y|ies))?|wedge deformit(?:y|ies)"),
    (("hernia",), r"hernia(?:s|tion)?"),
    (("scoliosis",),
     r"(?:levo|dextro)?scolio(?:sis|tic)(?: curvature)?|(?:levo|dextro)curvature|curvature of the(?: \w+)? spine"),
    (("degenerative_change",),
     r"degenerat\w*(?: \w+){0,2}? (?:changes?|disease|disc|spondylosis)|degenerative|osteophyt\w*"
     r"|spondylo(?:sis|tic)(?: changes?)?|arthriti(?:s|c)(?: changes?)?|arthropathy"
     r"|dish|diffuse idiopathic skeletal hyperostosis"),
    (("tortuous_aorta",),
     r"tortu(?:ous|osity)|ectati?c(?: \w+)?|ectasia|unfold(?:ed|ing)(?: of)?(?: the)? aorta"
     r"|(?:dilated|dilatation of the) (?:thoracic )?aorta"),
    (("hilar_enlargement",),
     r"(?:(?:hilar|mediastinal|paratracheal) )?(?:lymph ?adenopathy|adenopathy)"
     r"|enlarged(?: \w+){0,2}? (?:hila|hilum|lymph nodes?)"
     r"|hilar (?:enlargement|prominence|fullness|mass(?:es)?)|(?:prominent|full|bulky) hila"),
    (("support_device",),
     r"(?:endotracheal|tracheostomy|et|ng|og|nasogastric|orogastric|feeding|enteric|chest|gastric"
     r"|dobhoff|dobbhoff|nasoenteric) tubes?|tubes?|catheters?"
     r"|(?:picc|central|venous|arterial|midline|jugular|subclavian|ij|dialysis|port|swan ganz|pulmonary artery)"
     r" lines?|picc|pacemakers?|pacer|aicd|icd|defibrillators?|generator|leads?|electrodes?"
     r"|port a cath|portacath|(?:chest )?port|(?:sternotomy|sternal|surgical|cerclage) (?:wires?|clips?)|wires?"
     r"|(?:surgical |vascular |cholecystectomy |axillary )?clips?|stents?|valve replacement|drains?|hardware"
     r"|(?:surgical |spinal |orthopedic )?(?:fixation|fusion) (?:hardware|rods?|plates?|screws?)|rods?|screws?"
     r"|(?:surgical|orthopedic|fixation|metallic) plates?|devices?|stimulators?|(?:bone |suture )?anchors?|occluders?|arthroplast\w*"
     r"|prosthe(?:sis|ses|tic)(?: \w+){0,2}"
     r"|tip"),  # a "tip" in a chest film report is a line's or a tube's (IU often masks the device's name)
]

_NORMAL = r"(?:normal|within (?:the )?(?:normal )?limits(?: of normal)?|unremarkable|not enlarged)"
_NORMAL_GAP = r"(?: (?!(?:enlarg|large|prominent|increas|widen|abnormal)\w*\b)\w+)"  # no word that says otherwise

# Statements of normality: the observations they name are absent whatever the triggers say.
NORMAL_LEXICON: list[tuple[tuple[str, ...], str]] = [
    (("cardiomegaly", "enlarged_cardiomediastinum"),
     rf"cardiomediastinal (?:silhouette|contours?|shadow)s?{_NORMAL_GAP}{{0,6}}? (?:stable|{_NORMAL})"
     r"|normal cardiomediastinal (?:silhouette|contours?)"),
    (("cardiomegaly",),
     rf"(?:heart|cardiac)(?: size| silhouette| contours?| shadow)?{_NORMAL_GAP}{{0,6}}? {_NORMAL}"
     r"|normal (?:heart|cardiac)(?: size| silhouette| contours?)?"),
    (("enlarged_cardiomediastinum",),
     rf"mediastin\w*(?: silhouette| contours?| width)?{_NORMAL_GAP}{{0,4}}? {_NORMAL}"
     r"|normal mediastin\w*(?: silhouette| contours?)?"),
    (("lung_opacity",), r"lungs?(?: \w+){0,3}? clear|clear lungs?"),
    (("pleural_effusion",),
     r"(?:costophrenic|cp) (?:angles?|sulci|recesses)(?: \w+){0,2}? (?:clear|sharp|preserved|normal)"
     r"|sharp (?:costophrenic|cp) angles?"),
    (("fracture",),
     rf"(?:osseous|bony|skeletal) (?:structures?|thorax|findings?)?{_NORMAL_GAP}{{0,4}}? (?:intact|{_NORMAL})"),
    (("vascular_congestion",), rf"(?:pulmonary )?vascular(?:ity|ture| engorgement){_NORMAL_GAP}{{0,5}}? {_NORMAL}"),
]

# Global "nothing acute" phrases: they name these observations only when negated.
NEGATED_ONLY_LEXICON: list[tuple[tuple[str, ...], str]] = [
    (("fracture",),
     r"(?:acute )?(?:bony|bone|osseous|skeletal)(?: \w+){0,4}? (?:abnormalit(?:y|ies)|findings?|injur(?:y|ies)"
     r"|process|lesions?)"),
    (("lung_opacity", "pleural_effusion", "pneumothorax"),
     r"(?:acute|active) (?:(?!bony|bone|osseous|skeletal)\w+ ){0,3}?"
     r"(?:process|processes|disease|abnormalit(?:y|ies)|findings?|pathology|changes?|infiltrates?)"
     r"|cardiopulmonary (?:process|disease|abnormalit(?:y|ies)|findings?)"),
]

# Trigger phrases: (kind, direction, pattern). Kind None marks a pseudo-trigger that only keeps
# shorter triggers inside it from acting ("no change in the opacity" does not negate the opacity).
TRIGGERS: list[tuple[str | None, str, str]] = [
    (None, "pre",
     r"no (?:significant |interval |definite |appreciable )*"
     r"(?:change|changes|increase|decrease|worsening|improvement)"
     r"|not (?:significantly )?(?:changed|increased|decreased|worsened|improved)"
     r"|without (?:significant |interval )*(?:change|changes)"
     r"|not only|not necessarily|to suggest|to indicate|gram negative"),
    ("uncertain", "post",
     r"(?:cannot|can not|can't|could not|couldn't|not) be (?:entirely |completely |definitely )?(?:excluded|ruled out)"
     r"|not (?:entirely |completely |definitely )?(?:excluded|ruled out)"),
    ("uncertain", "pre",
     r"(?:cannot|can not|can't|could not|couldn't|difficult to) (?:entirely |completely |definitely )?"
     r"(?:exclude|rule out)"),
    ("uncertain", "both", r"versus|vs\.?|\?"),
    ("uncertain", "post", r"(?:is|are|was|were|remains?) (?:also )?(?:possible|suspected|questioned|likely|favored)"),
    ("absent", "post",
     r"(?:is|are|was|were|has been|have been|has|have)? ?"
     r"(?:not (?:well |clearly |definitely |convincingly )?(?:seen|identified|visuali[sz]ed|appreciated|evident"
     r"|present|demonstrated|noted|detected|visible|apparent)"
     r"|resolved|cleared|been removed|removed|absent|no longer \w+)"),
    ("absent", "pre",
     r"(?:interval )?(?:resolution|removal|resolving|clearing) of|resolved"
     r"|(?:no|without) (?:evidence|signs?|findings?) of"),
    ("uncertain", "pre",
     r"may|might|could|possib(?:le|ly|ility(?: of)?)|probabl[ey]|likely|suggest(?:s|ed|ing|ive(?: of)?)?"
     r"|question(?:able)?(?: of)?|concern(?:ing)? (?:for|of)|suspicio(?:us|n) (?:for|of)|suspect(?:ed)?"
     r"|presum(?:ed|ably|ptive)|differential(?: diagnosis)?(?: includes?)?|consider(?:ed|ation of)?"
     r"|borderline|equivocal|indeterminate|uncertain|worrisome for|raises? the possibility(?: of)?"),
    ("absent", "pre",
     r"no|not|without|free of|clear of|negative for|absence of|rather than|unlikely|nor|neither"
     r"|ruled out|rules out|excludes?"),
]

# What ends a trigger's scope inside a sentence.
CLAUSE_BREAK = re.compile(
    r";|\b(?:but|however|although|though|except|whereas|yet|nevertheless|which|aside from|apart from|other than"
    r"|with the exception of)\b|\band (?=(?:the|there|a|an)\b)|(?<=,) (?=there (?:is|are)\b)"
)


# Anatomical structures: (kind, zone, fixed side, plural, pattern). Kinds are resolved to REGIONS
# names by `_region_names`; sided kinds need a side (plural words imply both sides).
ANATOMY_LEXICON: list[tuple[str, str | None, str | None, bool, str]] = [
    ("lung", "lower", "both", True, r"bibasilar(?:ly)?|bibasal(?:ly)?|bibasally"),
    ("apex", None, "both", True, r"biapical(?:ly)?"),
    ("cpa", None, None, True, r"(?:costophrenic|cp) (?:angles|sulci|recesses)"),
    ("cpa", None, None, False, r"(?:costophrenic|cp) (?:angle|sulcus|recess)"),
    ("lung", "lower", None, True, r"(?:lung )?bases"),
    ("lung", "lower", None, False, r"(?:lung )?(?:base|basilar|basal|basally)|infrahilar"),
    ("apex", None, None, True, r"(?:lung )?apices"),
    ("apex", None, None, False, r"(?:lung )?(?:apex|apical|apically)"),
    ("lung", "mid", None, True, r"mid ?lungs|mid ?lung zones"),
    ("lung", "mid", None, False, r"mid ?lung(?: zone| field)?"),
    ("lung", "mid", "left", False, r"lingula|lingular"),
    ("lung", "lower", "left", False, r"retrocardiac"),
    ("lung", None, None, True, r"lungs|lobes|(?:lung )?zones|(?:lung )?fields|hemithoraces"),
    ("lung", None, None, False, r"lung|lobe|zone|(?:lung )?field|hemithorax|suprahilar"),
    ("hilum", None, None, True, r"hila|hilar regions"),
    ("hilum", None, None, False, r"hilum|hilus|hilar|perihilar"),
    ("hemidiaphragm", None, None, True, r"(?:hemi ?)?diaphragms"),
    ("hemidiaphragm", None, None, False, r"(?:hemi ?)?diaphragm(?:atic)?"),
    ("pleura", None, None, False, r"pleura|pleural"),
    ("heart", None, None, False, r"heart|cardiac|cardio\w*|pericardial|atri(?:um|al)|ventric\w+"),
    ("mediastinum", None, None, False, r"mediastinum|mediastinal|paratracheal|superior vena cava|svc"),
    ("aorta", None, None, False, r"aorta|aortic(?: arch| knob)?"),
    ("trachea", None, None, False, r"trachea|tracheal|carina"),
    ("spine", None, None, False,
     r"(?:thoracic |lumbar |thoracolumbar |cervical )?(?:spine|spinal|vertebra\w*)|paraspinal|mid ?thoracic"),
    ("bones", None, None, False,
     r"ribs?|clavicles?|clavicular|humer(?:us|al|i)|shoulders?|bones?|osseous|skeletal|bony(?: thorax)?"
     r"|sternum|sternal|scapula\w*|glenohumeral|acromioclavicular"),
    ("soft_tissue", None, None, False, r"soft tissues?|breasts?|axilla\w*|chest wall|subcutaneous"),
]
SIDED_KINDS = {"lung", "apex", "cpa", "hilum", "hemidiaphragm", "pleura"}
_SIDE_WORDS = {"right": "right", "left": "left", "bilateral": "both", "bilaterally": "both", "both": "both"}
_ZONE_WORDS = {"upper": "upper", "lower": "lower", "mid": "mid", "middle": "mid"}
_MODIFIERS = (r"(?:(?:right|left|bilateral|both|upper|lower|mid|middle|and|or|the"
              r"|lateral|medial|anterior|posterior|inferior|superior)\s+)*")
_SIDE_ONLY_RE = re.compile(r"\b(right|left|bilateral|bilaterally|both)(?: sided)?\b")

LUNG_KINDS = frozenset({"lung", "apex", "cpa", "hilum", "pleura", "hemidiaphragm"})
ANY_KIND = frozenset({"lung", "apex", "cpa", "hilum", "pleura", "hemidiaphragm", "heart", "mediastinum", "aorta",
                      "trachea", "spine", "bones", "soft_tissue"})
# Which anatomy a finding may be placed in, and where it goes when the sentence names none.
FINDING_KINDS = {
    "cardiomegaly": frozenset({"heart"}),
    "enlarged_cardiomediastinum": frozenset({"heart", "mediastinum"}),
    "tortuous_aorta": frozenset({"aorta"}),
    "fracture": frozenset({"bones", "spine"}),
    "degenerative_change": frozenset({"spine", "bones"}),
    "scoliosis": frozenset({"spine"}),
    "hernia": frozenset({"hemidiaphragm", "mediastinum"}),
    "hilar_enlargement": frozenset({"hilum", "mediastinum"}),
    "calcification": ANY_KIND,
    "support_device": ANY_KIND,
}
DEFAULT_REGION = {
    "cardiomegaly": "heart", "enlarged_cardiomediastinum": "mediastinum", "tortuous_aorta": "aorta",
    "fracture": "bones", "scoliosis": "spine", "degenerative_change": "spine",
}
# The kind a bare side ("small left effusion") stands for, per finding.
SIDE_ONLY_KIND = {"fracture": "bones", "hilar_enlargement": "hilum", "hernia": None, "support_device": None,
                  "cardiomegaly": None, "enlarged_cardiomediastinum": None, "tortuous_aorta": None,
                  "scoliosis": None, "degenerative_change": None, "calcification": None}
PLEURAL_FINDINGS = {"pleural_effusion"}
_MAX_ANATOMY_GAP = 60  # characters between a finding and the anatomy it is placed in


def _combine(patterns: list[str], before: str = r"\b", after: str = r"(?![a-z])") -> re.Pattern:
    """One regex over all entries; `lastgroup` names the entry. At a position earlier entries win."""
    return re.compile(before + "(?:" + "|".join(f"(?P<e{i}>{p})" for i, p in enumerate(patterns)) + ")" + after)


_FINDINGS = _combine([p for _, p in FINDING_LEXICON])
_NORMALS = [_combine([p]) for _, p in NORMAL_LEXICON]  # separately: normal statements may overlap
_NEGATED_ONLY = _combine([p for _, p in NEGATED_ONLY_LEXICON])
_TRIGGERS = _combine([p for *_, p in TRIGGERS], before=r"(?<![a-z])")
_ANATOMY = _combine([entry[-1] for entry in ANATOMY_LEXICON], after=r"(?:\s+bilaterally)?\b")
_MODIFIERS_BEFORE = re.compile(rf"\b{_MODIFIERS}$")
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
        if word in _SIDE_WORDS:
            if current["side"]:
                groups.append(current)
                current = {"side": None, "zone": None}
            current["side"] = _SIDE_WORDS[word]
        elif word in _ZONE_WORDS:
            if current["side"] or current["zone"]:
                groups.append(current)
                current = {"side": None, "zone": None}
            current["zone"] = _ZONE_WORDS[word]
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
    for m in _SIDE_ONLY_RE.finditer(text):
        if not any(m.start() < e and s < m.end() for s, e in taken):
            mentions.append(_Span(m.start(), m.end(), (None, [(_SIDE_WORDS[m.group(1)], None)])))
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
        if gap[0] <= _MAX_ANATOMY_GAP and (best_gap is None or gap < best_gap):
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


# A sentence that says the study (or a part of it) is normal, beyond the lexicon's normal
# statements: "The cardiomediastinal contours, lungs, pleura ... are normal", "Negative chest".
_NORMAL_STATEMENT = re.compile(
    r"(?<!\bnot )\b(?:normal|unremarkable|within (?:the )?normal limits|clear)\b"
    r"|\bnegative (?:chest|study|exam\w*|radiograph\w*|x ray)\b")


def states_normal(sentences: list[str], triplets: list[Triplet]) -> bool:
    """Whether the report says something is normal or absent (a negated finding, a normal statement).

    A note that names no finding at all ("At the entrance: pO2 = 61.3%") states nothing about the
    image, so it is not a normal study."""
    return any(t.existence == "absent" for t in triplets) or any(
        _NORMAL_STATEMENT.search(s.lower().replace("-", " ")) for s in sentences)


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
