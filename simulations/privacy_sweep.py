"""`python -m simulations.privacy_sweep`: one federation trained without DP and with DP-SGD at each target
epsilon (delta per site from `federation.privacy.max_delta`), every arm the same model, sites and step budget;
`sweep.json`, `sweep.md` and `sweep.png` (linear-probe mean AUC against epsilon) in the run directory.

Any `python -m simulations.run` override applies to every arm, e.g.
`python -m simulations.privacy_sweep federation.sites=4 federation.rounds=3 'epsilons=[1,4,8]'`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from shared_models.config import compose, hydra_entry  # noqa: E402
from simulations.report import mean_auc  # noqa: E402

# What privacy=dpsgd sets for the whole federation (no BatchNorm): the non-DP arm trains the same model,
# so the sweep measures the noise and clipping, not a change of projection head.
SAME_MODEL = ["model.projection_head=linear", "model.image.norm=group"]
SWEEP_KEYS = ("epsilons",)


def arm_overrides(epsilon: float | None) -> list[str]:
    """The overrides of one arm on top of the user's: DP-SGD at `epsilon`, or no DP (None)."""
    if epsilon is None:
        return ["privacy=none", *SAME_MODEL]
    return ["privacy=dpsgd", f"privacy.dpsgd.target_epsilon={float(epsilon)}"]


def arm_name(epsilon: float | None) -> str:
    return "no_dp" if epsilon is None else f"epsilon_{float(epsilon):g}"


def check_epsilons(epsilons) -> list[float]:
    values = [float(e) for e in (epsilons or [])]
    if not values or any(not math.isfinite(e) or e <= 0 for e in values):
        raise ValueError(f"epsilons must be a non-empty list of positive numbers, got {epsilons!r}")
    return sorted(values)


def sweep_rows(summaries: dict[str, dict]) -> list[dict]:
    """One row per arm: target and spent epsilon (the largest over sites), noise, probe AUC of the federated and
    random encoders, final training loss where the sites report it, wall time."""
    rows = []
    for name, summary in summaries.items():
        dp = summary["config"]["privacy"].get("dpsgd")
        federated = mean_auc(summary["final"].get("federated"))
        random = mean_auc(summary["final"].get("random"))
        last = summary["rounds"][-1]["sites"] if summary["rounds"] else {}
        noise = [m["noise_multiplier"] for m in last.values() if "noise_multiplier" in m]
        losses = [m["loss"] for m in last.values() if "loss" in m]
        rows.append({
            "arm": name,
            "target_epsilon": None if not dp else dp.get("target_epsilon"),
            "epsilon_spent": max(summary["epsilon"].values()) if summary["epsilon"] else None,
            "delta": None if not dp else summary["config"]["federation"]["privacy"].get("max_delta"),
            "noise_multiplier": max(noise) if noise else None,
            "label_fraction": None if federated is None else federated[0],
            "federated_auc": None if federated is None else federated[1],
            "random_auc": None if random is None else random[1],
            "final_loss": sum(losses) / len(losses) if losses else None,
            "wall_s": summary["wall_s"],
        })
    return rows


def _cell(value, digits: int = 3) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def sweep_markdown(rows: list[dict]) -> str:
    lines = ["| arm | target epsilon | epsilon spent (max over sites) | noise multiplier | probe mean AUC | "
             "random init | last-round loss | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {_cell(r['target_epsilon'], 1)} | {_cell(r['epsilon_spent'], 2)} | "
                     f"{_cell(r['noise_multiplier'], 2)} | {_cell(r['federated_auc'])} | {_cell(r['random_auc'])} | "
                     f"{_cell(r['final_loss'], 2)} | {_cell(r['wall_s'], 0)} |")
    return "\n".join(lines)


def plot_sweep(path: Path, rows: list[dict]) -> None:
    dp = [r for r in rows if r["epsilon_spent"] is not None and r["federated_auc"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if dp:
        ax.plot([r["epsilon_spent"] for r in dp], [r["federated_auc"] for r in dp], "o-", label="DP-SGD (federated)")
    for r in rows:
        if r["epsilon_spent"] is None and r["federated_auc"] is not None:
            ax.axhline(r["federated_auc"], color="tab:green", linestyle="--", label="no DP (federated)")
    randoms = [r["random_auc"] for r in rows if r["random_auc"] is not None]
    if randoms:
        ax.axhline(sum(randoms) / len(randoms), color="gray", linestyle=":", label="random init")
    ax.set_xscale("log")
    if dp:   # the epsilons themselves as ticks, in plain numbers
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xticks([r["epsilon_spent"] for r in dp], [f"{r['epsilon_spent']:.3g}" for r in dp])
    ax.set_xlabel("epsilon spent (delta per site as configured)")
    ax.set_ylabel("linear-probe mean AUC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(user_overrides: list[str], epsilons: list[float], run_dir: Path) -> list[dict]:
    from simulations.run import simulate

    run_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for epsilon in [None, *epsilons]:
        overrides = [*user_overrides, *arm_overrides(epsilon), "compare_centralized=false"]
        cfg = compose(overrides, config_name="privacy_sweep")
        # group choices (privacy=dpsgd, model=...): simulate() keeps those naming an app section
        choices = dict(o.split("=", 1) for o in overrides if "=" in o and "." not in o.split("=", 1)[0])
        name = arm_name(epsilon)
        print(f"\n== {name}: {' '.join(arm_overrides(epsilon))}", flush=True)
        summaries[name] = simulate(cfg, run_dir / name, choices)
        rows = sweep_rows(summaries)   # written after every arm: a stopped sweep keeps what it measured
        (run_dir / "sweep.json").write_text(json.dumps({"overrides": user_overrides, "rows": rows}, indent=2))
    (run_dir / "sweep.md").write_text(
        "# Privacy sweep\n\nOverrides for every arm: `" + " ".join(user_overrides or ["(defaults)"]) + "`. "
        "Each arm trains the same model (linear projection heads, no BatchNorm) on the same sites and steps; "
        "epsilon is per site, delta per site as configured.\n\n" + sweep_markdown(rows) + "\n\n![](sweep.png)\n")
    plot_sweep(run_dir / "sweep.png", rows)
    return rows


def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    started = time.monotonic()
    epsilons = check_epsilons(cfg.epsilons)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    user = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0] not in SWEEP_KEYS]
    rows = run_sweep(user, epsilons, run_dir)
    print("\n" + sweep_markdown(rows))
    print(f"\nsweep: {run_dir / 'sweep.md'} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    hydra_entry("privacy_sweep", main, config_name="privacy_sweep")
