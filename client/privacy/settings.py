"""The `privacy/` config group: which mechanisms a run uses, and refusal of combinations that cannot work."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from client.privacy.clipping import PrivacyError
from client.privacy.training import DpSgdSettings

MECHANISMS = ("dpsgd", "central_dp", "secagg")
# Strategies whose server step needs each site's update in the clear (order statistics of the updates).
ROBUST_STRATEGIES = frozenset({"median", "trimmed_mean", "krum", "multikrum", "bulyan"})
# Flower's fixed-clipping DP wrappers account for an unweighted mean of clipped updates (FedAvg, equal weights).
MEAN_STRATEGIES = frozenset({"fedavg", "fedprox"})


def _block(cfg, key: str) -> dict | None:
    value = _select(cfg, f"privacy.{key}")
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _select(cfg, path: str, default=None):
    if isinstance(cfg, DictConfig):
        return OmegaConf.select(cfg, path, default=default)
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _positive(block: dict, key: str, where: str, allow_zero: bool = False) -> None:
    value = block.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{where}.{key} must be a number {'>=' if allow_zero else '>'} 0, got {value!r}")


def validate_privacy_config(cfg) -> None:
    """Raise ValueError explaining why the composed config's privacy settings cannot work; None if they can."""
    if _select(cfg, "privacy") is None:
        return
    name = _select(cfg, "privacy.name", "?")
    where = f"privacy={name}"
    unknown = set(_select(cfg, "privacy").keys()) - {"name", *MECHANISMS}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; a privacy config has name and {list(MECHANISMS)}")
    strategy = _select(cfg, "federation.strategy", "fedavg")
    dpsgd, central, secagg = (_block(cfg, key) for key in MECHANISMS)

    if dpsgd is not None:
        try:
            DpSgdSettings.from_config(dpsgd)
        except PrivacyError as error:
            raise ValueError(f"{where}: {error}") from None
        if int(_select(cfg, "train.grad_accum", 1) or 1) != 1:
            raise ValueError(f"{where}: train.grad_accum must be 1 under DP-SGD "
                             "(one step is one Poisson batch of patients)")

    if central is not None:
        _positive(central, "clipping_norm", f"{where}: privacy.central_dp")
        _positive(central, "noise_multiplier", f"{where}: privacy.central_dp", allow_zero=True)
        if strategy not in MEAN_STRATEGIES:
            raise ValueError(
                f"{where} with federation.strategy={strategy}: Flower's server-side fixed-clipping DP wrapper adds "
                f"noise calibrated to an unweighted mean of clipped updates (FedAvg); {strategy} combines updates "
                f"differently, so that noise would not give the stated guarantee. Use strategy fedavg or fedprox."
            )
        if secagg is not None:
            raise ValueError(
                f"{where}: central DP with server-side clipping needs each site's update in the clear to clip it, "
                "and SecAgg+ hides the individual updates. Use one of them, or dpsgd with secagg "
                "(privacy=dpsgd_secagg)."
            )

    if secagg is not None:
        for key in ("num_shares", "reconstruction_threshold"):
            _positive(secagg, key, f"{where}: privacy.secagg")
        if secagg["reconstruction_threshold"] > secagg["num_shares"]:
            raise ValueError(f"{where}: privacy.secagg.reconstruction_threshold ({secagg['reconstruction_threshold']}) "
                             f"cannot exceed num_shares ({secagg['num_shares']})")
        if strategy in ROBUST_STRATEGIES:
            raise ValueError(
                f"{where} with federation.strategy={strategy}: SecAgg+ reveals only the sum of the sites' updates, "
                f"and {strategy} needs every update on its own (per-coordinate order statistics). Use fedavg, "
                "fedprox, fedadam or fedyogi with SecAgg+, or drop SecAgg+ to use robust aggregation."
            )
        if _select(cfg, "federation.validate_updates", False):
            raise ValueError(
                f"{where} with federation.validate_updates=true: SecAgg+ hides each site's update, so the server "
                "cannot check them one by one (shapes, NaN, norms). Turn per-update validation off for SecAgg+ runs."
            )
        min_sites = int(_select(cfg, "federation.min_sites", 2) or 0)
        if min_sites < 2:
            raise ValueError(
                f"{where} with federation.min_sites={min_sites}: an aggregate of one site is that site's update; "
                "SecAgg+ needs at least 2 sites per round (and with exactly 2 each can still infer the other's)."
            )
