//! How much a base uses its prompt where sampling begins: for held-out single-subject items, one conditional
//! forward at each of a few high noise levels (no guidance), and the correlation, over items, of the mean colour
//! of the one-step estimate `x̂₀ = x_t − t·v̂` with the ideal target's (R, G, B), beside the spread of both. Near
//! t = 1 `x_t` carries almost nothing of the image, so a base that follows the prompt's background shows a high
//! correlation there; below t ≈ 0.9 `x_t` itself carries the colours.
//!
//! `cargo run --release --example prompt_use -- BASE.safetensors|bundled [ITEMS (24)]`

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use focusdpo::eval::benchmark::{BenchmarkConfig, eval_items};
use focusdpo::eval::sampler::{SampleRequest, SampleSettings, predict_conditioned};
use focusdpo::model::base::bundled_base_path;
use focusdpo::model::schedule::{Parameterisation, add_noise, model_time, predicted_x0};
use focusdpo::model::{Adapters, BaseModel};
use focusdpo::rng::{normal_vec, stream_rng};

const TIMES: [f32; 4] = [1.0, 0.97, 0.95, 0.9];

fn mean_rgb(im: &image::RgbImage) -> [f64; 3] {
    let mut m = [0.0; 3];
    for p in im.pixels() {
        for (c, v) in m.iter_mut().enumerate() {
            *v += f64::from(p.0[c]);
        }
    }
    m.map(|v| v / f64::from((im.width() * im.height()).max(1)))
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt())
}

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let ((ma, sa), (mb, sb)) = (mean_sd(a), mean_sd(b));
    a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum::<f64>() / (a.len() as f64 * sa * sb)
}

fn main() -> anyhow::Result<()> {
    focusdpo::alloc::tune_for_tensors();
    let mut args = std::env::args().skip(1);
    let Some(base_arg) = args.next() else {
        bail!("usage: prompt_use BASE.safetensors|bundled [ITEMS (default 24)]");
    };
    let n: usize = match args.next() {
        Some(n) => n.parse().with_context(|| format!("ITEMS `{n}` is not a number"))?,
        None => 24,
    };
    let path = if base_arg == "bundled" {
        bundled_base_path()
    } else {
        PathBuf::from(&base_arg)
    };
    let dev = Device::Cpu;
    let base = BaseModel::load_file(&path, &dev).with_context(|| path.display().to_string())?;
    let items = eval_items(
        &BenchmarkConfig {
            single_items: n,
            multi_items: 0,
            ..Default::default()
        },
        false,
    )?;
    let param = Parameterisation::RectifiedFlow;
    let settings = SampleSettings {
        cfg_scale: 1.0,
        ..Default::default()
    };
    println!(
        "{}: {n} held-out items; corr / sd of the mean colour of x̂₀ vs the target's, R G B",
        path.display()
    );
    for t in TIMES {
        let (mut pred, mut truth) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
        for (k, item) in items.iter().enumerate() {
            let (w, h) = item.winner.dimensions();
            let x0 = base.codec.encode(&item.winner, &dev)?;
            let mut rng = stream_rng(k as u64, 0, 0);
            let eps = Tensor::from_vec(normal_vec(&mut rng, x0.elem_count()), x0.dims().to_vec(), &dev)?;
            let noised = add_noise(param, &x0, &eps, &[t])?;
            let request = SampleRequest {
                prompt: &item.record.prompt,
                references: &item.references,
                size_px: (w, h),
            };
            let mt = model_time(param, &[t], &dev)?;
            let v = predict_conditioned(&base, &request, &settings, &noised.x_t, &mt, Adapters::Off)?;
            let x0_hat = predicted_x0(param, &noised.x_t, &v, &[t])?;
            let im = base.codec.decode(&x0_hat, base.codec.grid_for(w, h)?)?;
            let (a, b) = (mean_rgb(&im), mean_rgb(&item.winner));
            for c in 0..3 {
                pred[c].push(a[c]);
                truth[c].push(b[c]);
            }
        }
        let corr: Vec<String> = (0..3)
            .map(|c| format!("{:.2}", correlation(&pred[c], &truth[c])))
            .collect();
        let sd = |v: &[Vec<f64>; 3]| {
            (0..3)
                .map(|c| format!("{:.0}", mean_sd(&v[c]).1))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "t = {t:.2}: corr {}   sd x̂₀ {}   sd target {}",
            corr.join(" "),
            sd(&pred),
            sd(&truth)
        );
    }
    Ok(())
}
