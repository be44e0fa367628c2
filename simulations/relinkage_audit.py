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

The same attack runs on the global model of a finished federation (`audits=[run_relinkage]
run_relinkage.runs=[outputs/simulate/<timestamp>]`): there the members are the patients whose studies the run's
sites trained on (its partition.json) and the non-members every other patient of the same collection, which no
site ever read (the evaluation splits' patients, and any the partition left out).
"""
from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path

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


def one_image_per_study(pool, members: set) -> tuple[torch.utils.data.Subset, np.ndarray]:
    """The pool's first image of each study (the candidate pool of reports is then one per study), and whether
    each of those studies belongs to a member patient."""
    first: dict[str, int] = {}
    for index, study in enumerate(pool.study_ids):
        first.setdefault(study, index)
    rows = sorted(first.values())
    return torch.utils.data.Subset(pool, rows), np.array([pool.patient_ids[i] in members for i in rows], dtype=bool)


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
    scored, is_member = one_image_per_study(pool, members)
    log.info("re-linkage: %d member patients (%d studies), %d non-members (%d studies), pool of %d reports",
             len(members), int(is_member.sum()), len(nonmembers), int((~is_member).sum()), len(scored))

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


# ------------------------------------------------------------------------------------------- a federation's model
class RunFolderError(ValueError):
    """A `run_relinkage.runs` entry that is not a finished `simulations.run` folder this machine can read."""


def run_membership(run_dir: Path) -> tuple[set[str], Path, Path]:
    """(the studies the run's sites trained on, the catalog and image cache they came from), read from the run's
    partition.json and its site files (sites/<n>.yaml), as `simulations.run` wrote them."""
    from omegaconf import OmegaConf

    partition_file = run_dir / "partition.json"
    try:
        partition = json.loads(partition_file.read_text())
    except (OSError, ValueError) as error:
        raise RunFolderError(f"{partition_file}: not a readable partition ({error}); give the folder of a "
                             "`python -m simulations.run` (outputs/simulate/<timestamp>)") from error
    studies: set[str] = set()
    for site, entry in (partition.items() if isinstance(partition, dict) else []):
        listed = entry.get("studies") if isinstance(entry, dict) else None
        if not isinstance(listed, list) or not all(isinstance(study, str) for study in listed):
            raise RunFolderError(f"{partition_file}: site {site!r} has no list of study ids under 'studies'")
        studies.update(listed)
    if not studies:
        raise RunFolderError(f"{partition_file}: no site with studies (a mapping of site name to its 'studies')")
    site_files = sorted((run_dir / "sites").glob("*.yaml"))
    sources = set()
    for site_file in site_files:
        try:
            site = OmegaConf.load(site_file)
        except Exception as error:   # OmegaConf raises yaml's and its own errors alike
            raise RunFolderError(f"{site_file}: not a readable site file ({error})") from error
        if not isinstance(site, DictConfig) or site.get("catalog") is None or site.get("cache") is None:
            raise RunFolderError(f"{site_file}: no 'catalog' and 'cache' (the collection the site read)")
        sources.add((str(site.catalog), str(site.cache)))
    if len(sources) != 1:
        raise RunFolderError(f"{run_dir / 'sites'}: the site files name {len(sources)} collections "
                             f"({sorted(sources)}); the audit needs the one collection the run partitioned")
    catalog, cache = sources.pop()
    return studies, Path(catalog), Path(cache)


def run_epsilon(run_dir: Path) -> float:
    """The run's accountant epsilon from its summary.json: the highest site's (patient-level DP-SGD) or the
    central one (site-level DP); infinity for a run without DP, or without a summary."""
    summary_file = run_dir / "summary.json"
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return math.inf
    try:
        claimed = [float(value) for value in (summary.get("epsilon") or {}).values()]
        if summary.get("central_epsilon") is not None:
            claimed.append(float(summary["central_epsilon"]))
    except (AttributeError, TypeError, ValueError) as error:
        raise RunFolderError(f"{summary_file}: 'epsilon' must map each site to a number and 'central_epsilon' be a "
                             f"number or null, as `simulations.run` writes them ({error})") from None
    return max(claimed) if claimed else math.inf


def audit_run(run_dir: Path, cfg: DictConfig) -> list[dict]:
    """The attack on a federation's global model (run_dir/checkpoint) and on the same model untrained (the
    floor): members are the patients whose studies the sites trained on, non-members all the others."""
    from client.data.dataset import CxrDataset
    from shared_models.batch import collate
    from shared_models.checkpoint import load_checkpoint
    from shared_models.factory import create_model

    rl = cfg.relinkage
    if not run_dir.is_dir():
        raise RunFolderError(f"run_relinkage.runs: {run_dir} is not a folder; give a `python -m simulations.run` "
                             "output folder (outputs/simulate/<timestamp>)")
    trained, catalog, cache = run_membership(run_dir)
    model, meta = load_checkpoint(run_dir / "checkpoint")
    project = meta["config"]
    size = int(project["train"].get("image_size") or project["model"]["image"]["img_size"])
    everyone = CxrDataset(catalog, cache, split=None, image_size=size, augmentation=None)
    absent = trained - set(everyone.study_ids)
    if absent:
        raise RunFolderError(f"{catalog} lacks {len(absent)} of the {len(trained)} studies the run trained on "
                             f"(e.g. {sorted(absent)[:3]}): it is not the collection {run_dir} partitioned")
    members = {patient for study, patient in zip(everyone.study_ids, everyone.patient_ids) if study in trained}
    # a member patient's study outside the partition was never read; it is neither member nor non-member evidence
    kept = {study for study, patient in zip(everyone.study_ids, everyone.patient_ids)
            if study in trained or patient not in members}
    pool = CxrDataset(catalog, cache, split=None, image_size=size, augmentation=None, study_ids=kept)
    scored, is_member = one_image_per_study(pool, members)
    if is_member.all() or not is_member.any():
        raise RunFolderError(f"{run_dir}: the collection has {'no' if is_member.all() else 'only'} patients the "
                             "sites never read; the attack needs both members and non-members")
    log.info("re-linkage of %s: %d member studies, %d non-member studies", run_dir, int(is_member.sum()),
             int((~is_member).sum()))
    collate_fn = partial(collate, tokenizer=model.tokenizer,
                         max_length=project["train"].get("max_text_length") or project["model"]["text"]["max_length"])
    untrained = create_model(project, tokenizer=model.tokenizer, seed=int(project.get("seed", 0)))
    claimed = run_epsilon(run_dir)
    rows = []
    for index, (arm, audited, epsilon) in enumerate([(f"{run_dir.name}: untrained", untrained, 0.0),
                                                     (f"{run_dir.name}: global model", model, claimed)]):
        started = time.monotonic()
        images, texts = embed_pairs(audited, scored, collate_fn)
        attack = attack_summary(relinkage_scores(images, texts), is_member, float(rl.fpr), int(rl.bootstrap),
                                float(cfg.confidence), int(rl.seed) + index)
        rows.append({"arm": arm, "run": str(run_dir), "accountant_epsilon": epsilon, **attack,
                     "seconds": round(time.monotonic() - started, 1)})
        log.info("%s: AUC %.3f [%.3f, %.3f], TPR %.3f at FPR <= %g", arm, attack["auc"], *attack["auc_ci"],
                 attack["tpr_at_fpr"]["tpr"], float(rl.fpr))
    return rows


def run_relinkage_of_runs(cfg: DictConfig) -> list[dict]:
    runs = list(cfg.get("run_relinkage", {}).get("runs") or [])
    if not runs:
        raise ValueError("audits=[run_relinkage] needs the runs to attack: run_relinkage.runs=[outputs/simulate/"
                         "<timestamp>] (folders of `python -m simulations.run`)")
    return [row for run in runs for row in audit_run(Path(str(run)).expanduser(), cfg)]


def runs_markdown(cfg: DictConfig, rows: list[dict]) -> list[str]:
    rl = cfg.relinkage
    lines = ["# Re-linkage membership inference on federations' global models", "",
             "Members: the patients whose studies the run's sites trained on; non-members: every other patient of "
             "the same collection.", "",
             f"| arm | accountant epsilon | member / non-member studies | AUC [{float(cfg.confidence):.0%} bootstrap "
             f"CI] | TPR at FPR <= {float(rl.fpr):g} | margin members / non-members |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        epsilon = "–" if row["accountant_epsilon"] == 0.0 else f"{row['accountant_epsilon']:.2f}"
        lines.append(f"| {row['arm']} | {epsilon} | {row['members']} / {row['nonmembers']} | {row['auc']:.3f} "
                     f"[{row['auc_ci'][0]:.3f}, {row['auc_ci'][1]:.3f}] | {row['tpr_at_fpr']['tpr']:.3f} | "
                     f"{row['member_margin_mean']:+.3f} / {row['nonmember_margin_mean']:+.3f} |")
    return lines
