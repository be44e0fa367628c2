"""The pre-training objectives: small modules that turn encoder outputs into loss terms."""
from .checks import values_checkable
from .global_contrastive import GlobalContrastive, similarity_logits
from .impression import BRANCHES, ImpressionDecoder, ImpressionGeneration
from .seg import PseudoSegmentation, SegmentationDecoder, dice_bce_loss, pseudo_masks
from .region import RegionSentenceAlignment, region_features
from .soft_label import SoftLabelContrastive, soft_targets, tag_similarity
from .tag import UNCERTAIN_TARGETS, TagRecognition
from .token import TokenAlignment, clip_and_normalise_weights

__all__ = [
    "BRANCHES",
    "GlobalContrastive",
    "ImpressionDecoder",
    "ImpressionGeneration",
    "PseudoSegmentation",
    "RegionSentenceAlignment",
    "SegmentationDecoder",
    "SoftLabelContrastive",
    "TagRecognition",
    "TokenAlignment",
    "UNCERTAIN_TARGETS",
    "clip_and_normalise_weights",
    "dice_bce_loss",
    "pseudo_masks",
    "region_features",
    "similarity_logits",
    "values_checkable",
    "soft_targets",
    "tag_similarity",
]
