"""Parity fixtures of the metric embedders against transformers: DINOv2 (DINO score) and CLIP (CLIP-I, CLIP-T).

DINOv2: a tiny `Dinov2Model` with DINOv2's 518 px / 14 px-patch position grid (37 × 37), converted to Meta's
checkpoint naming (`blocks.N.attn.qkv`, `ls1.gamma`, …, the naming our loader reads), and its `pooler_output`
(the final-normed CLS token) for two 56 px images: position embeddings interpolated bicubically, as DINOv2 does.
CLIP: a tiny `CLIPModel` saved with `save_pretrained` plus a word-level tokenizer.json, its `get_image_features`
for two images and its unit-normed `get_text_features` for prompts padded with the end-of-text token.
Written to tests/data/parity/metric_towers.safetensors and tests/data/parity/clip_model/.

Regenerate (any machine, CPU is enough):
    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
    .venv/bin/python scripts/parity/metric_towers.py
"""

import json
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

from common import ids_fixed_length, word_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2] / "tests/data/parity"
WORDS = ["a", "red", "cat", "and", "blue", "dog", "on", "grass"]
PROMPTS = ["a red cat on grass", "a blue dog"]
DINO_PX = 56


def randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def features(x):
    """transformers 5 returns model outputs from get_*_features; 4.x returned the tensor."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def dino(tensors):
    torch.manual_seed(8)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=518,
                       patch_size=14, layerscale_value=1.0)
    model = Dinov2Model(cfg).eval()
    randomise(model, 9)
    sd = model.state_dict()
    meta = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        h, b = f"encoder.layer.{i}", f"blocks.{i}"
        for s in ("weight", "bias"):
            meta[f"{b}.norm1.{s}"] = sd[f"{h}.norm1.{s}"]
            meta[f"{b}.norm2.{s}"] = sd[f"{h}.norm2.{s}"]
            meta[f"{b}.attn.qkv.{s}"] = torch.cat([sd[f"{h}.attention.{x}_proj.{s}"] for x in ("q", "k", "v")])
            meta[f"{b}.attn.proj.{s}"] = sd[f"{h}.attention.o_proj.{s}"]
            meta[f"{b}.mlp.fc1.{s}"] = sd[f"{h}.mlp.fc1.{s}"]
            meta[f"{b}.mlp.fc2.{s}"] = sd[f"{h}.mlp.fc2.{s}"]
        meta[f"{b}.ls1.gamma"] = sd[f"{h}.layer_scale1.lambda1"]
        meta[f"{b}.ls2.gamma"] = sd[f"{h}.layer_scale2.lambda1"]
    # q, k, v (weight and bias) of each layer become one qkv weight and bias.
    if len(meta) != len(sd) - 4 * cfg.num_hidden_layers:
        raise SystemExit(f"converted {len(meta)} tensors from {len(sd)} DINOv2 tensors")
    tensors.update({f"dino.weights.{k}": v for k, v in meta.items()})
    gen = torch.Generator().manual_seed(10)
    pixels = torch.randn(2, 3, DINO_PX, DINO_PX, generator=gen)
    with torch.no_grad():
        tensors["dino.pixels"] = pixels
        tensors["dino.cls"] = model(pixel_values=pixels).pooler_output


def clip(tensors):
    torch.manual_seed(11)
    special, eot = ["<unk>", "<|startoftext|>"], "<|endoftext|>"
    vocab_list = special + WORDS + [eot]
    text = dict(vocab_size=len(vocab_list), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                num_hidden_layers=2, max_position_embeddings=12, hidden_act="quick_gelu", bos_token_id=1,
                eos_token_id=len(vocab_list) - 1, pad_token_id=len(vocab_list) - 1)
    vision = dict(hidden_size=24, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2, image_size=28,
                  patch_size=14, hidden_act="quick_gelu")
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).eval()
    randomise(model, 12)
    out = ROOT / "clip_model"
    model.save_pretrained(out, safe_serialization=True)
    tok, vocab = word_tokenizer(vocab_list, "<unk>", "<|startoftext|>", eot)
    tok.save(str(out / "tokenizer.json"))
    ids = ids_fixed_length(tok, PROMPTS, text["max_position_embeddings"], vocab[eot], vocab[eot])
    gen = torch.Generator().manual_seed(13)
    pixels = torch.randn(2, 3, 28, 28, generator=gen)
    with torch.no_grad():
        tensors["clip.pixels"] = pixels
        tensors["clip.image_features"] = features(model.get_image_features(pixel_values=pixels))
        t = features(model.get_text_features(input_ids=ids))
        tensors["clip.text_features_unit"] = t / t.norm(dim=-1, keepdim=True)


def main():
    tensors = {}
    dino(tensors)
    clip(tensors)
    meta = {
        "prompts": json.dumps(PROMPTS),
        "dino_px": str(DINO_PX),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "generator": "scripts/parity/metric_towers.py",
    }
    path = ROOT / "metric_towers.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    for f in [path, *sorted((ROOT / "clip_model").iterdir())]:
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
