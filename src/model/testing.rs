//! Test weights for the MMDiT without downloads: deterministic random weights for every tensor of a config's FLUX
//! checkpoint layout ([`expected_tensor_shapes`], defined with the config). Public (not `cfg(test)`) so integration
//! tests and benches use it.

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::Config;
pub use super::config::{expected_tensor_shapes, parameter_count};
use crate::rng::standard_normal;

/// Standard deviation of the random weight init (the usual transformer 0.02).
pub const INIT_STD: f32 = 0.02;

/// A tensor of the given shape with i.i.d. normal(0, std²) entries, deterministic per `seed`.
pub fn random_tensor(shape: &[usize], std: f32, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| std * standard_normal(&mut rng)).collect();
    Tensor::from_vec(data, shape, device)
}

/// Random weights for every tensor of [`expected_tensor_shapes`]: normal(0, 0.02²) for linear weights and biases,
/// ones for the QK-norm scales. Deterministic per `seed`.
pub fn random_weights(cfg: &Config, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    expected_tensor_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with(".scale") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| INIT_STD * standard_normal(&mut rng)).collect()
            };
            Ok((name, Tensor::from_vec(data, shape, device)?))
        })
        .collect()
}

/// Random normal(0, std²) values for every tensor that `build` asks a `VarBuilder` for, under the names the
/// model code itself uses: tiny checkpoints of candle-transformers models (autoencoder, T5, CLIP, DINOv2) in
/// their real naming, without listing the names by hand. Deterministic per `seed`.
pub fn random_named_weights(
    seed: u64,
    std: f32,
    device: &Device,
    build: impl FnOnce(candle_nn::VarBuilder) -> Result<()>,
) -> Result<HashMap<String, Tensor>> {
    let varmap = candle_nn::VarMap::new();
    build(candle_nn::VarBuilder::from_varmap(
        &varmap,
        candle_core::DType::F32,
        device,
    ))?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let shape = data[name].shape().dims().to_vec();
            Ok((
                name.clone(),
                random_tensor(&shape, std, seed ^ (i as u64).wrapping_mul(0x9e37_79b9), device)?,
            ))
        })
        .collect()
}

/// The largest absolute difference between two tensors of one shape (for tests).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// The sizes of [`write_tiny_flux_folder`]'s transformer: FLUX-format (64 channels per token = 16 latent channels
/// packed 2×2, guidance-distilled like FLUX.1-dev) at the widths of the tiny T5 (24) and CLIP (16) test encoders.
pub fn tiny_flux_config() -> Config {
    Config {
        in_channels: 64,
        vec_in_dim: 16,
        context_in_dim: 24,
        hidden_size: 64,
        num_heads: 1,
        depth: 1,
        depth_single_blocks: 1,
        axes_dim: vec![8, 28, 28],
        guidance_embed: true,
        ..Config::tiny()
    }
}

/// Writes a FLUX.1-dev folder as downloaded, at tiny sizes with random weights (deterministic per `seed`):
/// `flux1-dev.safetensors` (BFL naming, no metadata: [`tiny_flux_config`]), `ae.safetensors`,
/// `text_encoder/` (CLIP) + `tokenizer/tokenizer.json`, `text_encoder_2/` (T5) + `tokenizer_2/tokenizer.json`.
/// For tests and for trying the FLUX code paths (`--backbone DIR`) without downloads.
pub fn write_tiny_flux_folder(dir: &std::path::Path, seed: u64) -> anyhow::Result<()> {
    use super::flux_text::testing::{write_tiny_clip, write_tiny_t5};
    std::fs::create_dir_all(dir)?;
    candle_core::safetensors::save(
        &random_weights(&tiny_flux_config(), seed, &Device::Cpu)?,
        dir.join("flux1-dev.safetensors"),
    )?;
    candle_core::safetensors::save(
        &super::codec::random_autoencoder_weights(&super::codec::tiny_autoencoder_config(), seed + 1, &Device::Cpu)?,
        dir.join("ae.safetensors"),
    )?;
    for (encoder, tokenizer, write) in [
        (
            "text_encoder",
            "tokenizer",
            write_tiny_clip as fn(&std::path::Path, u64) -> anyhow::Result<()>,
        ),
        ("text_encoder_2", "tokenizer_2", write_tiny_t5),
    ] {
        write(&dir.join(encoder), seed + 2)?;
        std::fs::create_dir_all(dir.join(tokenizer))?;
        std::fs::rename(
            dir.join(encoder).join("tokenizer.json"),
            dir.join(tokenizer).join("tokenizer.json"),
        )?;
    }
    Ok(())
}

