"""What a site accepts from a run, checked before it touches data: the coordinator's Hydra overrides (an
allow-list), the composed config (against the site file's `policy`), and the run name it writes under.

The coordinator is not trusted with the site's privacy or its disk. Its overrides may set training
hyperparameters, the objective and its weights, federation settings that are not paths, the model the site's
policy accepts, and privacy settings; the composed config must then satisfy the site's policy (required DP-SGD /
SecAgg+, the noise floor, the epsilon cap, accepted models and objectives, nothing more shared than the model's
preset shares): a run may tighten the site's privacy, never loosen it.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from client.data.errors import Rejected
from client.data.files import resolve_inside
from shared_models.config import is_run_name

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
REQUIREMENTS = ("dpsgd", "secagg")
# A site file's policy where it says nothing: its `privacy` caps are a DP budget, so DP-SGD is required until the
# site writes `require: []`. A site without any policy (a simulation's virtual site, written by the run) requires nothing.
POLICY_DEFAULTS = {"require": ["dpsgd"], "min_noise_multiplier": None, "accepted_models": None,
                   "accepted_objectives": None}
NO_POLICY = dict(POLICY_DEFAULTS, require=[])
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_OVERRIDES, MAX_OVERRIDE_CHARS = 512, 4096

# Config groups a coordinator may choose; their values are preset names under configs/<group>/.
GROUPS = ("model", "objective", "privacy", "train", "federation")
# Keys the coordinator sets for itself (its run folder, its registry): accepted, never applied at the site.
COORDINATOR_ONLY = ("federation.output_dir", "federation.registry")
# train.* keys that are the site's business (its cores, its files), not the run's hyperparameters.
SITE_TRAIN_KEYS = ("train.resume_from", "train.threads", "train.num_workers")
# model.* keys that would change what the site runs beyond its accepted presets: the architecture's name, a hub
# name, folder or file of weights to load from the site's disk.
MODEL_IDENTITY = ("model.name", "model.text.name", "model.image.pretrained", "model.text.pretrained",
                  "model.image.timm_name")
# The last part of a key that names a folder, file, database or URL of the site's.
PATH_NAMES = ("root", "catalog", "ledger", "cache", "registry", "reports", "resume_from", "site_dir")
PATH_SUFFIXES = ("_dir", "_path", "_file", "_folder", "_root", "_url", "_uri", "_catalog", "_ledger", "_registry")
# Simulation nodes run the researcher's own run on one machine: the simulation runtime also sets these.
SIMULATION_TRUSTED = ("federation.site_dir", "data", "partition", "cache_dir", "model")


class PolicyRefused(ValueError):
    """A round asks for something this site's policy or allow-list does not accept; the message names it."""


# ------------------------------------------------------------------------------------------- site file
def validate_policy(policy, where: str) -> dict:
    """The site file's `policy` with its defaults, or SiteConfigError naming the wrong key."""
    from client.site import SiteConfigError

    if policy is None:
        policy = {}
    if not isinstance(policy, dict):
        raise SiteConfigError(f"{where} must be a mapping with keys {list(POLICY_DEFAULTS)}, got {policy!r}")
    unknown = sorted(set(policy) - set(POLICY_DEFAULTS))
    if unknown:
        raise SiteConfigError(f"{where}: unknown key(s) {unknown}; allowed: {list(POLICY_DEFAULTS)}")
    out = {**POLICY_DEFAULTS, **policy}
    require = [] if out["require"] is None else out["require"]
    if not isinstance(require, list) or any(r not in REQUIREMENTS for r in require):
        raise SiteConfigError(f"{where}.require must be a list drawn from {list(REQUIREMENTS)}, got {require!r}")
    out["require"] = list(require)
    floor = out["min_noise_multiplier"]
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float))
                              or not math.isfinite(floor) or floor < 0):
        raise SiteConfigError(f"{where}.min_noise_multiplier must be a finite number >= 0 or null, got {floor!r}")
    for key in ("accepted_models", "accepted_objectives"):
        names = out[key]
        if names is not None and (not isinstance(names, list) or not names
                                  or not all(isinstance(n, str) and PLAIN_NAME.fullmatch(n) for n in names)):
            raise SiteConfigError(f"{where}.{key} must be null (any) or a non-empty list of preset names, got {names!r}")
    return out


# -------------------------------------------------------------------------------------------- run name
def check_run_name(name, what: str = "run") -> str:
    """A run name the site may use as a folder name under its state_dir (the coordinator sends it)."""
    if not is_run_name(name):
        raise PolicyRefused(f"{what} {name!r}: a run name must be 1-64 letters, digits, '.', '_' or '-' (not '.' "
                            "or '..'); it names a folder under this site's state_dir")
    return name


