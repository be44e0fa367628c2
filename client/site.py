"""A site's own file (`configs/site/<name>.yaml`): loading, validation, and the privacy-caps rule."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SITE_DIR = PROJECT_ROOT / "configs" / "site"
REQUIRED = ("name", "data", "superlink", "root_certificates", "node_private_key", "state_dir", "privacy")
PATH_KEYS = ("root_certificates", "node_private_key", "state_dir", "trusted_entities", "catalog", "cache", "ledger",
             "superexec_secret")
CAP_KEYS = ("max_epsilon", "max_delta")
CACHE_DIR = "fedcxr-image-cache"  # a site's default image cache, inside its data root (as `python -m client.data index`)


class SiteConfigError(ValueError):
    """The site file is incomplete or points at something that is not there."""


def site_file(site: str, site_dir: Path = SITE_DIR) -> Path:
    path = Path(site) if site.endswith((".yaml", ".yml")) else Path(site_dir) / f"{site}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in Path(site_dir).glob("*.yaml"))) or "none"
        raise SiteConfigError(f"site file {path} does not exist (sites in {site_dir}: {known})")
    return path


def _absolute(value: str | None) -> str | None:
    if value is None or "://" in str(value):
        return value
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() else (PROJECT_ROOT / path).resolve())


# How the SuperNode starts a round's ClientApp: `warm` forks it from a launcher that imported the ML stack once
# (client/clientapp_launcher.py); `flower` lets Flower's SuperExec start a fresh interpreter per message.
LAUNCHERS = ("warm", "flower")
DEFAULT_LAUNCHER = "warm"


def _read(path: Path) -> dict:
    """The file's mapping, interpolations resolved; malformed YAML named by file and line."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    try:
        text = Path(path).read_text()
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1} column {mark.column + 1}" if mark else str(path)
        raise SiteConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SiteConfigError(f"{path}: cannot be read ({err})") from None
    if not isinstance(raw, dict):
        raise SiteConfigError(f"{path}: a site file is a mapping of keys (see configs/site/A.yaml), got {type(raw).__name__}")
    try:
        return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as err:
        raise SiteConfigError(f"{path}: {err}") from None


def _path(value, key):
    if value is not None and (not isinstance(value, str) or not value.strip() or "\0" in value):
        return f"{key} must be a path (text) or null, got {value!r}"


def _integer(low: int, high: int | None = None, optional: bool = True):
    def check(value, key):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            return f"{key} must be an integer {span}{' or null' if optional else ''}, got {value!r}"
    return check


def _one_of(choices, optional: bool = False):
    def check(value, key):
        if value not in choices and not (optional and value is None):
            return f"{key} must be one of {list(choices)}{' or null' if optional else ''}, got {value!r}"
    return check


def _device(value, key):
    if value is not None and (not isinstance(value, str) or not DEVICE.fullmatch(value)):
        return f"{key} must be auto, cpu, cuda or cuda:N (auto: cuda where available, else cpu), got {value!r}"


def _superlink(value, key):
    host, _, port = str(value).rpartition(":")
    if not isinstance(value, str) or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{key} must be host:port with a port 1..65535, got {value!r}"


def _delays(value, key):
    if value is not None and (not isinstance(value, list) or not value or not all(
            isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and d >= 0 for d in value)):
        return f"{key} must be a list of seconds >= 0 (e.g. [5, 10, 20]) or null, got {value!r}"


def _name(value, key):
    if not isinstance(value, str) or not SITE_NAME.fullmatch(value):
        return f"{key} must be 1-64 letters, digits, '.', '_' or '-', got {value!r}"


def _studies(value, key):
    if value is not None and (not isinstance(value, list) or not all(isinstance(s, (str, int)) for s in value)):
        return f"{key} must be a list of study ids or null, got {type(value).__name__}"


def _scanner(value, key):
    if value is not None and (not isinstance(value, dict) or set(value) - {"site_index", "seed"}
                              or any(_integer(0)(v, k) for k, v in value.items())):
        return f"{key} must be null or {{site_index: N, seed: N}}, got {value!r}"


def _data(value, key):
    from client.data.layouts import LAYOUTS

    if not isinstance(value, dict):
        return f"{key} must be a mapping with root and layout (e.g. {{root: /data/site_a, layout: mimic_cxr}}), got {value!r}"
    unknown = sorted(set(value) - set(DATA_KEYS))
    if unknown:
        return f"{key}: unknown key(s) {unknown}; allowed: {list(DATA_KEYS)}"
    return (_path(value.get("root"), f"{key}.root") if value.get("root") is not None else f"{key}.root is missing") \
        or _one_of(tuple(LAYOUTS))(value.get("layout"), f"{key}.layout") \
        or _path(value.get("reports"), f"{key}.reports") \
        or _path(value.get("manifest"), f"{key}.manifest") \
        or (None if value.get("split") is None or isinstance(value["split"], str) else f"{key}.split must be text") \
        or (None if isinstance(value.get("index", True), bool) else f"{key}.index must be true or false") \
        or (None if isinstance(value.get("allow_outside_root", False), bool)
            else f"{key}.allow_outside_root must be true or false")


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
DATA_KEYS = ("root", "layout", "reports", "manifest", "split", "index", "allow_outside_root")
# Every key a site file may hold and its check (a function returning what is wrong, or None). A key not here is
# reported: a misspelt `policy` must not silently leave a site without one.
SCHEMA = {
    "name": _name, "data": _data, "superlink": _superlink, "state_dir": _path,
    "root_certificates": _path, "node_private_key": _path, "trusted_entities": _path, "superexec_secret": _path,
    "catalog": _path, "cache": _path, "ledger": _path,
    "supernode_port": _integer(1, 65535), "max_retries": _integer(0), "restart_delays_s": _delays,
    "clientapp_launcher": _one_of(LAUNCHERS, optional=True), "device": _device, "threads": _integer(1),
    "nproc": _integer(1),
    "public_patient_count": _integer(1), "studies": _studies, "scanner": _scanner,
    "privacy": None, "policy": None,   # checked by validate_caps / validate_policy
}


