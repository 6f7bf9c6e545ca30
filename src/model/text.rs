//! Text conditioning of the tiny default: a small *learned* prompt embedding, trained with the base model.
//!
//! FLUX conditions on T5-XXL token states (`txt`, 512 × 4096) and the CLIP-L pooled vector (`y`, 768). The tiny
//! model keeps the same two inputs at small widths and produces them with no tokenizer file and no download:
//! * words are the lower-cased alphanumeric runs of the prompt, each hashed (FNV-1a) into one of
//!   [`PROMPT_VOCAB`] − 1 buckets (id 0 is padding) — the hashing trick, so any prompt has an encoding;
//! * `txt[i] = token[id_i] + position[i]` for the first `L` words, `L` = the rows of the position table
//!   ([`PROMPT_TOKENS`] for new bases; padding rows use id 0; longer prompts are truncated);
//! * `y = mean of pooled[id]` over the real words (zeros for an empty prompt).
//!
//! The three tables are plain tensors stored with the base (`prompt_embed.{token,position,pooled}.weight`),
//! learned by `focusdpo pretrain` and frozen during preference optimisation.
//!
//! Not wired: the T5 / CLIP encoders for FLUX. A FLUX checkpoint has no prompt tables, and a run on it fails with
//! a clear error until precomputed embeddings or the encoders are supported (see `docs/backbone.md`).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Hash buckets of the word table (id 0 = padding).
pub const PROMPT_VOCAB: usize = 2048;
/// Text tokens per prompt of a new base (longer prompts are truncated, shorter padded). The synthetic DIP's
/// longest prompts (three subjects with attributes, background and light) have 36 words; 16, the first choice,
/// cut the background and light off three prompts in four. A loaded base keeps the length of its position table.
pub const PROMPT_TOKENS: usize = 40;

/// Largest accepted position table (text tokens per prompt) of a loaded base.
const MAX_PROMPT_TOKENS: usize = 512;

/// Tensor names of the prompt tables with their shapes, for a model with `context_in_dim` and `vec_in_dim`.
pub fn prompt_tensor_shapes(context_in_dim: usize, vec_in_dim: usize) -> Vec<(String, Vec<usize>)> {
    vec![
        ("prompt_embed.token.weight".into(), vec![PROMPT_VOCAB, context_in_dim]),
        (
            "prompt_embed.position.weight".into(),
            vec![PROMPT_TOKENS, context_in_dim],
        ),
        ("prompt_embed.pooled.weight".into(), vec![PROMPT_VOCAB, vec_in_dim]),
    ]
}

fn fnv1a(word: &str) -> u64 {
    word.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Word ids of a prompt: one per lower-cased alphanumeric run, in order, at most `max_tokens`.
pub fn tokenize(prompt: &str, max_tokens: usize) -> Vec<u32> {
    prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(max_tokens)
        .map(|w| 1 + (fnv1a(&w.to_lowercase()) % (PROMPT_VOCAB as u64 - 1)) as u32)
        .collect()
}

/// The learned prompt embedding of the tiny base.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    token: Tensor,
    position: Tensor,
    pooled: Tensor,
}

/// Encoded prompts: the two conditioning inputs of the MMDiT.
#[derive(Debug, Clone)]
pub struct EncodedPrompts {
    /// Text tokens `[B, L, context_in_dim]` (`L` = [`PromptEncoder::max_tokens`]).
    pub txt: Tensor,
    /// Pooled vector `[B, vec_in_dim]`.
    pub y: Tensor,
}

impl PromptEncoder {
    /// Loads the tables (`prompt_embed.*`) from `vb`; the prompt length is the position table's row count.
    pub fn load(context_in_dim: usize, vec_in_dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("prompt_embed");
        // A file's table has its own length. A `VarMap` (pretraining) has no `get_unchecked`: it holds the table at
        // the default length, or creates it there. When both reads fail, the file's error is the one reported.
        let position = match vb.get_unchecked("position.weight") {
            Ok(t) => t,
            Err(first) => vb
                .get((PROMPT_TOKENS, context_in_dim), "position.weight")
                .map_err(|second| {
                    if vb.contains_tensor("position.weight") {
                        first
                    } else {
                        second
                    }
                })?,
        };
        match position.dims() {
            &[n, c] if (1..=MAX_PROMPT_TOKENS).contains(&n) && c == context_in_dim => {}
            d => candle_core::bail!(
                "prompt_embed.position.weight has shape {d:?}, expected [L, {context_in_dim}] with L in 1..={MAX_PROMPT_TOKENS}"
            ),
        }
        Ok(Self {
            token: vb.get((PROMPT_VOCAB, context_in_dim), "token.weight")?,
            position: position.to_dtype(vb.dtype())?,
            pooled: vb.get((PROMPT_VOCAB, vec_in_dim), "pooled.weight")?,
        })
    }

    /// Text tokens per prompt (rows of the position table).
    pub fn max_tokens(&self) -> usize {
        self.position.dims().first().copied().unwrap_or(0)
    }

    /// Wraps existing tables (for training them: pass `Var` tensors).
    pub fn new(token: Tensor, position: Tensor, pooled: Tensor) -> Self {
        Self {
            token,
            position,
            pooled,
        }
    }

    /// The tables, in [`prompt_tensor_shapes`] order.
    pub fn tensors(&self) -> [&Tensor; 3] {
        [&self.token, &self.position, &self.pooled]
    }