def inside(folder, path) -> Path:
    """`path` resolved, if it lies inside `folder`; PolicyRefused otherwise (the site writes only in its state_dir).
    The containment check is the data layer's (`resolve_inside`); only the refusal is the site's."""
    try:
        return resolve_inside(Path(folder), os.path.abspath(path))
    except Rejected:
        raise PolicyRefused(f"{path} resolves to {os.path.realpath(path)}, outside this site's state_dir "
                            f"{os.path.realpath(folder)}: refused") from None


# ------------------------------------------------------------------------------------------- overrides
def _plain(value) -> bool:
    """A value a hyperparameter may take: numbers, booleans, null, simple strings, and lists/dicts of them.
    No paths, no interpolations (`${oc.env:...}` reads the site's environment, `${data.root}` its folders)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if isinstance(value, str):
        return not any(mark in value for mark in ("/", "\\", "${", "~", "\0", "\n")) and len(value) <= 256
    return value is None or isinstance(value, (bool, int, float))


def _refuse(line: str, why: str) -> PolicyRefused:
    return PolicyRefused(f"override {line!r} refused by this site: {why}")


def _pathlike(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in PATH_NAMES or last.endswith(PATH_SUFFIXES)


def _check_key(key: str, line: str, value, simulated: bool) -> None:
    """PolicyRefused unless the allow-list lets a run set `key` at this site."""
    if simulated and any(key == p or key.startswith(p + ".") for p in SIMULATION_TRUSTED):
        return
    section = key.split(".", 1)[0]
    if key in GROUPS:
        if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
            raise _refuse(line, f"{key}= takes a preset name under configs/{key}/")
    elif _pathlike(key):
        raise _refuse(line, f"{key} names a folder, file or database; the coordinator never chooses this site's paths")
    elif key in SITE_TRAIN_KEYS:
        raise _refuse(line, f"{key} is this site's own setting (its cores, its files), not the run's")
    elif key in MODEL_IDENTITY:
        raise _refuse(line, f"{key} changes which weights or architecture this site runs; choose a model preset "
                            "the site accepts (model=NAME)")
    elif key == "federation.run_name":
        check_run_name(value, "federation.run_name")
    elif key != "seed" and section not in ("train", "objective", "federation", "privacy", "model"):
        raise _refuse(line, f"{key} is not a setting a run may choose at this site (data, partition, cache and "
                            "hydra settings are the site's); a run may set train.*, objective, model, privacy, seed "
                            "and federation settings that are not paths")
    # privacy.*: any direction here; the composed config must then satisfy the site's policy (enforce_policy)


def accepted_overrides(overrides: list[str], simulated: bool = False) -> list[str]:
    """The coordinator's Hydra overrides this site composes its config with: each one is parsed and checked
    against the allow-list; keys only the coordinator uses are left out, anything else refused (PolicyRefused
    naming the override). `simulated`: a virtual site of `python -m simulations.run`, whose runtime also sets
    the virtual sites' folder, data and partition (one researcher's run on one machine)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if len(overrides) > MAX_OVERRIDES or any(len(line) > MAX_OVERRIDE_CHARS for line in overrides):
        raise PolicyRefused(f"the run config carries {len(overrides)} overrides (at most {MAX_OVERRIDES}, each at "
                            f"most {MAX_OVERRIDE_CHARS} characters, are read)")
    accepted = []
    for line in overrides:
        try:
            (override,) = OverridesParser.create().parse_overrides([line])
        except HydraException as err:
            raise _refuse(line, f"not a Hydra override ({' '.join(str(err).split())})") from None
        key = override.key_or_group
        if override.package is not None:
            raise _refuse(line, "package overrides (key@package) are not accepted")
        if override.is_sweep_override():
            raise _refuse(line, "a sweep is not one run's value")
        if (override.is_add() or override.is_force_add() or override.is_delete()) and not simulated:
            raise _refuse(line, "adding (+, ++) or deleting (~) keys is not accepted; set an existing key")
        if key in COORDINATOR_ONLY:
            log.info("override %s is the coordinator's own setting: not applied at this site", line)
            continue
        value = None if override.is_delete() else override.value()
        simulation_key = simulated and any(key == p or key.startswith(p + ".") for p in SIMULATION_TRUSTED)
        if not simulation_key and not _plain(value):
            raise _refuse(line, "values may not name paths or use interpolations (${...})")
        _check_key(key, line, value, simulated)
        accepted.append(line)
    return accepted


# ------------------------------------------------------------------------------------ composed config
def _preset_sharing(model: str) -> dict:
    path = CONFIG_DIR / "model" / f"{model}.yaml"
    sharing = OmegaConf.select(OmegaConf.load(path), "sharing") if path.is_file() else None
    return OmegaConf.to_container(sharing) if sharing is not None else {}


