"""Split a catalog's training studies into patient-disjoint virtual sites, by a registered partition (`partition.name`)."""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from omegaconf import DictConfig

from client.data.catalog import StudyEntry
from shared_models.vocab import OBSERVATIONS

log = logging.getLogger(__name__)

NO_FINDING = "no_finding"


@dataclass(frozen=True)
class Site:
    """One virtual site: its studies and patients, and the scanner profile index its images get (or None)."""

    name: str
    studies: list[str]
    patients: list[str]
    scanner: int | None = None


Patients = dict[str, list[StudyEntry]]          # patient id -> that patient's studies
Splitter = Callable[[list[str], Patients, int, DictConfig, np.random.Generator], list[list[str]]]
PARTITIONS: dict[str, Splitter] = {}


def register_partition(name: str) -> Callable[[Splitter], Splitter]:
    def register(fn: Splitter) -> Splitter:
        PARTITIONS[name] = fn
        return fn
    return register


def dominant_finding(studies: list[StudyEntry]) -> str:
    """The patient's most frequent present observation over their studies (ties: vocabulary order)."""
    counts = Counter(OBSERVATIONS[k] for study in studies for k, value in enumerate(study.tags)
                     if value == 1 and OBSERVATIONS[k] != NO_FINDING)
    if not counts:
        return NO_FINDING
    top = max(counts.values())
    return next(name for name in OBSERVATIONS if counts.get(name) == top)


def _split_by_shares(patients: list[str], shares: np.ndarray) -> list[list[str]]:
    bounds = np.round(np.cumsum(np.r_[0.0, shares]) / shares.sum() * len(patients)).astype(int)
    return [patients[bounds[i]:bounds[i + 1]] for i in range(len(shares))]


def _fill_empty(groups: list[list[str]]) -> list[list[str]]:
    """Give every empty site one patient from the largest site, so no site is silently empty."""
    for group in groups:
        if not group:
            largest = max(groups, key=len)
            if len(largest) < 2:
                raise ValueError(f"{sum(map(len, groups))} patients cannot fill {len(groups)} sites")
            group.append(largest.pop())
    return groups


@register_partition("iid")
def iid(order: list[str], patients: Patients, sites: int, cfg: DictConfig, rng: np.random.Generator) -> list[list[str]]:
    """Patients shuffled and dealt into equal shares."""
    return _fill_empty(_split_by_shares(order, np.ones(sites)))


@register_partition("scanner")
def scanner(order: list[str], patients: Patients, sites: int, cfg: DictConfig, rng: np.random.Generator) -> list[list[str]]:
    """An iid split; the sites differ by their scanner profile (set in `partition`)."""
    return iid(order, patients, sites, cfg, rng)


