"""Collate dataset samples into the tensors the pre-training model reads (reports tokenised with sentence spans)."""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

def _report_tokens(sample: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[list[int], list[int]]:
    """[CLS] sentence_0 sentence_1 ... [SEP] truncated to max_length, and each token's sentence (-1 outside)."""
    sentences = list(sample.get("sentences") or [])
    if sentences:
        pieces = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    else:
        # Free text the report parser could not split: the whole report, with no sentence spans.
        pieces = [tokenizer(sample["report"], add_special_tokens=False)["input_ids"]]
    ids, sentence_ids = [tokenizer.cls_token_id], [-1]
    for index, piece in enumerate(pieces):
        ids += piece
        sentence_ids += [index if sentences else -1] * len(piece)
    ids, sentence_ids = ids[: max_length - 1], sentence_ids[: max_length - 1]
    return ids + [tokenizer.sep_token_id], sentence_ids + [-1]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def _section(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int, prefix: str) -> dict:
    # An empty section still tokenises to [CLS] [SEP]; has_<section> tells the objectives to skip it.
    encoded = tokenizer(
        texts, padding="longest", truncation=True, max_length=max_length, padding_side="right", return_tensors="pt"
    )
    return {
        f"{prefix}_ids": encoded["input_ids"],
        f"{prefix}_mask": encoded["attention_mask"],
        f"has_{prefix}": torch.tensor([bool(t.strip()) for t in texts]),
    }


def collate(samples: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """Batch dataset samples (see client.data.dataset) into model inputs.

    Keys: images [B,1,S,S]; report_ids / report_mask [B,L] (the sentences concatenated, or the free
    text when there are none) with sentence_ids [B,L] (-1 outside sentences) and sentence_regions
    [B,S] (-1 for none, padding, or a sentence truncated away); findings_ids / findings_mask,
    impression_ids / impression_mask (right-padded) with has_findings / has_impression [B]; tags,
    labels, boxes stacked.
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    for sample in samples:
        if not (sample.get("report") or "").strip() and not sample.get("sentences"):
            raise ValueError(
                f"collate: image {sample.get('image_id')!r} has an empty report; the dataset must reject it"
            )
        if len(sample.get("sentence_regions") or []) != len(sample.get("sentences") or []):
            raise ValueError(
                f"collate: image {sample.get('image_id')!r} has {len(sample.get('sentences') or [])} sentences but "
                f"{len(sample.get('sentence_regions') or [])} sentence_regions; they must pair one to one"
            )

    reports = [_report_tokens(s, tokenizer, max_length) for s in samples]
    report_ids = _pad([ids for ids, _ in reports], tokenizer.pad_token_id)
    sentence_ids = _pad([sids for _, sids in reports], -1)
    num_sentences = max(1, max(len(s.get("sentences", [])) for s in samples))
    sentence_regions = torch.full((len(samples), num_sentences), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        kept = set(sentence_ids[row].tolist())  # sentences truncated away have no tokens: no region either
        for index, region in enumerate(sample.get("sentence_regions", [])):
            if index in kept:
                sentence_regions[row, index] = int(region)

    lengths = torch.tensor([len(ids) for ids, _ in reports])
    return dict(
        images=torch.stack([s["image"] for s in samples]),
        tags=torch.stack([s["tags"] for s in samples]),
        labels=torch.stack([s["labels"] for s in samples]),
        boxes=torch.stack([s["boxes"] for s in samples]),
        report_ids=report_ids,
        report_mask=(torch.arange(report_ids.shape[1]) < lengths[:, None]).long(),
        sentence_ids=sentence_ids,
        sentence_regions=sentence_regions,
        **_section([s.get("findings", "") for s in samples], tokenizer, max_length, "findings"),
        **_section([s.get("impression", "") for s in samples], tokenizer, max_length, "impression"),
    )
