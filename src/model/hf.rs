//! Pretrained encoders in the Hugging Face layout (T5, CLIP): configs, presets and `tokenizer.json` files,
//! shared by the FLUX text encoders ([`super::flux_text`]) and the eval embedders (`eval::pretrained`).
//!
//! Weights are given by path: a single `*.safetensors` file is read with the named preset's sizes; a folder is
//! read the way `transformers` saves a model: `config.json` for the sizes and every `*.safetensors` shard in it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use candle_transformers::models::t5;
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::weights::{WeightsError, safetensors_files, var_builder};

/// A pretrained encoder that cannot be loaded; each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The checkpoint cannot be opened.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The checkpoint does not fit the model (the message names the missing or mis-shaped tensor).
    #[error("{path}: {source}")]
    Model {
        /// File or folder.
        path: PathBuf,
        /// Cause.
        source: candle_core::Error,
    },
    /// `config.json` cannot be read or describes something this code cannot run.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer file cannot be read or lacks a token the model needs.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The `tokenizer.json`.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl LoadError {
    /// The file or folder the error is about.
    pub fn path(&self) -> PathBuf {
        match self {
            Self::Weights(WeightsError::Io { path, .. } | WeightsError::Format { path, .. })
            | Self::Weights(WeightsError::NoShards(path))
            | Self::Model { path, .. }
            | Self::Config { path, .. }
            | Self::Tokenizer { path, .. } => path.clone(),
        }
    }
}

/// A checkpoint opened by path: its `VarBuilder` and, for a folder, its `config.json`.
pub struct Checkpoint {
    /// The weights (f32).
    pub vb: VarBuilder<'static>,
    /// `config.json` of a folder checkpoint; `None` for a single file.
    pub config: Option<(PathBuf, serde_json::Value)>,
    /// The path as given (reported in errors).
    pub path: PathBuf,
}

impl Checkpoint {
    /// Opens a `*.safetensors` file or a folder (`config.json` + shards).
    pub fn open(path: &Path, device: &Device) -> Result<Self, LoadError> {
        let files = safetensors_files(path)?;
        let vb = var_builder(&files, DType::F32, device)?;
        let config = if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| LoadError::Config {
                path: cfg_path.clone(),
                message: format!("a checkpoint folder needs its config.json: {e}"),
            })?;
            let value = serde_json::from_str(&text).map_err(|e| LoadError::Config {
                path: cfg_path.clone(),
                message: e.to_string(),
            })?;
            Some((cfg_path, value))
        } else {
            None
        };
        Ok(Self {
            vb,
            config,
            path: path.to_path_buf(),
        })
    }

    /// Maps a candle error from building the model into a [`LoadError::Model`] naming this checkpoint.
    pub fn model_err(&self, source: candle_core::Error) -> LoadError {
        LoadError::Model {
            path: self.path.clone(),
            source,
        }
    }

    /// Fails with a message naming `name` when the checkpoint lacks it (for tensors that candle-transformers
    /// would otherwise replace with random values, such as CLIP's `class_embedding`).
    pub fn require(&self, name: &str) -> Result<(), LoadError> {
        if self.vb.contains_tensor(name) {
            Ok(())
        } else {
            Err(self.model_err(candle_core::Error::Msg(format!("cannot find tensor {name}"))))
        }
    }
}

