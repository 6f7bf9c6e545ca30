//! Text conditioning of the tiny default: a small *learned* prompt embedding, trained with the base model.
//!
//! FLUX conditions on T5-XXL token states (`txt`, 512 × 4096) and the CLIP-L pooled vector (`y`, 768). The tiny
//! model keeps the same two inputs at small widths and produces them with no tokenizer file and no download:
//! * words are the lower-cased alphanumeric runs of the prompt, each hashed (FNV-1a) into one of
//!   [`PROMPT_VOCAB`] − 1 buckets (id 0 is padding) — the hashing trick, so any prompt has an encoding;
//! * `txt[i] = token[id_i] + position[i]` for the first [`PROMPT_TOKENS`] words (padding rows use id 0);
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
/// Text tokens per prompt (longer prompts are truncated, shorter padded).
pub const PROMPT_TOKENS: usize = 16;

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

/// Word ids of a prompt: one per lower-cased alphanumeric run, in order, at most [`PROMPT_TOKENS`].
pub fn tokenize(prompt: &str) -> Vec<u32> {
    prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(PROMPT_TOKENS)
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
    /// Text tokens `[B, PROMPT_TOKENS, context_in_dim]`.
    pub txt: Tensor,
    /// Pooled vector `[B, vec_in_dim]`.
    pub y: Tensor,
}

impl PromptEncoder {
    /// Loads the tables (`prompt_embed.*`) from `vb`.
    pub fn load(context_in_dim: usize, vec_in_dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("prompt_embed");
        Ok(Self {
            token: vb.get((PROMPT_VOCAB, context_in_dim), "token.weight")?,
            position: vb.get((PROMPT_TOKENS, context_in_dim), "position.weight")?,
            pooled: vb.get((PROMPT_VOCAB, vec_in_dim), "pooled.weight")?,
        })
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
        let mut ids = Vec::with_capacity(prompts.len() * PROMPT_TOKENS);
        let mut pool_weights = Vec::with_capacity(prompts.len() * PROMPT_TOKENS);
        for p in prompts {
            let words = tokenize(p);
            let n = words.len();
            ids.extend(words.iter().copied().chain(std::iter::repeat_n(0, PROMPT_TOKENS - n)));
            let w = if n == 0 { 0.0 } else { 1.0 / n as f32 };
            pool_weights.extend((0..PROMPT_TOKENS).map(|i| if i < n { w } else { 0.0 }));
        }
        let b = prompts.len();
        let ids = Tensor::from_vec(ids, b * PROMPT_TOKENS, device)?;
        let txt = self
            .token
            .index_select(&ids, 0)?
            .reshape((b, PROMPT_TOKENS, ()))?
            .broadcast_add(&self.position.unsqueeze(0)?)?;
        let pooled = self.pooled.index_select(&ids, 0)?.reshape((b, PROMPT_TOKENS, ()))?;
        let weights = Tensor::from_vec(pool_weights, (b, PROMPT_TOKENS, 1), device)?.to_dtype(pooled.dtype())?;
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
        assert_eq!(tokenize("A red Cat."), tokenize("a  red-cat"));
        assert_ne!(tokenize("a red cat"), tokenize("a cat red"));
        assert!(tokenize("").is_empty());
        let long = "w ".repeat(40);
        assert_eq!(tokenize(&long).len(), PROMPT_TOKENS);
        assert!(
            tokenize("x y z")
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
        let ids = tokenize("red cat");
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
}