def load_site(path: Path, check_files: bool = True) -> dict:
    """The site file as a plain dict with absolute paths; raises SiteConfigError naming what is wrong.

    check_files: the site is starting (client/run.py): its certificate, key and data must exist, and its
    state_dir (and a default or plain-file catalog's folder) is created."""
    from client.policy import validate_policy

    site = _read(path)
    missing = [key for key in REQUIRED if site.get(key) in (None, "")]
    if missing:
        raise SiteConfigError(f"{path}: missing {', '.join(missing)} (see configs/site/A.yaml for a complete example)")
    unknown = sorted(set(site) - set(SCHEMA))
    if unknown:
        raise SiteConfigError(f"{path}: unknown key(s) {unknown}; a site file holds {sorted(SCHEMA)}")
    problems = [problem for key, check in SCHEMA.items() if check and (problem := check(site.get(key), key))]
    if problems:
        raise SiteConfigError(f"{path}: " + "; ".join(problems))
    for key in PATH_KEYS:
        site[key] = _absolute(site.get(key))
    site["data"]["root"] = _absolute(site["data"].get("root"))
    site["data"]["reports"] = _absolute(site["data"].get("reports"))
    site["privacy"] = validate_caps(site["privacy"], f"{path}: privacy")
    site["policy"] = validate_policy(site.get("policy"), f"{path}: policy")
    site.setdefault("clientapp_launcher", DEFAULT_LAUNCHER)
    site["clientapp_launcher"] = site["clientapp_launcher"] or DEFAULT_LAUNCHER
    site["device"] = site.get("device") or "auto"
    if check_files:
        for key, what in [("root_certificates", "TLS root certificate (the federation CA's .crt)"),
                          ("node_private_key", "SuperNode private key (ssh-keygen -t ecdsa -b 384)")]:
            if not Path(site[key]).is_file():
                raise SiteConfigError(f"{path}: {key} = {site[key]} does not exist; it should be the {what}")
        if site.get("trusted_entities") and not Path(site["trusted_entities"]).is_file():
            raise SiteConfigError(f"{path}: trusted_entities = {site['trusted_entities']} does not exist")
        if not site["data"].get("root") or not Path(site["data"]["root"]).is_dir():
            raise SiteConfigError(f"{path}: data.root = {site['data'].get('root')} is not a folder; point it at the site's data")
        if site["device"].startswith("cuda"):
            resolve_device(site["device"], f"{path}: device")
        create_folders(site, path)
    return site


def create_folders(site: dict, path: Path) -> None:
    """A first start makes the site's state_dir and the folder of a file catalog (the default is in state_dir)."""
    catalog = data_paths(site)[0]
    folders = [Path(site["state_dir"])] + ([] if "://" in catalog else [Path(catalog).parent])
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SiteConfigError(f"{path}: cannot create {folder} ({err.strerror}); create it, or point the site "
                                  "file's state_dir / catalog at a folder this user may write") from None


def resolve_device(device: str | None, where: str = "site device") -> str:
    """The torch device of `device`: auto (or null) is cuda where a GPU is visible, else cpu; cuda must exist."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise SiteConfigError(f"{where} is {device} but this machine has {torch.cuda.device_count()} visible CUDA "
                                  "device(s); set device: auto or cpu in the site file")
    return device


def data_paths(site: dict) -> tuple[str, Path]:
    """(catalog, image cache) of a site: its file's `catalog` / `cache`, else `<state_dir>/catalog.sqlite`
    and `<data root>/fedcxr-image-cache`."""
    catalog = site.get("catalog") or str(Path(site["state_dir"]) / "catalog.sqlite")
    return catalog, Path(site.get("cache") or Path(site["data"]["root"]) / CACHE_DIR)


def validate_caps(caps: dict, where: str) -> dict:
    if not isinstance(caps, dict):
        raise SiteConfigError(f"{where} must be a mapping {{max_epsilon: E, max_delta: D}}, got {caps!r}")
    unknown = set(caps) - set(CAP_KEYS)
    if unknown:
        raise SiteConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {list(CAP_KEYS)}")
    for key in CAP_KEYS:
        value = caps.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SiteConfigError(f"{where}.{key} must be a finite number >= 0, got {value!r}")
    return {key: float(caps[key]) for key in CAP_KEYS}


def effective_caps(site_caps: dict, run_caps: dict | None) -> dict:
    """The site's privacy caps after the run config's: a run may tighten a cap, never loosen it."""
    caps = dict(site_caps)
    for key, requested in (run_caps or {}).items():
        if key not in CAP_KEYS:
            raise SiteConfigError(f"run config privacy.{key} is not a site cap; allowed: {list(CAP_KEYS)}")
        if requested is None:
            continue
        if requested > caps[key]:
            log.warning("run config asks for %s=%s, looser than this site's %s; keeping the site's cap",
                        key, requested, caps[key])
        caps[key] = min(caps[key], float(requested))
    return caps
