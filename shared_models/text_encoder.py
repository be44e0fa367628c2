"""Text encoder: any Hugging Face encoder -> token, sentence and report embeddings plus word weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel


@dataclass
class TextFeatures:
    token_embeds: torch.Tensor      # [B, L, D] last hidden state
    report_emb: torch.Tensor        # [B, D] CLS token or masked token mean (`pooling`)
    word_weights: torch.Tensor      # [B, L] last layer's CLS attention, head-averaged, 0 on padding
    sentence_embeds: torch.Tensor | None = None   # [B, S, D] mean over each sentence's tokens
    sentence_mask: torch.Tensor | None = None     # [B, S] True where the sentence has tokens


def local_model_folder(name: str) -> str | None:
    """`name` as a local folder (a `save_pretrained` copy), or None for a hub name. A name written as a path
    (absolute, ./, ../, ~) that is not a folder is an error, never a hub lookup."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.text.name={name!r}: the folder has no config.json; give a folder "
                                    "written by save_pretrained (config.json, model.safetensors, tokenizer files)")
        return str(path.resolve())
    if path.is_absolute() or name.startswith(("./", "../", "~", ".\\")):
        raise FileNotFoundError(f"model.text.name={name!r}: no such folder; stage the encoder there with "
                                "save_pretrained (docs/simulation.md, 'Pretrained weights offline')")
    return None