/// Writes a LoRA in x-flux processor naming (UNO's `dit_lora.safetensors` format) for a model of config `cfg`:
/// every processor LoRA of every block, rank `rank`, random values (std 0.05).
pub fn write_tiny_uno_lora(path: &std::path::Path, cfg: &Config, rank: usize, seed: u64) -> anyhow::Result<()> {
    let mut tensors = HashMap::new();
    let mut k = seed;
    for (stem, rows, inp) in super::xflux_lora::xflux_processors(cfg) {
        k += 2;
        tensors.insert(
            format!("{stem}.down.weight"),
            random_tensor(&[rank, inp], 0.05, k, &Device::Cpu)?,
        );
        tensors.insert(
            format!("{stem}.up.weight"),
            random_tensor(&[rows, rank], 0.05, k + 1, &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_of<'a>(shapes: &'a [(String, Vec<usize>)], name: &str) -> Option<&'a [usize]> {
        shapes.iter().find(|(n, _)| n == name).map(|(_, s)| s.as_slice())
    }

    #[test]
    fn flux_dev_tensor_shapes_match_the_checkpoint() {
        let shapes = expected_tensor_shapes(&Config::flux_dev());
        let expect: [(&str, &[usize]); 11] = [
            ("double_blocks.0.img_attn.qkv.weight", &[9216, 3072]),
            ("double_blocks.18.txt_mlp.2.weight", &[3072, 12288]),
            ("double_blocks.0.img_mod.lin.weight", &[18432, 3072]),
            ("double_blocks.0.img_attn.norm.query_norm.scale", &[128]),
            ("single_blocks.37.linear1.weight", &[21504, 3072]),
            ("single_blocks.0.linear2.weight", &[3072, 15360]),
            ("single_blocks.0.modulation.lin.weight", &[9216, 3072]),
            ("final_layer.linear.weight", &[64, 3072]),
            ("final_layer.adaLN_modulation.1.weight", &[6144, 3072]),
            ("img_in.weight", &[3072, 64]),
            ("time_in.in_layer.weight", &[3072, 256]),
        ];
        for (name, shape) in expect {
            assert_eq!(shape_of(&shapes, name), Some(shape), "{name}");
        }
        assert!(shape_of(&shapes, "guidance_in.out_layer.bias").is_some());
        assert!(shape_of(&shapes, "double_blocks.19.img_attn.qkv.weight").is_none());
        // FLUX.1-dev: 11,901,408,320 parameters (the "12B" model); 780 tensors in the checkpoint.
        assert_eq!(parameter_count(&Config::flux_dev()), 11_901_408_320);
        assert_eq!(shapes.len(), 780);
        let mut names: Vec<&String> = shapes.iter().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), shapes.len(), "duplicate tensor names");
    }

    #[test]
    fn random_weights_are_deterministic_per_seed_and_cover_every_tensor() -> Result<()> {
        let cfg = Config::tiny();
        let dev = Device::Cpu;
        let a = random_weights(&cfg, 7, &dev)?;
        let b = random_weights(&cfg, 7, &dev)?;
        let c = random_weights(&cfg, 8, &dev)?;
        assert_eq!(a.len(), expected_tensor_shapes(&cfg).len());
        let name = "double_blocks.1.txt_attn.qkv.weight";
        let flat = |m: &HashMap<String, Tensor>| m[name].flatten_all()?.to_vec1::<f32>();
        assert_eq!(flat(&a)?, flat(&b)?);
        assert_ne!(flat(&a)?, flat(&c)?);
        let std = (flat(&a)?.iter().map(|v| v * v).sum::<f32>() / flat(&a)?.len() as f32).sqrt();
        assert!((std - INIT_STD).abs() < 0.002, "std {std}");
        assert_eq!(
            a["single_blocks.0.norm.key_norm.scale"].to_vec1::<f32>()?,
            vec![1.0; 64]
        );
        Ok(())
    }
}
