"""A site's own file (`configs/site/<name>.yaml`): loading, validation, and the privacy-caps rule."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SITE_DIR = PROJECT_ROOT / "configs" / "site"
REQUIRED = ("name", "data", "superlink", "root_certificates", "node_private_key", "state_dir", "privacy")
PATH_KEYS = ("root_certificates", "node_private_key", "state_dir", "trusted_entities", "catalog", "cache", "ledger")
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


def load_site(path: Path, check_files: bool = True) -> dict:
    """The site file as a plain dict with absolute paths; raises SiteConfigError naming what is wrong."""
    site = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    missing = [key for key in REQUIRED if site.get(key) in (None, "")]
    if missing:
        raise SiteConfigError(f"{path}: missing {', '.join(missing)} (see configs/site/A.yaml for a complete example)")
    for key in PATH_KEYS:
        site[key] = _absolute(site.get(key))
    site["data"]["root"] = _absolute(site["data"].get("root"))
    site["privacy"] = validate_caps(site["privacy"], f"{path}: privacy")
    delays = site.get("restart_delays_s")
    if delays is not None and (not isinstance(delays, list) or not all(
            isinstance(d, (int, float)) and math.isfinite(d) and d >= 0 for d in delays)):
        raise SiteConfigError(f"{path}: restart_delays_s must be a list of seconds >= 0 (e.g. [5, 10, 20]), got {delays!r}")
    site.setdefault("clientapp_launcher", DEFAULT_LAUNCHER)
    if site["clientapp_launcher"] not in LAUNCHERS:
        raise SiteConfigError(f"{path}: clientapp_launcher must be one of {list(LAUNCHERS)}, "
                              f"got {site['clientapp_launcher']!r}")
    if ":" not in str(site["superlink"]):
        raise SiteConfigError(f"{path}: superlink must be host:port, got {site['superlink']!r}")
    if check_files:
        for key, what in [("root_certificates", "TLS root certificate (the federation CA's .crt)"),
                          ("node_private_key", "SuperNode private key (ssh-keygen -t ecdsa -b 384)")]:
            if not Path(site[key]).is_file():
                raise SiteConfigError(f"{path}: {key} = {site[key]} does not exist; it should be the {what}")
        if site.get("trusted_entities") and not Path(site["trusted_entities"]).is_file():
            raise SiteConfigError(f"{path}: trusted_entities = {site['trusted_entities']} does not exist")
        if not site["data"].get("root") or not Path(site["data"]["root"]).is_dir():
            raise SiteConfigError(f"{path}: data.root = {site['data'].get('root')} is not a folder; point it at the site's data")
    return site


def data_paths(site: dict) -> tuple[str, Path]:
    """(catalog, image cache) of a site: its file's `catalog` / `cache`, else `<state_dir>/catalog.sqlite`
    and `<data root>/fedcxr-image-cache`."""
    catalog = site.get("catalog") or str(Path(site["state_dir"]) / "catalog.sqlite")
    return catalog, Path(site.get("cache") or Path(site["data"]["root"]) / CACHE_DIR)


def validate_caps(caps: dict, where: str) -> dict:
    unknown = set(caps) - set(CAP_KEYS)
    if unknown:
        raise SiteConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {list(CAP_KEYS)}")
    for key in CAP_KEYS:
        value = caps.get(key)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
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
