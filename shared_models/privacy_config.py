"""The `privacy/` config group as the whole federation sees it: refusal of mechanism combinations that cannot work."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


MECHANISMS = ("dpsgd", "central_dp", "secagg")
# Strategies whose server step needs each site's update in the clear (order statistics of the updates).
ROBUST_STRATEGIES = frozenset({"median", "trimmed_mean"})
# Strategies that ask one site per round, in turn (cyclic weight transfer: Chang et al. 2018, Sheller et al. 2020):
# the global model continues from each site's update, so the sites' local steps add up in sequence instead of
# being averaged in parallel. The server then sees each site's update on its own.
ONE_SITE_PER_ROUND = frozenset({"cyclic"})
# Flower's fixed-clipping DP wrappers account for an unweighted mean of clipped updates (FedAvg, equal weights).
MEAN_STRATEGIES = frozenset({"fedavg", "fedprox"})


def privacy_block(cfg, key: str) -> dict | None:
    value = config_value(cfg, f"privacy.{key}")
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def config_value(cfg, path: str, default=None):
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


def validate_federation_privacy(cfg) -> None:
    """Raise ValueError explaining why the run's privacy mechanisms cannot work together or with its
    aggregation; None if they can. The coordinator runs this; a site also checks its own DP-SGD block."""
    if config_value(cfg, "privacy") is None:
        return
    name = config_value(cfg, "privacy.name", "?")
    where = f"privacy={name}"
    unknown = set(config_value(cfg, "privacy").keys()) - {"name", *MECHANISMS}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; a privacy config has name and {list(MECHANISMS)}")
    strategy = config_value(cfg, "federation.strategy", "fedavg")
    central, secagg = privacy_block(cfg, "central_dp"), privacy_block(cfg, "secagg")

    if strategy in ONE_SITE_PER_ROUND and (central is not None or secagg is not None):
        raise ValueError(
            f"{where} with federation.strategy={strategy}: {strategy} asks one site per round, so the round's "
            "aggregate is that site's own update. SecAgg+ would hide nothing, and central DP would clip and noise a "
            "single site's update as if it were a mean over sites. Use privacy=dpsgd (each site's own DP-SGD) or "
            "privacy=none with cyclic, or a strategy that averages several sites (federation.strategy=fedavg or "
            "fedprox)."
        )
    if central is not None:
        _positive(central, "clipping_norm", f"{where}: privacy.central_dp")
        # no zero: a noiseless DP-FedAvg is not private, and its accountant's epsilon would be infinite
        _positive(central, "noise_multiplier", f"{where}: privacy.central_dp")
        fraction, delta = central.get("site_fraction", 1.0), central.get("delta", 1e-5)
        if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
            raise ValueError(f"{where}: privacy.central_dp.site_fraction must be in (0, 1], got {fraction!r}")
        if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 < delta < 1):
            raise ValueError(f"{where}: privacy.central_dp.delta must be in (0, 1), got {delta!r}")
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
        for key in ("num_shares", "reconstruction_threshold", "clipping_range", "max_weight"):
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
        if config_value(cfg, "federation.update_norm_action", "clip") == "reject":
            # The server's checks of each reply (server/trust_boundary.py) see only the mean under SecAgg+: `reject`
            # would leave out, for one site's update, every site's share of the round.
            raise ValueError(
                f"{where} with federation.update_norm_action=reject: SecAgg+ hides each site's update, so the server "
                "cannot check them one by one (norms) to leave one site out; it would reject the whole round's mean. "
                "Use federation.update_norm_action=clip with SecAgg+ (the norm bound then scales the mean)."
            )
        min_sites = int(config_value(cfg, "federation.min_sites", 2) or 0)
        if min_sites < 2:
            raise ValueError(
                f"{where} with federation.min_sites={min_sites}: an aggregate of one site is that site's update; "
                "SecAgg+ needs at least 2 sites per round (and with exactly 2 each can still infer the other's)."
            )
