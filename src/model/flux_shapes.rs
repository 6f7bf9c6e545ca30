//! The sizes of a FLUX-format MMDiT read from its tensor shapes, for checkpoints without our metadata: FLUX.1-dev,
//! FLUX.1-schnell and smaller FLUX-format models, with or without the `model.diffusion_model.` prefix that
//! ComfyUI-style single files carry.
//!
//! | size | read from |
//! |---|---|
//! | `hidden_size`, `in_channels` | `img_in.weight` `[H, C]` |
//! | `context_in_dim` | `txt_in.weight` `[H, T]` |
//! | `vec_in_dim` | `vector_in.in_layer.weight` `[H, V]` |
//! | `depth`, `depth_single_blocks` | the distinct indices `N` of `double_blocks.N.*` / `single_blocks.N.*` |
//! | `mlp_ratio` | `double_blocks.0.img_mlp.0.weight` `[M, H]` (or `single_blocks.0.linear1` `[3H + M, H]`) |
//! | `num_heads` | `H / D`, `D` = the length of a `query_norm.scale` (QK-norm is per head) |
//! | `qkv_bias` | whether `double_blocks.0.img_attn.qkv.bias` exists |
//! | `guidance_embed` | whether `guidance_in.in_layer.weight` exists (FLUX.1-dev: yes, schnell: no) |
//!
//! The rotary split is not stored: FLUX's `[16, 56, 56]` for head width 128 is `[D/8, 7D/16, 7D/16]`, and that rule
//! (rounded to even widths, the remainder on the last axis) is used for other head widths; `theta` is FLUX's 10 000.
//! Every tensor the inferred config needs is then checked against the file, so a file that is not FLUX-format gets
//! an error naming the first tensor that does not fit.

use std::collections::{BTreeSet, HashMap};

use super::config::{Config, expected_tensor_shapes};

/// Key prefixes some FLUX single files put before the BFL names.
pub const FLUX_KEY_PREFIXES: [&str; 2] = ["model.diffusion_model.", "diffusion_model."];

/// What the shapes of a FLUX-format checkpoint say.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxLayout {
    /// The sizes.
    pub config: Config,
    /// The prefix before every BFL tensor name (`""`, or one of [`FLUX_KEY_PREFIXES`]).
    pub prefix: &'static str,
}

/// A checkpoint whose tensors do not describe a FLUX-format MMDiT.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FluxShapeError {
    /// A tensor the layout needs is missing.
    #[error(
        "not a FLUX-format transformer: no tensor `{name}`{hint} (a FLUX checkpoint in BFL naming has `img_in.weight`, \
         `double_blocks.N.…`, `single_blocks.N.…`, `final_layer.…`)"
    )]
    Missing {
        /// Full tensor name (with the file's prefix).
        name: String,
        /// What the file looks like instead, when recognisable.
        hint: String,
    },
    /// A tensor has the wrong shape for the sizes read from the others.
    #[error("not a FLUX-format transformer: tensor `{name}` is {found:?}, expected {expected:?} for {what}")]
    Shape {
        /// Full tensor name.
        name: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the layout needs.
        expected: Vec<usize>,
        /// The sizes it was derived from.
        what: String,
    },
    /// The sizes read from the shapes do not make a model (e.g. a width that the head width does not divide).
    #[error("not a FLUX-format transformer: {0}")]
    Sizes(String),
}

