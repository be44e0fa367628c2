"""Local pretrained weights: a weights file for the image encoder, a save_pretrained folder for the text
encoder; loaded exactly, refused by name when a shape differs, and never fetched from a hub."""
import json
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from shared_models.image_encoder import ImageEncoder
from shared_models.text_encoder import TextEncoder
from shared_models.tokenizer import build_tokenizer

PROJECT = Path(__file__).resolve().parents[1]
VIT = {"timm_name": "vit_tiny_patch16_224", "img_size": 32, "kwargs": {"depth": 2}, "global_pool": "avg"}


def image_config(**changes) -> dict:
    """configs/model/tiny.yaml's image section, made small, as create_model passes it to ImageEncoder."""
    image = OmegaConf.to_container(OmegaConf.load(PROJECT / "configs/model/tiny.yaml").image)
    return {**image, **VIT, **changes}


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_image_weights_file_from_config_loads_exactly(tmp_path, suffix):
    torch.manual_seed(1)
    source = ImageEncoder(**image_config())
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)   # a timm training checkpoint wraps its state
    torch.manual_seed(2)
    loaded = ImageEncoder(**image_config(pretrained=str(path)))
    same_parameters(source.model, loaded.model)
    fresh = ImageEncoder(**image_config())
    assert not torch.equal(fresh.model.patch_embed.proj.weight, loaded.model.patch_embed.proj.weight)


def test_imagenet_style_checkpoint_gets_a_grey_stem_and_loses_its_classifier(tmp_path):
    torch.manual_seed(3)
    rgb = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10)   # 3 channels, a head
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, tmp_path / "imagenet.safetensors")
    loaded = ImageEncoder(**image_config(pretrained=str(tmp_path / "imagenet.safetensors"))).model
    # timm sums the RGB filters into the one grey channel, and drops the 10-class head (num_classes=0)
    torch.testing.assert_close(loaded.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(loaded.blocks[1].mlp.fc2.weight, rgb.blocks[1].mlp.fc2.weight, rtol=0, atol=0)
    assert "head.weight" not in loaded.state_dict()


def test_image_weights_of_another_shape_are_refused_by_name(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0, in_chans=1, embed_dim=96,
                              num_heads=3)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match=r"parameter [\w.]+ has shape \[.*96.*\] in the file, \[.*192.*\] in the model"):
        ImageEncoder(**image_config(pretrained=str(tmp_path / "small.safetensors")))
    shallower = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0, in_chans=1)
    save_file({k: v.contiguous() for k, v in shallower.state_dict().items()}, tmp_path / "shallower.safetensors")
    with pytest.raises(ValueError, match=r"missing from the file, e\.g\. blocks\.1\."):
        ImageEncoder(**image_config(pretrained=str(tmp_path / "shallower.safetensors")))


def test_image_weights_path_errors_and_no_download(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model.image.pretrained=.*no such file"):
        ImageEncoder(**image_config(pretrained=str(tmp_path / "missing.safetensors")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a weights file name"):
        ImageEncoder(**image_config(pretrained=str(tmp_path / "notes.txt")))
    # pretrained=true reads only what a cache already holds: nothing cached, a clear error, no download
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf",
                        lambda *a, **k: pytest.fail("tried the hub"))
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    with pytest.raises(FileNotFoundError, match="not in this machine's cache, and nothing is downloaded"):
        ImageEncoder(**image_config(pretrained=True))


def save_tiny_bert(folder: Path) -> BertModel:
    torch.manual_seed(4)
    bert = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False)
    bert.save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pleural", "effusion", "heart", "normal", "."]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    return bert


def test_text_encoder_from_a_local_folder_loads_exactly(tmp_path):
    bert = save_tiny_bert(tmp_path / "bio_clinical_bert")
    text_cfg = {"name": str(tmp_path / "bio_clinical_bert"), "pretrained": True}
    encoder = TextEncoder(name=text_cfg["name"], pretrained=True)
    same_parameters(bert, encoder.model)
    tokenizer = build_tokenizer(text_cfg)
    assert tokenizer("no pleural effusion.")["input_ids"] == [2, 5, 6, 7, 10, 3]
    features = encoder(torch.tensor([[2, 5, 6, 7, 10, 3]]), torch.ones(1, 6, dtype=torch.long))
    assert features.token_embeds.shape == (1, 6, 32)


def test_text_weights_of_another_shape_or_a_missing_folder_are_refused(tmp_path):
    folder = tmp_path / "bert"
    save_tiny_bert(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"parameter encoder\.layer\.0\.intermediate\.dense\.\w+ has shape \((?:64|32),.* in the model"):
        TextEncoder(name=str(folder), pretrained=True)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        TextEncoder(name=str(tmp_path / "not-staged"), pretrained=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder(name=str(tmp_path / "empty"), pretrained=True)


def test_a_checkpoint_loads_without_the_weights_file_its_model_started_from(tmp_path):
    from shared_models.checkpoint import load_checkpoint, save_checkpoint
    from shared_models.config import compose
    from shared_models.factory import create_model

    image = OmegaConf.to_container(OmegaConf.load(PROJECT / "configs/model/tiny.yaml").image)
    torch.manual_seed(6)
    start = ImageEncoder(**image).model
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, tmp_path / "start.safetensors")
    cfg = compose(["model=tiny", f"model.image.pretrained={tmp_path / 'start.safetensors'}"])
    model = create_model(cfg)
    same_parameters(start, model.image_encoder.model)
    folder = save_checkpoint(tmp_path / "checkpoint", model, cfg, step=0)
    (tmp_path / "start.safetensors").unlink()   # evaluated on another machine: the checkpoint holds the weights
    loaded, _ = load_checkpoint(folder)
    same_parameters(model.image_encoder.model, loaded.image_encoder.model)
