"""Phantom report text in MIMIC-CXR style, and the CheXpert labels a labeler would read from it.

Every sentence carries the labels it states (1.0 present, -1.0 uncertain, 0.0 negated), so the
chexpert CSV follows the text actually written: a present finding is always mentioned, an absent
one is negated or left unmentioned (blank).
"""
from __future__ import annotations

import textwrap

import numpy as np

from shared_models.vocab import CHEXPERT_LABELS

from .findings import LABELS_OF, Finding

Sentence = tuple[str, dict[str, float]]

LEVEL_WORDS = {
    "upper": (["upper lobe", "upper zone", "upper lung"], ["upper lobe", "upper zone"]),
    "mid": (["mid lung", "middle lobe", "mid zone", "perihilar region"], ["mid lung", "perihilar"]),
    "lower": (["lower lobe", "base", "lung base", "lower lung"], ["lower lobe", "basilar", "base"]),
}
LEFT_MID = (["lingula", "left mid lung", "left mid zone"], ["lingular", "left mid lung"])


def _pick(rng: np.random.Generator, options) -> str:
    return str(options[rng.integers(len(options))])


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _place(rng: np.random.Generator, region: str) -> tuple[str, str]:
    """(prepositional phrase, adjective phrase) for a lung zone: ('at the right base', 'right basilar')."""
    side, level, _ = region.split("_")
    if (side, level) == ("left", "mid") and rng.random() < 0.5:
        nouns, adjectives = LEFT_MID
        noun = _pick(rng, nouns)
        return f"in the {noun}", _pick(rng, adjectives)
    nouns, adjectives = LEVEL_WORDS[level]
    noun = _pick(rng, nouns)
    preposition = "at" if noun == "base" else "in"
    return f"{preposition} the {side} {noun}", f"{side} {_pick(rng, adjectives)}"


def _value(f: Finding) -> float:
    return -1.0 if f.hedged else 1.0


def _labels(f: Finding) -> dict[str, float]:
    return {label: _value(f) for label in LABELS_OF[f.finding]}


# ---------------------------------------------------------------- one (findings, impression) pair per finding
def _effusion(rng, f: Finding) -> tuple[Sentence, Sentence]:
    side, size = f.detail["side"], f.detail["size"]
    size_word = _pick(rng, ["small", "trace"]) if size == "small" else size
    if f.hedged:
        text = _pick(rng, [f"Blunting of the {side} costophrenic angle may reflect a {size_word} pleural effusion.",
                           f"Possible {size_word} {side} pleural effusion.",
                           f"A {size_word} {side}-sided effusion cannot be excluded."])
        summary = _pick(rng, [f"Possible {side} pleural effusion.", f"Questionable {size_word} {side} effusion."])
    else:
        text = _pick(rng, [f"There is a {size_word} {side} pleural effusion.",
                           f"{_cap(size_word)} {side} pleural effusion with blunting of the {side} costophrenic angle.",
                           f"A {size_word} amount of {side}-sided pleural fluid is seen.",
                           f"{_cap(size_word)} {side} effusion is present layering at the {side} base."])
        summary = _pick(rng, [f"{_cap(size_word)} {side} pleural effusion.", f"{_cap(side)} effusion, {size_word}."])
    return (text, _labels(f)), (summary, _labels(f))


def _consolidation(rng, f: Finding) -> tuple[Sentence, Sentence]:
    at, where = _place(rng, f.region)
    pneumonia, pneumonia_hedged = f.detail.get("pneumonia"), f.detail.get("pneumonia_hedged") or f.hedged
    if f.hedged:
        text = _pick(rng, [f"Ill-defined opacity {at} may represent consolidation",
                           f"Hazy opacity {at}, possibly early consolidation",
                           f"Subtle patchy opacity {at} could reflect airspace disease"])
        summary = _pick(rng, [f"Possible {where} consolidation", f"Questionable {where} opacity"])
    else:
        text = _pick(rng, [f"There is consolidation {at}", f"Patchy airspace opacity is seen {at}",
                           f"Focal airspace consolidation {at}", f"Patchy airspace disease {at}",
                           f"New opacity {at}"])
        summary = _cap(where) + _pick(rng, [" consolidation", " opacity", " airspace disease"])
    labels = _labels(f)
    if pneumonia:
        labels["Pneumonia"] = -1.0 if pneumonia_hedged else 1.0
        clause = (_pick(rng, ["; cannot exclude early pneumonia", ", which could represent pneumonia in the "
                              "appropriate clinical setting", ", possibly pneumonia"]) if pneumonia_hedged
                  else _pick(rng, [", consistent with pneumonia", ", compatible with pneumonia"]))
        text, summary = text + clause, summary + clause
    return (text + ".", labels), (summary + ".", labels)


