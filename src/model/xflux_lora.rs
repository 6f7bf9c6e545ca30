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
    /// A trained adapter as an update of its layer's leading rows, its `α/r` folded into `up`.
    pub fn from_adapter(path: &str, adapter: &super::lora::LoraAdapter) -> candle_core::Result<Self> {
        let up = adapter.b.as_tensor().affine(adapter.scale, 0.0)?;
        Ok(Self {
            target: path.to_string(),
            rows: 0..adapter.rows(),
            down: adapter.a.as_tensor().clone(),
            up,
        })
    }

    /// The same update times `scale` (a base LoRA's `lora_weight`).
    pub fn scaled(&self, scale: f64) -> candle_core::Result<Self> {
        Ok(Self {
            up: self.up.affine(scale, 0.0)?,
            ..self.clone()
        })
    }

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

/// The x-flux processor LoRA of the layer at `path`: (name stem, the rows x-flux adapts), `None` for a layer
/// x-flux cannot adapt (MLPs, modulations, embedders).
fn xflux_key(path: &str, h: usize) -> Option<(String, usize)> {
    let parts: Vec<&str> = path.split('.').collect();
    Some(match parts.as_slice() {
        ["double_blocks", i, "img_attn", "qkv"] => (format!("double_blocks.{i}.processor.qkv_lora1"), 3 * h),
        ["double_blocks", i, "img_attn", "proj"] => (format!("double_blocks.{i}.processor.proj_lora1"), h),
        ["double_blocks", i, "txt_attn", "qkv"] => (format!("double_blocks.{i}.processor.qkv_lora2"), 3 * h),
        ["double_blocks", i, "txt_attn", "proj"] => (format!("double_blocks.{i}.processor.proj_lora2"), h),
        ["single_blocks", i, "linear1"] => (format!("single_blocks.{i}.processor.qkv_lora"), 3 * h),
        ["single_blocks", i, "linear2"] => (format!("single_blocks.{i}.processor.proj_lora"), h),
        _ => return None,
    })
}

/// `(name stem, rows, in)` of every processor LoRA UNO's `set_lora` builds for a model of config `cfg`, in block
/// order: four per double block (image and text streams' `qkv` and `proj`), two per single block.
pub fn xflux_processors(cfg: &Config) -> Vec<(String, usize, usize)> {
    let (h, m) = (cfg.hidden_size, cfg.mlp_hidden_dim());
    let mut stems = Vec::new();
    for i in 0..cfg.depth {
        for (lora, rows) in [
            ("qkv_lora1", 3 * h),
            ("proj_lora1", h),
            ("qkv_lora2", 3 * h),
            ("proj_lora2", h),
        ] {
            stems.push((format!("double_blocks.{i}.processor.{lora}"), rows, h));
        }
    }
    for i in 0..cfg.depth_single_blocks {
        stems.push((format!("single_blocks.{i}.processor.qkv_lora"), 3 * h, h));
        stems.push((format!("single_blocks.{i}.processor.proj_lora"), h, h + m));
    }
    stems
}

/// An x-flux LoRA file's tensors, for UNO's own pipeline.
#[derive(Debug)]
pub struct XfluxExport {
    /// `….processor.<lora>.{down,up}.weight` of every processor of every block.
    pub tensors: HashMap<String, Tensor>,
    /// The one rank of all of them: UNO's `--lora_rank` to load the file with.
    pub rank: usize,
}

