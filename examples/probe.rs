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
use focusdpo::eval::sampler::{SampleRequest, SampleSettings, predict_conditioned};
use focusdpo::model::schedule::{Parameterisation, add_noise, model_time, predicted_x0};
use focusdpo::model::{Adapters, BaseModel};
use focusdpo::rng::{normal_vec, stream_rng};

/// Probe times, left to right.
const TIMES: [f32; 4] = [0.3, 0.6, 0.9, 1.0];
/// Side of the sheet's cells.
const SIZE: u32 = 64;

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
    let items = eval_items(
        &BenchmarkConfig {
            single_items: items_n,
            multi_items: 0,
            ..Default::default()
        },
        false,
    )?;
    let settings = SampleSettings::default();
    let param = Parameterisation::RectifiedFlow;
    let nt = TIMES.len();
    let mut rows = Vec::new();
    for (k, item) in items.iter().enumerate() {
        let mut row = vec![item.references[0].clone(), item.winner.clone()];
        let grid = base.codec.grid_for(item.winner.width(), item.winner.height())?;
        // One noise per item, shared by every t (one row per t).
        let x0 = base.codec.encode(&item.winner, &dev)?.repeat((nt, 1, 1))?;
        let mut rng = stream_rng(k as u64, 0, 0);
        let eps = Tensor::from_vec(
            normal_vec(&mut rng, x0.elem_count() / nt),
            x0.dims()[1..].to_vec(),
            &dev,
        )?
        .unsqueeze(0)?
        .repeat((nt, 1, 1))?;
        let noised = add_noise(param, &x0, &eps, &TIMES)?;
        let request = SampleRequest {
            prompt: &item.record.prompt,
            references: &item.references,
            size_px: item.winner.dimensions(),
        };
        let model_t = model_time(param, &TIMES, &dev)?;
        let v = predict_conditioned(&base, &request, &settings, &noised.x_t, &model_t, Adapters::Off)?;
        let x0_hat = predicted_x0(param, &noised.x_t, &v, &TIMES)?;
        for i in 0..nt {
            row.push(base.codec.decode(&x0_hat.narrow(0, i, 1)?, grid)?);
        }
        rows.push(row);
    }
    let columns = 2 + nt as u32;
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
