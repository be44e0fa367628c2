"""Poisson sampling of patients, one study (and one of its images) per sampled patient: the unit is the patient."""
from __future__ import annotations

import secrets
from collections import defaultdict
from typing import Sequence

import torch


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS's entropy: who is sampled and the noise must not follow from the run's seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


class PatientSampler:
    """Each step, every patient joins the batch independently with probability `sample_rate`.

    A sampled patient contributes one of its studies, chosen uniformly, and one image of that study:
    so however many studies a patient has, it enters a step at most once.
    """

    def __init__(self, patient_ids: Sequence[str], study_ids: Sequence[str], expected_batch_size: int,
                 generator: torch.Generator | None = None):
        if len(patient_ids) != len(study_ids):
            raise ValueError(f"patient_ids ({len(patient_ids)}) and study_ids ({len(study_ids)}) "
                             "must pair one per sample")
        if not patient_ids:
            raise ValueError("the training data set is empty: no study has an ok image and a usable report")
        if expected_batch_size < 1:
            raise ValueError(f"the expected batch size must be >= 1, got {expected_batch_size}")
        by_patient: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (patient, study) in enumerate(zip(patient_ids, study_ids)):
            by_patient[patient][study].append(index)
        self.patients = [list(studies.values()) for _, studies in sorted(by_patient.items())]
        self.sample_rate = min(1.0, expected_batch_size / len(self.patients))
        self.generator = generator if generator is not None else secret_generator()

    @classmethod
    def for_dataset(cls, dataset, expected_batch_size: int,
                    generator: torch.Generator | None = None) -> "PatientSampler":
        for attribute in ("patient_ids", "study_ids"):
            if not hasattr(dataset, attribute):
                raise ValueError(f"DP-SGD samples patients: the dataset ({type(dataset).__name__}) must list "
                                 f"`{attribute}` per sample, as client.data.dataset.CxrDataset does")
        return cls(dataset.patient_ids, dataset.study_ids, expected_batch_size, generator)

    @property
    def num_patients(self) -> int:
        return len(self.patients)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_patients

    def _pick(self, options: list) -> object:
        return options[int(torch.randint(len(options), (1,), generator=self.generator))]

    def draw(self) -> list[int]:
        """Dataset indices of one step's batch (possibly empty)."""
        chosen = torch.rand(self.num_patients, generator=self.generator) < self.sample_rate
        return [self._pick(self._pick(self.patients[p])) for p in chosen.nonzero().flatten().tolist()]
