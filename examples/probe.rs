//! One-step denoising probe of a base: for held-out single-subject items, the sheet shows the reference, the
//! winner (the target) and `x̂₀ = x_t − t·v̂` at t = 0.3, 0.6, 0.9 and 1.0 (`x_t = (1 − t)·x₀ + t·ε`, one fixed
//! noise per item). A base that uses its conditioning shows the subject and background at high t; one that does
//! not shows noise or the same grey for every prompt. `docs/pretraining.md` shows it for the shipped base.
//!
//! ```sh
//! cargo run --release --example probe -- assets/base/tiny-base.safetensors out/probe.png [ITEMS]
//! ```

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use focusdpo::eval::benchmark::{BenchmarkConfig, eval_items};
use focusdpo::model::{
    BaseModel, ForwardOptions, MmditInput, Reference, ids_tensor, reference_ids, target_ids, text_ids,
    uno_reference_offsets,
};
use focusdpo::rng::{normal_vec, stream_rng};

/// Probe times, left to right.
const TIMES: [f32; 4] = [0.3, 0.6, 0.9, 1.0];
/// Side of the generated images.
const SIZE: u32 = 64;
/// Side the reference is fed at.
const REFERENCE_PX: u32 = 32;

fn main() -> anyhow::Result<()> {
    focusdpo::alloc::tune_for_tensors();
    let mut args = std::env::args().skip(1);
    let (Some(base_path), Some(out)) = (args.next(), args.next()) else {
        bail!("usage: probe BASE.safetensors OUT.png [ITEMS (default 4)]");
    };
    let items_n: usize = match args.next() {
        Some(n) => n.parse().with_context(|| format!("ITEMS `{n}` is not a number"))?,
        None => 4,
    };
    let dev = Device::Cpu;
    let base = BaseModel::load_file(&PathBuf::from(&base_path), &dev).with_context(|| base_path.clone())?;
    let text = base
        .text_conditioner()
        .context("the probe needs a base with its own prompt tables (the tiny format)")?;
    let items = eval_items(
        &BenchmarkConfig {
            single_items: items_n,
            multi_items: 0,
            ..Default::default()
        },
        false,
    )?;
    let grid = base.codec.grid_for(SIZE, SIZE)?;
    let (rside, _) = base.codec.grid_for(REFERENCE_PX, REFERENCE_PX)?;
    let mut rows = Vec::new();
    for (k, item) in items.iter().enumerate() {
        let mut row = vec![item.references[0].clone(), item.winner.clone()];
        let x0 = base.codec.encode(&item.winner, &dev)?;
        let mut rng = stream_rng(k as u64, 0, 0);
        let eps = Tensor::from_vec(normal_vec(&mut rng, x0.elem_count()), x0.dims(), &dev)?;
        let reference = focusdpo::model::encoder::reference_at(&item.references[0], REFERENCE_PX);
        let rtok = base.codec.encode(&reference, &dev)?;
        let offsets = uno_reference_offsets(grid, &[(rside, rside)]);
        let rids = ids_tensor(&reference_ids(rside, rside, offsets[0]), 1, &dev)?;
        let enc = text.encode(&[item.record.prompt.as_str()])?;
        for &t in &TIMES {
            let xt = ((&x0 * f64::from(1.0 - t))? + (&eps * f64::from(t))?)?;
            let refs = [Reference {
                tokens: &rtok,
                ids: &rids,
            }];
            let input = MmditInput {
                img: &xt,
                img_ids: &ids_tensor(&target_ids(grid.0, grid.1), 1, &dev)?,
                txt: &enc.txt,
                txt_ids: &text_ids(enc.txt.dim(1)?, 1, &dev)?,
                timesteps: &Tensor::new(&[t], &dev)?,
                y: &enc.y,
                guidance: None,
                references: &refs,
            };
            let v = base.mmdit.forward_with(&input, ForwardOptions::default())?.prediction;
            let x0_hat = (&xt - (v * f64::from(t))?)?;
            row.push(base.codec.decode(&x0_hat, grid)?);
        }
        rows.push(row);
    }
    let columns = 2 + TIMES.len() as u32;
    let mut sheet = image::RgbImage::new(SIZE * columns, SIZE * rows.len() as u32);
    for (r, row) in rows.iter().enumerate() {
        for (c, im) in row.iter().enumerate() {
            let im = image::imageops::resize(im, SIZE, SIZE, image::imageops::FilterType::Nearest);
            image::imageops::overlay(&mut sheet, &im, i64::from(SIZE) * c as i64, i64::from(SIZE) * r as i64);
        }
    }
    sheet.save(&out).with_context(|| out.clone())?;
    println!("{out}: reference | target | x̂₀ at t = {TIMES:?}");
    Ok(())
}
