"""Image <-> report retrieval Recall@K from paired embeddings (image i belongs with report i)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.metrics import image_text_recalls


def cosine_similarity(image_embeddings, text_embeddings) -> np.ndarray:
    """[N_images, N_texts] cosine similarity of two embedding sets of the same width."""
    image = F.normalize(torch.as_tensor(np.ascontiguousarray(image_embeddings, dtype=np.float32)), dim=-1)
    text = F.normalize(torch.as_tensor(np.ascontiguousarray(text_embeddings, dtype=np.float32)), dim=-1)
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"image embeddings have {image.shape[1]} dims, text embeddings {text.shape[1]}")
    return (image @ text.T).numpy()


def evaluate_retrieval(image_embeddings, text_embeddings, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Contract JSON {i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10} plus the gallery size `pairs`.

    Recall@K depends on the gallery size, so it is reported beside the numbers; a tie with the
    correct item counts against it."""
    if len(image_embeddings) != len(text_embeddings):
        raise ValueError(f"{len(image_embeddings)} images but {len(text_embeddings)} reports; retrieval needs pairs")
    return {**image_text_recalls(cosine_similarity(image_embeddings, text_embeddings), ks),
            "pairs": len(image_embeddings)}
