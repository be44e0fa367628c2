"""One site's part of a round, without Flower: global shared parameters in, locally trained shared parameters out.

The ClientApp calls `train_round`. What travels is decided in one place, `shared_models.sharing` driven by
`model.sharing`; everything else (decoders, tag decoder, pseudo-seg head, FedBN norms) is local-only and
persists on the site's disk between rounds, keyed by run.

The round's settings (its steps, batch size, lr, seed, rounds, proximal term, optimizer state, wire dtype, privacy
caps) come from one source, the round's config record the server sends (`validate_round_config`). The run's
composed overrides give the model, objective, `train` group and privacy mechanisms only: `run_settings` drops
their `federation` section and `seed`, so no code here can read a second copy of a round setting.
"""
from __future__ import annotations

import logging
import io
import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from client import distributed
from client.data.dataset import CxrDataset
from client.data.scanner import apply_scanner, scanner_profile
from client.data.transforms import augmentation_settings
from client.policy import check_run_name, inside, planned_dp_steps
from client.site import data_paths, resolve_device
from client.trainer import TrainSettings, train_steps
from shared_models.batch import collate
from shared_models.checkpoint import (CheckpointError, checkpoint_fingerprints, hashed_tensors_bytes,
                                      read_hashed_tensors, read_verified, write_atomic)
from shared_models.factory import create_model
from shared_models.model import PretrainModel
from shared_models.sharing import split_state
from shared_models.transfer import TRANSFER_DTYPES, contiguous

Params = dict[str, np.ndarray]
log = logging.getLogger(__name__)


class FingerprintMismatch(RuntimeError):
    """The round's model config, tokenizer or objective is not the one this site builds."""


# Keys of the composed config that the round's config record carries instead (server/rounds.py)
ROUND_SETTINGS = ("federation", "seed", "train.batch_size", "train.lr")


def run_settings(cfg: DictConfig) -> DictConfig:
    """The composed config without the round's settings (`ROUND_SETTINGS`): what a site builds and trains with
    besides its round config record."""
    settings = OmegaConf.masked_copy(cfg, [key for key in cfg if key not in ROUND_SETTINGS])
    with open_dict(settings):
        for section, _, key in (name.partition(".") for name in ROUND_SETTINGS if "." in name):
            if section in settings:
                settings[section].pop(key, None)
    return settings


def shared_arrays(model: PretrainModel, cfg: DictConfig) -> Params:
    """numpy copies of the model's shared parameters (the only arrays that leave a site)."""
    return {name: t.detach().cpu().numpy().copy() for name, t in split_state(model, cfg)[0].items()}


def check_fingerprints(round_config: dict, mine: dict[str, str]) -> None:
    """Refuse to train when the coordinator's hashes differ from this site's."""
    theirs = {k.removeprefix("fingerprint_"): v for k, v in round_config.items() if k.startswith("fingerprint_")}
    wrong = [f"{name}: coordinator {theirs.get(name)}, site {value}" for name, value in mine.items() if theirs.get(name) != value]
    if wrong:
        raise FingerprintMismatch("the round's " + "; ".join(wrong) + " — this site refuses to train; "
                                  "update the site's fedcxr install/configs to the coordinator's version")


def site_dataset(site: dict, cfg: DictConfig) -> CxrDataset:
    """The site's training images (a simulated site: its `studies`, seen through its `scanner`)."""
    catalog, cache = data_paths(site)
    transform = None
    if site.get("scanner"):
        profile = scanner_profile(int(site["scanner"]["site_index"]), int(site["scanner"].get("seed", 0)))

        def transform(image: torch.Tensor, image_id: str) -> torch.Tensor:
            return apply_scanner(image, profile, image_id)
    # A site trains on its `train` split, or on every study its data gives no split (an export without a split column)
    split = site["data"].get("split") or ["train", None]
    dataset = CxrDataset(catalog, cache, split=split,
                         image_size=int(cfg.model.image.img_size), augmentation=augmentation_settings(cfg.train),
                         study_ids=site.get("studies"), site_transform=transform)
    if len(dataset) == 0:
        raise ValueError(f"site {site['name']}: no usable training image in {catalog} (split "
                         f"{site['data'].get('split') or 'train, or none given'}); index the site's data with "
                         "python client/run.py and check python -m client.data summary --catalog "
                         f"{catalog} (images by status, studies with a report, splits)")
    return dataset


