"""What the coordinator tells the sites each round: schedule, sharing rule, fingerprints, privacy caps."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def hybridmed_stage(fed: DictConfig, round_: int) -> int:
    """HybridMED trains summarisation alone (stage 1) for the first rounds, then everything (stage 2)."""
    return 1 if round_ <= int(fed.hybridmed_stage1_rounds) else 2


def round_config(cfg: DictConfig, round_: int, run_name: str, fingerprints: dict[str, str]) -> dict:
    """The config record of round `round_` (1-based). Sites continue one lr schedule over all rounds'
    local steps, so the schedule stays in step when a run resumes."""
    fed = cfg.federation
    config = {
        "run": run_name,
        "round": round_,
        "rounds": int(fed.rounds),
        "local_steps": int(fed.local_steps),
        "batch_size": int(fed.batch_size),
        "lr": float(fed.lr),
        "hybridmed_stage": hybridmed_stage(fed, round_),
        "proximal_mu": float(fed.proximal_mu) if fed.strategy == "fedprox" else 0.0,
        "seed": int(cfg.seed),
        "shared_patterns": [str(p) for p in fed.shared_patterns],
        "norm_patterns": [str(p) for p in fed.norm_patterns],
        "fedbn": bool(fed.fedbn),
    }
    config.update({f"fingerprint_{name}": value for name, value in fingerprints.items()})
    caps = OmegaConf.to_container(fed.privacy, resolve=True) or {}
    config.update({f"privacy_{key}": float(value) for key, value in caps.items() if value is not None})
    return config