def _check_sharing(cfg: DictConfig) -> None:
    """Nothing may travel that the model's preset keeps at the site (its decoders, FedBN norms, local patterns)."""
    preset = _preset_sharing(str(cfg.model.name))
    if not preset:
        return
    sharing = OmegaConf.to_container(cfg.model.sharing)
    extra = sorted(set(sharing.get("shared") or []) - set(preset.get("shared") or []))
    dropped = sorted(set(preset.get("local") or []) - set(sharing.get("local") or []))
    if extra or dropped or (preset.get("fedbn") and not sharing.get("fedbn")):
        raise PolicyRefused(f"model.sharing {sharing} would send parameters that model {cfg.model.name} keeps at the "
                            f"site ({preset}): a run may keep more at the site, never send more")


def planned_dp_steps(round_config: dict) -> int:
    """This site's local steps over the run (its own rounds, its turns under cyclic): what DP-SGD prices."""
    return int(round_config.get("site_rounds", round_config["rounds"])) * int(round_config["local_steps"])


def _noise(dpsgd, site: dict, caps: dict, round_config: dict) -> float | None:
    """The noise multiplier this round's DP-SGD will use, None where it depends on what DP-SGD itself refuses
    (no public patient count)."""
    if dpsgd.get("target_epsilon") is None:
        return float(dpsgd.get("noise_multiplier") or 0.0)
    patients = site.get("public_patient_count")
    if not isinstance(patients, int) or isinstance(patients, bool) or patients < 1:
        return None
    from client.privacy import DpSgdSettings   # opacus: only DP rounds with a target pay for its import

    rate = min(1.0, int(round_config["batch_size"]) / patients)
    return DpSgdSettings.from_config(dpsgd).noise(caps["max_delta"], rate, planned_dp_steps(round_config))


def enforce_policy(site: dict, cfg: DictConfig, round_config: dict | None = None, secure: bool = False) -> None:
    """Refuse (PolicyRefused naming the setting) a composed config that would loosen the site's policy.
    round_config: the round's config record (None for a query, which trains nothing); secure: the round came
    through SecAgg+."""
    from client.site import effective_caps

    policy = site.get("policy") or NO_POLICY
    name = site.get("name")
    model, objective = str(cfg.model.name), str(cfg.objective.name)
    if policy.get("accepted_models") is not None and model not in policy["accepted_models"]:
        raise PolicyRefused(f"model={model}: site {name} accepts only models {policy['accepted_models']} "
                            "(its policy.accepted_models)")
    if policy.get("accepted_objectives") is not None and objective not in policy["accepted_objectives"]:
        raise PolicyRefused(f"objective={objective}: site {name} accepts only objectives "
                            f"{policy['accepted_objectives']} (its policy.accepted_objectives)")
    _check_sharing(cfg)
    if round_config is None:
        return
    dpsgd = OmegaConf.select(cfg, "privacy.dpsgd")
    privacy = OmegaConf.select(cfg, "privacy.name")
    if "dpsgd" in policy.get("require", []) and not dpsgd:
        raise PolicyRefused(f"privacy={privacy}: site {name} requires DP-SGD (policy.require: {policy['require']}); "
                            "run it with privacy=dpsgd or dpsgd_secagg")
    if "secagg" in policy.get("require", []) and not secure:
        raise PolicyRefused(f"privacy={privacy}: site {name} requires SecAgg+ (policy.require: {policy['require']}) "
                            "and this round came in the clear; run it with privacy=secagg or dpsgd_secagg")
    if not dpsgd:
        return
    dpsgd = OmegaConf.to_container(dpsgd, resolve=True)
    run_caps = {k.removeprefix("privacy_"): v for k, v in round_config.items() if k.startswith("privacy_")}
    caps = effective_caps(site["privacy"], run_caps)
    target, multiplier = dpsgd.get("target_epsilon"), dpsgd.get("noise_multiplier")
    for key, value in (("target_epsilon", target), ("noise_multiplier", multiplier)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise PolicyRefused(f"privacy.dpsgd.{key}={value!r} must be a finite number > 0")
    if target is not None and target > caps["max_epsilon"]:
        raise PolicyRefused(f"privacy.dpsgd.target_epsilon={target} is above site {name}'s max_epsilon="
                            f"{caps['max_epsilon']:g}")
    floor = policy.get("min_noise_multiplier")
    if floor is not None:
        noise = _noise(dpsgd, site, caps, round_config)
        if noise is not None and noise < floor:
            setting = "privacy.dpsgd.noise_multiplier" if target is None else f"privacy.dpsgd.target_epsilon={target}"
            raise PolicyRefused(f"{setting} gives noise multiplier {noise:.4g}, below site {name}'s floor "
                                f"policy.min_noise_multiplier={floor:g}")