/// Reads the sizes of the FLUX-format MMDiT whose tensors have `shapes`, and checks every tensor it needs.
pub fn flux_layout_from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<FluxLayout, FluxShapeError> {
    let prefix = FLUX_KEY_PREFIXES
        .into_iter()
        .find(|p| shapes.contains_key(&format!("{p}img_in.weight")))
        .unwrap_or("");
    let get = |name: &str| -> Result<&Vec<usize>, FluxShapeError> {
        let full = format!("{prefix}{name}");
        shapes.get(&full).ok_or_else(|| FluxShapeError::Missing {
            hint: naming_hint(shapes),
            name: full,
        })
    };
    let matrix = |name: &str| -> Result<(usize, usize), FluxShapeError> {
        match get(name)?.as_slice() {
            [rows, cols] => Ok((*rows, *cols)),
            other => Err(FluxShapeError::Shape {
                name: format!("{prefix}{name}"),
                found: other.to_vec(),
                expected: vec![0, 0],
                what: "a linear layer's weight (2 dimensions)".into(),
            }),
        }
    };
    let (hidden, in_channels) = matrix("img_in.weight")?;
    let (_, context_in_dim) = matrix("txt_in.weight")?;
    let (_, vec_in_dim) = matrix("vector_in.in_layer.weight")?;
    let depth = block_count(shapes, &format!("{prefix}double_blocks."));
    let depth_single_blocks = block_count(shapes, &format!("{prefix}single_blocks."));
    let (mlp_hidden, norm) = if depth > 0 {
        (
            matrix("double_blocks.0.img_mlp.0.weight")?.0,
            "double_blocks.0.img_attn.norm.query_norm.scale",
        )
    } else if depth_single_blocks > 0 {
        let (rows, _) = matrix("single_blocks.0.linear1.weight")?;
        (rows.saturating_sub(3 * hidden), "single_blocks.0.norm.query_norm.scale")
    } else {
        return Err(FluxShapeError::Missing {
            name: format!("{prefix}double_blocks.0.img_mod.lin.weight"),
            hint: naming_hint(shapes),
        });
    };
    let head_dim = match get(norm)?.as_slice() {
        [d] if *d > 0 => *d,
        other => {
            return Err(FluxShapeError::Shape {
                name: format!("{prefix}{norm}"),
                found: other.to_vec(),
                expected: vec![128],
                what: "QK-norm's per-head scale (1 dimension: the head width)".into(),
            });
        }
    };
    if hidden == 0 || !hidden.is_multiple_of(head_dim) {
        return Err(FluxShapeError::Sizes(format!(
            "width {hidden} (`img_in.weight`) is not a multiple of the head width {head_dim} (`{norm}`)"
        )));
    }
    let config = Config {
        in_channels,
        vec_in_dim,
        context_in_dim,
        hidden_size: hidden,
        mlp_ratio: mlp_hidden as f64 / hidden as f64,
        num_heads: hidden / head_dim,
        depth,
        depth_single_blocks,
        axes_dim: flux_axes_dim(head_dim),
        theta: 10_000.0,
        qkv_bias: shapes.contains_key(&format!("{prefix}double_blocks.0.img_attn.qkv.bias")) || depth == 0,
        guidance_embed: shapes.contains_key(&format!("{prefix}guidance_in.in_layer.weight")),
        prediction: super::Prediction::Velocity,
        self_condition: shapes.contains_key(&format!("{prefix}{}.weight", super::config::SELF_COND_IN)),
    };
    config.validate().map_err(|e| FluxShapeError::Sizes(e.to_string()))?;
    if config.mlp_hidden_dim() != mlp_hidden {
        return Err(FluxShapeError::Sizes(format!(
            "MLP width {mlp_hidden} is not a whole multiple-of-width ratio of {hidden}"
        )));
    }
    let what = format!(
        "width {hidden}, {} heads, MLP {mlp_hidden}, {depth} double + {depth_single_blocks} single blocks, {in_channels} \
         channels, text {context_in_dim}/{vec_in_dim}",
        config.num_heads
    );
    for (name, expected) in expected_tensor_shapes(&config) {
        let full = format!("{prefix}{name}");
        match shapes.get(&full) {
            None => {
                return Err(FluxShapeError::Missing {
                    name: full,
                    hint: String::new(),
                });
            }
            Some(found) if *found != expected => {
                return Err(FluxShapeError::Shape {
                    name: full,
                    found: found.clone(),
                    expected,
                    what,
                });
            }
            Some(_) => {}
        }
    }
    Ok(FluxLayout { config, prefix })
}

/// FLUX's rotary split for a head of width `head_dim`: `[D/8, 7D/16, 7D/16]` (`[16, 56, 56]` at 128), each rounded
/// down to an even width, the remainder added to the last axis.
pub fn flux_axes_dim(head_dim: usize) -> Vec<usize> {
    let even = |x: usize| x / 2 * 2;
    let index = even(head_dim / 8).max(2);
    let row = even(head_dim * 7 / 16);
    let col = head_dim.saturating_sub(index + row);
    vec![index, row, col]
}

/// Number of distinct block indices under `prefix` (`double_blocks.`): the highest index + 1 when they are
/// contiguous from 0, which the per-tensor check then confirms.
fn block_count(shapes: &HashMap<String, Vec<usize>>, prefix: &str) -> usize {
    let indices: BTreeSet<usize> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next())
        .filter_map(|i| i.parse().ok())
        .collect();
    indices.last().map_or(0, |max| max + 1)
}

