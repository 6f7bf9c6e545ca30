//! FLUX.1 text conditioning: T5-XXL token states for `txt` and the CLIP-L pooled vector for `y`, with the
//! candle-transformers encoders and `tokenizer.json` files given by path.
//!
//! As in BFL's `HFEmbedder`: each prompt is tokenized with truncation and padding to a fixed length (T5: 512
//! for FLUX.1-dev, 256 for schnell; CLIP: 77), the encoders see no attention mask, `txt` is T5's last hidden
//! state and `y` is CLIP's pooled output (the final-layer-normed state at the first end-of-text token, without
//! the projection).

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Tensor};
use candle_transformers::models::clip::text_model::{ClipTextConfig, ClipTextTransformer};
use candle_transformers::models::t5::{self, T5EncoderModel};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::hf::{self, Checkpoint, LoadError};
use super::text::{EncodedPrompts, PromptEncoder};

/// T5 tokens per prompt of FLUX.1-dev (`max_sequence_length`).
pub const FLUX_T5_TOKENS: usize = 512;
/// CLIP's context length.
pub const CLIP_TOKENS: usize = 77;
/// T5's padding token.
pub const T5_PAD: &str = "<pad>";
/// CLIP's end-of-text token (also its padding token in the OpenAI tokenizer).
pub const CLIP_EOT: &str = "<|endoftext|>";

/// Errors encoding prompts with the FLUX text encoders.
#[derive(Debug, thiserror::Error)]
pub enum TextEncodeError {
    /// Tokenization failed.
    #[error("{path}: tokenizing: {message}")]
    Tokenize {
        /// The tokenizer file.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// Tensor error in the encoder.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

fn tokenize(tokenizer: &Tokenizer, path: &Path, prompts: &[&str], device: &Device) -> Result<Tensor, TextEncodeError> {
    let err = |e: tokenizers::Error| TextEncodeError::Tokenize {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let encodings = tokenizer.encode_batch(prompts.to_vec(), true).map_err(err)?;
    let len = encodings.first().map_or(0, |e| e.get_ids().len());
    let ids: Vec<u32> = encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect();
    Ok(Tensor::from_vec(ids, (prompts.len(), len), device)?)
}

/// `tokenizer` set to truncate and pad every text to exactly `max_tokens` with `pad` (HFEmbedder's
/// `padding="max_length", truncation=True`: truncation keeps the end token).
pub fn fixed_length(
    mut tokenizer: Tokenizer,
    max_tokens: usize,
    pad: &str,
    path: &Path,
) -> Result<Tokenizer, LoadError> {
    let pad_id = hf::token_id(&tokenizer, pad, path)?;
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..Default::default()
        }))
        .map_err(|e| LoadError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(max_tokens),
        pad_id,
        pad_token: pad.to_string(),
        ..Default::default()
    }));
    Ok(tokenizer)
}

/// The T5 encoder of FLUX (`txt`).
#[derive(Debug, Clone)]
pub struct T5TextEncoder {
    model: T5EncoderModel,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    max_tokens: usize,
    hidden: usize,
}

impl T5TextEncoder {
    /// Loads T5 from `weights` (a file with T5 v1.1 XXL sizes, or a folder with `config.json` and shards; HF
    /// names `shared.weight`, `encoder.block.N.layer.…`) and `tokenizer` (`tokenizer.json`), producing
    /// `max_tokens` tokens per prompt.
    pub fn load(weights: &Path, tokenizer: &Path, max_tokens: usize, device: &Device) -> Result<Self, LoadError> {
        let ckpt = Checkpoint::open(weights, device)?;
        let cfg = match &ckpt.config {
            Some((path, value)) => hf::t5_config_from_json(value, path)?,
            None => hf::t5_v1_1_xxl(),
        };
        Self::from_checkpoint(&ckpt, &cfg, tokenizer, max_tokens)
    }

