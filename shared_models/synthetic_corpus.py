"""Synthetic chest radiograph report text from the shared vocabularies, for training tiny tokenizers."""
from __future__ import annotations

import random
from collections.abc import Iterator

from shared_models.vocab import OBSERVATIONS, REGIONS

# Phrasing common to chest radiograph reports; no site's text is involved.
FINDING_TEMPLATES = [
    "there is {severity} {finding} in the {region}.",
    "{severity} {finding} is seen at the {region}.",
    "no {finding}.",
    "no evidence of {finding} or {other}.",
    "possible {finding} in the {region}.",
    "findings may represent {finding}.",
    "{finding} is unchanged compared to the prior study.",
    "new {finding} in the {region}, increased since {date}.",
    "interval improvement of {finding}.",
    "cannot exclude {finding} at the {region}.",
    "the {region} shows {severity} {finding}.",
    "resolution of the previously seen {finding}.",
]
FIXED_SENTENCES = [
    "the lungs are clear.",
    "heart size is normal.",
    "the cardiomediastinal silhouette is within normal limits.",
    "no acute cardiopulmonary process.",
    "no pleural effusion or pneumothorax.",
    "pa and lateral views of the chest.",
    "portable ap upright view of the chest.",
    "the osseous structures are intact.",
    "lines and tubes are in standard position.",
    "endotracheal tube terminates 4 cm above the carina.",
    "right internal jugular catheter ends in the mid svc.",
    "median sternotomy wires and mediastinal clips are noted.",
    "degenerative changes of the thoracic spine.",
    "the hila are normal in size.",
    "pulmonary vasculature is normal.",
    "comparison is made to the radiograph from yesterday.",
    "low lung volumes with bibasilar atelectasis.",
    "recommend follow-up ct for further evaluation.",
]
SEVERITIES = ["mild", "moderate", "severe", "small", "large", "trace", "minimal", "patchy", "focal", "diffuse"]
DATES = ["___", "the prior exam", "1/2/2020", "12:30 pm", "two days ago"]


def _words(name: str) -> str:
    return name.replace("_", " ")


def synthetic_reports(num_reports: int, seed: int = 0) -> Iterator[str]:
    """Deterministic report-like texts (3-7 sentences each) built from OBSERVATIONS and REGIONS."""
    rng = random.Random(seed)
    findings = [_words(o) for o in OBSERVATIONS]
    regions = [_words(r) for r in REGIONS]
    for _ in range(num_reports):
        sentences = []
        for _ in range(rng.randint(3, 7)):
            if rng.random() < 0.35:
                sentences.append(rng.choice(FIXED_SENTENCES))
                continue
            sentences.append(
                rng.choice(FINDING_TEMPLATES).format(
                    severity=rng.choice(SEVERITIES),
                    finding=rng.choice(findings),
                    other=rng.choice(findings),
                    region=rng.choice(regions),
                    date=rng.choice(DATES),
                )
            )
        text = " ".join(s[0].upper() + s[1:] for s in sentences)
        yield f"FINDINGS: {text} IMPRESSION: {sentences[-1].capitalize()}"