def _local_file(site: dict, run_name: str) -> Path:
    """Where this run's local-only parameters live: under state_dir, whatever name the coordinator sent."""
    return inside(site["state_dir"], Path(site["state_dir"]) / "runs" / check_run_name(run_name) / "local.safetensors")


OPTIMIZER_FILE = "optimizer.pt"  # beside local.safetensors: the site's AdamW moments, never sent


def _load_optimizer_state(path: Path, expected_sha256: str | None) -> dict | None:
    """The AdamW moments this site ended its last round with (None in its first round of the run). Their sha256
    is recorded in local.safetensors, written after them: a round that stopped between the two loses the moments."""
    if not path.is_file():
        return None
    try:
        return torch.load(io.BytesIO(read_verified(path, expected_sha256)), weights_only=True)
    except Exception as err:  # a torn or foreign file costs only the moments, never the round
        log.warning("%s unreadable (%s): this round's AdamW starts from zero moments", path, err)
        return None


def _save_optimizer_state(path: Path, state: dict) -> str:
    """Write the moments through the one checkpoint writer; returns their sha256 for local.safetensors to record."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_atomic(path, buffer.getvalue())


def _read_local_state(path: Path) -> tuple[Params, dict[str, str]]:
    """(local-only arrays, header notes) of this run's local.safetensors; nothing before the run's first round."""
    if not path.is_file():
        return {}, {}
    try:
        return read_hashed_tensors(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; this site's local-only parameters for the run are lost: remove {path.parent} "
                              "to restart them from the seed (the federation's shared parameters are not)") from None


def _save_local_state(path: Path, params: Params, optimizer_sha256: str | None = None) -> None:
    notes = {OPTIMIZER_FILE: optimizer_sha256} if optimizer_sha256 else {}
    write_atomic(path, hashed_tensors_bytes({k: contiguous(v) for k, v in params.items()}, **notes))


class RoundConfigError(ValueError):
    """A number in the round's config from the coordinator is missing, of the wrong type or out of range."""


def _integer(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value)


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# key: (integer?, low, high, required) — the round's numbers the site acts on, bounded to what one round can mean
ROUND_NUMBERS = {
    "round": (True, 1, 1_000_000, True),
    "rounds": (True, 1, 1_000_000, True),
    "site_rounds": (True, 1, 1_000_000, False),
    "local_steps": (True, 1, 1_000_000, True),
    "batch_size": (True, 1, 4096, True),
    "seed": (True, 0, 2**32 - 1, True),
    "lr": (False, 0.0, 10.0, True),
    "proximal_mu": (False, 0.0, 1e6, False),
    "privacy_max_epsilon": (False, 0.0, math.inf, False),
    "privacy_max_delta": (False, 0.0, 1.0, False),
}
ROUND_SWITCHES = ("keep_optimizer_state",)   # true or false; absent: false


def _number_problems(config: dict, numbers: dict) -> list[str]:
    problems = []
    for key, (integral, low, high, required) in numbers.items():
        if key not in config:
            if required:
                problems.append(f"{key} is missing")
            continue
        value = config[key]
        number = _integer(value) if integral else _finite(value)
        if number is None or not low <= number <= high or (key == "lr" and number == 0):
            kind = "an integer" if integral else "a finite number"
            span = f"in ({low}, {high}]" if key == "lr" else f"in [{low}, {high}]"
            problems.append(f"{key}={value!r} must be {kind} {span}")
    return problems