    /// Builds the encoder from an opened checkpoint with `cfg`.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        cfg: &t5::Config,
        tokenizer: &Path,
        max_tokens: usize,
    ) -> Result<Self, LoadError> {
        if max_tokens == 0 {
            return Err(LoadError::Tokenizer {
                path: tokenizer.to_path_buf(),
                message: "T5 needs at least one token per prompt".into(),
            });
        }
        let model = T5EncoderModel::load(ckpt.vb.clone(), cfg).map_err(|e| ckpt.model_err(e))?;
        let tok = fixed_length(hf::load_tokenizer(tokenizer)?, max_tokens, T5_PAD, tokenizer)?;
        Ok(Self {
            model,
            tokenizer: tok,
            tokenizer_path: tokenizer.to_path_buf(),
            max_tokens,
            hidden: cfg.d_model,
        })
    }

    /// Width of one token state (4096 for T5-XXL).
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Tokens per prompt.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Last hidden states `[B, max_tokens, hidden]`.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor, TextEncodeError> {
        let ids = tokenize(&self.tokenizer, &self.tokenizer_path, prompts, self.model.device())?;
        // `forward` takes `&mut self` for the decoder's KV cache; the encoder keeps none, and a clone shares the
        // weights, so encoding needs no lock.
        Ok(self.model.clone().forward(&ids)?)
    }
}

/// The CLIP text tower of FLUX (`y`): pooled output at the first end-of-text token.
#[derive(Debug, Clone)]
pub struct ClipTextEncoder {
    model: ClipTextTransformer,
    tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    eot_id: u32,
    hidden: usize,
    device: Device,
}

impl ClipTextEncoder {
    /// Loads the CLIP text tower from `weights` (a file with CLIP-L sizes, or a folder with `config.json`;
    /// HF names `text_model.*`, as in a `CLIPTextModel` saved by transformers 4.x or a full `CLIPModel`, or without
    /// the prefix, as transformers 5.x saves a `CLIPTextModel`) and `tokenizer`.
    pub fn load(weights: &Path, tokenizer: &Path, device: &Device) -> Result<Self, LoadError> {
        let ckpt = Checkpoint::open(weights, device)?;
        let cfg = match &ckpt.config {
            Some((path, value)) => hf::clip_text_config_from_json(value, path)?,
            None => hf::clip_l_text(),
        };
        Self::from_checkpoint(&ckpt, &cfg, tokenizer, device)
    }

    /// Builds the tower from an opened checkpoint with `cfg`.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        cfg: &ClipTextConfig,
        tokenizer: &Path,
        device: &Device,
    ) -> Result<Self, LoadError> {
        // transformers 4.x saves a `CLIPTextModel` (FLUX.1-dev's `text_encoder/`) under `text_model.`; 5.x saves it
        // without the prefix.
        let vb = if ckpt.vb.contains_tensor("embeddings.token_embedding.weight") {
            ckpt.vb.clone()
        } else {
            ckpt.vb.pp("text_model")
        };
        let model = ClipTextTransformer::new(vb, cfg).map_err(|e| ckpt.model_err(e))?;
        let raw = hf::load_clip_tokenizer(tokenizer)?;
        let eot_id = hf::token_id(&raw, CLIP_EOT, tokenizer)?;
        let tok = fixed_length(raw, cfg.max_position_embeddings, CLIP_EOT, tokenizer)?;
        Ok(Self {
            model,
            tokenizer: tok,
            tokenizer_path: tokenizer.to_path_buf(),
            eot_id,
            hidden: cfg.embed_dim,
            device: device.clone(),
        })
    }

    /// Width of the pooled vector (768 for CLIP-L).
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Pooled outputs `[B, hidden]` (before any projection).
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor, TextEncodeError> {
        let ids = tokenize(&self.tokenizer, &self.tokenizer_path, prompts, &self.device)?;
        let states = self.model.forward_with_mask(&ids, usize::MAX)?;
        let rows = ids.to_vec2::<u32>()?;
        let pooled = rows
            .iter()
            .enumerate()
            .map(|(b, row)| {
                // Truncation keeps the end-of-text token, so it is always there; the last position is a guard.
                let at = row
                    .iter()
                    .position(|&id| id == self.eot_id)
                    .unwrap_or(row.len().saturating_sub(1));
                states.i((b, at))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&pooled, 0)?)
    }
}

