"""The clipping arithmetic of DP-SGD's summed gradient S(B), whose add/remove-one-patient sensitivity docs/privacy.md
proves (Lemma 1): which terms are coupled (the objective registry's `coupled`), the clip norms C and C_b and the
sensitivity C + 2 C_b, each summand's clip, and the clipped sums. No model passes and no threads here: those are
`client.privacy.clipped_sum`'s."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from client.privacy.disclosure import NonFiniteStep
from shared_models.objectives.registry import coupled_terms as registered_coupled_terms

# Terms whose value for one study depends on the other studies of the batch (in-batch negatives, soft
# targets from the other studies' tags), as each objective registers itself (`coupled`). Every other term
# is a function of one study alone when the model runs on a batch of that study only. The clipping asks
# the registry at every step (`split_terms`); this is the set registered when this module was imported.
COUPLED_TERMS = registered_coupled_terms()


class PrivacyError(ValueError):
    """The model or settings cannot be trained under DP as configured."""


def split_terms(terms: set[str], studies: int) -> tuple[set[str], set[str]]:
    """A step's terms as (coupled, per-patient). With fewer than two studies there are no negatives: the
    coupled terms are 0 with a 0 gradient, so none is taken."""
    coupled = registered_coupled_terms()
    return (terms & coupled if studies >= 2 else set()), terms - coupled


@dataclass(frozen=True)
class ClipNorms:
    """C for each patient's gradient of its per-patient terms, C_b for the coupled terms' batch gradient."""

    patient: float
    coupled: float

    def __post_init__(self):
        if not (self.patient > 0 and self.coupled > 0):
            raise PrivacyError(f"clip norms must be > 0, got max_grad_norm={self.patient}, "
                               f"coupled_max_grad_norm={self.coupled}")

    @property
    def sensitivity(self) -> float:
        """L2 change of `clipped_gradient_sum` when one patient is added or removed: C + 2 C_b."""
        return self.patient + 2.0 * self.coupled


def require_group_norm(model: nn.Module) -> None:
    """Refuse BatchNorm: its batch statistics mix patients in the forward pass (and its running stats leak), so a
    per-patient summand would no longer see its study alone, which Lemma 1 needs."""
    batch_norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        raise PrivacyError(
            f"DP-SGD cannot train a model with BatchNorm ({len(batch_norms)} layer(s), e.g. {batch_norms[0]!r}): "
            "it mixes patients inside a batch. The norm layer type is a federation-wide model choice: start the "
            f"federation with {_batch_norm_remedy(batch_norms)}"
        )


def _batch_norm_remedy(batch_norm_names: list[str]) -> str:
    fixes = []
    if any(name.startswith("image_encoder.") for name in batch_norm_names):
        fixes.append("model.image.norm=group")
    if any(name.split(".")[0] in ("image_projection", "text_projection") for name in batch_norm_names):
        fixes.append("model.projection_head=linear")
    # The privacy=dpsgd* presets set both; a command line or model file that sets them back lands here.
    return " and ".join(fixes) or "model.image.norm=group and model.projection_head=linear"


def add_scaled_(total: list[Tensor], grads: list[Tensor | None], factor: float) -> None:
    """total += factor * grads, skipping parameters the loss did not use."""
    used = [i for i, g in enumerate(grads) if g is not None]
    if used:
        torch._foreach_add_([total[i] for i in used], [grads[i] for i in used], alpha=factor)


def clip_factor(grads: list[Tensor | None], max_norm: float, scale: float = 1.0) -> tuple[float, float]:
    """The factor that brings `scale * grads` (None: zero) to joint L2 norm at most max_norm, and that norm before.

    A factor, not an in-place scaling: autograd may return one gradient as a view of another (at batch 1,
    timm's cls_token gradient is a slice of pos_embed's), which an in-place scaling would scale twice."""
    used = [g for g in grads if g is not None]
    norm = scale * float(torch.nn.utils.get_total_norm(used)) if used else 0.0
    if not math.isfinite(norm):  # a NaN would pass any clip and void the sensitivity bound
        raise NonFiniteStep(None, "gradient norm", norm)
    return scale * min(1.0, max_norm / norm) if norm > 0 else scale, norm


def clipped_row_sum(grads: list[Tensor], max_norm: float) -> tuple[list[Tensor], Tensor]:
    """Sum over rows i of `grads` (study i's gradient across all tensors), each row first scaled to L2 norm at
    most max_norm; also the row norms before.

    One weighted sum (sum_i f_i g_i as a tensordot) per tensor: the scaled rows are never materialised."""
    norms = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1), dim=1)
    if not bool(torch.isfinite(norms).all()):   # a NaN would pass any clip and void the sensitivity bound
        raise NonFiniteStep(None, "per-study gradient norm", norms.tolist())
    factors = (max_norm / norms).clamp(max=1.0)
    return [torch.tensordot(factors, g, dims=1) for g in grads], norms


@dataclass
class ClippedSum:
    gradient: list[Tensor]              # S(B), one tensor per trainable parameter
    terms: dict[str, float]             # loss terms for the site's own log (data-derived: never sent)
    clipped_patients: int               # patients whose gradient was scaled down (site's log only)