def _pneumothorax(rng, f: Finding) -> tuple[Sentence, Sentence]:
    side, size = f.detail["side"], f.detail["size"]
    apical = " apical" if f.region.endswith("apex") else ""
    if f.hedged:
        text = _pick(rng, [f"Possible tiny {side}{apical} pneumothorax.",
                           f"A {side}{apical} pneumothorax cannot be excluded.",
                           f"Faint pleural line at the {side} apex may represent a small pneumothorax."])
        summary = _pick(rng, [f"Possible {side} pneumothorax.", f"Cannot exclude small {side} pneumothorax."])
    else:
        line_place = f"at the {side} apex" if apical else f"along the {side} hemithorax"
        text = _pick(rng, [f"There is a {size} {side}{apical} pneumothorax.",
                           f"A {size} {side} pneumothorax is present.",
                           f"{_cap(side)} pneumothorax is seen, {size} in size.",
                           f"Visible pleural line {line_place} compatible with a {size} pneumothorax."])
        summary = _pick(rng, [f"{_cap(size)} {side} pneumothorax.", f"{_cap(side)}{apical} pneumothorax."])
    return (text, _labels(f)), (summary, _labels(f))


def _lesion(rng, f: Finding) -> tuple[Sentence, Sentence]:
    at, where = _place(rng, f.region)
    mm = int(round(f.detail.get("mm", 12)))
    if f.finding == "mass":
        cm = f"{mm / 10:.1f}"
        text = (_pick(rng, [f"Rounded density {at} may represent a mass.",
                            f"Possible mass {at}, measuring up to {cm} cm."])
                if f.hedged else
                _pick(rng, [f"A {cm} cm mass is present {at}.", f"Large lobulated mass {at}, measuring {cm} cm.",
                            f"There is a {cm}-cm mass-like opacity {at}."]))
        summary = _pick(rng, [f"{_cap(where)} mass, further evaluation with CT recommended.",
                              f"{_cap(where)} mass concerning for malignancy."])
        if f.hedged:
            summary = f"Possible {where} mass; recommend CT."
    else:
        text = (_pick(rng, [f"Possible nodule {at}; recommend CT.",
                            f"A nodular density {at} may represent a nipple shadow versus true nodule."])
                if f.hedged else
                _pick(rng, [f"A {mm} mm nodule is seen {at}.",
                            f"Nodular opacity {at}, measuring approximately {mm} mm.",
                            f"There is a {mm}-mm rounded density projecting {at}."]))
        summary = (f"Possible {where} nodule." if f.hedged else
                   _pick(rng, [f"{_cap(where)} pulmonary nodule; CT recommended.", f"{mm} mm {where} nodule."]))
    return (text, _labels(f)), (summary, _labels(f))


def _cardiomegaly(rng, f: Finding) -> tuple[Sentence, Sentence]:
    severity = f.detail["severity"]
    if f.hedged:
        text = _pick(rng, ["Heart size is top normal to mildly enlarged.",
                           "The cardiac silhouette is possibly enlarged."])
        summary = _pick(rng, ["Possible mild cardiomegaly.", "Borderline cardiomegaly."])
    else:
        text = _pick(rng, [f"The heart is {severity}ly enlarged.", f"{_cap(severity)} cardiomegaly.",
                           "The cardiac silhouette is enlarged.",
                           f"There is {severity} enlargement of the cardiac silhouette."])
        summary = _pick(rng, ["Cardiomegaly.", f"{_cap(severity)} cardiomegaly.", "Enlarged heart."])
    return (text, _labels(f)), (summary, _labels(f))


