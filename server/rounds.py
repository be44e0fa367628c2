"""What the coordinator tells the sites each round: schedule, fingerprints, privacy caps."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from shared_models.objectives.schedule import federation_steps, resolve_schedule
from shared_models.privacy_config import ONE_SITE_PER_ROUND


def sites_of_round(strategy: str, nodes: list[int], round_: int) -> list[int]:
    """The SuperNodes asked in round `round_` (1-based): all of `nodes`, or for `cyclic` the next one in turn."""
    if strategy in ONE_SITE_PER_ROUND:
        return [nodes[(round_ - 1) % len(nodes)]]
    return nodes


def site_rounds(strategy: str, nodes: int, rounds: int) -> int:
    """The most rounds any one of `nodes` SuperNodes trains in a run of `rounds`: all of them, or for `cyclic` its
    turns. A site's DP-SGD sizes its noise for a target epsilon by these rounds' steps, so it never plans (and
    over-noises for) the rounds of the other sites."""
    return -(-rounds // max(nodes, 1)) if strategy in ONE_SITE_PER_ROUND else rounds


def schedule_trainer(strategy: str) -> str:
    """Whose steps `rounds x local_steps` counts, for notices: each site's, continued over the rounds, or with
    `cyclic` the model's as it passes from site to site (round r starts at step (r - 1) * local_steps)."""
    return "the model passed from site to site" if strategy in ONE_SITE_PER_ROUND else "each site"


def total_local_steps(fed: DictConfig, sites: int) -> int:
    """All sites' local steps over the run: what a centralized baseline with the same budget trains."""
    return int(fed.rounds) * int(fed.local_steps) * (1 if fed.strategy in ONE_SITE_PER_ROUND else sites)


def hybridmed_stage(cfg: DictConfig, start_step: int) -> int:
    """The HybridMED stage a round starting at `start_step` begins in, by the model's own step schedule."""
    return resolve_schedule(cfg.objective, federation_steps(cfg)).hybridmed_stage(start_step)


def round_config(cfg: DictConfig, round_: int, run_name: str, fingerprints: dict[str, str],
                 nodes: int | None = None) -> dict:
    """The config record of round `round_` (1-based). Sites continue one lr and objective schedule over
    all rounds' local steps (round r starts at step (r - 1) * local_steps), so it stays in step on resume.
    `site_rounds` is the most rounds one site trains in the run, for `nodes` connected SuperNodes (all rounds
    when `nodes` is not given). What travels is not here: every site derives it from `model.sharing`, which the
    fingerprints cover."""
    fed = cfg.federation
    start_step = (round_ - 1) * int(fed.local_steps)
    config = {
        "run": run_name,
        "round": round_,
        "rounds": int(fed.rounds),
        "site_rounds": site_rounds(str(fed.strategy), nodes, int(fed.rounds)) if nodes else int(fed.rounds),
        "local_steps": int(fed.local_steps),
        "start_step": start_step,
        "batch_size": int(fed.batch_size),
        "lr": float(fed.lr),
        "proximal_mu": float(fed.proximal_mu) if fed.strategy == "fedprox" else 0.0,
        "seed": int(cfg.seed),
        "transfer_dtype": str(fed.transfer_dtype),  # the sites reply in the dtype the server sends
        "hybridmed_stage": hybridmed_stage(cfg, start_step),  # reported; the sites' model follows its own schedule
    }
    config.update({f"fingerprint_{name}": value for name, value in fingerprints.items()})
    caps = OmegaConf.to_container(fed.privacy, resolve=True) or {}
    config.update({f"privacy_{key}": float(value) for key, value in caps.items() if value is not None})
    return config