/// Loads a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, LoadError> {
    Tokenizer::from_file(path).map_err(|e| LoadError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

use super::flux_text::CLIP_EOT;
/// CLIP's start-of-text token.
const CLIP_SOT: &str = "<|startoftext|>";

/// CLIP's byte-level BPE tokenizer from `vocab.json` + `merges.txt` (the `tokenizer/` folder of FLUX.1, which
/// has no `tokenizer.json`), built exactly as transformers' `CLIPTokenizer` builds it from those two files: NFC,
/// whitespace runs → one space, lower case; split into CLIP's word / digit / punctuation pieces; byte-level;
/// BPE with the `</w>` end-of-word suffix; `<|startoftext|> … <|endoftext|>` around each text.
pub fn clip_bpe_tokenizer(vocab: &Path, merges: &Path) -> Result<Tokenizer, LoadError> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormSeq};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::processors::roberta::RobertaProcessing;
    use tokenizers::{AddedToken, SplitDelimiterBehavior};
    let fail = |path: &Path, message: String| LoadError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let (Some(v), Some(m)) = (vocab.to_str(), merges.to_str()) else {
        return Err(fail(vocab, "the path is not UTF-8".into()));
    };
    let bpe = BPE::from_file(v, m)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .unk_token(CLIP_EOT.into())
        .build()
        .map_err(|e| fail(vocab, format!("with {}: {e}", merges.display())))?;
    let mut tok = Tokenizer::new(bpe);
    let replace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| fail(vocab, e.to_string()))?;
    tok.with_normalizer(Some(NormSeq::new(vec![NFC.into(), replace.into(), Lowercase.into()])))
        .map_err(|e| fail(vocab, e.to_string()))?;
    let split = Split::new(
        SplitPattern::Regex(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+".into(),
        ),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| fail(vocab, e.to_string()))?;
    tok.with_pre_tokenizer(Some(PreSeq::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens([AddedToken::from(CLIP_SOT, true), AddedToken::from(CLIP_EOT, true)])
        .map_err(|e| fail(vocab, e.to_string()))?;
    let sot = token_id(&tok, CLIP_SOT, vocab)?;
    let eot = token_id(&tok, CLIP_EOT, vocab)?;
    tok.with_post_processor(Some(
        RobertaProcessing::new((CLIP_EOT.into(), eot), (CLIP_SOT.into(), sot))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    Ok(tok)
}

/// CLIP's tokenizer at `path`: a `tokenizer.json`, or a folder holding one, or a folder (or its `vocab.json`) with
/// `vocab.json` + `merges.txt` as FLUX.1's `tokenizer/` ([`clip_bpe_tokenizer`]).
pub fn load_clip_tokenizer(path: &Path) -> Result<Tokenizer, LoadError> {
    let dir = if path.is_dir() {
        Some(path)
    } else if path.file_name().is_some_and(|n| n == "vocab.json") {
        path.parent()
    } else {
        None
    };
    match dir {
        Some(d) if d.join("tokenizer.json").is_file() => load_tokenizer(&d.join("tokenizer.json")),
        Some(d) => {
            let (vocab, merges) = (d.join("vocab.json"), d.join("merges.txt"));
            for f in [&vocab, &merges] {
                if !f.is_file() {
                    return Err(LoadError::Tokenizer {
                        path: f.clone(),
                        message: "not found: a CLIP tokenizer folder holds tokenizer.json, or vocab.json + \
                                  merges.txt"
                            .into(),
                    });
                }
            }
            clip_bpe_tokenizer(&vocab, &merges)
        }
        None => load_tokenizer(path),
    }
}

/// The id of `token` in `tokenizer`, or an error naming the file and the token.
pub fn token_id(tokenizer: &Tokenizer, token: &str, path: &Path) -> Result<u32, LoadError> {
    tokenizer.token_to_id(token).ok_or_else(|| LoadError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("the tokenizer has no `{token}` token"),
    })
}

/// Google's T5 v1.1 XXL encoder (`text_encoder_2` of FLUX.1), as in its `config.json`.
pub fn t5_v1_1_xxl() -> t5::Config {
    t5::Config {
        vocab_size: 32128,
        d_model: 4096,
        d_kv: 64,
        d_ff: 10240,
        num_layers: 24,
        num_decoder_layers: Some(24),
        num_heads: 64,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        dropout_rate: 0.1,
        layer_norm_epsilon: 1e-6,
        initializer_factor: 1.0,
        feed_forward_proj: t5::ActivationWithOptionalGating {
            gated: true,
            activation: candle_nn::Activation::NewGelu,
        },
        tie_word_embeddings: false,
        is_decoder: false,
        is_encoder_decoder: true,
        use_cache: false,
        pad_token_id: 0,
        eos_token_id: 1,
        decoder_start_token_id: Some(0),
    }
}

/// A T5 config from a `config.json` value.
pub fn t5_config_from_json(value: &serde_json::Value, path: &Path) -> Result<t5::Config, LoadError> {
    t5::Config::deserialize(value).map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        message: format!("not a T5 config: {e}"),
    })
}

/// OpenAI CLIP ViT-L/14 text tower (`text_encoder` of FLUX.1): width 768, 12 layers of 12 heads, projection 768.
pub fn clip_l_text() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        embed_dim: 768,
        activation: Activation::QuickGelu,
        intermediate_size: 3072,
        max_position_embeddings: 77,
        pad_with: None,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        projection_dim: 768,
    }
}

/// OpenAI CLIP ViT-L/14 vision tower at 224 px (`openai/clip-vit-large-patch14`).
pub fn clip_l_vision() -> ClipVisionConfig {
    ClipVisionConfig {
        embed_dim: 1024,
        activation: Activation::QuickGelu,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        projection_dim: 768,
        num_channels: 3,
        image_size: 224,
        patch_size: 14,
    }
}

#[derive(Deserialize)]
struct HfClipTower {
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    projection_dim: Option<usize>,
    // Text tower only.
    #[serde(default)]
    vocab_size: Option<usize>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    // Vision tower only.
    #[serde(default)]
    image_size: Option<usize>,
    #[serde(default)]
    patch_size: Option<usize>,
    #[serde(default)]
    num_channels: Option<usize>,
}

