"""Image-report re-linkage membership inference on the shared encoders (the second audit of
`python -m simulations.privacy_audit`, `audits=[canary,relinkage]`).

The auditor splits a collection's patients into members, on which the project's model is pre-trained (the
project's own `client.trainer.train_steps`, or the site's `client.privacy.dp_train_steps` at a target epsilon),
and held-out non-members from the same collection. The attacker holds the final model (the shared encoders a
coordinator or any recipient of the checkpoint gets) and a study's image and report, and asks: was this patient
trained on? Its score for a study is the margin by which the image's embedding prefers its own report over the
best wrong report of a fixed candidate pool (every audited study's report): a model that memorised a pair links
it tighter than it links an unseen one. Reported: the attack's AUC (members against non-members) with a
bootstrap interval, and its TPR at a false-positive rate of `fpr` among the non-members.
"""
from __future__ import annotations

import logging
import math
import time
from functools import partial

import numpy as np
import torch
from omegaconf import DictConfig
from scipy.stats import rankdata

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- the attack's maths
def relinkage_scores(image_embeddings, text_embeddings) -> np.ndarray:
    """Per study i (image i belongs with report i of the candidate pool): cos(image i, report i) minus the best
    cosine of image i with any other report of the pool. Positive: the image picks its own report."""
    from evaluation.retrieval import cosine_similarity

    similarity = cosine_similarity(image_embeddings, text_embeddings)
    if similarity.shape[0] != similarity.shape[1] or similarity.shape[0] < 2:
        raise ValueError(f"re-linkage needs n >= 2 paired images and reports, got {similarity.shape}")
    own = np.diag(similarity).copy()
    np.fill_diagonal(similarity, -np.inf)
    return own - similarity.max(axis=1)


def membership_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(a member's score > a non-member's), ties counted half (the Mann-Whitney U over both counts)."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("the AUC needs at least one member and one non-member")
    ranks = rankdata(np.concatenate([members, nonmembers]))
    u = ranks[:len(members)].sum() - len(members) * (len(members) + 1) / 2
    return float(u / (len(members) * len(nonmembers)))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> dict:
    """The largest TPR of a threshold ("member" when score > t) that calls at most floor(fpr x n) of the n
    non-members members. With fewer than 1 / fpr non-members that allowance is 0 false positives."""
    members, nonmembers = np.asarray(members, float), np.sort(np.asarray(nonmembers, float))[::-1]
    allowed = int(math.floor(fpr * len(nonmembers) + 1e-9))
    threshold = nonmembers[allowed] if allowed < len(nonmembers) else -np.inf
    return {"tpr": float((members > threshold).mean()), "fpr": float((nonmembers > threshold).mean()),
            "false_positives_allowed": allowed, "nonmembers": len(nonmembers),
            "meaningful": len(nonmembers) * fpr >= 1.0}


