"""Parity fixtures of FLUX's text encoders against transformers (their reference implementation).

Writes tiny random T5 (v1.1-style: gated GELU, no tied embeddings) and CLIP text models with transformers'
`save_pretrained` (the folder layout of FLUX.1-dev's text_encoder_2/ and text_encoder/), a small word-level
tokenizer.json for each (made with the tokenizers library: the file format our loader reads), and what BFL's
`HFEmbedder` computes from them for a few prompts: T5 `last_hidden_state` of the prompt padded/truncated to
`max_length` tokens, and CLIP `pooler_output` (77-token padding with the end-of-text token), both without an
attention mask. `cargo test --test parity` compares our encoders with them.

Regenerate (any machine, CPU is enough):
    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
    .venv/bin/python scripts/parity/text_encoders.py
"""

import json
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from common import ids_fixed_length, word_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2] / "tests/data/parity"
WORDS = ["a", "red", "cat", "and", "blue", "dog", "on", "grass", "under", "tree"]
PROMPTS = ["a red cat on grass", "a blue dog under a tree and a red cat", "dog"]
T5_TOKENS = 12
CLIP_TOKENS = 16  # max_position_embeddings of the tiny CLIP (77 in CLIP-L)


def t5(tensors):
    torch.manual_seed(3)
    cfg = T5Config(
        vocab_size=3 + len(WORDS), d_model=24, d_kv=8, d_ff=32, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    model = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    out = ROOT / "t5"
    model.save_pretrained(out, safe_serialization=True)
    tok, vocab = word_tokenizer(["<pad>", "</s>", "<unk>"] + WORDS, "<unk>", None, "</s>")
    tok.save(str(out / "tokenizer.json"))
    ids = ids_fixed_length(tok, PROMPTS, T5_TOKENS, vocab["<pad>"], vocab["</s>"])
    with torch.no_grad():
        tensors["t5.ids"] = ids.to(torch.int64)
        tensors["t5.last_hidden_state"] = model(input_ids=ids, attention_mask=None).last_hidden_state


def clip(tensors):
    torch.manual_seed(4)
    special = ["<unk>", "<|startoftext|>"]
    eot = "<|endoftext|>"
    # The end-of-text token is the highest id, as in CLIP's real vocabulary (49407).
    vocab_list = special + WORDS + [eot]
    cfg = CLIPTextConfig(
        vocab_size=len(vocab_list), hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=CLIP_TOKENS, hidden_act="quick_gelu",
        bos_token_id=1, eos_token_id=len(vocab_list) - 1, pad_token_id=len(vocab_list) - 1, projection_dim=12,
    )
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    out = ROOT / "clip"
    model.save_pretrained(out, safe_serialization=True)
    tok, vocab = word_tokenizer(vocab_list, "<unk>", "<|startoftext|>", eot)
    tok.save(str(out / "tokenizer.json"))
    ids = ids_fixed_length(tok, PROMPTS, CLIP_TOKENS, vocab[eot], vocab[eot])
    with torch.no_grad():
        tensors["clip.ids"] = ids.to(torch.int64)
        tensors["clip.pooler_output"] = model(input_ids=ids, attention_mask=None).pooler_output


def main():
    tensors = {}
    t5(tensors)
    clip(tensors)
    meta = {
        "prompts": json.dumps(PROMPTS),
        "t5_tokens": str(T5_TOKENS),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "generator": "scripts/parity/text_encoders.py",
    }
    path = ROOT / "text_encoders.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    for f in sorted(ROOT.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(ROOT)}: {f.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
