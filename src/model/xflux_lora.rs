//! LoRAs in x-flux processor naming, the format of UNO's released `dit_lora.safetensors`, as a frozen part of the
//! base: each low-rank update is merged into the weight it adapts, and the FocusDPO LoRA trains on top.
//!
//! UNO (`uno/flux/modules/layers.py`, `DoubleStreamBlockLoraProcessor` / `SingleStreamBlockLoraProcessor`) adds
//! `up(down(x))·lora_weight` (no α/r factor: `network_alpha` is never set) to:
//!
//! | x-flux tensors | adds to the output of | rows |
//! |---|---|---|
//! | `double_blocks.N.processor.qkv_lora1.{down,up}.weight` | `double_blocks.N.img_attn.qkv` (image stream) | all `3H` |
//! | `double_blocks.N.processor.proj_lora1.…` | `double_blocks.N.img_attn.proj` | all `H` |
//! | `double_blocks.N.processor.qkv_lora2.…`, `proj_lora2.…` | `txt_attn.qkv`, `txt_attn.proj` (text stream) | all |
//! | `single_blocks.N.processor.qkv_lora.…` | `single_blocks.N.linear1` | the q/k/v rows `0..3H` only |
//! | `single_blocks.N.processor.proj_lora.…` | `single_blocks.N.linear2` (its input: attention ⊕ GELU(MLP)) | all `H` |
//!
//! Each takes the same input as the layer it adapts, so merging is `W[rows] += s·up·down` (`down` [r, in], `up`
//! [rows, r], `s` the LoRA's scale, UNO's `lora_weight`, 1 by default). The rank is read from the shapes.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Tensor};

use super::config::Config;
use super::lora::LoraError;

/// One low-rank update of a base weight.
#[derive(Clone, Debug)]
pub struct BaseLoraPiece {
    /// The adapted linear layer's FLUX path (`double_blocks.0.img_attn.qkv`).
    pub target: String,
    /// The rows of the layer's output it adds to.
    pub rows: Range<usize>,
    /// `down` [r, in].
    pub down: Tensor,
    /// `up` [rows, r].
    pub up: Tensor,
}

impl BaseLoraPiece {
    /// The rank.
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// `scale · up · down`, [rows, in], in f32.
    pub fn delta(&self, scale: f64) -> candle_core::Result<Tensor> {
        self.up
            .to_dtype(DType::F32)?
            .matmul(&self.down.to_dtype(DType::F32)?)?
            .affine(scale, 0.0)
    }
}

/// Whether `tensors` are in x-flux processor naming.
pub fn is_xflux_lora<'a>(mut names: impl Iterator<Item = &'a String>) -> bool {
    names.any(|n| n.contains(".processor.") && (n.ends_with(".down.weight") || n.ends_with(".up.weight")))
}

/// Where an x-flux processor LoRA name points: (adapted layer path, rows as a function of the width `H`).
fn xflux_target(block: &str, index: usize, lora: &str, h: usize) -> Option<(String, Range<usize>)> {
    let (layer, rows) = match (block, lora) {
        ("double_blocks", "qkv_lora1") => ("img_attn.qkv", 0..3 * h),
        ("double_blocks", "proj_lora1") => ("img_attn.proj", 0..h),
        ("double_blocks", "qkv_lora2") => ("txt_attn.qkv", 0..3 * h),
        ("double_blocks", "proj_lora2") => ("txt_attn.proj", 0..h),
        ("single_blocks", "qkv_lora") => ("linear1", 0..3 * h),
        ("single_blocks", "proj_lora") => ("linear2", 0..h),
        _ => return None,
    };
    Some((format!("{block}.{index}.{layer}"), rows))
}

/// Reads an x-flux LoRA (UNO's `dit_lora.safetensors`) for a model of config `cfg`: every `down`/`up` pair
/// mapped onto the layer it adapts, shapes checked against `cfg`. A name that is not a known processor LoRA, a
/// half pair, a block index the model does not have or a wrong shape is an error that names the tensor.
pub fn read_xflux_lora(tensors: &HashMap<String, Tensor>, cfg: &Config) -> Result<Vec<BaseLoraPiece>, LoraError> {
    let h = cfg.hidden_size;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut pieces = Vec::new();
    for name in names {
        let Some(stem) = name.strip_suffix(".down.weight") else {
            if name.ends_with(".up.weight") {
                let down = name.replace(".up.weight", ".down.weight");
                if !tensors.contains_key(&down) {
                    return Err(LoraError::Missing(down));
                }
                continue;
            }
            return Err(LoraError::Config(format!(
                "`{name}` is not an x-flux processor LoRA tensor (`double_blocks.N.processor.qkv_lora1.down.weight`, \
                 …)"
            )));
        };
        let parts: Vec<&str> = stem.split('.').collect();
        let target = match parts.as_slice() {
            [block, index, "processor", lora] => index
                .parse::<usize>()
                .ok()
                .filter(|&i| match *block {
                    "double_blocks" => i < cfg.depth,
                    "single_blocks" => i < cfg.depth_single_blocks,
                    _ => false,
                })
                .and_then(|i| xflux_target(block, i, lora, h)),
            _ => None,
        };
        let Some((target, rows)) = target else {
            return Err(LoraError::Config(format!(
                "`{name}`: no such processor LoRA in a model with {} double and {} single blocks",
                cfg.depth, cfg.depth_single_blocks
            )));
        };
        let up_name = format!("{stem}.up.weight");
        let down = tensors[name].clone();
        let up = tensors
            .get(&up_name)
            .ok_or_else(|| LoraError::Missing(up_name.clone()))?
            .clone();
        let in_dim = if target.ends_with("linear2") {
            h + cfg.mlp_hidden_dim()
        } else {
            h
        };
        let (rank, found_in) = down.dims2()?;
        if found_in != in_dim || rank == 0 {
            return Err(LoraError::Shape {
                name: name.clone(),
                expected: vec![rank.max(1), in_dim],
                found: down.dims().to_vec(),
            });
        }
        if up.dims() != [rows.len(), rank] {
            return Err(LoraError::Shape {
                name: up_name,
                expected: vec![rows.len(), rank],
                found: up.dims().to_vec(),
            });
        }
        pieces.push(BaseLoraPiece { target, rows, down, up });
    }
    if pieces.is_empty() {
        return Err(LoraError::UnknownFormat);
    }
    Ok(pieces)
}