def _atelectasis(rng, f: Finding) -> tuple[Sentence, Sentence]:
    at, where = _place(rng, f.region)
    if f.hedged:
        text = _pick(rng, [f"Linear opacity {at} may represent atelectasis.",
                           f"Streaky opacity {at}, possibly atelectasis."])
        summary = f"Possible {where} atelectasis."
    else:
        text = _pick(rng, [f"Linear opacity {at} is consistent with subsegmental atelectasis.",
                           f"Plate-like atelectasis {at}.", f"There is discoid atelectasis {at}.",
                           f"Streaky opacity {at} likely reflects atelectasis."])
        summary = _pick(rng, [f"{_cap(where)} atelectasis.", f"Subsegmental atelectasis {at}."])
    return (text, _labels(f)), (summary, _labels(f))


def _edema(rng, f: Finding) -> tuple[Sentence, Sentence]:
    severity = f.detail["severity"]
    if f.hedged:
        text = _pick(rng, ["Hazy perihilar opacities could reflect mild edema.", "Possible mild interstitial edema."])
        summary = "Possible mild pulmonary edema."
    else:
        text = _pick(rng, [f"There is {severity} pulmonary edema.",
                           f"Perihilar haziness and vascular indistinctness consistent with {severity} "
                           "pulmonary edema.",
                           "Interstitial edema is present bilaterally.",
                           f"{_cap(severity)} interstitial pulmonary edema."])
        summary = _pick(rng, [f"{_cap(severity)} pulmonary edema.", "Pulmonary edema.",
                              f"{_cap(severity)} interstitial edema."])
    return (text, _labels(f)), (summary, _labels(f))


def _device(rng, f: Finding) -> tuple[Sentence, Sentence]:
    kind, side = f.detail["kind"], f.detail["side"]
    if kind == "endotracheal_tube":
        cm = rng.integers(3, 7)
        text = _pick(rng, [f"Endotracheal tube terminates approximately {cm} cm above the carina.",
                           f"An ET tube is present with its tip {cm} cm from the carina."])
        summary = _pick(rng, ["ET tube in standard position.", "Endotracheal tube appropriately positioned."])
    elif kind == "central_line":
        tip = _pick(rng, ["mid SVC", "lower SVC", "cavoatrial junction"])
        text = _pick(rng, [f"{_cap(side)} internal jugular central venous catheter terminates in the {tip}.",
                           f"{_cap(side)}-sided PICC line tip projects over the {tip}."])
        summary = _pick(rng, [f"{_cap(side)} central line tip in the {tip}.",
                              "Central venous catheter in satisfactory position."])
    else:
        text = _pick(rng, ["Enteric tube courses below the diaphragm with the tip in the stomach.",
                           "Nasogastric tube tip is in the stomach."])
        summary = _pick(rng, ["Enteric tube in the stomach.", "NG tube in appropriate position."])
    return (text, _labels(f)), (summary, _labels(f))


SENTENCES = {
    "pleural_effusion": _effusion, "consolidation": _consolidation, "pneumothorax": _pneumothorax,
    "nodule": _lesion, "mass": _lesion, "cardiomegaly": _cardiomegaly, "atelectasis": _atelectasis,
    "edema": _edema, "support_device": _device,
}