def validate_round_config(round_config: dict) -> dict:
    """The round's config as this site will use it, or RoundConfigError naming every key that is wrong: finite,
    integral where it counts something, in range (`lr` > 0: a round that cannot move the model is refused, as is
    `local_steps=0`, so an unchanged model is never sent back at full weight)."""
    problems = _number_problems(round_config, ROUND_NUMBERS)
    problems += [f"{key}={round_config[key]!r} must be true or false" for key in ROUND_SWITCHES
                 if key in round_config and not isinstance(round_config[key], bool)]
    if not problems and int(round_config["round"]) > int(round_config["rounds"]):
        problems.append(f"round={round_config['round']} is past rounds={round_config['rounds']}")
    dtype = round_config.get("transfer_dtype", "float32")
    if dtype not in TRANSFER_DTYPES:
        problems.append(f"transfer_dtype={dtype!r} must be one of {list(TRANSFER_DTYPES)}")
    try:
        check_run_name(round_config.get("run_name"), "run_name")
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise RoundConfigError("the round's config is refused by this site: " + "; ".join(problems))
    return round_config


def _check_settings(settings: TrainSettings) -> TrainSettings:
    """The composed `train` hyperparameters the round runs with (the coordinator's overrides may set them)."""
    rules = {"weight_decay": (0.0, 10.0), "warmup_steps": (0, 10**9), "min_lr_ratio": (0.0, 1.0),
             "grad_accum": (1, 4096), "log_every": (1, 10**9)}
    wrong = [f"train.{key}={getattr(settings, key)!r} must be in [{low}, {high}]" for key, (low, high) in rules.items()
             if _finite(getattr(settings, key)) is None or not low <= getattr(settings, key) <= high
             or (isinstance(low, int) and _integer(getattr(settings, key)) is None)]
    clip = settings.grad_clip
    if clip is not None and (_finite(clip) is None or clip <= 0):
        wrong.append(f"train.grad_clip={clip!r} must be a finite number > 0 or null")
    if not isinstance(settings.amp, bool):
        wrong.append(f"train.amp={settings.amp!r} must be true or false")
    if wrong:
        raise RoundConfigError("the run's training settings are refused by this site: " + "; ".join(wrong))
    return settings


QUERY_NUMBERS = ("seed", "rounds", "local_steps")


def query_model_settings(config: dict) -> dict[str, int]:
    """create_model's `seed` and `total_steps` from a query's config record (a query builds the initial model and
    trains nothing): its `seed`, `rounds` and `local_steps`, checked as a round's are."""
    problems = _number_problems(config, {key: ROUND_NUMBERS[key] for key in QUERY_NUMBERS})
    if problems:
        raise RoundConfigError("the query's config is refused by this site: " + "; ".join(problems))
    return {"seed": int(config["seed"]), "total_steps": int(config["rounds"]) * int(config["local_steps"])}


def _settings(round_config: dict, cfg: DictConfig) -> TrainSettings:
    """The `train` group with the round's settings: its share of one schedule over all rounds' local steps."""
    steps = int(round_config["local_steps"])
    settings = TrainSettings.from_config(
        cfg.train, steps=steps, batch_size=int(round_config["batch_size"]), lr=float(round_config["lr"]),
        seed=int(round_config["seed"]), start_step=(int(round_config["round"]) - 1) * steps,
        total_steps=int(round_config["rounds"]) * steps, proximal_mu=float(round_config.get("proximal_mu", 0.0)))
    return _check_settings(settings)