fn clip_tower(value: &serde_json::Value, key: &str, path: &Path) -> Result<HfClipTower, LoadError> {
    let config_err = |message: String| LoadError::Config {
        path: path.to_path_buf(),
        message,
    };
    // A full CLIPModel config nests the towers; a CLIPTextModel / CLIPVisionModel config is the tower itself.
    let tower = value.get(key).unwrap_or(value);
    let mut t = HfClipTower::deserialize(tower).map_err(|e| config_err(format!("{key}: {e}")))?;
    if let Some(act) = t.hidden_act.as_deref()
        && act != "quick_gelu"
    {
        return Err(config_err(format!(
            "{key}.hidden_act = `{act}`: candle-transformers' CLIP supports only quick_gelu"
        )));
    }
    // A full CLIPModel's projections are sized by its top-level `projection_dim`; the towers' own entry is
    // transformers' default (512) unless the saving version wrote the real value there too.
    let top = value
        .get(key)
        .and(value.get("projection_dim"))
        .and_then(serde_json::Value::as_u64)
        .map(|v| v as usize);
    if top.is_some() {
        t.projection_dim = top;
    } else if t.projection_dim.is_none() {
        t.projection_dim = value
            .get("projection_dim")
            .and_then(serde_json::Value::as_u64)
            .map(|v| v as usize);
    }
    Ok(t)
}

/// The CLIP text tower described by a `config.json` (a `CLIPModel` or `CLIPTextModel` config).
pub fn clip_text_config_from_json(value: &serde_json::Value, path: &Path) -> Result<ClipTextConfig, LoadError> {
    let t = clip_tower(value, "text_config", path)?;
    let preset = clip_l_text();
    Ok(ClipTextConfig {
        vocab_size: t.vocab_size.unwrap_or(preset.vocab_size),
        embed_dim: t.hidden_size,
        activation: Activation::QuickGelu,
        intermediate_size: t.intermediate_size,
        max_position_embeddings: t.max_position_embeddings.unwrap_or(preset.max_position_embeddings),
        pad_with: None,
        num_hidden_layers: t.num_hidden_layers,
        num_attention_heads: t.num_attention_heads,
        projection_dim: t.projection_dim.unwrap_or(t.hidden_size),
    })
}

/// The CLIP vision tower described by a `config.json` (a `CLIPModel` or `CLIPVisionModel` config).
pub fn clip_vision_config_from_json(value: &serde_json::Value, path: &Path) -> Result<ClipVisionConfig, LoadError> {
    let t = clip_tower(value, "vision_config", path)?;
    let preset = clip_l_vision();
    Ok(ClipVisionConfig {
        embed_dim: t.hidden_size,
        activation: Activation::QuickGelu,
        intermediate_size: t.intermediate_size,
        num_hidden_layers: t.num_hidden_layers,
        num_attention_heads: t.num_attention_heads,
        projection_dim: t.projection_dim.unwrap_or(preset.projection_dim),
        num_channels: t.num_channels.unwrap_or(3),
        image_size: t.image_size.unwrap_or(preset.image_size),
        patch_size: t.patch_size.unwrap_or(preset.patch_size),
    })
}

/// Writes a tiny `tokenizer.json` for tests: a lower-casing whitespace WordLevel tokenizer over `words`, with
/// `special` tokens first (ids 0, 1, …) and a template that wraps each text as `prefix $A suffix`.
pub fn write_test_tokenizer(
    path: &Path,
    special: &[&str],
    words: &[&str],
    prefix: Option<&str>,
    suffix: &str,
) -> anyhow::Result<()> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::normalizers::Lowercase;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    let vocab: std::collections::HashMap<String, u32> = special
        .iter()
        .chain(words)
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let id = |t: &str| vocab.get(t).copied().ok_or_else(|| anyhow::anyhow!("no `{t}`"));
    let model = WordLevel::builder()
        .vocab(vocab.clone().into_iter().collect())
        .unk_token(special.first().map_or("<unk>", |s| *s).to_string())
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let template = match prefix {
        Some(p) => format!("{p} $A {suffix}"),
        None => format!("$A {suffix}"),
    };
    let mut specials = vec![(suffix.to_string(), id(suffix)?)];
    if let Some(p) = prefix {
        specials.push((p.to_string(), id(p)?));
    }
    let post = TemplateProcessing::builder()
        .try_single(template.as_str())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(Lowercase))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.with_pre_tokenizer(Some(Whitespace));
    tok.with_post_processor(Some(post));
    tok.save(path, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_configs_read_nested_and_flat_json() -> anyhow::Result<()> {
        let nested = serde_json::json!({
            "projection_dim": 16,
            "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                            "num_hidden_layers": 1, "vocab_size": 20, "max_position_embeddings": 8,
                            "hidden_act": "quick_gelu"},
            "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 3,
                              "num_hidden_layers": 2, "image_size": 28, "patch_size": 14}
        });
        let p = Path::new("config.json");
        let text = clip_text_config_from_json(&nested, p)?;
        assert_eq!((text.embed_dim, text.vocab_size, text.projection_dim), (32, 20, 16));
        let vision = clip_vision_config_from_json(&nested, p)?;
        assert_eq!(
            (vision.embed_dim, vision.image_size, vision.projection_dim),
            (48, 28, 16)
        );
        let flat = serde_json::json!({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                      "num_hidden_layers": 1, "hidden_act": "gelu"});
        let err = clip_text_config_from_json(&flat, p).expect_err("gelu").to_string();
        assert!(err.contains("config.json") && err.contains("quick_gelu"), "{err}");
        Ok(())
    }
}
