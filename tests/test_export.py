"""Checkpoint folders and the timm / transformers export of the encoders (tiny random-init models)."""
import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from shared_models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared_models.config import compose
from shared_models.export import main as export_main
from shared_models.factory import create_model
from shared_models.sharing import split_state
from shared_models.text_encoder import TextEncoder
from shared_models.tokenizer import tokenizer_hash, train_wordpiece

FAST = ["model.image.img_size=64", "model.text.max_length=48", "model.text.tokenizer.num_reports=300",
        "objective=clip"]


def _checkpoint(tmp_path, *overrides):
    cfg = compose([*FAST, *overrides])
    torch.manual_seed(0)
    model = create_model(cfg)
    with torch.no_grad():  # move off the initialisation so that a fresh model would not pass by chance
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return model, cfg, save_checkpoint(tmp_path / "checkpoint", model, cfg, step=7)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.image.kwargs.depth=2"],
        ["model.image.timm_name=resnet18", "~model.image.kwargs.depth", "model.image.norm=group"],
    ],
    ids=["vit", "resnet_groupnorm"],
)
def test_export_round_trips_through_timm_and_transformers(tmp_path, overrides):
    model, cfg, folder = _checkpoint(tmp_path, *overrides)
    out = tmp_path / "export"
    export_main([str(folder), "--out", str(out)])
    model.eval()

    config = json.loads((out / "image" / "config.json").read_text())
    timm_model = timm.create_model(config["architecture"], **config["kwargs"]).eval()
    result = timm_model.load_state_dict(load_file(out / "image" / "model.safetensors"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours = model.image_encoder(images)
        theirs = timm_model.forward_features((images - config["input"]["mean"]) / config["input"]["std"])
    if theirs.dim() == 3:  # ViT: class token, then the patch tokens; the global feature per `global_pool`
        pooled = theirs[:, 0] if model.image_encoder.global_pool == "token" else theirs[:, 1:].mean(dim=1)
        torch.testing.assert_close(pooled, ours.global_emb)
        torch.testing.assert_close(theirs[:, 1:], ours.patch_tokens)
    else:  # CNN: the last feature map is the patch grid
        torch.testing.assert_close(theirs.flatten(2).transpose(1, 2), ours.patch_tokens)
    assert (out / "image" / "attention_pool.safetensors").is_file() == (model.image_encoder.attention_pool is not None)

    text = AutoModel.from_pretrained(out / "text").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "text")
    assert tokenizer_hash(tokenizer) == tokenizer_hash(model.tokenizer)
    encoded = tokenizer(["no pleural effusion.", "mild cardiomegaly in the heart."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.text_encoder(encoded["input_ids"], encoded["attention_mask"]).token_embeds
        got = text(**encoded).last_hidden_state
        reloaded = TextEncoder(name=str(out / "text"), pretrained=True).eval()  # a local path as model.text.name
        again = reloaded(encoded["input_ids"], encoded["attention_mask"]).token_embeds
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)


def test_unavailable_text_encoder_names_the_fix(tmp_path):
    with pytest.raises(OSError, match="huggingface-cli download"):
        TextEncoder(name=str(tmp_path / "no-such-model"), pretrained=True)


def test_checkpoint_round_trip(tmp_path):
    model, cfg, folder = _checkpoint(tmp_path, "model.image.kwargs.depth=1", "objective=asg")
    loaded, meta = load_checkpoint(folder)
    assert meta["step"] == 7 and meta["config"]["objective"]["name"] == "asg"
    assert set(meta["shared"]) == set(split_state(model, cfg)[0])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)


def test_federated_checkpoint_with_shared_parameters_only_loads(tmp_path):
    model, cfg, _ = _checkpoint(tmp_path, "model.image.kwargs.depth=1", "objective=asg")
    shared, _ = split_state(model, cfg)
    folder = save_checkpoint(tmp_path / "global", model, cfg, round=3, state=shared)
    shutil.rmtree(folder / "tokenizer")  # like the server's global checkpoint: the config rebuilds it
    loaded, meta = load_checkpoint(folder)
    assert tokenizer_hash(loaded.tokenizer) == tokenizer_hash(model.tokenizer)
    assert meta["round"] == 3
    for name, value in model.image_projection.state_dict().items():
        torch.testing.assert_close(loaded.image_projection.state_dict()[name], value, msg=name)
    # Without any image encoder tensor the checkpoint is not usable: a clear error, not a silent reinit.
    partial = {k: v for k, v in shared.items() if not k.startswith("image_encoder.")}
    bad = save_checkpoint(tmp_path / "partial", model, cfg, state=partial)
    with pytest.raises(CheckpointError, match="lacks shared parameters"):
        load_checkpoint(bad)


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    model, cfg, folder = _checkpoint(tmp_path, "model.image.kwargs.depth=1")
    weights = folder / "model.safetensors"
    original = weights.read_bytes()

    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="truncated or altered"):
        load_checkpoint(folder)

    weights.write_bytes(original)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    edited = json.loads(json.dumps(meta))
    edited["config"]["objective"]["lambdas"]["global"] = 2.0
    meta_path.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="objective"):
        load_checkpoint(folder)

    meta_path.write_text(json.dumps(meta))
    train_wordpiece(num_reports=300, vocab_size=150).save_pretrained(folder / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_checkpoint(folder)

    (folder / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_checkpoint(folder)