/// Writes a LoRA whose adapters fit x-flux naming back in it, for UNO's own pipeline: `adapters` are
/// `(layer path, A [r, in], B [out, r], scale)`; the scale is folded into `up` (x-flux has no α). Adapters on
/// layers x-flux cannot express (MLPs, modulations, the MLP rows of `linear1`) are an error naming the layer.
pub fn to_xflux_tensors<'a>(
    adapters: impl IntoIterator<Item = (&'a str, &'a Tensor, &'a Tensor, f64)>,
    cfg: &Config,
) -> Result<HashMap<String, Tensor>, LoraError> {
    let h = cfg.hidden_size;
    let mut out = HashMap::new();
    for (path, a, b, scale) in adapters {
        let parts: Vec<&str> = path.split('.').collect();
        let (key, rows) = match parts.as_slice() {
            ["double_blocks", i, "img_attn", "qkv"] => (format!("double_blocks.{i}.processor.qkv_lora1"), 3 * h),
            ["double_blocks", i, "img_attn", "proj"] => (format!("double_blocks.{i}.processor.proj_lora1"), h),
            ["double_blocks", i, "txt_attn", "qkv"] => (format!("double_blocks.{i}.processor.qkv_lora2"), 3 * h),
            ["double_blocks", i, "txt_attn", "proj"] => (format!("double_blocks.{i}.processor.proj_lora2"), h),
            ["single_blocks", i, "linear1"] => (format!("single_blocks.{i}.processor.qkv_lora"), 3 * h),
            ["single_blocks", i, "linear2"] => (format!("single_blocks.{i}.processor.proj_lora"), h),
            _ => {
                return Err(LoraError::Config(format!(
                    "the adapter on `{path}` has no x-flux equivalent (x-flux adapts attention qkv/proj only): \
                     train with lora.targets.mlp = false to export for UNO"
                )));
            }
        };
        let b_rows = b.dim(0)?;
        if b_rows > rows {
            let beyond = b.narrow(0, rows, b_rows - rows)?;
            let nonzero = beyond.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? > 0.0;
            if nonzero {
                return Err(LoraError::Config(format!(
                    "the adapter on `{path}` changes the MLP rows {rows}..{b_rows}, which x-flux's qkv_lora cannot \
                     express: train with lora.targets.mlp = false to export for UNO"
                )));
            }
        }
        let up = b.narrow(0, 0, rows.min(b_rows))?.affine(scale, 0.0)?;
        out.insert(format!("{key}.down.weight"), a.clone());
        out.insert(format!("{key}.up.weight"), up);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn micro() -> Config {
        Config::micro()
    }

    fn pair(r: usize, rows: usize, inp: usize, v: f32) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let down = Tensor::full(v, (r, inp), &dev).expect("down");
        let up = Tensor::full(1.0f32, (rows, r), &dev).expect("up");
        (down, up)
    }

    #[test]
    fn every_processor_lora_maps_onto_its_layer_and_rows() {
        let cfg = micro();
        let (h, m) = (cfg.hidden_size, cfg.mlp_hidden_dim());
        let mut t = HashMap::new();
        for (stem, rows, inp) in [
            ("double_blocks.0.processor.qkv_lora1", 3 * h, h),
            ("double_blocks.0.processor.proj_lora2", h, h),
            ("single_blocks.0.processor.qkv_lora", 3 * h, h),
            ("single_blocks.0.processor.proj_lora", h, h + m),
        ] {
            let (d, u) = pair(4, rows, inp, 0.5);
            t.insert(format!("{stem}.down.weight"), d);
            t.insert(format!("{stem}.up.weight"), u);
        }
        assert!(is_xflux_lora(t.keys()));
        let pieces = read_xflux_lora(&t, &cfg).expect("reads");
        let got: Vec<(String, Range<usize>, usize)> = pieces
            .iter()
            .map(|p| (p.target.clone(), p.rows.clone(), p.rank()))
            .collect();
        assert_eq!(
            got,
            [
                ("double_blocks.0.txt_attn.proj".to_string(), 0..h, 4),
                ("double_blocks.0.img_attn.qkv".to_string(), 0..3 * h, 4),
                ("single_blocks.0.linear2".to_string(), 0..h, 4),
                ("single_blocks.0.linear1".to_string(), 0..3 * h, 4),
            ]
        );
        // up·down: every entry is rank × 0.5 = 2, times the scale.
        let d = pieces[1].delta(0.5).expect("delta");
        assert_eq!(d.dims(), [3 * h, h]);
        assert_eq!(
            d.flatten_all()
                .expect("f")
                .max(0)
                .expect("m")
                .to_scalar::<f32>()
                .expect("s"),
            1.0
        );
    }

    #[test]
    fn adapters_written_in_xflux_naming_read_back_as_the_same_updates() {
        let cfg = micro();
        let (h, m, r) = (cfg.hidden_size, cfg.mlp_hidden_dim(), 2);
        let rnd = |rows: usize, cols: usize, seed: u64| {
            crate::model::testing::random_tensor(&[rows, cols], 0.3, seed, &Device::Cpu).expect("random")
        };
        let (a1, b1) = (rnd(r, h, 1), rnd(3 * h, r, 2));
        let (a2, b2) = (rnd(r, h, 3), rnd(h, r, 4));
        // linear1 adapter whose MLP rows are zero: expressible.
        let b3 = Tensor::cat(
            &[
                &rnd(3 * h, r, 6),
                &Tensor::zeros((m, r), DType::F32, &Device::Cpu).expect("z"),
            ],
            0,
        )
        .expect("cat");
        let a3 = rnd(r, h, 5);
        let adapters = [
            ("double_blocks.0.txt_attn.qkv", &a1, &b1, 0.5),
            ("double_blocks.0.img_attn.proj", &a2, &b2, 2.0),
            ("single_blocks.0.linear1", &a3, &b3, 1.0),
        ];
        let tensors = to_xflux_tensors(adapters, &cfg).expect("exports");
        assert!(tensors.contains_key("double_blocks.0.processor.qkv_lora2.up.weight"));
        assert!(tensors.contains_key("double_blocks.0.processor.proj_lora1.down.weight"));
        let pieces = read_xflux_lora(&tensors, &cfg).expect("reads back");
        for (path, a, b, scale) in adapters {
            let piece = pieces.iter().find(|p| p.target == path).expect("piece");
            let want = b
                .narrow(0, 0, piece.rows.len())
                .expect("rows")
                .matmul(a)
                .expect("BA")
                .affine(scale, 0.0)
                .expect("scale");
            let got = piece.delta(1.0).expect("delta");
            let diff = crate::model::testing::max_abs_diff(&got, &want).expect("diff");
            assert!(diff < 1e-6, "{path}");
        }
        // What x-flux cannot express is refused, naming the layer.
        let mlp = [("double_blocks.0.img_mlp.0", &a1, &b1, 1.0)];
        let e = to_xflux_tensors(mlp, &cfg).expect_err("mlp").to_string();
        assert!(
            e.contains("double_blocks.0.img_mlp.0") && e.contains("lora.targets.mlp"),
            "{e}"
        );
        let b4 = rnd(3 * h + m, r, 7);
        let full = [("single_blocks.0.linear1", &a3, &b4, 1.0)];
        let e = to_xflux_tensors(full, &cfg).expect_err("mlp rows").to_string();
        assert!(e.contains("MLP rows"), "{e}");
    }

    #[test]
    fn bad_names_half_pairs_and_shapes_are_named() {
        let cfg = micro();
        let h = cfg.hidden_size;
        let (d, u) = pair(4, 3 * h, h, 1.0);
        let mut t = HashMap::from([("double_blocks.0.processor.qkv_lora1.down.weight".to_string(), d.clone())]);
        let e = read_xflux_lora(&t, &cfg).expect_err("half").to_string();
        assert!(e.contains("qkv_lora1.up.weight"), "{e}");
        t.insert("double_blocks.0.processor.qkv_lora1.up.weight".into(), d.clone());
        let e = read_xflux_lora(&t, &cfg).expect_err("shape").to_string();
        assert!(
            e.contains("qkv_lora1.up.weight") && e.contains("expected [192, 4]"),
            "{e}"
        );
        t.insert("double_blocks.0.processor.qkv_lora1.up.weight".into(), u.clone());
        t.insert("double_blocks.5.processor.qkv_lora1.down.weight".into(), d);
        t.insert("double_blocks.5.processor.qkv_lora1.up.weight".into(), u);
        let e = read_xflux_lora(&t, &cfg).expect_err("index").to_string();
        assert!(e.contains("double_blocks.5") && e.contains("1 double"), "{e}");
        let e = read_xflux_lora(&HashMap::new(), &cfg).expect_err("empty").to_string();
        assert!(e.contains("no LoRA tensor"), "{e}");
    }
}
