"""Checkpoint folders and the timm / transformers export of the encoders (tiny random-init models)."""
import json
import logging
import shutil

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from server.checkpoints import save_round
from server.registry import Registry
from shared_models.checkpoint import CheckpointError, checkpoint_fingerprints, load_checkpoint, save_checkpoint
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
def test_export_round_trips_through_timm_and_transformers(tmp_path, overrides, recwarn, caplog):
    model, cfg, folder = _checkpoint(tmp_path, *overrides)
    out = tmp_path / "export"
    export_main([str(folder), "--out", str(out)])
    model.eval()
    _loads_as_timm_and_hf_natives(out, model, recwarn, caplog)

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


def _loads_as_timm_and_hf_natives(out, model, recwarn, caplog):
    """The folders load the ecosystems' own way, with every tensor used, none missing, and nothing warned."""
    config = json.loads((out / "image" / "config.json").read_text())
    assert config["architecture"] == model.image_encoder.timm_name and config["num_classes"] == 0
    assert config["num_features"] == model.image_encoder.feature_dim
    assert config["pretrained_cfg"]["input_size"][0] == 1 and config["pretrained_cfg"]["mean"] == [0.5]
    assert "license" not in config["pretrained_cfg"]   # ImageNet weights' metadata does not describe these
    weights = load_file(out / "image" / "model.safetensors")
    transformers_logger = logging.getLogger("transformers")   # does not propagate to caplog's root handler
    transformers_logger.addHandler(caplog.handler)
    recwarn.clear()
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO):
            local = timm.create_model(f"local-dir:{out / 'image'}", pretrained=True).eval()
            overlay = timm.create_model(
                config["architecture"], pretrained=True,
                pretrained_cfg_overlay=dict(config["pretrained_cfg"], file=str(out / "image" / "model.safetensors")),
                **config["model_args"]).eval()
            text, info = AutoModel.from_pretrained(out / "text", output_loading_info=True)
            AutoTokenizer.from_pretrained(out / "text")
    finally:
        transformers_logger.removeHandler(caplog.handler)
    assert [str(w.message) for w in recwarn] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not any("Missing keys" in r.getMessage() for r in caplog.records)  # timm logs a partial load at INFO
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for timm_model in (local, overlay):
        state = timm_model.state_dict()
        assert set(state) == set(weights)
        for name, value in weights.items():
            torch.testing.assert_close(state[name], value, msg=name)
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours = model.image_encoder(images)
        data_config = timm.data.resolve_data_config({}, model=local)
        assert data_config["input_size"] == (1, 64, 64)
        theirs = local.forward_features((images - data_config["mean"][0]) / data_config["std"][0])
    tokens = theirs[:, model.image_encoder.num_prefix_tokens:] if theirs.dim() == 3 else theirs.flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, ours.patch_tokens)

    tokenizer = AutoTokenizer.from_pretrained(out / "text")
    encoded = tokenizer(["no pleural effusion.", "mild cardiomegaly."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.text_encoder(encoded["input_ids"], encoded["attention_mask"])
        got = text.eval()(**encoded)
    torch.testing.assert_close(got.last_hidden_state, expected.token_embeds)
    # The exported pooler is the identity the config says: tanh of the class token.
    torch.testing.assert_close(got.pooler_output, torch.tanh(expected.token_embeds[:, 0]))
    report = {"mean": lambda t, m: (t * m[..., None]).sum(1) / m.sum(1, keepdim=True), "cls": lambda t, m: t[:, 0]}
    assert text.config.fedcxr_report_embedding.startswith({"mean": "mean", "cls": "last_hidden_state[:, 0]"}[
        model.text_encoder.pooling])
    torch.testing.assert_close(report[model.text_encoder.pooling](got.last_hidden_state, encoded["attention_mask"]),
                               expected.report_emb)


def test_model_card_reports_sites_rounds_epsilon_and_evaluation(tmp_path):
    """A federated round checkpoint in its run folder: the card takes sites, rounds and epsilon from the run
    registry, and the figures from a results.json given on the command line."""
    model, cfg, _ = _checkpoint(tmp_path, "model.image.kwargs.depth=1")
    shared, _ = split_state(model, cfg)
    output_dir = tmp_path / "runs"
    registry = Registry(output_dir / "registry.sqlite")
    registry.start_run("cxr-1", "7", 2, {}, "h")
    for round_, site, epsilon in [(1, "site_a", 1.25), (1, "site_b", 0.5), (2, "site_a", 2.5)]:
        registry.add_site_metrics("cxr-1", round_, site, 11 + round_, 40, {"loss": 1.0, "epsilon": epsilon})
    params = {k: v.detach().numpy() for k, v in shared.items()}
    config = OmegaConf.to_container(cfg, resolve=True)
    config["federation"] |= {"rounds": 2, "output_dir": str(output_dir)}
    meta = {"run": "cxr-1", "strategy": "fedavg", "sites": {"site_a": 40}, "shared": sorted(params),
            "config": config, "fingerprints": checkpoint_fingerprints(cfg, model.tokenizer)}
    folder, _ = save_round(output_dir / "cxr-1", 2, params, meta, tokenizer=model.tokenizer)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"linear_probe": {"0.1": {"mean_auc": {"mean": 0.6789, "std": 0.01,
                                                                         "per_seed": [0.6689, 0.6889]}}},
                                   "retrieval": {f"{d}_r{k}": 0.1 * k for d in ("i2t", "t2i") for k in (1, 5, 10)}}))
    export_main([str(folder), "--out", str(tmp_path / "export"), "--results", str(results)])
    card = (tmp_path / "export" / "README.md").read_text()
    assert "round 2 of 2" in card and "`cxr-1`" in card
    assert "| site_a | 2 | 40 | 2.50 |" in card and "| site_b | 1 | 40 | 0.50 |" in card
    assert "epsilon per site: site_a 2.50, site_b 0.50" in card
    assert "10% labels: mean AUC 0.679" in card and "R@1/5/10 0.100/0.500/1.000" in card
    assert "each site's own data" in card   # the coordinator's config names no site's data
    assert 'timm.create_model("local-dir:image", pretrained=True)' in card

    with pytest.raises(SystemExit, match="no such results file"):
        export_main([str(folder), "--out", str(tmp_path / "x"), "--results", str(tmp_path / "missing.json")])
    (tmp_path / "half.json").write_text('{"linear_probe": ')
    with pytest.raises(SystemExit, match="not readable JSON"):
        export_main([str(folder), "--out", str(tmp_path / "x"), "--results", str(tmp_path / "half.json")])
    # A simulation's summary.json names the data and each site's epsilon.
    (output_dir / "cxr-1" / "summary.json").write_text(json.dumps({"config": config, "epsilon": {"site_a": 3.0}}))
    export_main([str(folder), "--out", str(tmp_path / "sim")])
    card = (tmp_path / "sim" / "README.md").read_text()
    assert "synthetic phantom (300 studies" in card and "epsilon per site: site_a 3.00" in card
    # A damaged summary.json or a results file of another shape leaves the card short, not the export failed.
    (output_dir / "cxr-1" / "summary.json").write_text("{")
    (tmp_path / "other.json").write_text(json.dumps({"linear_probe": {"0.1": {"auc": 0.5}}}))
    export_main([str(folder), "--out", str(tmp_path / "again"), "--results", str(tmp_path / "other.json")])
    card = (tmp_path / "again" / "README.md").read_text()
    assert "not in the results.json shape" in card and "summary.json" in card and "| site_a | 2 | 40 | 2.50 |" in card


