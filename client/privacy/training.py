"""Patient-level DP-SGD at a site: Poisson batches of patients, clipped gradient sum, Gaussian noise, the ledger."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from client import distributed
from client.privacy.accountant import ACCOUNTANTS, noise_for_target
from client.privacy.clipped_sum import check_per_study, clipped_gradient_sum, trainable_parameters
from client.privacy.clipping import ClippedSum, ClipNorms, PrivacyError, require_group_norm
from client.privacy.ledger import Charge, PrivacyLedger
from client.privacy.sampling import PatientSampler, secret_generator, secret_global_rng
from client.site import effective_caps
from client.trainer import TakeStep, TrainResult, TrainSettings, move_to, train_steps


@dataclass(frozen=True)
class DpSgdSettings:
    """The `privacy.dpsgd` block: either a fixed noise multiplier or a target epsilon for the run's planned steps."""

    noise_multiplier: float | None = 1.0
    max_grad_norm: float = 1.0           # C: each patient's per-patient-terms gradient
    coupled_max_grad_norm: float = 1.0   # C_b: the coupled terms' (scaled) batch gradient
    accountant: str = "rdp"
    target_epsilon: float | None = None
    per_study: str = "auto"              # the per-patient summands: one vmapped pass (vmap), a pass each (loop), auto

    def __post_init__(self):
        check_per_study(self.per_study)
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"privacy.dpsgd.accountant={self.accountant!r}; choose one of {sorted(ACCOUNTANTS)}")
        if self.target_epsilon is None and (self.noise_multiplier is None or self.noise_multiplier <= 0):
            raise PrivacyError("privacy.dpsgd needs noise_multiplier > 0 or a target_epsilon > 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise PrivacyError(f"privacy.dpsgd.target_epsilon must be > 0, got {self.target_epsilon}")
        ClipNorms(self.max_grad_norm, self.coupled_max_grad_norm)

    @classmethod
    def from_config(cls, section) -> "DpSgdSettings":
        known = set(cls.__dataclass_fields__)
        values = dict(section)
        unknown = set(values) - known
        if unknown:
            raise PrivacyError(f"privacy.dpsgd has unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    @property
    def clip(self) -> ClipNorms:
        return ClipNorms(self.max_grad_norm, self.coupled_max_grad_norm)

    def noise(self, delta: float, sample_rate: float, planned_steps: int) -> float:
        if self.target_epsilon is None:
            return float(self.noise_multiplier)
        return noise_for_target(self.target_epsilon, delta, sample_rate, planned_steps, self.accountant)


def noisy_gradient(summed: list[torch.Tensor], noise_std: float, scale: float,
                   generator: torch.Generator) -> list[torch.Tensor]:
    """(S(B) + N(0, noise_std^2 I)) / scale, one fresh Gaussian per coordinate."""
    # the noise tensor becomes the result in place: one allocation per parameter, not three
    return [torch.empty_like(g).normal_(0.0, noise_std, generator=generator).add_(g).div_(scale) for g in summed]


def check_group(settings: TrainSettings) -> None:
    """DP-SGD trains on train.nproc ranks only inside a worker group of that size (`distributed.run`)."""
    if settings.nproc != distributed.world_size():
        raise PrivacyError(f"train.nproc={settings.nproc} but this process trains in a group of "
                           f"{distributed.world_size()}: DP-SGD on N processes runs inside the worker group "
                           "`client.distributed.run` starts (docs/scale.md); set train.nproc=1 here")


def private_gradient(model: nn.Module, samples: list[dict], collate_fn: Callable, step: int, clip: ClipNorms,
                     scale: float, params: list[nn.Parameter], noise_std: float, generator: torch.Generator,
                     **clipping) -> tuple[list[torch.Tensor], ClippedSum]:
    """(S(B) + N(0, noise_std^2 I)) / scale for the Poisson batch `samples`, the same on every rank of a group.

    In a group every rank holds the whole batch (rank 0 drew it) and clips a consecutive share of it; the
    shares' clipped sums and the coupled terms' batch gradient are summed over the ranks (`clipped_gradient_sum`
    with `group_counts`), so every rank holds the 1-process S(B). Rank 0 alone adds the noise, from its secret
    generator, and broadcasts the noised gradient: one draw, never one per rank. A batch with fewer patients
    than ranks is clipped by rank 0 alone, as one process would. Returns the gradient and this rank's ClippedSum
    (its terms are its share's, for the site's log)."""
    world = distributed.world_size()
    if world == 1:
        summed = clipped_gradient_sum(model, samples, collate_fn, step, clip, scale, params, **clipping)
        return noisy_gradient(summed.gradient, noise_std, scale, generator), summed
    if len(samples) >= world:
        shares = distributed.contiguous_shares(len(samples), world)
        summed = clipped_gradient_sum(model, [samples[i] for i in shares[distributed.rank()]], collate_fn, step,
                                      clip, scale, params, group_counts=[len(s) for s in shares], **clipping)
    elif distributed.is_main():
        summed = clipped_gradient_sum(model, samples, collate_fn, step, clip, scale, params, **clipping)
    else:
        summed = ClippedSum([torch.zeros_like(p, dtype=torch.float32) for p in params], {}, 0)
    if distributed.is_main():
        gradient = noisy_gradient(summed.gradient, noise_std, scale, generator)
    else:
        gradient = [torch.empty_like(g) for g in summed.gradient]
    return distributed.broadcast_(gradient), summed


@dataclass
class PrivateStep:
    """The DP-SGD step for `client.trainer.train_steps`: a Poisson batch of patients drawn with secret coins, its
    clipped gradient sum S(B) (`clipped_gradient_sum`), Gaussian noise once, divided by the expected batch size:
    gradient = (S(B) + N(0, (noise * sensitivity)^2 I)) / expected batch size.

    Everything the loop does after it (AdamW, weight decay, the FedProx term towards the public global model, the
    global-norm clip) only post-processes the noisy gradient. The loss terms it returns are data-derived and
    unprotected: they are for the site's own log, never for a message. The ledger is charged before the steps, by
    `dp_train_round`."""

    clip: ClipNorms
    noise_multiplier: float
    sampler: PatientSampler
    per_study: str = "auto"

    @contextmanager
    def bind(self, model: nn.Module, dataset: Dataset, collate_fn: Callable, settings: TrainSettings,
             device: torch.device, proximal: Callable[[], torch.Tensor] | None) -> Iterator[TakeStep]:
        require_group_norm(model)
        if settings.grad_accum != 1:
            raise PrivacyError(f"train.grad_accum={settings.grad_accum}: under DP-SGD one step is one Poisson batch; "
                               "set 1")
        check_group(settings)
        params = trainable_parameters(model)
        distributed.broadcast_(params)  # the ranks step with one gradient from rank 0's weights: one model
        scale = self.sampler.expected_batch_size
        noise_std = self.noise_multiplier * self.clip.sensitivity  # calibrated to S(B)'s sensitivity
        noise_generator = secret_generator(device)
        use_amp = settings.amp and device.type == "cuda"

        def autocast():
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_amp else nullcontext()

        def take_step(step: int) -> tuple[dict[str, float], int]:
            # Rank 0 draws the global batch with its secret coins; every rank loads it and clips its share.
            drawn = distributed.broadcast_object(self.sampler.draw() if distributed.is_main() else None)
            samples = [dataset[j] for j in drawn]
            gradient, summed = private_gradient(model, samples, collate_fn, step, self.clip, scale, params, noise_std,
                                                noise_generator, move=lambda batch: move_to(batch, device),
                                                autocast=autocast, per_study=self.per_study)
            for param, grad in zip(params, gradient):
                param.grad = grad.to(param.dtype)
            if proximal is not None:
                proximal().backward()
            return {**summed.terms, "patients": float(len(samples))}, len(samples)

        # Dropout, augmentation and the vmap's masks draw from torch's global generators: secret for the round
        with secret_global_rng():
            yield take_step


def dp_train_steps(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    settings: TrainSettings,
    clip: ClipNorms,
    noise_multiplier: float,
    sampler: PatientSampler,
    device: torch.device | str = "cpu",
    proximal_anchor: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    description: str = "dp-train",
    optimizer_state: dict | None = None,
    per_study: str = "auto",
) -> TrainResult:
    """`settings.steps` DP-SGD steps: the trainer's loop with `PrivateStep`. The result's `images` is the realised
    number of sampled patients (site's log only)."""
    return train_steps(model, dataset, collate_fn, settings, device, proximal_anchor, progress, description,
                       optimizer_state, strategy=PrivateStep(clip, noise_multiplier, sampler, per_study))


@dataclass
class DpRoundResult:
    train: TrainResult                  # site-local: its losses and example count are data-derived
    charge: Charge
    noise_multiplier: float
    sample_rate: float
    expected_examples: float            # steps * expected batch size: public, the weight to send
    local_metrics: dict[str, float] = field(default_factory=dict)

    def public_metrics(self) -> dict[str, float]:
        """The only scalars of a DP round that may leave the site: nothing computed from the data.

        Losses, the realised number of sampled patients, and wall time (which grows with it) are not here.
        """
        return {"epsilon": self.charge.epsilon_run, "epsilon_total": self.charge.epsilon_total,
                "delta": self.charge.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": float(self.train.steps),
                "examples": self.expected_examples}


def ledger_location(site: dict) -> str:
    """The site file's `ledger`, else the site's catalog, else `<state_dir>/ledger.sqlite`.

    A simulation's virtual sites set `ledger`: they exist for one run, while the catalog they read is shared by
    every run (and every virtual site of the same name) on the machine."""
    if site.get("ledger"):
        Path(site["ledger"]).parent.mkdir(parents=True, exist_ok=True)
        return str(site["ledger"])
    if site.get("catalog"):
        return str(site["catalog"])
    if site.get("state_dir"):
        Path(site["state_dir"]).mkdir(parents=True, exist_ok=True)
        return str(Path(site["state_dir"]) / "ledger.sqlite")
    raise PrivacyError(f"site {site.get('name')!r} has no `ledger`, `catalog` or `state_dir`: nowhere to keep its ledger")


def public_patient_count(site: dict) -> int:
    """The patient count the site declares public in its file (`public_patient_count`).

    The sample rate (batch size / patients) and `examples` leave the site, and the noise for a target epsilon and
    the delta check depend on the count: computed from the real count they would publish it, and adding or removing
    a patient would change them. A declared count is a constant of the site, the same on every neighbouring data
    set. No declared count, no DP round: a bucket of the real count would still move at the bucket's edges."""
    value = site.get("public_patient_count")
    if value is None:
        raise PrivacyError(
            f"site {site.get('name')!r} declares no public_patient_count: DP-SGD sends its sampling rate (batch size / "
            "patients) and its examples to the coordinator, and computed from the real patient count they would "
            "publish it. Add `public_patient_count: N` to the site file, a rounded figure near the real count that "
            "the site is content to publish (e.g. 5000)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrivacyError(f"site {site.get('name')!r}: public_patient_count must be an integer >= 1, got {value!r}")
    return value


def _charge(site: dict, run_id: str, round: int, spend: tuple, caps: dict, accountant: str) -> Charge | Exception:
    ledger = PrivacyLedger(ledger_location(site), site["name"])
    try:
        return ledger.charge(run_id, round, spend, caps, accountant)
    except Exception as error:  # noqa: BLE001 - handed to every rank, which raises it
        return error
    finally:
        ledger.close()


def dp_train_round(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    settings: TrainSettings,
    dpsgd,
    site: dict,
    run_id: str,
    round: int,
    planned_steps: int,
    run_caps: dict | None = None,
    device: torch.device | str = "cpu",
    proximal_anchor: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
    optimizer_state: dict | None = None,
) -> DpRoundResult:
    """One site's DP round: check the model, price the round, charge the ledger (or refuse), then train.

    dpsgd: the `privacy.dpsgd` config block (or DpSgdSettings); site: the loaded site file (its `catalog`
    holds the ledger, its `privacy` the caps, its `public_patient_count` the count the rate uses); run_caps: the run config's `federation.privacy` (tighten
    only); planned_steps: the run's total local steps at this site (sets the noise for a target epsilon).
    Raises BudgetExceeded before any training if the round would pass the site's budget.
    """
    require_group_norm(model)
    dp = dpsgd if isinstance(dpsgd, DpSgdSettings) else DpSgdSettings.from_config(dpsgd)
    caps = effective_caps(site["privacy"], run_caps)
    sampler = PatientSampler.for_dataset(dataset, settings.batch_size, public_patients=public_patient_count(site))
    if caps["max_delta"] >= 1.0 / sampler.public_patients:
        raise PrivacyError(f"max_delta={caps['max_delta']:g} is not below 1/patients = 1/{sampler.public_patients} "
                           "(the site's public_patient_count): such a delta allows leaking a whole patient; lower "
                           "the site's privacy.max_delta")
    check_group(settings)  # before the charge: a round that cannot train must not spend budget
    noise = dp.noise(caps["max_delta"], sampler.sample_rate, planned_steps)
    # One charge for the group, at the global batch's rate (every rank built the same sampler): rank 0's.
    charge = distributed.broadcast_object(_charge(site, run_id, round, (noise, sampler.sample_rate, settings.steps),
                                                  caps, dp.accountant) if distributed.is_main() else None)
    if isinstance(charge, Exception):  # rank 0 refused (BudgetExceeded): every rank stops before training
        raise charge
    result = dp_train_steps(model, dataset, collate_fn, settings, dp.clip, noise, sampler, device, proximal_anchor,
                            progress, description=f"site {site['name']} dp", optimizer_state=optimizer_state,
                            per_study=dp.per_study)
    local = {name: float(v) for name, v in result.loss_end.items()}
    local.update(seconds=result.seconds, patients=float(result.images))
    return DpRoundResult(result, charge, noise, sampler.sample_rate,
                         settings.steps * sampler.expected_batch_size, local)