/// Where prompt embeddings come from: the tiny base's learned tables or FLUX's T5 + CLIP.
#[derive(Debug, Clone, Copy)]
pub enum TextConditioner<'a> {
    /// The tiny default's learned tables ([`PromptEncoder`]).
    Learned(&'a PromptEncoder),
    /// FLUX: T5 states for `txt`, CLIP pooled vector for `y`.
    Flux {
        /// T5 encoder.
        t5: &'a T5TextEncoder,
        /// CLIP text tower.
        clip: &'a ClipTextEncoder,
    },
}

impl TextConditioner<'_> {
    /// Encodes a batch of prompts into the MMDiT's `txt` `[B, L, ctx]` and `y` `[B, vec]`.
    pub fn encode(&self, prompts: &[&str]) -> Result<EncodedPrompts, TextEncodeError> {
        match self {
            Self::Learned(p) => Ok(p.encode(prompts)?),
            Self::Flux { t5, clip } => Ok(EncodedPrompts {
                txt: t5.encode(prompts)?,
                y: clip.encode(prompts)?,
            }),
        }
    }
}

/// FLUX's two text encoders, as carried by a base model.
#[derive(Debug, Clone)]
pub struct FluxTextEncoders {
    /// T5 (`txt`).
    pub t5: T5TextEncoder,
    /// CLIP (`y`).
    pub clip: ClipTextEncoder,
}

impl FluxTextEncoders {
    /// The conditioner over these encoders.
    pub fn conditioner(&self) -> TextConditioner<'_> {
        TextConditioner::Flux {
            t5: &self.t5,
            clip: &self.clip,
        }
    }
}

