"""Virtual sites: patient-disjoint, reproducible, and each partition does what it says."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from client.data.catalog import StudyEntry
from client.data.scanner import apply_scanner, scanner_profile
from shared_models.vocab import OBSERVATIONS
from simulations.partition import (PARTITIONS, check_disjoint, composition, composition_markdown, dominant_finding,
                                   partition)

FINDINGS = ["atelectasis", "cardiomegaly", "pleural_effusion", "edema", "no_finding"]


def make_studies(patients: int = 120, seed: int = 0, sites: list[str] | None = None) -> list[StudyEntry]:
    """Patients with one to three studies; each patient has one finding in all their studies."""
    rng = np.random.default_rng(seed)
    studies = []
    for p in range(patients):
        finding = FINDINGS[p % len(FINDINGS)]
        tags = [1.0 if name == finding else 0.0 for name in OBSERVATIONS]
        for s in range(int(rng.integers(1, 4))):
            studies.append(StudyEntry(patient_id=f"p{p:04d}", study_id=f"s{p:04d}_{s}", split="train",
                                      labels=[math.nan] * 14, tags=tags,
                                      site=None if sites is None else sites[p % len(sites)], images=1))
    return studies


def cfg(name: str, **extra):
    return OmegaConf.create({"name": name, "split": "train", **extra})


@pytest.mark.parametrize("name,extra", [("iid", {}), ("scanner", {}), ("dirichlet", {"alpha": 0.3}),
                                            ("quantity", {"alpha": 0.5})])
def test_every_partition_is_patient_disjoint_complete_and_reproducible(name, extra):
    studies = make_studies()
    sites = partition(studies, 4, cfg(name, **extra), seed=3)
    assert len(sites) == 4 and all(site.studies for site in sites)
    patients = [p for site in sites for p in site.patients]
    assert len(patients) == len(set(patients)) == 120
    assert sorted(s for site in sites for s in site.studies) == sorted(s.study_id for s in studies)
    for site in sites:   # a patient's studies all go with the patient
        assert {s.patient_id for s in studies if s.study_id in set(site.studies)} == set(site.patients)
    assert partition(studies, 4, cfg(name, **extra), seed=3) == sites
    assert partition(studies, 4, cfg(name, **extra), seed=4) != sites


def test_held_out_patients_never_reach_a_site():
    studies = make_studies()
    held_out = {"p0001", "p0007", "p0100"}
    sites = partition(studies, 3, cfg("iid"), seed=0, held_out=held_out)
    assert not held_out & {p for site in sites for p in site.patients}
    assert sum(len(site.patients) for site in sites) == 117


def test_check_disjoint_catches_a_shared_patient():
    sites = partition(make_studies(30), 2, cfg("iid"), seed=0)
    bad = [sites[0], type(sites[1])(sites[1].name, sites[1].studies, sites[1].patients + [sites[0].patients[0]])]
    with pytest.raises(AssertionError, match="not patient-disjoint"):
        check_disjoint(bad)
    with pytest.raises(AssertionError, match="evaluation"):
        check_disjoint(sites, held_out={sites[1].patients[0]})


def _mixes(sites, studies):
    table = composition(sites, studies)
    return np.array([[table[s.name]["finding_mix"].get(f, 0.0) for f in FINDINGS[:4]] for s in sites])


def test_dirichlet_finding_mixes_differ_and_iid_ones_do_not():
    studies = make_studies(400)
    skewed = _mixes(partition(studies, 4, cfg("dirichlet", alpha=0.1), seed=1), studies)
    even = _mixes(partition(studies, 4, cfg("iid"), seed=1), studies)
    # spread of each finding's share across sites: large under small alpha, small under iid
    assert skewed.std(0).mean() > 3 * even.std(0).mean()
    assert skewed.std(0).mean() > 0.1


def test_quantity_sizes_are_skewed_and_iid_sizes_equal():
    studies = make_studies(400)
    skewed = [len(s.patients) for s in partition(studies, 5, cfg("quantity", alpha=0.3), seed=2)]
    even = [len(s.patients) for s in partition(studies, 5, cfg("iid"), seed=2)]
    assert max(even) - min(even) <= 1
    assert max(skewed) > 2 * min(skewed) and min(skewed) >= 1


def test_natural_follows_the_site_column_and_refuses_a_patient_at_two_sites():
    studies = make_studies(60, sites=["north", "south", "east"])
    sites = partition(studies, 8, cfg("natural"), seed=0)   # federation.sites is ignored
    assert [s.name for s in sites] == ["east", "north", "south"]
    for site in sites:
        assert {s.site for s in studies if s.patient_id in set(site.patients)} == {site.name}
    first = studies[0]
    assert first.site != "east"
    moved = [dataclasses.replace(first, study_id="extra", site="east")]   # the same patient at a second site
    with pytest.raises(ValueError, match="patient-disjoint"):
        partition(studies + moved, 3, cfg("natural"), seed=0)
    with pytest.raises(ValueError, match="site"):
        partition(make_studies(10), 2, cfg("natural"), seed=0)


def test_scanner_sites_get_distinct_profiles_that_change_the_images():
    sites = partition(make_studies(40), 3, cfg("scanner"), seed=0)
    assert [s.scanner for s in sites] == [0, 1, 2]
    profiles = [scanner_profile(s.scanner, 0) for s in sites]
    assert len(set(profiles)) == 3
    image = torch.linspace(0, 1, 64 * 64).reshape(1, 64, 64)
    rendered = [apply_scanner(image, p, "img") for p in profiles]
    assert torch.allclose(rendered[0], image, atol=1e-6)   # site 0 is the identity scanner
    assert (rendered[1] - rendered[2]).abs().mean() > 0.01
    assert all(s.scanner is None for s in partition(make_studies(40), 3, cfg("iid"), seed=0))


def test_dominant_finding_and_composition_table():
    studies = make_studies(10)
    assert dominant_finding([s for s in studies if s.patient_id == "p0001"]) == "cardiomegaly"
    assert dominant_finding([s for s in studies if s.patient_id == "p0004"]) == "no_finding"
    sites = partition(studies, 2, cfg("iid"), seed=0)
    table = composition(sites, studies)
    for site in sites:
        row = table[site.name]
        assert row["studies"] == len(site.studies) and row["patients"] == len(site.patients)
        with_edema = sum(1 for s in studies if s.study_id in set(site.studies) and s.patient_id in
                         {f"p{p:04d}" for p in range(10) if FINDINGS[p % 5] == "edema"})
        assert row["finding_mix"].get("edema", 0.0) == pytest.approx(with_edema / len(site.studies), abs=1e-3)
    assert "| site_0 |" in composition_markdown(table)


def test_unknown_partition_and_too_few_patients_are_clear_errors():
    with pytest.raises(ValueError, match="not one of"):
        partition(make_studies(10), 2, cfg("bogus"), seed=0)
    with pytest.raises(ValueError, match="cannot fill"):
        partition(make_studies(3), 5, cfg("iid"), seed=0)
    assert set(PARTITIONS) == {"iid", "dirichlet", "quantity", "scanner", "natural"}


@pytest.mark.parametrize("name", ["natural", "iid"])
def test_studies_without_report_are_counted_per_site_and_a_site_left_with_none_is_named(name, caplog):
    studies = make_studies(60, sites=["north", "south", "east"])
    # east has no notes at all; one north study lacks its report
    first_north = next(s.study_id for s in studies if s.site == "north")
    studies = [dataclasses.replace(s, has_report=False) if s.site == "east" or s.study_id == first_north else s
               for s in studies]
    with caplog.at_level("WARNING", logger="simulations.partition"):
        sites = partition(studies, 2, cfg(name), seed=0)
    assert "east" in caplog.text and "no study with a usable report" in caplog.text
    assert "north" not in caplog.text and "south" not in caplog.text
    pretrained = sorted(s for site in sites for s in site.studies)
    assert pretrained == sorted(s.study_id for s in studies if s.has_report)
    if name == "natural":
        assert [s.name for s in sites] == ["north", "south"]   # east takes no part in the federation
    table = composition(sites, studies)
    east = sum(s.site == "east" for s in studies)
    assert table["east"] == {"studies": 0, "patients": 0, "scanner": None, "finding_mix": {}, "without_report": east}
    assert sum(row["without_report"] for row in table.values()) == east + 1
    assert sum(row["studies"] for row in table.values()) == len(pretrained)
    assert "| east | 0 | 0 | %d |" % east in composition_markdown(table)


def test_no_study_with_a_report_is_a_clear_error():
    studies = [dataclasses.replace(s, has_report=False) for s in make_studies(10)]
    with pytest.raises(ValueError, match="none of the .* training studies has a usable report"):
        partition(studies, 2, cfg("iid"), seed=0)
