"""Collate dataset samples into the tensors the pre-training model reads (reports tokenised with sentence spans)."""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

# Each report token's section in `report_sections`; 0 marks [CLS], [SEP] and padding. The findings words are read
# off the report pass (the text encoder lets them attend only to each other: shared_models/text_encoder.py).
SECTIONS = {"findings": 1, "impression": 2, "text": 3}
OUTSIDE = 0


def _report_tokens(sample: dict, tokenizer: PreTrainedTokenizerBase,
                   max_length: int) -> tuple[list[int], list[int], list[int]]:
    """[CLS] sentence_0 sentence_1 ... [SEP] truncated to max_length, each token's sentence (-1 outside) and its
    section (`SECTIONS`, `OUTSIDE` for [CLS] and [SEP])."""
    sentences = list(sample.get("sentences") or [])
    if sentences:
        pieces = tokenizer(sentences, add_special_tokens=False)["input_ids"]
        sections = [SECTIONS[name] for name in sample["sentence_sections"]]
    else:
        # Free text the report parser could not split: the whole report, with no sentence spans.
        pieces = [tokenizer(sample["report"], add_special_tokens=False)["input_ids"]]
        sections = [SECTIONS["text"]]
    ids, sentence_ids, section_ids = [tokenizer.cls_token_id], [-1], [OUTSIDE]
    for index, (piece, section) in enumerate(zip(pieces, sections, strict=True)):
        ids += piece
        sentence_ids += [index if sentences else -1] * len(piece)
        section_ids += [section] * len(piece)
    keep = max_length - 1
    return ids[:keep] + [tokenizer.sep_token_id], sentence_ids[:keep] + [-1], section_ids[:keep] + [OUTSIDE]


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
    text when there are none) with sentence_ids [B,L] (-1 outside sentences), report_sections [B,L]
    (`SECTIONS`: where the findings words are) and sentence_regions [B,S] (-1 for none, padding, or a
    sentence truncated away); impression_ids / impression_mask (right-padded: the impression has its
    own pass, for its global embedding) with has_findings / has_impression [B]; tags, labels, boxes
    stacked.
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    for sample in samples:
        if not (sample.get("report") or "").strip() and not sample.get("sentences"):
            raise ValueError(
                f"collate: image {sample.get('image_id')!r} has an empty report; the dataset must reject it"
            )
        for key in ("sentence_regions", "sentence_sections"):
            if len(sample.get(key) or []) != len(sample.get("sentences") or []):
                raise ValueError(
                    f"collate: image {sample.get('image_id')!r} has {len(sample.get('sentences') or [])} sentences but "
                    f"{len(sample.get(key) or [])} {key}; they must pair one to one"
                )
        unknown = set(sample.get("sentence_sections") or []) - set(SECTIONS)
        if unknown:
            raise ValueError(f"collate: image {sample.get('image_id')!r} has sentences of sections {sorted(unknown)}; "
                             f"known: {', '.join(SECTIONS)}")

    reports = [_report_tokens(s, tokenizer, max_length) for s in samples]
    report_ids = _pad([ids for ids, _, _ in reports], tokenizer.pad_token_id)
    sentence_ids = _pad([sids for _, sids, _ in reports], -1)
    num_sentences = max(1, max(len(s.get("sentences", [])) for s in samples))
    sentence_regions = torch.full((len(samples), num_sentences), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        kept = set(sentence_ids[row].tolist())  # sentences truncated away have no tokens: no region either
        for index, region in enumerate(sample.get("sentence_regions", [])):
            if index in kept:
                sentence_regions[row, index] = int(region)

    lengths = torch.tensor([len(ids) for ids, _, _ in reports])
    return dict(
        images=torch.stack([s["image"] for s in samples]),
        tags=torch.stack([s["tags"] for s in samples]),
        labels=torch.stack([s["labels"] for s in samples]),
        boxes=torch.stack([s["boxes"] for s in samples]),
        report_ids=report_ids,
        report_mask=(torch.arange(report_ids.shape[1]) < lengths[:, None]).long(),
        sentence_ids=sentence_ids,
        report_sections=_pad([sections for _, _, sections in reports], OUTSIDE),
        sentence_regions=sentence_regions,
        has_findings=torch.tensor([bool((s.get("findings") or "").strip()) for s in samples]),
        **_section([s.get("impression", "") for s in samples], tokenizer, max_length, "impression"),
    )