def _restore(model: PretrainModel, shared: Params, local: Params) -> None:
    """Global shared parameters over this site's local-only ones (fresh from the seed in round 1)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({k: torch.from_numpy(v) for k, v in local.items()})
    unknown = set(shared) - set(state)
    if unknown:
        raise ValueError(f"the round's arrays name parameters this model does not have: {sorted(unknown)[:5]}")
    state.update({k: torch.from_numpy(np.array(v)) for k, v in shared.items()})
    model.load_state_dict(state)


def train_round(shared: Params, round_config: dict, site: dict, run_name: str,
                cfg: DictConfig) -> tuple[Params, float, dict[str, float]]:
    """Train locally from the global shared parameters; returns (new shared parameters, examples, scalar metrics).

    Metrics are each loss term's mean over the round, steps and seconds; `examples` (FedAvg's weight) is the
    site's number of training images; `setup_s` is the time spent before training (model, local state, data).
    Under `privacy.dpsgd` the round is priced and charged to the site's
    ledger first (BudgetExceeded refuses it) and only `DpRoundResult.public_metrics()` is returned, with the
    round's expected examples as the weight: nothing computed from the data leaves.
    `round_config` (validated) gives every round setting; of `cfg` only `run_settings` is read.
    """
    started = time.perf_counter()
    cfg = run_settings(cfg)
    settings = _settings(round_config, cfg)   # refused before anything is built or read
    # The site file's `nproc` (the site's processes, one per GPU), not the coordinator's train.nproc.
    settings = replace(settings, nproc=int(site.get("nproc") or 1))
    if settings.nproc > 1 and not distributed.is_distributed():
        # N workers, children of this process, each rebuild the model and data; rank 0's result is the reply
        return distributed.run(train_round, (shared, round_config, site, run_name, cfg), settings.nproc,
                               run_id=f"site-{site['name']}")
    local_file = _local_file(site, run_name)
    model = create_model(cfg, seed=int(round_config["seed"]), total_steps=settings.total_steps)
    check_fingerprints(round_config, checkpoint_fingerprints(cfg, model.tokenizer))
    saved_local, local_notes = _read_local_state(local_file)
    _restore(model, shared, saved_local)
    if "tag" in model.objectives:  # tag queries follow the text encoder the federation just averaged
        model.refresh_tag_queries()
    dataset = site_dataset(site, cfg)
    collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=int(cfg.model.text.max_length))
    anchor = {k: torch.from_numpy(np.array(v)) for k, v in shared.items()}
    device = resolve_device(site.get("device"))

    dpsgd = OmegaConf.select(cfg, "privacy.dpsgd")
    optimizer_sha256 = None   # the moments kept for the next round, if any
    if dpsgd:
        from client.privacy import dp_train_round

        caps = {k.removeprefix("privacy_"): v for k, v in round_config.items() if k.startswith("privacy_")}
        # this site's own rounds (its turns under cyclic); a coordinator that does not say: every round
        planned = planned_dp_steps(round_config)
        result = dp_train_round(model, dataset, collate_fn, settings, dpsgd, site, run_name, int(round_config["round"]),
                                planned, caps, device, anchor)
        metrics = result.public_metrics()
        examples = metrics.pop("examples")
    else:
        keep_optimizer = bool(round_config.get("keep_optimizer_state", False))
        optimizer_file = local_file.with_name(OPTIMIZER_FILE)
        optimizer_state = (_load_optimizer_state(optimizer_file, local_notes.get(OPTIMIZER_FILE)) if keep_optimizer
                           else None)
        setup_s = time.perf_counter() - started
        trained = train_steps(model, dataset, collate_fn, settings, device=device, proximal_anchor=anchor,
                              progress=False, description=f"site {site['name']}", optimizer_state=optimizer_state)
        if keep_optimizer and distributed.is_main():
            optimizer_sha256 = _save_optimizer_state(optimizer_file, trained.optimizer_state)
        metrics = {name: float(value) for name, value in trained.loss_mean.items()}
        metrics.update(steps=float(trained.steps), seconds=float(trained.seconds), setup_s=setup_s)
        examples = float(len(dataset))

    new_shared, local = split_state(model.cpu(), cfg)
    if distributed.is_main():   # the ranks hold one model: rank 0 keeps it
        _save_local_state(local_file, {k: v.detach().numpy().copy() for k, v in local.items()}, optimizer_sha256)
    return {k: v.detach().numpy().copy() for k, v in new_shared.items()}, examples, metrics
