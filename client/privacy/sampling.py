"""Poisson sampling of patients, one study (and one of its images) per sampled patient: the unit is the patient."""
from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

log = logging.getLogger(__name__)


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS's entropy: who is sampled and the noise must not follow from the run's seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


@contextmanager
def secret_global_rng() -> Iterator[None]:
    """Torch's global generators (CPU and every CUDA device) seeded from the OS's entropy inside, restored after.

    Dropout, augmentation and vmap's masks draw from them. Seeded from the run's seed, an observer could replay
    every mask; drawn in batch order, adding a patient shifts every later patient's, so Lemma 1's mixture
    argument (the coins independent of the data and unknown) fails. Restored after, so that whatever runs after
    a DP round stays reproducible from the seed."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        torch.manual_seed(secrets.randbits(63))   # seeds the CPU generator and every CUDA device's
        yield


class PatientSampler:
    """Each step, every patient joins the batch independently with probability `sample_rate`.

    A sampled patient contributes one of its studies, chosen uniformly, and one image of that study:
    so however many studies a patient has, it enters a step at most once.

    `public_patients`: the patient count the rate is computed from, `expected_batch_size / public_patients`. The
    rate leaves the site (the accountant needs it), so under DP it must be a count the site declared public, not
    its real one (`public_patient_count`); None uses the real count (local use only: benchmarks, tests).
    """

    def __init__(self, patient_ids: Sequence[str], study_ids: Sequence[str], expected_batch_size: int,
                 generator: torch.Generator | None = None, public_patients: int | None = None):
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
        if public_patients is not None and (isinstance(public_patients, bool) or not isinstance(public_patients, int)
                                            or public_patients < 1):
            raise ValueError(f"the public patient count must be an integer >= 1, got {public_patients!r}")
        self.public_patients = len(self.patients) if public_patients is None else public_patients
        self.sample_rate = min(1.0, expected_batch_size / self.public_patients)
        self.generator = generator if generator is not None else secret_generator()
        if not 0.5 <= len(self.patients) / self.public_patients <= 2.0:   # the site's own log only
            log.warning("the declared public patient count (%d) is far from the real one (%d): the batches average "
                        "%.1f patients, not %.1f; update public_patient_count in the site file",
                        self.public_patients, len(self.patients), self.sample_rate * len(self.patients),
                        self.expected_batch_size)

    @classmethod
    def for_dataset(cls, dataset, expected_batch_size: int, generator: torch.Generator | None = None,
                    public_patients: int | None = None) -> "PatientSampler":
        for attribute in ("patient_ids", "study_ids"):
            if not hasattr(dataset, attribute):
                raise ValueError(f"DP-SGD samples patients: the dataset ({type(dataset).__name__}) must list "
                                 f"`{attribute}` per sample, as client.data.dataset.CxrDataset does")
        return cls(dataset.patient_ids, dataset.study_ids, expected_batch_size, generator, public_patients)

    @property
    def num_patients(self) -> int:
        """The real count: the site's own (never sent, never a divisor of anything sent)."""
        return len(self.patients)

    @property
    def expected_batch_size(self) -> float:
        """sample rate x public count: a public constant (the gradient's divisor, the round's `examples`)."""
        return self.sample_rate * self.public_patients

    def _pick(self, options: list) -> object:
        return options[int(torch.randint(len(options), (1,), generator=self.generator))]

    def draw(self) -> list[int]:
        """Dataset indices of one step's batch (possibly empty)."""
        chosen = torch.rand(self.num_patients, generator=self.generator) < self.sample_rate
        return [self._pick(self._pick(self.patients[p])) for p in chosen.nonzero().flatten().tolist()]