def test_unavailable_text_encoder_names_the_fix(tmp_path):
    with pytest.raises(OSError, match="no such folder; stage the encoder there with save_pretrained"):
        TextEncoder(name=str(tmp_path / "no-such-model"), pretrained=True)
    with pytest.raises(OSError, match="huggingface-cli download no-such-org/no-such-model"):
        TextEncoder(name="no-such-org/no-such-model", pretrained=True)


def test_checkpoint_round_trip(tmp_path):
    model, cfg, folder = _checkpoint(tmp_path, "model.image.kwargs.depth=1", "objective=asg")
    loaded, meta = load_checkpoint(folder)
    assert meta["step"] == 7 and meta["config"]["objective"]["name"] == "asg"
    assert set(meta["shared"]) == set(split_state(model, cfg)[0])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)


def test_a_checkpoint_written_before_the_seg_start_rename_loads_with_its_schedule(tmp_path):
    model, cfg, folder = _checkpoint(tmp_path, "model.image.kwargs.depth=1", "objective=g2d",
                                     "objective.schedule.seg_start_at=null", "objective.schedule.seg_start_step=9")
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    schedule = meta["config"]["objective"]["schedule"]   # as the old code wrote it, fingerprints included
    schedule["warmup_at"], schedule["warmup_steps"] = schedule.pop("seg_start_at"), schedule.pop("seg_start_step")
    meta["fingerprints"] = checkpoint_fingerprints(meta["config"], model.tokenizer)
    meta_path.write_text(json.dumps(meta))
    loaded, _ = load_checkpoint(folder)
    assert loaded.schedule.seg_start_step == 9 and loaded.active_terms(8) == ["global"]
    assert loaded.active_terms(9) == ["global", "seg"]


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