def bootstrap_auc(members: np.ndarray, nonmembers: np.ndarray, rounds: int, confidence: float,
                  seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, members and non-members resampled separately."""
    rng = np.random.default_rng(seed)
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    values = [membership_auc(rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers)))
              for _ in range(rounds)]
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def attack_summary(scores: np.ndarray, is_member: np.ndarray, fpr: float, bootstrap: int, confidence: float,
                   seed: int) -> dict:
    members, nonmembers = scores[is_member], scores[~is_member]
    low, high = bootstrap_auc(members, nonmembers, bootstrap, confidence, seed)
    return {"auc": membership_auc(members, nonmembers), "auc_ci": [low, high], "confidence": confidence,
            "tpr_at_fpr": tpr_at_fpr(members, nonmembers, fpr), "members": int(is_member.sum()),
            "nonmembers": int((~is_member).sum()),
            "member_margin_mean": float(members.mean()), "nonmember_margin_mean": float(nonmembers.mean())}


# ------------------------------------------------------------------------------------------- the runs
def project_config(cfg: DictConfig) -> DictConfig:
    """The project's config of the audited model and collection (`relinkage.overrides`, Hydra syntax)."""
    from shared_models.config import compose

    return compose(list(cfg.relinkage.overrides))


def split_patients(patient_ids: list[str], members: int, nonmembers: int, seed: int) -> tuple[set, set]:
    """Disjoint random member and non-member patients of one collection (the same distribution)."""
    patients = sorted(set(patient_ids))
    if members + nonmembers > len(patients) or members < 2 or nonmembers < 2:
        raise ValueError(f"relinkage.members={members} + relinkage.nonmembers={nonmembers} must be at least 2 each "
                         f"and at most the collection's {len(patients)} patients; lower them or use a larger "
                         "collection (data.studies=... for the phantom)")
    order = np.random.default_rng(seed).permutation(len(patients))
    return {patients[i] for i in order[:members]}, {patients[i] for i in order[members:members + nonmembers]}


@torch.no_grad()
def embed_pairs(model, dataset, collate_fn, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(image, report) embeddings of every sample, through the same collate the model trained on."""
    model.eval()
    images, texts = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        images.append(model.encode_image(batch["images"]))
        texts.append(model.encode_text(batch["report_ids"], batch["report_mask"]))
    return torch.cat(images).numpy(), torch.cat(texts).numpy()


def train_arm(model, members, collate_fn, rl: DictConfig, epsilon: float | None, delta: float) -> dict:
    """Pre-train `model` on the member studies: plainly (epsilon None) or with the site's DP-SGD at epsilon."""
    from client.privacy import ClipNorms, PatientSampler, dp_train_steps, epsilon_spent, noise_for_target
    from client.trainer import TrainSettings, train_steps

    settings = TrainSettings(steps=int(rl.steps), batch_size=int(rl.batch_size), lr=float(rl.lr),
                             warmup_steps=int(rl.warmup_steps), weight_decay=0.0, amp=False, seed=int(rl.seed))
    if epsilon is None:
        result = train_steps(model, members, collate_fn, settings, progress=False, description="relinkage")
        return {"accountant_epsilon": math.inf, "noise_multiplier": 0.0, "loss_end": result.loss_end.get("loss")}
    # the declared public count is the member patients' (the auditor's own site: it may declare the truth)
    public = len(set(members.patient_ids))
    sampler = PatientSampler.for_dataset(members, int(rl.batch_size), public_patients=public)
    noise = noise_for_target(float(epsilon), delta, sampler.sample_rate, int(rl.steps))
    result = dp_train_steps(model, members, collate_fn, settings, ClipNorms(float(rl.clip), float(rl.coupled_clip)),
                            noise, sampler, progress=False, description="relinkage-dp", per_study=str(rl.per_study))
    return {"accountant_epsilon": epsilon_spent([(noise, sampler.sample_rate, int(rl.steps))], delta),
            "noise_multiplier": noise, "loss_end": result.loss_end.get("loss")}


def run_relinkage(cfg: DictConfig) -> list[dict]:
    """Arms: the untrained model (the attack's floor), no DP, DP-SGD at each of `relinkage.epsilons`."""
    from client.data.dataset import CxrDataset
    from client.data.transforms import augmentation_settings
    from shared_models.batch import collate
    from shared_models.factory import create_model
    from simulations.data import prepare_data

    rl = cfg.relinkage
    project = project_config(cfg)
    data = prepare_data(project.data)
    size = project.train.image_size or project.model.image.img_size
    # the eval view for scoring; training sees it too (relinkage.augment=false): memorisation is what is audited
    everyone = CxrDataset(data.catalog, data.cache, split=None, image_size=size, augmentation=None)
    members, nonmembers = split_patients(everyone.patient_ids, int(rl.members), int(rl.nonmembers), int(rl.seed))
    augmentation = augmentation_settings(project.train) if bool(rl.augment) else None
    train_set = CxrDataset(data.catalog, data.cache, split=None, image_size=size, augmentation=augmentation,
                           patient_ids=members)
    pool = CxrDataset(data.catalog, data.cache, split=None, image_size=size, augmentation=None,
                      patient_ids=members | nonmembers)
    first = {}
    for index, study in enumerate(pool.study_ids):    # one image per study: the pool's first of each
        first.setdefault(study, index)
    rows = sorted(first.values())
    scored = torch.utils.data.Subset(pool, rows)
    is_member = np.array([pool.patient_ids[i] in members for i in rows])
    log.info("re-linkage: %d member patients (%d studies), %d non-members (%d studies), pool of %d reports",
             len(members), int(is_member.sum()), len(nonmembers), int((~is_member).sum()), len(rows))

    arms: list[tuple[str, float | None, bool]] = [("untrained", None, False), ("no DP", None, True)]
    arms += [(f"DP-SGD epsilon {float(e):g}", float(e), True) for e in rl.epsilons]
    results = []
    for index, (name, epsilon, trains) in enumerate(arms):
        started = time.monotonic()
        torch.manual_seed(int(rl.seed))                  # every arm starts from the same initial weights
        model = create_model(project)
        collate_fn = partial(collate, tokenizer=model.tokenizer,
                             max_length=project.train.max_text_length or project.model.text.max_length)
        training = (train_arm(model, train_set, collate_fn, rl, epsilon, float(cfg.delta)) if trains
                    else {"accountant_epsilon": 0.0, "noise_multiplier": None, "loss_end": None})
        images, texts = embed_pairs(model, scored, collate_fn)
        attack = attack_summary(relinkage_scores(images, texts), is_member, float(rl.fpr), int(rl.bootstrap),
                                float(cfg.confidence), int(rl.seed) + index)
        results.append({"arm": name, **training, **attack, "steps": int(rl.steps) if trains else 0,
                        "seconds": round(time.monotonic() - started, 1)})
        log.info("%s: AUC %.3f [%.3f, %.3f], TPR %.3f at FPR <= %g (%.0f s)", name, attack["auc"], *attack["auc_ci"],
                 attack["tpr_at_fpr"]["tpr"], float(rl.fpr), results[-1]["seconds"])
    return results


def markdown(cfg: DictConfig, rows: list[dict]) -> list[str]:
    rl = cfg.relinkage
    first = rows[0]
    meaningful = first["tpr_at_fpr"]["meaningful"]
    lines = [f"# Re-linkage membership inference ({first['members']} member studies, {first['nonmembers']} "
             f"non-member studies, {int(rl.steps)} steps, `{' '.join(rl.overrides)}`)", "",
             f"| arm | accountant epsilon | noise | AUC [{float(cfg.confidence):.0%} bootstrap CI] | TPR at FPR <= "
             f"{float(rl.fpr):g} | margin members / non-members | final loss | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        epsilon = "–" if not row["noise_multiplier"] and row["steps"] == 0 else f"{row['accountant_epsilon']:.2f}"
        noise = "–" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.2f}"
        loss = "–" if row["loss_end"] is None else f"{row['loss_end']:.3f}"
        lines.append(f"| {row['arm']} | {epsilon} | {noise} | {row['auc']:.3f} [{row['auc_ci'][0]:.3f}, "
                     f"{row['auc_ci'][1]:.3f}] | {row['tpr_at_fpr']['tpr']:.3f} | {row['member_margin_mean']:+.3f} / "
                     f"{row['nonmember_margin_mean']:+.3f} | {loss} | {row['seconds']:.0f} |")
    lines += ["", "Score: cos(image, own report) minus the best cos with another report of the pool."
              + ("" if meaningful else f" With {first['nonmembers']} non-members the 1 % FPR point allows no false "
                 f"positive at all (it needs >= {math.ceil(1 / float(rl.fpr))} non-members to mean 1 %).")]
    return lines
