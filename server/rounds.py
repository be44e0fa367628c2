"""What the coordinator tells the sites each round: schedule, fingerprints, privacy caps. The round's config record
is the sites' one source of these settings: a site does not read them from the run's overrides
(client/federated.py:run_settings). Which sites a round asks is the strategy's (server/strategy.py)."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from shared_models.objectives.schedule import federation_steps, resolve_schedule


def hybridmed_stage(cfg: DictConfig, start_step: int) -> int:
    """The HybridMED stage a round starting at `start_step` begins in, by the model's own step schedule."""
    return resolve_schedule(cfg.objective, federation_steps(cfg)).hybridmed_stage(start_step)


def round_config(cfg: DictConfig, round_: int, run_name: str, fingerprints: dict[str, str],
                 site_rounds: int | None = None) -> dict:
    """The config record of round `round_` (1-based). Sites continue one lr and objective schedule over
    all rounds' local steps (round r starts at step (r - 1) * local_steps), so it stays in step on resume.
    `site_rounds` is the most rounds one site trains in the run (the strategy's `site_rounds`; all rounds when
    not given). What travels is not here: every site derives it from `model.sharing`, which the fingerprints
    cover."""
    fed = cfg.federation
    start_step = (round_ - 1) * int(fed.local_steps)
    config = {
        "run_name": run_name,
        "round": round_,
        "rounds": int(fed.rounds),
        "site_rounds": int(site_rounds or fed.rounds),
        "local_steps": int(fed.local_steps),
        "start_step": start_step,
        "batch_size": int(cfg.train.batch_size),
        "lr": float(cfg.train.lr),
        "proximal_mu": float(fed.proximal_mu) if fed.strategy == "fedprox" else 0.0,
        "seed": int(cfg.seed),
        "keep_optimizer_state": bool(fed.keep_optimizer_state),   # the site's AdamW moments kept between rounds
        "transfer_dtype": str(fed.transfer_dtype),  # the sites reply in the dtype the server sends
        "hybridmed_stage": hybridmed_stage(cfg, start_step),  # reported; the sites' model follows its own schedule
    }
    config.update({f"fingerprint_{name}": value for name, value in fingerprints.items()})
    caps = OmegaConf.to_container(fed.privacy, resolve=True) or {}
    config.update({f"privacy_{key}": float(value) for key, value in caps.items() if value is not None})
    return config
