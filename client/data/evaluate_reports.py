"""Score the report extractor against the people-written MeSH `major` tags of IU X-ray reports."""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

from client.data.errors import Rejected
from client.data.reports import OBSERVATION_INDEX, parse_report

# The fixed map of the contracts page: MeSH tag components (a prefix of the tag's '/'-separated
# components) -> evaluated observation.
MESH_MAP: dict[str, list[str]] = {
    "cardiomegaly": ["Cardiomegaly"],
    "lung_opacity": ["Opacity", "Airspace Disease", "Density", "Infiltrate", "Consolidation", "Pneumonia"],
    "atelectasis": ["Pulmonary Atelectasis"],
    "pleural_effusion": ["Pleural Effusion"],
    "granuloma": ["Calcified Granuloma", "Granulomatous Disease", "Granuloma"],
    "nodule_or_mass": ["Nodule", "Mass"],
    "edema": ["Pulmonary Edema", "Pulmonary Congestion"],
    "emphysema": ["Emphysema", "Pulmonary Emphysema", "Pulmonary Disease, Chronic Obstructive", "Lung/hyperdistention"],
    "support_device": ["Catheters, Indwelling", "Implanted Medical Device", "Surgical Instruments", "Medical Device"],
    "fracture": ["Fractures, Bone"],
}
# Evaluated observation -> the vocabulary observations whose tag predicts it (the MeSH side groups
# the same findings: congestion with edema, hyperdistention with emphysema, ...).
PREDICTED_BY: dict[str, list[str]] = {
    "cardiomegaly": ["cardiomegaly"],
    "lung_opacity": ["lung_opacity", "consolidation", "pneumonia"],
    "atelectasis": ["atelectasis"],
    "pleural_effusion": ["pleural_effusion"],
    "granuloma": ["granuloma"],
    "nodule_or_mass": ["nodule", "mass", "lung_lesion"],
    "edema": ["edema", "vascular_congestion"],
    "emphysema": ["emphysema", "hyperinflation"],
    "support_device": ["support_device"],
    "fracture": ["fracture"],
}


def _components(tag: str) -> list[str]:
    return [part.strip().casefold() for part in tag.split("/")]


def mesh_observations(major_tags: list[str]) -> set[str]:
    """The evaluated observations a report's MeSH major tags name."""
    found = set()
    for tag in major_tags:
        components = _components(tag)
        for observation, prefixes in MESH_MAP.items():
            if any(components[: len(p)] == p for p in map(_components, prefixes)):
                found.add(observation)
    return found


def predicted_observations(text: str) -> set[str]:
    """The evaluated observations the extractor finds present or uncertain in report text."""
    return extracted(text)[0]


def extracted(text: str) -> tuple[set[str], bool]:
    """(evaluated observations present or uncertain, whether the `no_finding` tag is set)."""
    try:
        tags = parse_report(text).tags
    except Rejected:
        return set(), False
    found = {obs for obs, names in PREDICTED_BY.items() if any(tags[OBSERVATION_INDEX[n]] != 0 for n in names)}
    return found, bool(tags[OBSERVATION_INDEX["no_finding"]] == 1)


def iu_reports(tgz_path: str | Path):
    """Yield (report id, text as 'FINDINGS: ... IMPRESSION: ...', MeSH major tags) per IU XML file."""
    with tarfile.open(tgz_path) as archive:
        for member in archive:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            root = ET.fromstring(archive.extractfile(member).read())
            sections = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
            text = f"FINDINGS: {sections.get('FINDINGS', '')} IMPRESSION: {sections.get('IMPRESSION', '')}"
            major = [m.text.strip() for m in root.iter("major") if m.text and m.text.strip()]
            yield Path(member.name).stem, text, major


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def evaluate_iu(tgz_path: str | Path) -> dict:
    """Micro F1 and per-observation scores over the ten mapped observations, and normal precision."""
    counts = {obs: {"tp": 0, "fp": 0, "fn": 0} for obs in MESH_MAP}
    reports = normal_reports = normal_clean = 0
    no_finding = {"tp": 0, "fp": 0, "fn": 0}   # the no_finding tag against "the only major tag is normal"
    for _, text, major in iu_reports(tgz_path):
        reports += 1
        truth, (predicted, tagged_normal) = mesh_observations(major), extracted(text)
        is_normal = [t.casefold() for t in major] == ["normal"]
        no_finding["tp"] += is_normal and tagged_normal
        no_finding["fp"] += tagged_normal and not is_normal
        no_finding["fn"] += is_normal and not tagged_normal
        for obs, c in counts.items():
            c["tp"] += obs in truth and obs in predicted
            c["fp"] += obs not in truth and obs in predicted
            c["fn"] += obs in truth and obs not in predicted
        if is_normal:
            normal_reports += 1
            normal_clean += not predicted
    if reports == 0:
        raise ValueError(f"{tgz_path}: no .xml reports in the archive; pass the IU X-ray reports .tgz")
    per_observation = {}
    for obs, c in counts.items():
        precision, recall, f1 = _f1(c["tp"], c["fp"], c["fn"])
        per_observation[obs] = {"precision": precision, "recall": recall, "f1": f1, "support": c["tp"] + c["fn"]}
    total = {k: sum(c[k] for c in counts.values()) for k in ("tp", "fp", "fn")}
    return {
        "reports": reports,
        "finding_micro_f1": _f1(total["tp"], total["fp"], total["fn"])[2],
        "per_observation": per_observation,
        "normal_precision": normal_clean / normal_reports if normal_reports else 0.0,
        "no_finding_tag": dict(zip(("precision", "recall", "f1"), _f1(**no_finding))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.data evaluate-reports", description=__doc__)
    parser.add_argument("--iu-tgz", required=True, type=Path, help="IU X-ray reports archive (ecgen-radiology/*.xml)")
    parser.add_argument("--json", type=Path, help="write the scores here as JSON")
    args = parser.parse_args(argv)
    if not args.iu_tgz.is_file():
        parser.error(f"--iu-tgz {args.iu_tgz}: no such file; pass the path of iu-reports-dev.tgz")
    try:
        results = evaluate_iu(args.iu_tgz)
    except (tarfile.TarError, ET.ParseError, ValueError) as error:
        parser.error(f"--iu-tgz {args.iu_tgz}: cannot read the reports ({error})")
    print(f"{results['reports']} reports  finding_micro_f1 {results['finding_micro_f1']:.3f}  "
          f"normal_precision {results['normal_precision']:.3f}  no_finding tag P "
          f"{results['no_finding_tag']['precision']:.3f} R {results['no_finding_tag']['recall']:.3f}")
    for obs, s in results["per_observation"].items():
        print(f"  {obs:<17} P {s['precision']:.3f}  R {s['recall']:.3f}  F1 {s['f1']:.3f}  n={s['support']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
