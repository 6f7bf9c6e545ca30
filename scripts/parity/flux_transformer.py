"""Parity fixture of the MMDiT and of UNO's LoRA against diffusers (the reference implementation of FLUX).

Builds a tiny FLUX transformer with random weights in diffusers, runs it on random inputs with 0, 1 and 2 UNO
in-context references (their tokens appended after the target's, UnoPE diagonal position ids as UNO's
`prepare_multi_ip` makes them, the output sliced back to the target like UNO's `Flux.forward`), and writes the
weights in BFL naming (the naming of flux1-dev.safetensors, which our model reads) with the inputs and outputs to
tests/data/parity/flux_transformer.safetensors.

Then a random LoRA in x-flux processor naming (the format of UNO's dit_lora.safetensors) on every block is loaded
into the same model with diffusers' own x-flux converter (`_convert_xlabs_flux_lora_to_diffusers`, through peft),
and its output with one reference is written too (`lora.*`, `output.lora.refs1`).

Last, a trainable LoRA as we write it in PEFT naming (`base_model.model.<BFL path>.lora_A/B.weight`, rank 4,
α 8: the update is scaled by α/r = 2) on every layer our default targets adapt (attention and MLPs, the single
blocks' fused `linear1`/`linear2`) is applied by peft itself (`inject_adapter_in_model` +
`set_peft_model_state_dict`) to a fresh copy of the model, each fused BFL layer split onto diffusers' separate
layers (`A` shared, `B` split by rows), and its output written (`peft.*`, `output.peft.refs1`). diffusers' kohya
converter hard-codes FLUX.1-dev's sizes (3072-wide blocks), so the kohya naming is checked through the same tensors
(our kohya writer and reader against this PEFT file) rather than through that converter.

`cargo test --test parity` compares our model, our merge of the x-flux LoRA and our adapters with them.

Regenerate (any machine, CPU is enough):
    python3 -m venv .venv && .venv/bin/pip install torch diffusers peft safetensors
    .venv/bin/python scripts/parity/flux_transformer.py
The versions used are written into the file's metadata.
"""

import json
import pathlib

import diffusers
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/data/parity/flux_transformer.safetensors"

# Tiny sizes of the same architecture: width 64 = 2 heads of 32, rotary axes (8, 12, 12), 1 double + 1 single block,
# FLUX's MLP ratio 4, guidance-distilled like FLUX.1-dev.
CONFIG = dict(
    in_channels=48,
    vec_in_dim=24,
    context_in_dim=40,
    hidden_size=64,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[8, 12, 12],
    theta=10000.0,
    qkv_bias=True,
    guidance_embed=True,
)
GRID = 4  # target tokens: GRID × GRID
REF_GRIDS = [(3, 3), (2, 4)]  # reference token grids
TEXT_TOKENS = 5
BATCH = 2
LORA_RANK = 4
PEFT_RANK, PEFT_ALPHA = 4, 8.0


def diffusers_model() -> FluxTransformer2DModel:
    c = CONFIG
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=c["in_channels"],
        num_layers=c["depth"],
        num_single_layers=c["depth_single_blocks"],
        attention_head_dim=c["hidden_size"] // c["num_heads"],
        num_attention_heads=c["num_heads"],
        joint_attention_dim=c["context_in_dim"],
        pooled_projection_dim=c["vec_in_dim"],
        guidance_embeds=c["guidance_embed"],
        axes_dims_rope=tuple(c["axes_dim"]),
    )
    # Every parameter random (diffusers zero-initialises nothing here, but the RMSNorm scales start at 1: make
    # them differ from 1 so that a norm read from the wrong tensor shows).
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name else 0.05
            base = 1.0 if std == 0.3 else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=gen))
            # f16-exact values: the fixture stores the weights in f16 (half the bytes), and both sides compute in
            # f32 from exactly these values.
            p.copy_(p.half().float())
    return model.eval()