    /// Encodes a batch of prompts.
    pub fn encode(&self, prompts: &[&str]) -> Result<EncodedPrompts> {
        let device = self.token.device();
        let l = self.max_tokens();
        let mut ids = Vec::with_capacity(prompts.len() * l);
        let mut pool_weights = Vec::with_capacity(prompts.len() * l);
        for p in prompts {
            let words = tokenize(p, l);
            let n = words.len();
            ids.extend(words.iter().copied().chain(std::iter::repeat_n(0, l - n)));
            let w = if n == 0 { 0.0 } else { 1.0 / n as f32 };
            pool_weights.extend((0..l).map(|i| if i < n { w } else { 0.0 }));
        }
        let b = prompts.len();
        let ids = Tensor::from_vec(ids, b * l, device)?;
        let txt = self
            .token
            .index_select(&ids, 0)?
            .reshape((b, l, ()))?
            .broadcast_add(&self.position.unsqueeze(0)?)?;
        let pooled = self.pooled.index_select(&ids, 0)?.reshape((b, l, ()))?;
        let weights = Tensor::from_vec(pool_weights, (b, l, 1), device)?.to_dtype(pooled.dtype())?;
        let y = pooled.broadcast_mul(&weights)?.sum(1)?;
        Ok(EncodedPrompts { txt, y })
    }
}

/// Random prompt tables (normal, std 0.02 for words, 0.01 for positions), deterministic per seed.
pub fn random_prompt_tables(
    context_in_dim: usize,
    vec_in_dim: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    prompt_tensor_shapes(context_in_dim, vec_in_dim)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let std = if name.contains("position") { 0.01 } else { 0.02 };
            let t = super::testing::random_tensor(&shape, std, seed ^ (0x7e57 + i as u64), device)?;
            Ok((name, t.to_dtype(DType::F32)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_is_case_and_punctuation_insensitive_and_truncates() {
        assert_eq!(tokenize("A red Cat.", 16), tokenize("a  red-cat", 16));
        assert_ne!(tokenize("a red cat", 16), tokenize("a cat red", 16));
        assert!(tokenize("", 16).is_empty());
        let long = "w ".repeat(60);
        assert_eq!(tokenize(&long, PROMPT_TOKENS).len(), PROMPT_TOKENS);
        assert_eq!(tokenize(&long, 16).len(), 16);
        assert!(
            tokenize("x y z", 16)
                .iter()
                .all(|&id| id >= 1 && (id as usize) < PROMPT_VOCAB)
        );
    }

    #[test]
    fn encode_adds_positions_and_pools_over_real_words() -> Result<()> {
        let dev = Device::Cpu;
        let tables = random_prompt_tables(4, 3, 7, &dev)?;
        let [token, position, pooled] = [&tables[0].1, &tables[1].1, &tables[2].1];
        let enc = PromptEncoder::new(token.clone(), position.clone(), pooled.clone());
        let out = enc.encode(&["red cat", ""])?;
        assert_eq!(out.txt.dims(), &[2, PROMPT_TOKENS, 4]);
        assert_eq!(out.y.dims(), &[2, 3]);
        let ids = tokenize("red cat", PROMPT_TOKENS);
        let tok = token.to_vec2::<f32>()?;
        let pos = position.to_vec2::<f32>()?;
        let pool = pooled.to_vec2::<f32>()?;
        let txt = out.txt.to_vec3::<f32>()?;
        let y = out.y.to_vec2::<f32>()?;
        for c in 0..4 {
            let want = tok[ids[1] as usize][c] + pos[1][c];
            assert!((txt[0][1][c] - want).abs() < 1e-6);
            let pad = tok[0][c] + pos[5][c];
            assert!((txt[0][5][c] - pad).abs() < 1e-6);
        }
        for c in 0..3 {
            let want = (pool[ids[0] as usize][c] + pool[ids[1] as usize][c]) / 2.0;
            assert!((y[0][c] - want).abs() < 1e-6);
            assert_eq!(y[1][c], 0.0, "an empty prompt pools to zero");
        }
        Ok(())
    }

    /// A base saved with 16-token tables (the first bundled format) loads and encodes 16 tokens; a table of the
    /// wrong width is an error.
    #[test]
    fn the_prompt_length_comes_from_the_position_table() -> Result<()> {
        let dev = Device::Cpu;
        let mut tables: std::collections::HashMap<String, Tensor> =
            random_prompt_tables(4, 3, 7, &dev)?.into_iter().collect();
        tables.insert(
            "prompt_embed.position.weight".into(),
            Tensor::zeros((16, 4), DType::F32, &dev)?,
        );
        let vb = VarBuilder::from_tensors(tables.clone(), DType::F32, &dev);
        let enc = PromptEncoder::load(4, 3, vb)?;
        assert_eq!(enc.max_tokens(), 16);
        assert_eq!(enc.encode(&["a b"])?.txt.dims(), &[1, 16, 4]);
        tables.insert(
            "prompt_embed.position.weight".into(),
            Tensor::zeros((16, 5), DType::F32, &dev)?,
        );
        let vb = VarBuilder::from_tensors(tables, DType::F32, &dev);
        assert!(PromptEncoder::load(4, 3, vb).is_err());
        Ok(())
    }
}
