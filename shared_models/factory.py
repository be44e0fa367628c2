"""Build the pre-training model (and its tokenizer) from the composed config's `model` and `objective`."""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from shared_models.image_encoder import ImageEncoder
from shared_models.model import PretrainModel
from shared_models.objectives.schedule import federation_steps
from shared_models.text_encoder import TextEncoder
from shared_models.tokenizer import build_tokenizer


def as_dict(section: DictConfig | dict) -> dict:
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)


def create_text_encoder(text_cfg: dict, tokenizer: PreTrainedTokenizerBase) -> TextEncoder:
    config = text_cfg.get("config")
    if config is not None:
        # A random-init encoder's embedding table is sized by its (trained) tokenizer.
        config = {**config, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    return TextEncoder(
        name=None if config is not None else text_cfg["name"],
        config=config,
        pretrained=text_cfg.get("pretrained", False),
        freeze_layers=text_cfg.get("freeze_layers", 0),
        truncate_layers=text_cfg.get("truncate_layers"),
        pooling=text_cfg.get("pooling", "cls"),
        dropout=text_cfg.get("dropout"),
    )


def create_model(cfg: DictConfig | dict, tokenizer: PreTrainedTokenizerBase | None = None,
                 total_steps: int | None = None, seed: int | None = None) -> PretrainModel:
    """`PretrainModel` for `cfg.model` + `cfg.objective`; pass `tokenizer` when it comes from a checkpoint.
    `total_steps`: the run's steps that the objective's schedule spans; by default a federation's
    (`rounds x local_steps`), the one run whose every process builds its model from the config alone.
    `seed`: torch's generator is seeded with it first, so the coordinator and every site that build the model
    from the same config and the run's seed start from the same weights (None: the generator as it is)."""
    if seed is not None:
        torch.manual_seed(int(seed))
    model_cfg, objective = as_dict(cfg["model"]), as_dict(cfg["objective"])
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(model_cfg["text"])
    return PretrainModel(
        image_encoder=ImageEncoder(**model_cfg["image"]),
        text_encoder=create_text_encoder(model_cfg["text"], tokenizer),
        tokenizer=tokenizer,
        objective=objective,
        projection_dim=model_cfg.get("projection_dim", 128),
        projection_head=model_cfg.get("projection_head", "linear"),
        projection_hidden_dim=model_cfg.get("projection_hidden_dim", 512),
        total_steps=total_steps if total_steps is not None else default_total_steps(cfg),
    )


def default_total_steps(cfg) -> int | None:
    return federation_steps(cfg) if "federation" in cfg else None