/// Tiny T5 / CLIP checkpoints in the HF folder layout, with their tokenizers: for tests and for trying a FLUX-format
/// backbone without downloads ([`crate::model::testing::write_tiny_flux_folder`]).
pub mod testing {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor};

    use super::*;

    /// Words of the test tokenizers.
    pub const WORDS: &[&str] = &["a", "red", "cat", "and", "blue", "dog", "on", "grass"];

    /// Random values (std 0.2) for every tensor `build` asks for, with candle-transformers' own names.
    pub fn random_named(
        seed: u64,
        build: impl FnOnce(candle_nn::VarBuilder) -> candle_core::Result<()>,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        crate::model::testing::random_named_weights(seed, 0.2, &Device::Cpu, build)
    }

    /// A tiny T5 config (gated GELU like v1.1).
    pub fn tiny_t5_config() -> serde_json::Value {
        serde_json::json!({
            "vocab_size": 16, "d_model": 24, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_heads": 3,
            "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16, "dropout_rate": 0.0,
            "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false, "is_encoder_decoder": true, "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0
        })
    }

    /// A tiny CLIP config (both towers).
    pub fn tiny_clip_config() -> serde_json::Value {
        serde_json::json!({
            "projection_dim": 12,
            "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                            "num_hidden_layers": 2, "vocab_size": 16, "max_position_embeddings": 10,
                            "hidden_act": "quick_gelu"},
            "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                              "num_hidden_layers": 1, "image_size": 28, "patch_size": 14,
                              "hidden_act": "quick_gelu"}
        })
    }

    /// Writes `dir/{config.json, model.safetensors, tokenizer.json}` for a tiny T5 encoder.
    pub fn write_tiny_t5(dir: &Path, seed: u64) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = tiny_t5_config();
        let cfg = hf::t5_config_from_json(&json, Path::new("config.json"))?;
        let mut w = random_named(seed, |vb| T5EncoderModel::load(vb, &cfg).map(|_| ()))?;
        // Built over an empty VarMap, candle names the embedding `encoder.embed_tokens`; HF files call it `shared`.
        if let Some(e) = w.remove("encoder.embed_tokens.weight") {
            w.insert("shared.weight".into(), e);
        }
        std::fs::write(dir.join("config.json"), serde_json::to_string(&json)?)?;
        candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
        hf::write_test_tokenizer(
            &dir.join("tokenizer.json"),
            &["<pad>", "</s>", "<unk>"],
            WORDS,
            None,
            "</s>",
        )
    }

    /// Writes `dir/{config.json, model.safetensors, tokenizer.json}` for a tiny full CLIP model (both towers and
    /// projections); the FLUX text encoder reads only `text_model.*` from it.
    pub fn write_tiny_clip(dir: &Path, seed: u64) -> anyhow::Result<()> {
        use candle_transformers::models::clip::vision_model::ClipVisionTransformer;
        std::fs::create_dir_all(dir)?;
        let json = tiny_clip_config();
        let p = Path::new("config.json");
        let (text, vision) = (
            hf::clip_text_config_from_json(&json, p)?,
            hf::clip_vision_config_from_json(&json, p)?,
        );
        let mut w = random_named(seed, |vb| {
            ClipTextTransformer::new(vb.pp("text_model"), &text)?;
            ClipVisionTransformer::new(vb.pp("vision_model"), &vision)?;
            candle_nn::linear_no_bias(text.embed_dim, text.projection_dim, vb.pp("text_projection"))?;
            candle_nn::linear_no_bias(vision.embed_dim, vision.projection_dim, vb.pp("visual_projection"))?;
            Ok(())
        })?;
        // candle-transformers replaces a missing class embedding with random values instead of asking the
        // VarBuilder, so it is added by hand.
        w.insert(
            "vision_model.embeddings.class_embedding".into(),
            crate::model::testing::random_tensor(&[vision.embed_dim], 0.2, seed, &Device::Cpu)?,
        );
        std::fs::write(dir.join("config.json"), serde_json::to_string(&json)?)?;
        candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
        hf::write_test_tokenizer(
            &dir.join("tokenizer.json"),
            &["<unk>", "<|startoftext|>", CLIP_EOT],
            WORDS,
            Some("<|startoftext|>"),
            CLIP_EOT,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn t5_and_clip_encode_fixed_length_states_and_pooled_vectors() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (t5_dir, clip_dir) = (dir.path().join("t5"), dir.path().join("clip"));
        write_tiny_t5(&t5_dir, 1)?;
        write_tiny_clip(&clip_dir, 2)?;
        let dev = Device::Cpu;
        let t5 = T5TextEncoder::load(&t5_dir, &t5_dir.join("tokenizer.json"), 6, &dev)?;
        let clip = ClipTextEncoder::load(&clip_dir, &clip_dir.join("tokenizer.json"), &dev)?;
        let enc = TextConditioner::Flux { t5: &t5, clip: &clip };
        let out = enc.encode(&["a red cat", "a blue dog on grass and a red cat and a dog", "A RED CAT"])?;
        assert_eq!(out.txt.dims(), &[3, 6, 24]);
        assert_eq!(out.y.dims(), &[3, 16]);
        let txt = out.txt.to_vec3::<f32>()?;
        let y = out.y.to_vec2::<f32>()?;
        assert!(txt.iter().flatten().flatten().all(|v| v.is_finite()));
        assert_eq!(txt[0], txt[2], "the tokenizer lower-cases");
        assert_eq!(y[0], y[2]);
        assert_ne!(y[0], y[1]);
        // A prompt encodes the same alone or in a batch.
        let alone = clip.encode(&["a red cat"])?.to_vec2::<f32>()?;
        let max_diff = alone[0]
            .iter()
            .zip(&y[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-5, "{max_diff}");
        Ok(())
    }

    #[test]
    fn text_encoder_errors_name_the_file_and_the_tensor() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let t5_dir = dir.path().join("t5");
        write_tiny_t5(&t5_dir, 3)?;
        let tok = t5_dir.join("tokenizer.json");
        // A single file is read with the T5-XXL preset: the shapes do not match and the error says which.
        let err = T5TextEncoder::load(&t5_dir.join("model.safetensors"), &tok, 8, &Device::Cpu)
            .expect_err("preset sizes")
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("shared.weight"),
            "{err}"
        );
        let missing_tok = dir.path().join("nope.json");
        let err = T5TextEncoder::load(&t5_dir, &missing_tok, 8, &Device::Cpu).expect_err("no tokenizer");
        assert!(err.to_string().contains("nope.json"), "{err}");
        let clip_dir = dir.path().join("clip");
        write_tiny_clip(&clip_dir, 4)?;
        // The T5 tokenizer has no end-of-text token: CLIP cannot pool.
        let err = ClipTextEncoder::load(&clip_dir, &tok, &Device::Cpu)
            .expect_err("wrong tokenizer")
            .to_string();
        assert!(err.contains("tokenizer.json") && err.contains(CLIP_EOT), "{err}");
        Ok(())
    }
}