/// What a file that is not in BFL naming looks like, for the error.
fn naming_hint(shapes: &HashMap<String, Vec<usize>>) -> String {
    let has = |needle: &str| shapes.keys().any(|k| k.contains(needle));
    if has("transformer_blocks.") && has("x_embedder") {
        " — this is diffusers naming (`FluxTransformer2DModel`, e.g. FLUX.1-dev's `transformer/` folder): use the BFL \
         single file (`flux1-dev.safetensors`) instead"
            .into()
    } else if has(".processor.") && has("_lora") {
        " — this is a LoRA in x-flux naming (UNO's `dit_lora.safetensors`): pass it as a base LoRA, not as the \
         transformer"
            .into()
    } else if has("lora_") {
        " — this looks like a LoRA file, not a transformer".into()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes_of(cfg: &Config, prefix: &str) -> HashMap<String, Vec<usize>> {
        expected_tensor_shapes(cfg)
            .into_iter()
            .map(|(n, s)| (format!("{prefix}{n}"), s))
            .collect()
    }

    #[test]
    fn flux_dev_and_schnell_sizes_come_from_the_shapes_alone() {
        let dev = Config::flux_dev();
        let layout = flux_layout_from_shapes(&shapes_of(&dev, "")).expect("dev");
        assert_eq!(layout.config, dev);
        assert_eq!(layout.prefix, "");
        let schnell = Config {
            guidance_embed: false,
            ..Config::flux_dev()
        };
        let layout = flux_layout_from_shapes(&shapes_of(&schnell, "model.diffusion_model.")).expect("schnell");
        assert_eq!(layout.config, schnell);
        assert_eq!(layout.prefix, "model.diffusion_model.");
    }

    #[test]
    fn a_smaller_flux_format_model_is_read_with_its_own_sizes() {
        let small = Config {
            in_channels: 64,
            vec_in_dim: 32,
            context_in_dim: 48,
            hidden_size: 96,
            mlp_ratio: 2.0,
            num_heads: 3,
            depth: 2,
            depth_single_blocks: 5,
            axes_dim: flux_axes_dim(32),
            theta: 10_000.0,
            qkv_bias: false,
            guidance_embed: true,
            prediction: crate::model::Prediction::Velocity,
            self_condition: false,
        };
        assert_eq!(flux_axes_dim(32), [4, 14, 14]);
        assert_eq!(flux_axes_dim(128), [16, 56, 56]);
        assert_eq!(flux_axes_dim(64), [8, 28, 28]);
        let layout = flux_layout_from_shapes(&shapes_of(&small, "")).expect("small");
        assert_eq!(layout.config, small);
    }

    #[test]
    fn the_first_tensor_that_does_not_fit_is_named() {
        let dev = Config::flux_dev();
        let mut shapes = shapes_of(&dev, "");
        shapes.insert("single_blocks.7.linear2.weight".into(), vec![3072, 1]);
        let e = flux_layout_from_shapes(&shapes).expect_err("shape").to_string();
        assert!(
            e.contains("`single_blocks.7.linear2.weight` is [3072, 1], expected [3072, 15360]"),
            "{e}"
        );
        shapes.remove("single_blocks.7.linear2.weight");
        let e = flux_layout_from_shapes(&shapes).expect_err("missing").to_string();
        assert!(e.contains("no tensor `single_blocks.7.linear2.weight`"), "{e}");
        let diffusers: HashMap<String, Vec<usize>> = [
            ("x_embedder.weight".to_string(), vec![3072, 64]),
            ("transformer_blocks.0.attn.to_q.weight".to_string(), vec![3072, 3072]),
        ]
        .into();
        let e = flux_layout_from_shapes(&diffusers).expect_err("diffusers").to_string();
        assert!(
            e.contains("no tensor `img_in.weight`") && e.contains("diffusers naming"),
            "{e}"
        );
        let lora: HashMap<String, Vec<usize>> = [(
            "double_blocks.0.processor.qkv_lora1.down.weight".to_string(),
            vec![4, 64],
        )]
        .into();
        let e = flux_layout_from_shapes(&lora).expect_err("lora").to_string();
        assert!(e.contains("x-flux naming"), "{e}");
        let mut bad_heads = shapes_of(&dev, "");
        bad_heads.insert("double_blocks.0.img_attn.norm.query_norm.scale".into(), vec![100]);
        let e = flux_layout_from_shapes(&bad_heads).expect_err("heads").to_string();
        assert!(e.contains("not a multiple of the head width 100"), "{e}");
    }
}