# Negations: the labels a sentence states as absent, and its wordings.
NEGATIONS = [
    (("Pneumothorax",), ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."]),
    (("Pleural Effusion",), ["No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."]),
    (("Pleural Effusion", "Pneumothorax"), ["No pleural effusion or pneumothorax.",
                                            "There is no effusion or pneumothorax."]),
    (("Consolidation",), ["No focal consolidation.", "There is no focal consolidation.",
                          "No focal airspace consolidation."]),
    (("Edema",), ["No pulmonary edema.", "No evidence of pulmonary edema."]),
    (("Cardiomegaly",), ["Heart size is normal.", "The heart is normal in size.", "Normal heart size."]),
    (("Cardiomegaly", "Enlarged Cardiomediastinum"), ["The cardiomediastinal silhouette is normal.",
                                                      "Cardiomediastinal contours are within normal limits."]),
    (("Lung Lesion",), ["No suspicious pulmonary nodules.", "No focal mass or nodule."]),
    (("Fracture",), ["No displaced rib fracture is seen.", "No acute fracture."]),
]
NORMAL_LUNGS = ["The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear."]
NORMAL_IMPRESSIONS = ["No acute cardiopulmonary process.", "No acute intrathoracic abnormality.",
                      "Normal chest radiograph.", "No acute cardiopulmonary abnormality."]
INDICATIONS = ["___-year-old man with cough and fever, evaluate for pneumonia.", "___F with shortness of breath.",
               "History: ___M with chest pain.", "___-year-old woman with dyspnea.  Evaluate for effusion.",
               "Preoperative evaluation.", "___M s/p line placement, assess position.", "Fever.",
               "___F with hypoxia, evaluate for edema."]
ORDER = ["support_device", "consolidation", "atelectasis", "nodule", "mass", "edema", "pleural_effusion",
         "pneumothorax", "cardiomegaly"]


def _findings_section(rng, present: list[Sentence], lung_clear: bool) -> list[Sentence]:
    stated = {label for _, labels in present for label in labels}
    sentences = list(present)
    if lung_clear and rng.random() < 0.6:
        sentences.append((_pick(rng, NORMAL_LUNGS), {}))
    for labels, wordings in NEGATIONS:
        if not stated.intersection(labels) and rng.random() < 0.45:
            sentences.append((_pick(rng, wordings), {label: 0.0 for label in labels}))
            stated.update(labels)
    return sentences


def write_report(rng: np.random.Generator, findings: list[Finding], exam: str, technique: str,
                 has_prior: bool) -> tuple[str, dict[str, float | None]]:
    """MIMIC-style report text and the chexpert CSV row it implies (None = blank)."""
    ordered = sorted(findings, key=lambda f: ORDER.index(f.finding))
    pairs = [SENTENCES[f.finding](rng, f) for f in ordered]
    lung_clear = all(f.finding in {"cardiomegaly", "support_device"} for f in findings)
    body = _findings_section(rng, [p[0] for p in pairs], lung_clear)
    pathology = [p[1] for f, p in zip(ordered, pairs) if f.finding != "support_device"]
    impression = [p[1] for p in pairs]
    if not pathology:
        impression.insert(0, (_pick(rng, NORMAL_IMPRESSIONS), {}))
    keep = rng.choice(["both"] * 8 + ["findings", "impression"])
    sections = [("EXAMINATION", exam), ("INDICATION", _pick(rng, INDICATIONS))]
    if rng.random() < 0.85:
        sections.append(("TECHNIQUE", technique))
    comparison = _pick(rng, ["___.", "Chest radiograph ___."] if has_prior else ["None.", "___."])
    sections.append(("COMPARISON", comparison))
    written: list[Sentence] = []
    if keep in ("both", "findings"):
        sections.append(("FINDINGS", " ".join(s for s, _ in body)))
        written += body
    if keep in ("both", "impression"):
        sections.append(("IMPRESSION", " ".join(s for s, _ in impression)))
        written += impression
    return _layout(sections), _chexpert_row(written, findings)


def _layout(sections: list[tuple[str, str]]) -> str:
    lines = [" " * 33 + "FINAL REPORT"]
    for header, text in sections:
        if header in ("FINDINGS", "IMPRESSION"):
            lines += [f" {header}: ", " ", textwrap.fill(text, 78, initial_indent=" ", subsequent_indent=" "), " "]
        else:
            lines += [textwrap.fill(f"{header}:  {text}", 78, initial_indent=" ", subsequent_indent=" "), " "]
    return "\n".join(lines).rstrip() + "\n"


def _chexpert_row(written: list[Sentence], findings: list[Finding]) -> dict[str, float | None]:
    """Merge sentence labels (present over uncertain over negated); No Finding is 1.0 or blank
    (1.0 when nothing but support devices is present, as in CheXpert)."""
    rank = {1.0: 2, -1.0: 1, 0.0: 0}
    row: dict[str, float | None] = {name: None for name in CHEXPERT_LABELS}
    for _, labels in written:
        for label, value in labels.items():
            if row[label] is None or rank[value] > rank[row[label]]:
                row[label] = value
    row["No Finding"] = None if any(f.finding != "support_device" for f in findings) else 1.0
    return row
