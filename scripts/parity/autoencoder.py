"""Parity fixture of the FLUX autoencoder against diffusers' AutoencoderKL (the reference implementation).

Builds a tiny AutoencoderKL with FLUX's layout (16 latent channels, no quant convs, FLUX.1's scaling 0.3611 and
shift 0.1159; width 32, four levels, one res-block per level: the smallest our loader accepts), converts its weights
to BFL naming (the naming of ae.safetensors, which our loader reads: the inverse of diffusers'
convert_ldm_vae_checkpoint), and writes with it the encoder's normalised posterior mean `(mean − shift)·scale` of a
random image and the decoder's output for random normalised latents, to
tests/data/parity/autoencoder.safetensors. `cargo test --test parity` compares our autoencoder with them.

Regenerate (any machine, CPU is enough):
    python3 -m venv .venv && .venv/bin/pip install torch diffusers safetensors
    .venv/bin/python scripts/parity/autoencoder.py
"""

import pathlib

import diffusers
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/data/parity/autoencoder.safetensors"
LEVELS, RES_BLOCKS, WIDTH, Z = 4, 1, 32, 16
SCALE, SHIFT = 0.3611, 0.1159


def model():
    torch.manual_seed(5)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * LEVELS,
        up_block_types=("UpDecoderBlock2D",) * LEVELS,
        block_out_channels=(WIDTH,) * LEVELS,
        layers_per_block=RES_BLOCKS,
        latent_channels=Z,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
    ).eval()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            # f16-exact values: the fixture stores the weights in f16, both sides compute in f32 from them.
            p.copy_(p.half().float())
    return vae


def bfl_weights(sd):
    out, used = {}, set()

    def cp(dst, src, conv1x1=False):
        for s in ("weight", "bias"):
            k = f"{src}.{s}"
            if k in sd:
                v = sd[k]
                if conv1x1 and s == "weight" and v.ndim == 2:
                    v = v[:, :, None, None]
                out[f"{dst}.{s}"] = v.contiguous().half()
                used.add(k)

    def resnet(dst, src):
        for a, b in [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                     ("nin_shortcut", "conv_shortcut")]:
            cp(f"{dst}.{a}", f"{src}.{b}")

    def attn(dst, src):
        cp(f"{dst}.norm", f"{src}.group_norm")
        for a, b in [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]:
            cp(f"{dst}.{a}", f"{src}.{b}", conv1x1=True)

    for part in ("encoder", "decoder"):
        cp(f"{part}.conv_in", f"{part}.conv_in")
        cp(f"{part}.norm_out", f"{part}.conv_norm_out")
        cp(f"{part}.conv_out", f"{part}.conv_out")
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        attn(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
    for i in range(LEVELS):
        for j in range(RES_BLOCKS):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        cp(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        # diffusers counts decoder levels from the latent side, BFL from the image side.
        bfl = LEVELS - 1 - i
        for j in range(RES_BLOCKS + 1):
            resnet(f"decoder.up.{bfl}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        cp(f"decoder.up.{bfl}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    left = sorted(set(sd) - used)
    if left:
        raise SystemExit(f"diffusers tensors not converted: {left}")
    return out


def main():
    vae = model()
    tensors = {f"weights.{k}": v for k, v in bfl_weights(vae.state_dict()).items()}
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    latents = torch.randn(2, Z, 4, 4, generator=gen)
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean
        decoded = vae.decode(latents / SCALE + SHIFT).sample
    tensors.update({
        "input.image": image,
        "output.latents": (mean - SHIFT) * SCALE,
        "input.latents": latents,
        "output.decoded": decoded,
    })
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "generator": "scripts/parity/autoencoder.py"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
