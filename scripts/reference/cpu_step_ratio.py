"""Our tiny-model CPU steps against the same steps in diffusers + peft on PyTorch's CPU backend, in one run, with
the ratio (ours / PyTorch; < 1 means ours is faster).

The model is our `Config::tiny()` as diffusers' `FluxTransformer2DModel` (hidden 256 = 4 heads × 64, 3 double +
3 single blocks, 48 input channels = pixel-unshuffled RGB at 4 px a token, 64-wide text and pooled inputs, RoPE
axes 8/28/28, no guidance embedding). Token counts are the bundled two-subject pair's: 256 target + 2 × 64
reference + 40 text tokens; UNO's references are extra image tokens in the same sequence, the loss reads the
target's tokens only.

* `dpo`: one Diffusion-DPO pair (Eq. 1): the policy (LoRA on) on winner and loser at batch 2 with a graph, the
  reference (LoRA off) at batch 2 without, backward, AdamW on the LoRA. peft LoRA rank 8 (α 8) on every attention
  and MLP linear of the blocks (our `lora.targets` default), f32.
* `sft`: the policy on the winner at batch 1, MSE, backward, AdamW.
* `pretrain`: batch 8 with every weight trained (rectified-flow MSE), grad-norm clip 1, AdamW, an EMA of the
  weights. Our step also renders its 8 synthetic scenes; PyTorch's gets random tensors (its data is free).

    python3 scripts/reference/cpu_step_ratio.py                      # builds and runs our example, then PyTorch
    python3 scripts/reference/cpu_step_ratio.py --ours target/release/examples/step_time --kinds dpo

Both sides use 2 threads (torch.set_num_threads(2); ours: the rayon pool of a 2-core machine, set with
RAYON_NUM_THREADS=2 where there are more cores) and report the median of `--steps` timed steps after 2 warm-up
steps, and the peak resident memory of their process (PyTorch's includes the interpreter and its libraries).
Needs torch, diffusers and peft (the registry's; `scripts/parity/README.md` has the virtual environment).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from diffusers_dpo_step import FLUX_DEV, TARGETS, grid_ids

# FLUX's layout, our tiny sizes (diffusers_dpo_step.py: FLUX_DEV, its LoRA targets, its position ids).
TINY = dict(
    FLUX_DEV,
    in_channels=48,
    num_layers=3,
    num_single_layers=3,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 28, 28),
)
SIDE, REF_SIDE, REFERENCES, TEXT = 16, 8, 2, 40


def ours(binary, kind, steps, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    if binary:
        cmd = [binary, kind, str(steps)]
    else:
        cmd = ["cargo", "run", "--quiet", "--release", "--example", "step_time", "--", kind, str(steps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def torch_steps(kind, steps, threads):
    import torch
    import torch.nn.functional as F
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    model = FluxTransformer2DModel(**TINY)
    n_img, n_ref, ch = SIDE * SIDE, REFERENCES * REF_SIDE * REF_SIDE, TINY["in_channels"]
    cpu = torch.device("cpu")
    img_ids = torch.cat(
        [grid_ids(SIDE, 0, cpu)] + [grid_ids(REF_SIDE, SIDE * (r + 1), cpu) for r in range(REFERENCES)]
    )
    txt_ids = torch.zeros(TEXT, 3)

    def predict(x_t, refs, text, pooled, t):
        out = model(
            hidden_states=torch.cat([x_t, refs], dim=1),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        return out[:, :n_img]

    if kind == "pretrain":
        model.train()
        params = [p for p in model.parameters()]
        opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
        ema = [p.detach().clone() for p in params]

        def step():
            b = 8
            x0 = randn(b, n_img, ch)
            noise = randn(b, n_img, ch)
            t = torch.rand(b, generator=g)
            x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            loss = F.mse_loss(predict(x_t, randn(b, n_ref, ch), randn(b, TEXT, 64), randn(b, 64), t), noise - x0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.999)
            return loss.item()

    else:
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS))
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        beta = 2500.0

        def step():
            x0 = randn(2, n_img, ch)
            noise = randn(1, n_img, ch).repeat(2, 1, 1)
            t = torch.rand(1, generator=g).repeat(2)
            x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            target = noise - x0
            refs = randn(1, n_ref, ch).repeat(2, 1, 1)
            text = randn(1, TEXT, 64).repeat(2, 1, 1)
            pooled = randn(1, 64).repeat(2, 1)
            if kind == "sft":
                loss = F.mse_loss(predict(x_t[:1], refs[:1], text[:1], pooled[:1], t[:1]), target[:1])
            else:
                with torch.no_grad():
                    model.disable_adapters()
                    ref_err = (predict(x_t, refs, text, pooled, t) - target).pow(2).mean(dim=(1, 2))
                    model.enable_adapters()
                err = (predict(x_t, refs, text, pooled, t) - target).pow(2).mean(dim=(1, 2))
                inside = -0.5 * beta * ((err[0] - err[1]) - (ref_err[0] - ref_err[1]))
                loss = -F.logsigmoid(inside)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "impl": "diffusers FluxTransformer2DModel + peft (torch %s)" % torch.__version__,
        "kind": kind,
        "steps": steps,
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default="sft,dpo,pretrain", help="comma-separated: sft, dpo, focus-dpo, pretrain")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours", help="our built step_time example (default: cargo run --release --example step_time)")
    a = p.parse_args()
    rows = []
    for kind in a.kinds.split(","):
        mine = ours(a.ours, kind, a.steps, a.threads)
        # focus-dpo's PyTorch counterpart is the DPO step (the paper's code is unreleased; the mask costs little).
        theirs = torch_steps("dpo" if kind == "focus-dpo" else kind, a.steps, a.threads)
        rows.append((kind, mine, theirs))
        print(json.dumps({"ours": mine, "pytorch": theirs}), flush=True)
    print()
    print("| step | ours (median ms) | diffusers + peft (median ms) | ratio ours/PyTorch | ours peak RSS MiB |")
    print("|---|---|---|---|---|")
    for kind, mine, theirs in rows:
        ratio = mine["median_ms"] / theirs["median_ms"]
        print(
            f"| {kind} | {mine['median_ms']:.1f} | {theirs['median_ms']:.1f} | {ratio:.2f} | "
            f"{mine['peak_rss_mib']:.0f} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
