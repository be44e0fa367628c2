"""`python -m simulations.privacy_audit`: a one-run canary audit of the site's DP-SGD (Steinke, Nasr & Jagielski 2023,
"Privacy auditing with one (1) training run"): an empirical lower bound on epsilon beside the accountant's.

The mechanism audited is the site's own: `client.privacy.dp_train_steps` (Poisson sampling of patients, clipped
per-patient sum, Gaussian noise, AdamW), run on a linear model whose patients are chosen by the auditor: `canaries`
canary patients, each included with probability 1/2 by the auditor's coin, and `background` other patients. Canary
i's input is `canary_scale` on feature i alone and its target a fixed unit vector u (a "Dirac" canary): its clipped
gradient lies in column i of the weights, where no other patient's does. Two observers score each canary:

- white-box: every step's noisy gradient (what a coordinator that saw every step would see; stronger than the
  per-round parameters it really sees): score_i = sum over steps of the gradient's pull of column i towards u;
- black-box: the final weights only: score_i = column i's component along u.

The auditor guesses "in" for the k highest scores and "out" for the k lowest; if the run is epsilon-DP, the number
of correct guesses is dominated by Binomial(2k, e^eps / (1 + e^eps)), so every epsilon under which the observed count
is less likely than beta is refuted (the delta = 0 form of their Theorem; with delta > 0 the bound would be lower
still by a term of order canaries x delta). The best k of `guess_counts` is taken with a Bonferroni correction.

Arms: no noise (clipping only), DP-SGD at each target epsilon, and a deliberately broken DP-SGD that claims the
first target but adds a third of its noise (what calibrating to C instead of C + 2 C_b does at C_b = C).
Writes audit.json, audit.md and audit.png (empirical lower bound against the accountant's epsilon) in the run
directory. `audits=[canary,relinkage]` (the default) also runs the image-report re-linkage membership inference on
the project's model (simulations/relinkage_audit.py); its table joins audit.md and its arms audit.json's
`relinkage`. `audits=[run_relinkage] run_relinkage.runs=[FOLDER]` runs the same attack on the global model of
finished `simulations.run` federations (audit.json's `run_relinkage`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import binom
from torch import nn

from evaluation.report import jsonable

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- the bound
def epsilon_lower_bound(correct: int, guesses: int, beta: float) -> float:
    """The largest epsilon refuted at confidence 1 - beta by `correct` right guesses out of `guesses`: under
    epsilon-DP, P[correct >= v] <= P[Binomial(guesses, e^eps / (1 + e^eps)) >= v]. 0 when nothing is refuted."""
    if guesses <= 0 or correct <= 0:
        return 0.0

    def tail(epsilon: float) -> float:
        return float(binom.sf(correct - 1, guesses, 1.0 / (1.0 + math.exp(-epsilon))))

    if tail(0.0) >= beta:
        return 0.0
    low, high = 0.0, 50.0
    if tail(high) < beta:
        return high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) < beta else (low, mid)
    return low


def audit_scores(scores: np.ndarray, included: np.ndarray, guess_counts: list[int], beta: float) -> dict:
    """Guess "in" for the k highest scores and "out" for the k lowest, for each k; the best k's bound, each k
    tested at beta / len(guess_counts)."""
    order = np.argsort(-scores, kind="stable")
    best = {"epsilon_lower_bound": 0.0, "k": None, "correct": 0, "guesses": 0}
    for k in guess_counts:
        k = min(int(k), len(scores) // 2)
        correct = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        bound = epsilon_lower_bound(correct, 2 * k, beta / len(guess_counts))
        if bound > best["epsilon_lower_bound"] or best["k"] is None:
            best = {"epsilon_lower_bound": bound, "k": k, "correct": correct, "guesses": 2 * k}
    return best


# ------------------------------------------------------------------------------------------- the run
class CanaryModel(nn.Module):
    """A linear map with one per-patient squared-error term: what DP-SGD needs of a model, and nothing else."""

    lambdas = {"fit": 1.0}

    def __init__(self, features: int, outputs: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(outputs, features))

    def active_terms(self, step: int) -> list[str]:
        return ["fit"]

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        fit = 0.5 * (batch["x"] @ self.weight.T - batch["t"]).pow(2).sum(1).mean()
        return {"fit": fit, "loss": fit}


class Patients(torch.utils.data.Dataset):
    def __init__(self, samples: list[dict], ids: list[str]):
        self.samples, self.patient_ids, self.study_ids = samples, ids, ids

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def collate(samples: list[dict]) -> dict:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def canary_data(cfg: DictConfig, rng: np.random.Generator) -> tuple[Patients, np.ndarray]:
    """Background patients on their own features, canaries on one feature each; (the data set, which canaries
    the auditor's coin put in)."""
    canaries, background, extra = int(cfg.canaries), int(cfg.background), int(cfg.background_features)
    features = canaries + extra
    included = rng.random(canaries) < 0.5
    target = torch.tensor([1.0, 0.0])
    samples, ids = [], []
    for i in np.flatnonzero(included):
        x = torch.zeros(features)
        x[i] = float(cfg.canary_scale)
        samples.append({"x": x, "t": target})
        ids.append(f"canary{i:05d}")
    for j in range(background):
        x = torch.zeros(features)
        x[canaries:] = torch.from_numpy(rng.standard_normal(extra)).float()
        samples.append({"x": x, "t": torch.from_numpy(rng.standard_normal(2)).float()})
        ids.append(f"patient{j:05d}")
    return Patients(samples, ids), included


@contextmanager
def observed_steps(model: CanaryModel, into: list[tuple[torch.Tensor, torch.Tensor]]):
    """The white-box observer: every step's (weights, noisy gradient), as dp_train_steps computes them."""
    from client.privacy import training

    noisy = training.noisy_gradient

    def observe(summed, noise_std, scale, generator):
        out = noisy(summed, noise_std, scale, generator)
        into.append((model.weight.detach().clone(), out[0].detach().clone()))
        return out

    training.noisy_gradient = observe
    try:
        yield
    finally:
        training.noisy_gradient = noisy


def run_arm(cfg: DictConfig, noise: float, seed: int) -> dict:
    """One training run at `noise` (multiplier of the sensitivity); the canaries' white- and black-box audits."""
    from client.privacy import ClipNorms, PatientSampler, dp_train_steps
    from client.trainer import TrainSettings

    rng = np.random.default_rng(seed)
    dataset, included = canary_data(cfg, rng)
    canaries = int(cfg.canaries)
    model = CanaryModel(canaries + int(cfg.background_features))
    sampler = PatientSampler.for_dataset(dataset, int(cfg.batch_size), public_patients=int(cfg.public_patients))
    settings = TrainSettings(steps=int(cfg.steps), batch_size=int(cfg.batch_size), lr=float(cfg.lr), warmup_steps=0,
                             weight_decay=0.0, amp=False, grad_clip=None)
    # the noise is calibrated to C + 2 C_b; this model has no coupled term, so a C_b near 0 makes that its true
    # sensitivity C, and the accountant's epsilon tight: an audit can then tell a correct arm from a broken one
    clip = ClipNorms(float(cfg.clip), float(cfg.coupled_clip))
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    with observed_steps(model, steps):
        dp_train_steps(model, dataset, collate, settings, clip, noise, sampler, progress=False,
                       per_study=str(cfg.per_study))
    # white-box: at each step's weights the observer knows the direction canary i's clipped gradient would take
    # (column i: scale x (W_i scale - u)); it sums the noisy gradient's component along it
    target = torch.tensor([1.0, 0.0])[:, None]
    white = torch.zeros(canaries)
    for weight, gradient in steps:
        direction = weight[:, :canaries] * float(cfg.canary_scale) - target
        direction = direction / direction.norm(dim=0).clamp_min(1e-12)
        white += (gradient[:, :canaries] * direction).sum(0)
    final = model.weight.detach()[0, :canaries].numpy()    # black-box: how far column i moved towards u
    beta = 1.0 - float(cfg.confidence)
    guesses = list(cfg.guess_counts)
    return {"sample_rate": sampler.sample_rate, "white_box": audit_scores(white.numpy(), included, guesses, beta),
            "black_box": audit_scores(final, included, guesses, beta), "included": int(included.sum())}


def run_audit(cfg: DictConfig) -> list[dict]:
    """Every arm: (name, the noise the accountant is told, the noise actually added)."""
    from client.privacy import epsilon_spent, noise_for_target

    delta, steps = float(cfg.delta), int(cfg.steps)
    rate = min(1.0, int(cfg.batch_size) / int(cfg.public_patients))
    arms = [("no noise", 0.0, 0.0)]
    for epsilon in cfg.epsilons:
        noise = noise_for_target(float(epsilon), delta, rate, steps)
        arms.append((f"epsilon {float(epsilon):g}", noise, noise))
    claimed = noise_for_target(float(cfg.epsilons[0]), delta, rate, steps)
    arms.append((f"broken: claims epsilon {float(cfg.epsilons[0]):g}, noise / {float(cfg.broken_factor):g}", claimed,
                 claimed / float(cfg.broken_factor)))

    def epsilon(noise: float) -> float:
        return math.inf if noise == 0 else epsilon_spent([(noise, rate, steps)], delta)

    rows = []
    for index, (name, told, added) in enumerate(arms):
        started = time.monotonic()
        result = run_arm(cfg, added, int(cfg.seed) + index)
        rows.append({"arm": name, "noise_multiplier": added, "accountant_epsilon": epsilon(told),
                     "true_epsilon": epsilon(added), **result, "seconds": round(time.monotonic() - started, 1)})
        log.info("%s: accountant %.2f, white-box lower bound %.2f, black-box %.2f (%.0f s)", name, epsilon(told),
                 result["white_box"]["epsilon_lower_bound"], result["black_box"]["epsilon_lower_bound"],
                 rows[-1]["seconds"])
    return rows


# ------------------------------------------------------------------------------------------- outputs
def flagged(row: dict) -> bool:
    return row["white_box"]["epsilon_lower_bound"] > row["accountant_epsilon"]


AUDITS = ("canary", "relinkage", "run_relinkage")


def chosen_audits(cfg: DictConfig) -> list[str]:
    audits = list(cfg.get("audits", ["canary"]))
    unknown = sorted(set(audits) - set(AUDITS))
    if not audits or unknown:
        raise ValueError(f"audits={audits}: choose one or more of {list(AUDITS)}, e.g. 'audits=[canary,relinkage]'")
    return audits


def write_outputs(run_dir: Path, cfg: DictConfig, rows: list[dict], relinkage: list[dict] | None = None,
                  run_relinkage: list[dict] | None = None) -> None:
    """audit.json / audit.md (and audit.png with canary arms): `rows` the canary arms, `relinkage` the re-linkage's,
    `run_relinkage` the re-linkage of finished federations' global models."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    # strict JSON: a run without DP has an infinite accountant epsilon, written as null
    audit = jsonable({"config": config, "arms": rows, "relinkage": relinkage or [], "run_relinkage": run_relinkage or []})
    (run_dir / "audit.json").write_text(json.dumps(audit, indent=2, default=str, allow_nan=False))
    lines = canary_markdown(cfg, rows) if rows else []
    if relinkage:
        from simulations.relinkage_audit import markdown

        lines += ([""] if lines else []) + markdown(cfg, relinkage)
    if run_relinkage:
        from simulations.relinkage_audit import runs_markdown

        lines += ([""] if lines else []) + runs_markdown(cfg, run_relinkage)
    (run_dir / "audit.md").write_text("\n".join(lines) + "\n")
    if rows:
        plot(run_dir / "audit.png", rows)


def canary_markdown(cfg: DictConfig, rows: list[dict]) -> list[str]:
    confidence = float(cfg.confidence)
    lines = [f"# Privacy audit: one-run canary audit of DP-SGD ({int(cfg.canaries)} canaries, {int(cfg.steps)} steps, "
             f"delta {float(cfg.delta):g}, confidence {confidence:.0%})", "",
             "| arm | noise | accountant epsilon | true epsilon | white-box lower bound (k) | black-box lower bound (k) "
             "| flagged |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        wb, bb = row["white_box"], row["black_box"]
        lines.append(f"| {row['arm']} | {row['noise_multiplier']:.3f} | {row['accountant_epsilon']:.2f} | "
                     f"{row['true_epsilon']:.2f} | {wb['epsilon_lower_bound']:.2f} ({wb['correct']}/{wb['guesses']}) | "
                     f"{bb['epsilon_lower_bound']:.2f} ({bb['correct']}/{bb['guesses']}) | "
                     f"{'yes' if flagged(row) else 'no'} |")
    lines += ["", "flagged: the white-box lower bound exceeds the accountant's epsilon (the implementation leaks more "
              "than it claims)."]
    return lines


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if math.isfinite(r["accountant_epsilon"])]
    fig, ax = plt.subplots(figsize=(5, 4))
    top = max([r["accountant_epsilon"] for r in finite] + [r["white_box"]["epsilon_lower_bound"] for r in rows] + [1])
    ax.plot([0, top], [0, top], color="gray", linestyle="--", label="lower bound = accountant")
    for r in finite:
        colour = "tab:red" if r["arm"].startswith("broken") else "tab:blue"
        ax.scatter(r["accountant_epsilon"], r["white_box"]["epsilon_lower_bound"], color=colour, marker="o")
        ax.scatter(r["accountant_epsilon"], r["black_box"]["epsilon_lower_bound"], color=colour, marker="x")
        ax.annotate(r["arm"].split(":")[0], (r["accountant_epsilon"], r["white_box"]["epsilon_lower_bound"]),
                    fontsize=7)
    ax.set_xlabel("accountant's (claimed) epsilon")
    ax.set_ylabel("empirical lower bound (o white-box, x black-box)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(max(1, int(cfg.threads)))
    audits = chosen_audits(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    rows = run_audit(cfg) if "canary" in audits else []
    relinkage = None
    if "relinkage" in audits:
        from simulations.relinkage_audit import run_relinkage

        relinkage = run_relinkage(cfg)
    of_runs = None
    if "run_relinkage" in audits:
        from simulations.relinkage_audit import run_relinkage_of_runs

        of_runs = run_relinkage_of_runs(cfg)
    write_outputs(run_dir, cfg, rows, relinkage, of_runs)
    print((run_dir / "audit.md").read_text())


if __name__ == "__main__":
    from shared_models.config import hydra_entry

    hydra_entry("privacy_audit", main, config_name="privacy_audit")
