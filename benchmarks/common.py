"""What several benchmark sections share: composing models offline, synthetic batches, step timing."""
from __future__ import annotations

import statistics
import time

import torch

from shared_models.batch import collate
from shared_models.config import compose
from shared_models.factory import create_model, default_total_steps
from shared_models.objectives.schedule import resolve_schedule
from shared_models.synthetic_corpus import synthetic_reports
from shared_models.vocab import CHEXPERT_LABELS, OBSERVATIONS, REGIONS, ZONE_ATLAS

# The papers' text encoder (Bio_ClinicalBERT) is not on this machine: benchmark a random-init BERT of
# the same shape instead (its vocabulary is the synthetic WordPiece one, smaller than Bio_ClinicalBERT's
# 28996, which makes the impression decoder's output layer cheaper than in the paper setting).
OFFLINE_TEXT = {
    "resnet50_bert": [
        "model.text.name=null",
        "model.text.pretrained=false",
        "model.text.config={model_type: bert, hidden_size: 768, num_hidden_layers: 12, "
        "num_attention_heads: 12, intermediate_size: 3072, max_position_embeddings: 512}",
        "+model.text.tokenizer={vocab_size: 2000, num_reports: 2000, seed: 0}",
    ],
}
OFFLINE_TEXT["vit_b16_bert"] = OFFLINE_TEXT["resnet50_bert"]


def model_config(model: str, objective: str, extra: list[str] | None = None):
    return compose([f"model={model}", f"objective={objective}", *OFFLINE_TEXT.get(model, []), *(extra or [])])


def synthetic_samples(n: int, image_size: int, seed: int = 0) -> list[dict]:
    """Dataset-shaped samples with random images and synthetic report text (no data set needed)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i, text in enumerate(synthetic_reports(n, seed=seed)):
        findings, impression = text.removeprefix("FINDINGS: ").split(" IMPRESSION: ")
        # Findings then impression sentences, as the dataset gives them (the report pass reads both).
        parts = [(name, s.strip() + ".") for name, section in (("findings", findings), ("impression", impression))
                 for s in section.split(".") if s.strip()]
        sentences = [sentence for _, sentence in parts]
        samples.append({
            "image": torch.rand(1, image_size, image_size, generator=generator),
            "patient_id": f"p{i}", "study_id": f"s{i}", "image_id": f"i{i}",
            "findings": findings, "impression": impression, "report": text,
            "sentences": sentences, "sentence_sections": [name for name, _ in parts],
            "sentence_regions": [int(torch.randint(len(REGIONS), (1,), generator=generator)) for _ in sentences],
            "tags": torch.randint(-1, 2, (len(OBSERVATIONS),), generator=generator).float(),
            "labels": torch.randint(0, 2, (len(CHEXPERT_LABELS),), generator=generator).float(),
            "boxes": torch.tensor([ZONE_ATLAS[r] for r in REGIONS], dtype=torch.float32),
        })
    return samples


def all_terms_step(cfg) -> int:
    """A step at which every scheduled term of the objective is active in the model that `build` makes."""
    schedule = resolve_schedule(cfg.objective, default_total_steps(cfg))
    return max([0, schedule.stage2_step, *schedule.start_step.values()]) + 1


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn(), its queued GPU work included."""
    started, cpu_started = time.perf_counter(), time.process_time()
    fn()
    synchronize()
    return time.perf_counter() - started, time.process_time() - cpu_started


def train_step(model, batch: dict, step: int, optimizer) -> None:
    """One non-DP training step: forward, backward, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    model(batch, step=step)["loss"].backward()
    optimizer.step()


def interleaved(steps: dict, repeats: int, warmup: int = 1) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds of each named step per repeat, the steps timed in turn within every repeat so
    that a change in the machine's speed during the run (its cores are shared) falls on all of them alike; the
    warm-up repeats are dropped."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, fn in steps.items():
            seconds = timed(fn)
            if i >= warmup:
                times[name].append(seconds)
    return times


def ratio_to(times: dict[str, list[tuple[float, float]]], name: str, reference: str) -> dict:
    """name's step over reference's within each repeat: the median (wall and CPU) and the wall range."""
    pairs = list(zip(times[name], times[reference]))
    wall = [step[0] / ref[0] for step, ref in pairs]
    return {"ratio": round(statistics.median(wall), 3),
            "cpu_ratio": round(statistics.median(step[1] / ref[1] for step, ref in pairs), 3),
            "ratio_range": [round(min(wall), 3), round(max(wall), 3)]}


def median_seconds(times: list[tuple[float, float]]) -> tuple[float, float]:
    return (round(statistics.median(w for w, _ in times), 4), round(statistics.median(c for _, c in times), 4))


def make_batch(model, cfg, batch_size: int) -> dict:
    samples = synthetic_samples(batch_size, int(cfg.model.image.img_size))
    return collate(samples, model.tokenizer, int(cfg.model.text.max_length))


def build(model_name: str, objective: str, extra: list[str] | None = None):
    cfg = model_config(model_name, objective, extra)
    torch.manual_seed(0)
    return cfg, create_model(cfg)
