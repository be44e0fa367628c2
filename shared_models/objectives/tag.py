"""ASG's image-tag recognition (IRL): tag-name embeddings query the patch features, one logit per tag."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_models.objectives.registry import register_objective
from shared_models.vocab import OBSERVATIONS

# What an uncertain (-1) tag is trained as; None leaves it out of the loss.
UNCERTAIN_TARGETS = {"ignore": None, "positive": 1.0, "negative": 0.0}


class TagRecognition(nn.Module):
    """Transformer decoder (tag queries x patch tokens) + shared linear head, BCE against the report's tags.

    The queries are the text encoder's embeddings of the tag names, set once with `set_tag_queries`
    and kept as a buffer (saved with the site's local state), not recomputed every step.
    """

    def __init__(
        self,
        dim: int,
        num_tags: int,
        num_layers: int = 4,
        num_heads: int = 4,
        uncertain: str = "ignore",
        dropout: float = 0.1,
    ):
        super().__init__()
        if uncertain not in UNCERTAIN_TARGETS:
            raise ValueError(f"uncertain must be one of {sorted(UNCERTAIN_TARGETS)}, got {uncertain!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"objective.tag.dropout={dropout} must be in [0, 1)")
        self.uncertain = uncertain
        layer = nn.TransformerDecoderLayer(
            dim, num_heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(dim))
        self.head = nn.Linear(dim, 1)
        self.register_buffer("tag_queries", torch.zeros(num_tags, dim))
        self.register_buffer("query_updates", torch.zeros((), dtype=torch.long))  # how often the queries were set

    @torch.no_grad()
    def set_tag_queries(self, emb: Tensor) -> None:
        if emb.shape != self.tag_queries.shape:
            raise ValueError(
                f"tag query embeddings must be [num_tags, dim] = {tuple(self.tag_queries.shape)}, "
                f"got {tuple(emb.shape)}"
            )
        self.tag_queries.copy_(emb.detach())
        self.query_updates += 1

    def targets(self, tags: Tensor) -> tuple[Tensor, Tensor]:
        """BCE targets and the mask of entries that count, from tags with 1 / 0 / -1 (uncertain)."""
        uncertain = tags == -1
        value = UNCERTAIN_TARGETS[self.uncertain]
        target = torch.where(uncertain, 0.0 if value is None else value, (tags == 1).to(tags.dtype))
        counted = ~uncertain if value is None else torch.ones_like(uncertain)
        return target.float(), counted

    def forward(self, patch_tokens: Tensor, tags: Tensor) -> tuple[Tensor, Tensor]:
        if int(self.query_updates) == 0:
            raise RuntimeError(
                "TagRecognition has no tag queries: call set_tag_queries(text embeddings of the tag names) once"
            )
        batch = patch_tokens.shape[0]
        if tags.shape != (batch, self.tag_queries.shape[0]):
            raise ValueError(f"tags must be [B={batch}, num_tags={self.tag_queries.shape[0]}], got {tuple(tags.shape)}")
        queries = self.tag_queries.to(patch_tokens.dtype).expand(batch, -1, -1)
        logits = self.head(self.decoder(queries, patch_tokens)).squeeze(-1)  # [B, T]
        target, counted = self.targets(tags)
        losses = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        counted = counted.to(losses.dtype)
        return (losses * counted).sum() / counted.sum().clamp_min(1), logits


# A checkpoint written before `dropout` was a setting holds no such key: it had the decoder's 0.1.
@register_objective("tag", build=lambda c, m: TagRecognition(m.projection_dim, len(OBSERVATIONS), c["layers"],
                                                             c["heads"], c["uncertain"], c.get("dropout", 0.1)),
                    inputs=("patch_tokens",), batch=("tags",))
def tag_loss(model, s, step: int) -> dict[str, Tensor]:
    """ASG IRL (its queries: `PretrainModel.refresh_tag_queries`)."""
    loss, _ = model.objectives["tag"](s.patch_tokens, s.batch["tags"])
    return {"tag": loss}
