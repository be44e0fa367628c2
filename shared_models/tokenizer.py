"""The tokenizer that goes with the text encoder: a named model's own, or WordPiece trained on synthetic text."""
from __future__ import annotations

import hashlib
import string
from collections import Counter

from tokenizers import normalizers, pre_tokenizers
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

from shared_models.synthetic_corpus import synthetic_reports

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(vocab_size: int = 2000, num_reports: int = 2000, seed: int = 0) -> BertTokenizer:
    """A BERT WordPiece tokenizer whose vocabulary is learnt from `synthetic_reports`.

    The vocabulary is the special tokens, every printable ASCII character (alone and as a `##`
    continuation, so no English text maps to [UNK]) and then the corpus's most frequent words.
    It is counted here rather than by `tokenizers.trainers.WordPieceTrainer`, whose vocabulary
    differs from run to run: every site and the coordinator must derive the identical tokenizer.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter()
    for report in synthetic_reports(num_reports, seed):
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(report))
        counts.update(word for word, _ in words)
    characters = string.ascii_lowercase + string.digits + string.punctuation
    vocab = SPECIAL_TOKENS + list(characters) + [f"##{c}" for c in characters]
    known = set(vocab)
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if w not in known]
    vocab += words[: max(vocab_size - len(vocab), 0)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def build_tokenizer(text_cfg: dict) -> PreTrainedTokenizerBase:
    """The tokenizer for `model.text`: trained WordPiece for a `config` encoder, else the named model's."""
    if text_cfg.get("config") is not None:
        return train_wordpiece(**text_cfg.get("tokenizer", {}))
    return AutoTokenizer.from_pretrained(text_cfg["name"], local_files_only=True)   # a local folder or the cache: never a download


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary, normalisation and special tokens: what every site must agree on."""
    backend = tokenizer.backend_tokenizer.to_str()
    special = repr(sorted(tokenizer.special_tokens_map.items()))
    return hashlib.sha256((backend + special).encode()).hexdigest()[:16]