/// Writes `pieces` (each adding `up·down` to its layer's leading rows; scales already folded into `up`, as x-flux
/// has no α) as one x-flux LoRA that UNO's pipeline loads: the pieces on one layer are concatenated along the rank
/// (UNO's LoRA followed by ours gives their exact sum), and since UNO's `set_lora` gives every block a processor of
/// one rank, every processor of every block of `cfg` is written, padded with zero rank components to the largest
/// rank. A piece on a layer x-flux cannot adapt, or changing rows it cannot express (the MLP rows of a single
/// block's `linear1`), is an error naming the layer.
pub fn write_xflux_lora(pieces: &[BaseLoraPiece], cfg: &Config) -> Result<XfluxExport, LoraError> {
    let h = cfg.hidden_size;
    let not_expressible = |path: &str, what: String| {
        LoraError::Config(format!(
            "the adapter on `{path}` {what}, which x-flux (UNO's LoRA format) cannot express: train with \
             lora.targets.mlp = false (attention only) to export for UNO"
        ))
    };
    let stems = xflux_processors(cfg);
    let mut parts: HashMap<String, (Vec<Tensor>, Vec<Tensor>)> = HashMap::new();
    for p in pieces {
        let Some((stem, rows)) = xflux_key(&p.target, h) else {
            return Err(not_expressible(&p.target, "adapts a layer outside attention".into()));
        };
        let Some((_, _, in_dim)) = stems.iter().find(|(s, _, _)| *s == stem) else {
            return Err(LoraError::Config(format!(
                "the adapter on `{}` names a block the model does not have ({} double, {} single)",
                p.target, cfg.depth, cfg.depth_single_blocks
            )));
        };
        if p.down.dims() != [p.rank(), *in_dim] || p.up.dims() != [p.rows.len(), p.rank()] {
            return Err(LoraError::Config(format!(
                "the adapter on `{}` has down {:?} / up {:?}; this model needs down [r, {in_dim}] and up [{}, r]",
                p.target,
                p.down.dims(),
                p.up.dims(),
                p.rows.len()
            )));
        }
        let up = p.up.to_dtype(DType::F32)?;
        let r = p.rank();
        // The piece's rows placed within the rows x-flux adapts; rows beyond them must not change.
        let (start, end) = (p.rows.start.min(rows), p.rows.end.min(rows));
        if p.rows.end > rows {
            let beyond = up.narrow(0, end - p.rows.start, p.rows.end - end)?;
            if beyond.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? > 0.0 {
                return Err(not_expressible(
                    &p.target,
                    format!("changes rows {rows}..{}", p.rows.end),
                ));
            }
        }
        let kept = up.narrow(0, start - p.rows.start, end - start)?;
        let mut blocks = Vec::new();
        if start > 0 {
            blocks.push(Tensor::zeros((start, r), DType::F32, up.device())?);
        }
        blocks.push(kept);
        if end < rows {
            blocks.push(Tensor::zeros((rows - end, r), DType::F32, up.device())?);
        }
        let entry = parts.entry(stem).or_default();
        entry.0.push(p.down.to_dtype(DType::F32)?);
        entry.1.push(Tensor::cat(&blocks, 0)?);
    }
    let rank = parts
        .values()
        .map(|(downs, _)| downs.iter().map(|d| d.dim(0).unwrap_or(0)).sum::<usize>())
        .max()
        .unwrap_or(0)
        .max(1);
    let device = pieces
        .first()
        .map(|p| p.down.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let mut tensors = HashMap::new();
    for (stem, rows, in_dim) in stems {
        let (mut downs, mut ups) = parts.remove(&stem).unwrap_or_default();
        let r: usize = downs.iter().map(|d| d.dim(0).unwrap_or(0)).sum();
        if r < rank {
            downs.push(Tensor::zeros((rank - r, in_dim), DType::F32, &device)?);
            ups.push(Tensor::zeros((rows, rank - r), DType::F32, &device)?);
        }
        tensors.insert(format!("{stem}.down.weight"), Tensor::cat(&downs, 0)?);
        tensors.insert(format!("{stem}.up.weight"), Tensor::cat(&ups, 1)?);
    }
    Ok(XfluxExport { tensors, rank })
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
    fn pieces_written_in_xflux_naming_read_back_as_their_sum_for_every_block() {
        let cfg = Config {
            depth: 2,
            depth_single_blocks: 2,
            ..micro()
        };
        let (h, m) = (cfg.hidden_size, cfg.mlp_hidden_dim());
        let rnd = |rows: usize, cols: usize, seed: u64| {
            crate::model::testing::random_tensor(&[rows, cols], 0.3, seed, &Device::Cpu).expect("random")
        };
        let piece = |target: &str, rows: usize, r: usize, inp: usize, seed: u64| BaseLoraPiece {
            target: target.into(),
            rows: 0..rows,
            down: rnd(r, inp, seed),
            up: rnd(rows, r, seed + 100),
        };
        // UNO's LoRA (rank 3 on two layers) and ours (rank 2 on three layers, one shared): ranks add up on the
        // shared layer, so the file's rank is 5 and every other processor is padded to it.
        let pieces = [
            piece("double_blocks.0.img_attn.qkv", 3 * h, 3, h, 1),
            piece("single_blocks.1.linear2", h, 3, h + m, 2),
            piece("double_blocks.0.img_attn.qkv", 3 * h, 2, h, 3),
            piece("double_blocks.1.txt_attn.proj", h, 2, h, 4),
            piece("single_blocks.0.linear1", 3 * h, 2, h, 5),
        ];
        let export = write_xflux_lora(&pieces, &cfg).expect("exports");
        assert_eq!(export.rank, 5);
        assert_eq!(
            export.tensors.len(),
            2 * (4 * 2 + 2 * 2),
            "every processor of every block"
        );
        assert_eq!(
            export.tensors["double_blocks.1.processor.qkv_lora1.up.weight"].dims(),
            [3 * h, 5]
        );
        let read = read_xflux_lora(&export.tensors, &cfg).expect("reads back");
        for target in [
            "double_blocks.0.img_attn.qkv",
            "double_blocks.1.txt_attn.proj",
            "double_blocks.1.img_attn.qkv",
            "single_blocks.0.linear1",
            "single_blocks.1.linear2",
        ] {
            let got = read
                .iter()
                .find(|p| p.target == target)
                .expect("piece")
                .delta(1.0)
                .expect("delta");
            let mut want = Tensor::zeros(got.dims(), DType::F32, &Device::Cpu).expect("zeros");
            for p in pieces.iter().filter(|p| p.target == target) {
                want = (want + p.delta(1.0).expect("delta")).expect("sum");
            }
            let diff = crate::model::testing::max_abs_diff(&got, &want).expect("diff");
            assert!(diff < 1e-5, "{target}: {diff}");
        }
        // What x-flux cannot express is refused, naming the layer.
        let e = write_xflux_lora(&[piece("double_blocks.0.img_mlp.0", h * 4, 2, h, 7)], &cfg)
            .expect_err("mlp")
            .to_string();
        assert!(
            e.contains("double_blocks.0.img_mlp.0") && e.contains("lora.targets.mlp"),
            "{e}"
        );
        let e = write_xflux_lora(&[piece("single_blocks.0.linear1", 3 * h + m, 2, h, 8)], &cfg)
            .expect_err("mlp rows")
            .to_string();
        assert!(e.contains("single_blocks.0.linear1") && e.contains("rows 192.."), "{e}");
        // Zero MLP rows are dropped, not refused.
        let mut zero_tail = piece("single_blocks.0.linear1", 3 * h + m, 2, h, 9);
        zero_tail.up = Tensor::cat(
            &[
                &rnd(3 * h, 2, 10),
                &Tensor::zeros((m, 2), DType::F32, &Device::Cpu).expect("z"),
            ],
            0,
        )
        .expect("cat");
        write_xflux_lora(&[zero_tail], &cfg).expect("zero MLP rows");
        let e = write_xflux_lora(&[piece("double_blocks.4.img_attn.qkv", 3 * h, 2, h, 11)], &cfg)
            .expect_err("block")
            .to_string();
        assert!(e.contains("double_blocks.4") && e.contains("2 double"), "{e}");
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
