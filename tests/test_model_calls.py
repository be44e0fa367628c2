"""A training step runs the image encoder once and the text encoder once per text (report, findings, impression)."""
import pytest
import torch

from benchmarks.common import synthetic_samples
from shared_models.batch import collate
from shared_models.config import compose
from shared_models.factory import create_model

FAST = ["model.image.img_size=64", "model.image.kwargs.depth=2", "model.text.max_length=48",
        "model.text.tokenizer.num_reports=300"]
PAST_ALL_SCHEDULES = 10_000


def encoder_inputs_per_step(preset: str) -> tuple[dict, list, list]:
    torch.manual_seed(0)
    model = create_model(compose([*FAST, f"objective={preset}"]))
    batch = collate(synthetic_samples(4, 64), model.tokenizer, max_length=48)
    model(batch, step=PAST_ALL_SCHEDULES)  # first step also embeds the tag names (once, see test_model)
    images, texts = [], []
    model.image_encoder.register_forward_hook(lambda m, args, out: images.append(args[0]))
    model.text_encoder.register_forward_hook(lambda m, args, out: texts.append(args[0]))
    model(batch, step=PAST_ALL_SCHEDULES)["loss"].backward()
    return batch, images, texts


@pytest.mark.parametrize("preset, texts_expected", [
    ("clip", ["report_ids"]),
    ("hybrid", ["report_ids", "impression_ids"]),   # the findings are read off the report pass
])
def test_each_encoder_runs_once_per_input(preset, texts_expected):
    batch, images, texts = encoder_inputs_per_step(preset)
    assert len(images) == 1 and images[0] is batch["images"]
    assert sorted(name for t in texts for name in texts_expected if t is batch[name]) == sorted(texts_expected)
    assert len(texts) == len(texts_expected)