@register_partition("dirichlet")
def dirichlet(order: list[str], patients: Patients, sites: int, cfg: DictConfig, rng: np.random.Generator) -> list[list[str]]:
    """Each dominant-finding class is dealt to the sites in Dirichlet(alpha) proportions: small alpha,
    each site sees a different finding mix."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for patient in order:
        by_class[dominant_finding(patients[patient])].append(patient)
    groups: list[list[str]] = [[] for _ in range(sites)]
    for name in sorted(by_class):
        for group, part in zip(groups, _split_by_shares(by_class[name], rng.dirichlet(np.full(sites, float(cfg.alpha))))):
            group.extend(part)
    return _fill_empty(groups)


@register_partition("quantity")
def quantity(order: list[str], patients: Patients, sites: int, cfg: DictConfig, rng: np.random.Generator) -> list[list[str]]:
    """Site sizes drawn from Dirichlet(alpha) (small alpha: a few large sites, several small ones)."""
    return _fill_empty(_split_by_shares(order, rng.dirichlet(np.full(sites, float(cfg.alpha)))))


@register_partition("natural")
def natural(order: list[str], patients: Patients, sites: int, cfg: DictConfig, rng: np.random.Generator) -> list[list[str]]:
    """The data's own `site` column (e.g. a manifest's): one virtual site per value."""
    return list(natural_groups(patients).values())


def natural_groups(patients: Patients) -> dict[str, list[str]]:
    """Patients per value of the `site` column; a patient seen at two sites, or none, is an error."""
    unlabelled = sorted(p for p, studies in patients.items() if any(s.site in (None, "") for s in studies))
    if unlabelled:
        raise ValueError(f"partition=natural needs a `site` for every study; {len(unlabelled)} patient(s) have "
                         "studies without one: add a `site` column to the manifest, or choose another partition")
    groups: dict[str, list[str]] = defaultdict(list)
    for patient in sorted(patients):
        names = {s.site for s in patients[patient]}
        if len(names) > 1:
            raise ValueError(f"partition=natural: a patient has studies at sites {sorted(names)}; sites must be "
                             "patient-disjoint — fix the `site` column or choose another partition")
        groups[names.pop()].append(patient)
    return dict(sorted(groups.items()))


def partition(studies: list[StudyEntry], sites: int, cfg: DictConfig, seed: int,
              held_out: set[str] = frozenset()) -> list[Site]:
    """Split `studies` (a catalog's training studies) into patient-disjoint sites named `cfg.name`.

    Only studies with a usable report are pre-trained on (`has_report`); the others are counted per
    site by `composition`, and a data site (the `site` column) left with none is named in a warning.
    Patients in `held_out` (those the evaluation uses) never reach a site; the function refuses to
    return a split in which a patient is at two sites or in `held_out`."""
    if cfg.name not in PARTITIONS:
        raise ValueError(f"partition.name={cfg.name!r} is not one of {sorted(PARTITIONS)} (partition=NAME picks one)")
    warn_sites_without_reports(studies, held_out)
    patients: Patients = defaultdict(list)
    for study in studies:
        if study.has_report:
            patients[study.patient_id].append(study)
    overlap = sorted(set(patients) & set(held_out))
    if overlap:
        log.warning("%d patient(s) of the training studies are also in the evaluation splits; they are left out "
                    "of every site so that no patient is both pre-trained on and evaluated", len(overlap))
        for patient in overlap:
            del patients[patient]
    if not patients:
        raise ValueError(f"none of the {len(studies)} training studies has a usable report and a patient outside "
                         "the evaluation splits: nothing to pre-train on (python -m client.data summary shows the "
                         "report status)")
    if cfg.name != "natural" and len(patients) < sites:
        raise ValueError(f"{len(patients)} training patients cannot fill {sites} sites; lower federation.sites")
    rng = np.random.default_rng([seed, 0x5173])
    order = [str(p) for p in rng.permutation(sorted(patients))]
    groups = PARTITIONS[cfg.name](order, patients, sites, cfg, rng)
    names = list(natural_groups(patients)) if cfg.name == "natural" else [f"site_{i}" for i in range(len(groups))]
    result = [Site(name=str(name), patients=sorted(group),
                   studies=sorted(s.study_id for p in group for s in patients[p]),
                   scanner=i if cfg.name == "scanner" else None)
              for i, (name, group) in enumerate(zip(names, groups))]
    check_disjoint(result, held_out)
    return result


def pretraining_counts(studies: list[StudyEntry], held_out: set[str] = frozenset()) -> dict[str, Counter]:
    """Per data site (the `site` column): studies with a usable report (`pretraining`) and without (`without_report`)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for study in studies:
        if study.site not in (None, "") and study.patient_id not in held_out:
            counts[study.site]["pretraining" if study.has_report else "without_report"] += 1
    return dict(sorted(counts.items()))


def warn_sites_without_reports(studies: list[StudyEntry], held_out: set[str] = frozenset()) -> list[str]:
    """Name (in a warning) every data site none of whose studies can be pre-trained on; returns them."""
    empty = {name: c["without_report"] for name, c in pretraining_counts(studies, held_out).items()
             if not c["pretraining"]}
    if empty:
        log.warning("site(s) %s have no study with a usable report (%s): they are left out of pre-training; "
                    "their images still serve image-only evaluation (linear probe, segmentation)",
                    ", ".join(empty), ", ".join(f"{name}: {n} without one" for name, n in empty.items()))
    missing = sum(not s.has_report for s in studies)
    if missing:
        log.info("%d of %d training studies have no usable report and are left out of pre-training",
                 missing, len(studies))
    return list(empty)


def check_disjoint(sites: list[Site], held_out: set[str] = frozenset()) -> None:
    """Raise if a patient is at two sites or also held out for evaluation."""
    seen: dict[str, str] = {}
    for site in sites:
        for patient in site.patients:
            if patient in seen:
                raise AssertionError(f"a patient is at sites {seen[patient]} and {site.name}: the partition is not patient-disjoint")
            if patient in held_out:
                raise AssertionError(f"site {site.name} holds a patient of the evaluation splits")
            seen[patient] = site.name


# ------------------------------------------------------------------------------------- composition
def composition(sites: list[Site], studies: list[StudyEntry]) -> dict[str, dict]:
    """Per site: studies (pre-training), patients, scanner, finding_mix (share of its studies with each
    observation present) and without_report (its studies left out of pre-training for want of a report).
    A data site (`site` column) with no pre-training study gets a row of its own with 0 studies."""
    by_id = {s.study_id: s for s in studies}
    site_names = {site.name for site in sites}
    owner = {p: site.name for site in sites for p in site.patients}
    without_report: Counter = Counter()
    for study in studies:
        if not study.has_report:   # natural sites count their own; virtual ones their patients'
            name = study.site if study.site in site_names else owner.get(study.patient_id)
            without_report[name] += 1
    table = {}
    for site in sites:
        present = np.array([[value == 1 for value in by_id[sid].tags] for sid in site.studies], dtype=float)
        shares = present.mean(0) if len(present) else np.zeros(len(OBSERVATIONS))
        table[site.name] = {
            "studies": len(site.studies),
            "patients": len(site.patients),
            "scanner": site.scanner,
            "finding_mix": {name: round(float(v), 3) for name, v in zip(OBSERVATIONS, shares) if v > 0},
            "without_report": without_report[site.name],
        }
    for name, counts in pretraining_counts(studies).items():
        if not counts["pretraining"] and name not in table:
            table[name] = {"studies": 0, "patients": 0, "scanner": None, "finding_mix": {},
                           "without_report": counts["without_report"]}
    return table


def composition_markdown(table: dict[str, dict], top: int = 6) -> str:
    """The composition as a markdown table: sizes and the most common findings per site."""
    lines = ["| site | studies | patients | without report | scanner | most common findings (share of studies) |",
             "|---|---:|---:|---:|---|---|"]
    for name, row in table.items():
        mix = sorted(row["finding_mix"].items(), key=lambda kv: -kv[1])[:top]
        findings = ", ".join(f"{k} {v:.2f}" for k, v in mix) or "none"
        scanner_text = "-" if row["scanner"] is None else f"profile {row['scanner']}"
        findings = findings if row["studies"] else "none: not pre-trained on"
        lines.append(f"| {name} | {row['studies']} | {row['patients']} | {row.get('without_report', 0)} | "
                     f"{scanner_text} | {findings} |")
    return "\n".join(lines)


def save_partition(folder: Path, sites: list[Site], table: dict[str, dict]) -> None:
    """partition.json (the sites' study and patient lists: they stay on this machine) and sites.md."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "partition.json").write_text(json.dumps({s.name: asdict(s) for s in sites}, indent=1))
    (folder / "sites.md").write_text(composition_markdown(table) + "\n")
