"""Helpers shared by the parity fixture scripts: the tiny word-level tokenizers and HFEmbedder's fixed-length ids."""

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors


def word_tokenizer(vocab_list, unk, prefix, suffix):
    """A lower-casing whitespace word-level tokenizer over `vocab_list` (ids in list order) that wraps each text as
    `prefix $A suffix` (either may be None). Returns the tokenizer and its vocabulary."""
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = " ".join(x for x in [prefix, "$A", suffix] if x)
    special_ids = [(t, vocab[t]) for t in [prefix, suffix] if t]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special_ids)
    return tok, vocab


def ids_fixed_length(tok, prompts, length, pad_id, eos_id):
    """HFEmbedder's `padding="max_length", truncation=True`: truncation keeps the end token."""
    rows = []
    for p in prompts:
        ids = tok.encode(p).ids
        if len(ids) > length:
            ids = ids[: length - 1] + [eos_id]
        rows.append(ids + [pad_id] * (length - len(ids)))
    return torch.tensor(rows)