def refuse_partial_load(name: str, info: dict) -> None:
    """A pretrained encoder loads whole or not at all: a parameter of another shape, or one the weights
    lack (transformers would leave it at random init with a log line), is refused by name."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, in_file, in_model = mismatched[0]
        raise ValueError(f"model.text.name={name!r}: parameter {key} has shape {tuple(in_file)} in the weights, "
                         f"{tuple(in_model)} in the model its config.json builds ({len(mismatched)} such); "
                         "the weights belong to another model")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"model.text.name={name!r}: the weights lack {len(missing)} parameter(s) of the model, "
                         f"e.g. {', '.join(missing[:3])}")


def _load_hf(name: str, config: dict | None, pretrained: bool) -> nn.Module:
    if config is not None:
        config = dict(config)
        model_type = config.pop("model_type", "bert")
        hf_config = AutoConfig.for_model(model_type, attn_implementation="eager", **config)
        return AutoModel.from_config(hf_config, add_pooling_layer=False)
    local = local_model_folder(name)
    # Never a download: a local folder, or the Hugging Face cache of a machine that fetched it before.
    source = local or name
    try:
        if pretrained:
            model, info = AutoModel.from_pretrained(source, attn_implementation="eager", add_pooling_layer=False,
                                                    local_files_only=True, output_loading_info=True,
                                                    ignore_mismatched_sizes=True)
            refuse_partial_load(name, info)
            return model
        hf_config = AutoConfig.from_pretrained(source, local_files_only=True, attn_implementation="eager")
        return AutoModel.from_config(hf_config, add_pooling_layer=False)
    except OSError as error:
        raise OSError(
            f"text encoder {name!r} is neither a local folder nor in the Hugging Face cache, and nothing is downloaded "
            f"here; stage it on a connected machine (`huggingface-cli download {name}`, or save_pretrained into a "
            f"folder) and point model.text.name at the folder ({error})"
        ) from error


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


# How the report embedding is read off the token embeddings. A pretrained BERT's CLS token carries the
# sentence; a random-init one gives nearly the same CLS vector for every report (cosine ~0.9999), which
# stalls contrastive learning from scratch, so tiny configs use the masked token mean.
REPORT_POOLING = {
    "cls": lambda tokens, mask: tokens[:, 0],
    "mean": _masked_mean,
}


class TextEncoder(nn.Module):
    """A Hugging Face encoder, optionally truncated to its first layers and with its lower layers frozen."""

    def __init__(
        self,
        name: str | None = None,
        config: dict | None = None,
        pretrained: bool = False,
        freeze_layers: int = 0,
        truncate_layers: int | None = None,
        pooling: str = "cls",
        dropout: float | None = None,
    ):
        """`dropout`: None keeps the encoder's own dropout rates; a number sets every dropout in it to that rate."""
        super().__init__()
        if pooling not in REPORT_POOLING:
            raise ValueError(f"text encoder pooling must be one of {sorted(REPORT_POOLING)}, got {pooling!r}")
        self.pooling = pooling
        if (name is None) == (config is None):
            raise ValueError("text encoder: give exactly one of `name` (hub name or local path) or `config`")
        self.model = _load_hf(name, config, pretrained)
        layers = self._layers()
        if truncate_layers is not None:
            if not 0 < truncate_layers <= len(layers):
                raise ValueError(f"truncate_layers={truncate_layers} outside 1..{len(layers)}")
            del layers[truncate_layers:]
            self.model.config.num_hidden_layers = truncate_layers
        if not 0 <= freeze_layers <= len(layers):
            raise ValueError(f"freeze_layers={freeze_layers} outside 0..{len(layers)}")
        if freeze_layers:
            for module in [self.model.embeddings, *layers[:freeze_layers]]:
                module.requires_grad_(False)
        self.freeze_layers = freeze_layers
        self.hidden_size = self.model.config.hidden_size
        if dropout is not None:
            if not 0.0 <= float(dropout) < 1.0:
                raise ValueError(f"model.text.dropout={dropout} must be in [0, 1), or null to keep the encoder's own")
            for module in self.model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = float(dropout)

    def _layers(self) -> nn.ModuleList:
        try:
            return self.model.encoder.layer
        except AttributeError as error:
            raise TypeError(
                f"{type(self.model).__name__} has no encoder.layer list; only BERT-style encoders are supported"
            ) from error

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sentence_ids: torch.Tensor | None = None,
        num_sentences: int | None = None,
        apart: torch.Tensor | None = None,
    ) -> TextFeatures:
        """`apart` [B, L]: tokens that attend only to each other (a report's findings, so that they are encoded as
        if alone and carry nothing of the impression the summarisation branch must predict from them); the other
        tokens attend to every token."""
        # The additive [B, 1, 1, L] mask is what transformers would build from the 2D one; built here, it spares
        # transformers' check of whether any token is padded, a data-dependent branch torch.func.vmap refuses
        # (DP-SGD's per-study gradients, client/privacy/clipped_sum.py).
        dtype = self.model.get_input_embeddings().weight.dtype
        allowed = attention_mask[:, None, None, :].bool()                          # [B, 1, 1, L]: query x key
        if apart is not None:
            apart = apart.bool()
            allowed = allowed & (~apart[:, None, :, None] | apart[:, None, None, :])   # [B, 1, L, L]
        additive_mask = (~allowed).to(dtype) * torch.finfo(dtype).min
        out = self.model(input_ids=input_ids, attention_mask=additive_mask, output_attentions=True)
        tokens = out.last_hidden_state
        word_weights = out.attentions[-1][:, :, 0, :].mean(dim=1) * attention_mask
        report_emb = REPORT_POOLING[self.pooling](tokens, attention_mask)
        features = TextFeatures(token_embeds=tokens, report_emb=report_emb, word_weights=word_weights)
        if sentence_ids is not None:
            features.sentence_embeds, features.sentence_mask = sentence_means(tokens, sentence_ids, num_sentences)
        return features


def sentence_means(
    tokens: torch.Tensor, sentence_ids: torch.Tensor, num_sentences: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token embedding per sentence; sentence_ids [B, L] holds each token's sentence, -1 outside any."""
    if num_sentences is None:
        num_sentences = max(int(sentence_ids.max()) + 1, 1)
    membership = (sentence_ids.unsqueeze(-1) == torch.arange(num_sentences, device=tokens.device)).to(tokens.dtype)
    counts = membership.sum(dim=1)                                        # [B, S]
    sums = membership.transpose(1, 2) @ tokens                            # [B, S, D]
    return sums / counts.clamp(min=1).unsqueeze(-1), counts > 0