def bfl_weights(model: FluxTransformer2DModel) -> dict:
    """The diffusers state dict in BFL naming (the inverse of diffusers' convert_flux_transformer_checkpoint)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}

    def lin(dst, src):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        if f"{src}.bias" in sd:
            out[f"{dst}.bias"] = sd[f"{src}.bias"]

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if CONFIG["guidance_embed"]:
        lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for i in range(CONFIG["depth"]):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{d}.img_mod.lin", f"{b}.norm1.linear")
        lin(f"{d}.txt_mod.lin", f"{b}.norm1_context.linear")
        for stream, q, k, v, nq, nk, proj in [
            ("img", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0"),
            ("txt", "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k", "to_add_out"),
        ]:
            out[f"{d}.{stream}_attn.qkv.weight"] = torch.cat([sd[f"{b}.attn.{x}.weight"] for x in (q, k, v)])
            out[f"{d}.{stream}_attn.qkv.bias"] = torch.cat([sd[f"{b}.attn.{x}.bias"] for x in (q, k, v)])
            out[f"{d}.{stream}_attn.norm.query_norm.scale"] = sd[f"{b}.attn.{nq}.weight"]
            out[f"{d}.{stream}_attn.norm.key_norm.scale"] = sd[f"{b}.attn.{nk}.weight"]
            lin(f"{d}.{stream}_attn.proj", f"{b}.attn.{proj}")
        lin(f"{d}.img_mlp.0", f"{b}.ff.net.0.proj")
        lin(f"{d}.img_mlp.2", f"{b}.ff.net.2")
        lin(f"{d}.txt_mlp.0", f"{b}.ff_context.net.0.proj")
        lin(f"{d}.txt_mlp.2", f"{b}.ff_context.net.2")
    for i in range(CONFIG["depth_single_blocks"]):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        lin(f"{s}.modulation.lin", f"{b}.norm.linear")
        parts = [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"]
        out[f"{s}.linear1.weight"] = torch.cat([sd[f"{p}.weight"] for p in parts])
        out[f"{s}.linear1.bias"] = torch.cat([sd[f"{p}.bias"] for p in parts])
        out[f"{s}.norm.query_norm.scale"] = sd[f"{b}.attn.norm_q.weight"]
        out[f"{s}.norm.key_norm.scale"] = sd[f"{b}.attn.norm_k.weight"]
        lin(f"{s}.linear2", f"{b}.proj_out")
    # diffusers' AdaLayerNormContinuous chunks (scale, shift); BFL's LastLayer (shift, scale).
    for suffix in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{suffix}"].chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale])
    lin("final_layer.linear", "proj_out")
    return {k: v.contiguous().half() for k, v in out.items()}


def grid_ids(h, w, dr=0, dc=0):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None] + dr
    ids[..., 2] = torch.arange(w)[None, :] + dc
    return ids.reshape(h * w, 3)


def main():
    model = diffusers_model()
    c = CONFIG
    gen = torch.Generator().manual_seed(2)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)
    tensors = {f"weights.{k}": v for k, v in bfl_weights(model).items()}
    img = rnd(BATCH, GRID * GRID, c["in_channels"])
    txt = rnd(BATCH, TEXT_TOKENS, c["context_in_dim"])
    y = rnd(BATCH, c["vec_in_dim"])
    t = torch.tensor([0.3, 0.8])
    guidance = torch.tensor([3.5, 1.0])
    tensors.update({"input.img": img, "input.txt": txt, "input.y": y, "input.t": t, "input.guidance": guidance})
    refs = [rnd(BATCH, h * w, c["in_channels"]) for h, w in REF_GRIDS]
    for k, r in enumerate(refs):
        tensors[f"input.ref{k}"] = r

    def predict(m, hidden, img_ids):
        """The target's prediction, as UNO's `Flux.forward` slices it."""
        with torch.no_grad():
            out = m(
                hidden_states=hidden,
                encoder_hidden_states=txt,
                pooled_projections=y,
                timestep=t,
                img_ids=img_ids,
                txt_ids=torch.zeros(TEXT_TOKENS, 3),
                guidance=guidance,
                return_dict=False,
            )[0]
        return out[:, : GRID * GRID].contiguous()
    for n_refs in range(len(REF_GRIDS) + 1):
        # UNO's prepare_multi_ip, pe="d": reference k starts at (h + Σ_{j<k} h_j, w + Σ_{j<k} w_j).
        ids = [grid_ids(GRID, GRID)]
        shift_h = shift_w = GRID
        for h, w in REF_GRIDS[:n_refs]:
            ids.append(grid_ids(h, w, shift_h, shift_w))
            shift_h, shift_w = shift_h + h, shift_w + w
        hidden = torch.cat([img] + refs[:n_refs], dim=1)
        tensors[f"output.refs{n_refs}"] = predict(model, hidden, torch.cat(ids))
        tensors[f"input.ids.refs{n_refs}"] = torch.cat(ids).contiguous()
    # UNO's LoRA (x-flux naming) on every block, applied by diffusers' converter + peft.
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    h, m, rank = c["hidden_size"], int(c["hidden_size"] * c["mlp_ratio"]), LORA_RANK
    xflux = {}
    for i in range(c["depth"]):
        for name, rows in [("qkv_lora1", 3 * h), ("proj_lora1", h), ("qkv_lora2", 3 * h), ("proj_lora2", h)]:
            xflux[f"double_blocks.{i}.processor.{name}.down.weight"] = 0.2 * rnd(rank, h)
            xflux[f"double_blocks.{i}.processor.{name}.up.weight"] = 0.2 * rnd(rows, rank)
    for i in range(c["depth_single_blocks"]):
        xflux[f"single_blocks.{i}.processor.qkv_lora.down.weight"] = 0.2 * rnd(rank, h)
        xflux[f"single_blocks.{i}.processor.qkv_lora.up.weight"] = 0.2 * rnd(3 * h, rank)
        xflux[f"single_blocks.{i}.processor.proj_lora.down.weight"] = 0.2 * rnd(rank, h + m)
        xflux[f"single_blocks.{i}.processor.proj_lora.up.weight"] = 0.2 * rnd(h, rank)
    tensors.update({f"lora.{k}": v.contiguous() for k, v in xflux.items()})
    converted = _convert_xlabs_flux_lora_to_diffusers({k: v.clone() for k, v in xflux.items()})
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="uno")
    ids = torch.cat([grid_ids(GRID, GRID), grid_ids(*REF_GRIDS[0], GRID, GRID)])
    tensors["output.lora.refs1"] = predict(model, torch.cat([img, refs[0]], dim=1), ids)
    if torch.equal(tensors["output.lora.refs1"], tensors["output.refs1"]):
        raise SystemExit("the LoRA did not change the model: it was not applied")

    # Our trainable LoRA in PEFT naming, applied by peft to a fresh copy of the model.
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    r = PEFT_RANK
    # BFL path -> (in, out, [(diffusers module, rows)]).
    layers = {}
    for i in range(c["depth"]):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        layers[f"{d}.img_attn.qkv"] = (h, [(f"{b}.attn.{x}", h) for x in ("to_q", "to_k", "to_v")])
        layers[f"{d}.img_attn.proj"] = (h, [(f"{b}.attn.to_out.0", h)])
        layers[f"{d}.txt_attn.qkv"] = (h, [(f"{b}.attn.{x}", h) for x in ("add_q_proj", "add_k_proj", "add_v_proj")])
        layers[f"{d}.txt_attn.proj"] = (h, [(f"{b}.attn.to_add_out", h)])
        layers[f"{d}.img_mlp.0"] = (h, [(f"{b}.ff.net.0.proj", m)])
        layers[f"{d}.img_mlp.2"] = (m, [(f"{b}.ff.net.2", h)])
        layers[f"{d}.txt_mlp.0"] = (h, [(f"{b}.ff_context.net.0.proj", m)])
        layers[f"{d}.txt_mlp.2"] = (m, [(f"{b}.ff_context.net.2", h)])
    for i in range(c["depth_single_blocks"]):
        sb, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        parts = [(f"{b}.attn.{x}", h) for x in ("to_q", "to_k", "to_v")] + [(f"{b}.proj_mlp", m)]
        layers[f"{sb}.linear1"] = (h, parts)
        layers[f"{sb}.linear2"] = (h + m, [(f"{b}.proj_out", h)])
    ours, theirs = {}, {}
    for path, (inp, parts) in layers.items():
        a = 0.3 * rnd(r, inp)
        bmat = 0.3 * rnd(sum(rows for _, rows in parts), r)
        ours[f"peft.base_model.model.{path}.lora_A.weight"] = a
        ours[f"peft.base_model.model.{path}.lora_B.weight"] = bmat
        start = 0
        for module, rows in parts:
            theirs[f"{module}.lora_A.weight"] = a.clone()
            theirs[f"{module}.lora_B.weight"] = bmat[start : start + rows].clone()
            start += rows
    tensors.update({k: v.contiguous() for k, v in ours.items()})
    fresh = diffusers_model()
    modules = sorted({m_ for _, parts in layers.values() for m_, _ in parts})
    config = LoraConfig(r=r, lora_alpha=PEFT_ALPHA, target_modules=modules, init_lora_weights=False)
    fresh = inject_adapter_in_model(config, fresh, adapter_name="focusdpo")
    result = set_peft_model_state_dict(fresh, theirs, adapter_name="focusdpo")
    if result.unexpected_keys:
        raise SystemExit(f"peft did not take {result.unexpected_keys}")
    tensors["output.peft.refs1"] = predict(fresh, torch.cat([img, refs[0]], dim=1), ids)
    if torch.equal(tensors["output.peft.refs1"], tensors["output.refs1"]):
        raise SystemExit("the PEFT LoRA did not change the model: it was not applied")

    meta = {
        "config": json.dumps(c),
        "peft_rank": str(PEFT_RANK),
        "peft_alpha": str(PEFT_ALPHA),
        "ref_grids": json.dumps(REF_GRIDS),
        "grid": str(GRID),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": __import__("peft").__version__,
        "generator": "scripts/parity/flux_transformer.py",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
