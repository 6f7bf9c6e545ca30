"""The step a researcher would otherwise run, for ratios: one Diffusion-DPO step (Eq. 1) on diffusers' FLUX
transformer with a peft LoRA, as diffusers' training scripts set it up (frozen base in bf16, LoRA in f32,
autocast, `enable_gradient_checkpointing`, AdamW), on random FLUX.1-dev-shaped weights.

UNO's reference images are extra image tokens in the same sequence (UnoPE only moves their positions), so they
are concatenated to the target's tokens here: the same sequence length, hence the same work, as UNO's forward.
The loss reads the target's tokens only.

    python3 scripts/reference/diffusers_dpo_step.py --size 512 --references 1 --checkpoint   # on a GPU
    python3 scripts/reference/diffusers_dpo_step.py --tiny --device cpu --steps 2           # smoke test

Prints one line per timed step and a last JSON line: median step time, peak memory allocated and reserved by
PyTorch's allocator (`torch.cuda.max_memory_*`). Needs torch, diffusers and peft (scripts/gpu-check.sh carries
the diffusers wheel in .whl/; the GPU machine has the rest).
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY = dict(
    FLUX_DEV,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)
# Attention and MLP layers of every block (our `lora.targets` default: attention + mlp), not the final layer.
TARGETS = (
    r".*blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)$"
)


def grid_ids(side, offset, device):
    i, j = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.stack([torch.zeros_like(i), i + offset, j + offset], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=torch.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="target side in pixels (16 pixels a token)")
    p.add_argument("--references", type=int, default=1)
    p.add_argument("--reference-px", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=40, help="our random-flux-dev base's prompt length")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--beta", type=float, default=5000.0)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--checkpoint", action="store_true", help="enable_gradient_checkpointing()")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny config, for a smoke test on the CPU")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cuda = dev.type == "cuda"
    torch.manual_seed(a.seed)
    cfg = TINY if a.tiny else FLUX_DEV
    # Built on the device in the weights' dtype directly (no f32 copy of 12 B parameters on the way).
    torch.set_default_dtype(dtype)
    with dev:
        model = FluxTransformer2DModel(**cfg)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian", target_modules=TARGETS))
    trainable = [q for q in model.parameters() if q.requires_grad]
    for q in trainable:  # diffusers' cast_training_params: LoRA in f32 under a bf16 base
        q.data = q.data.float()
    if a.checkpoint:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    side, ref_side = a.size // 16, a.reference_px // 16
    n_img, n_ref = side * side, a.references * ref_side * ref_side
    ch, txt_dim, pooled_dim = cfg["in_channels"], cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    img_ids = torch.cat(
        [grid_ids(side, 0, dev)] + [grid_ids(ref_side, side * (r + 1), dev) for r in range(a.references)]
    )
    txt_ids = torch.zeros(a.text_tokens, 3, device=dev)
    g = torch.Generator(device=dev).manual_seed(a.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    def predict(x_t, refs, text, pooled, t):
        out = model(
            hidden_states=torch.cat([x_t, refs], dim=1),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.full_like(t, 3.5),
            return_dict=False,
        )[0]
        return out[:, :n_img].float()

    def step():
        # A pair: winner and loser share noise, timestep, references and prompt (Diffusion-DPO).
        # (Materialised batches, as a data loader gives them, not broadcast views.)
        x0 = randn(2, n_img, ch)
        noise = randn(1, n_img, ch).repeat(2, 1, 1)
        t = torch.rand(1, generator=g, device=dev).repeat(2)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        target = noise - x0
        refs = randn(1, n_ref, ch).repeat(2, 1, 1)
        text = randn(1, a.text_tokens, txt_dim).repeat(2, 1, 1)
        pooled = randn(1, pooled_dim).repeat(2, 1)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                model.disable_adapters()
                ref_err = (predict(x_t, refs, text, pooled, t) - target).pow(2).mean(dim=(1, 2))
                model.enable_adapters()
            err = (predict(x_t, refs, text, pooled, t) - target).pow(2).mean(dim=(1, 2))
        inside = -0.5 * a.beta * ((err[0] - err[1]) - (ref_err[0] - ref_err[1]))
        loss = -F.logsigmoid(inside)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: kernels chosen, optimiser state allocated
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.steps):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append((time.perf_counter() - start) * 1000)
        print(f"step {i + 1}: loss {loss:.4f}, {times[-1]:.0f} ms", flush=True)
    result = {
        "tool": "diffusers FluxTransformer2DModel + peft LoRA",
        "tokens": n_img + n_ref + a.text_tokens,
        "checkpoint": a.checkpoint,
        "median_step_ms": round(statistics.median(times), 1),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None,
        "lora_params": sum(q.numel() for q in trainable),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
