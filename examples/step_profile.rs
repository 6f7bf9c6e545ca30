//! Splits a tiny-model DPO step into its phases (forward with graph, forward without, backward, optimiser) and
//! prints the min and median time of each: `cargo run --release --example step_profile`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use focusdpo::model::{Adapters, BaseModel, Config, ForwardOptions};
use focusdpo::train::RunConfig;
use focusdpo::train::session::{Trainer, load_items};

fn main() -> anyhow::Result<()> {
    focusdpo::alloc::tune_for_tensors();
    let device = Device::Cpu;
    let base = BaseModel::random(&Config::tiny(), 4, 0, &device)?;
    let cfg = RunConfig::default().with_overrides(&[r#"data.items=["synth-0000"]"#.into()])?;
    let items = load_items(&cfg, &base, &device)?;
    let mut trainer = Trainer::new(cfg, base, items)?;
    let item = trainer.items()[0].clone();
    let x2 = Tensor::cat(&[&item.x0_w, &item.x0_l], 0)?;
    let ts = Tensor::new(&[0.5f32, 0.5], &device)?;
    let n = 8;
    let time = |label: &str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        f()?;
        let mut ms: Vec<f64> = (0..n)
            .map(|_| {
                let start = Instant::now();
                f().map(|()| start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<anyhow::Result<_>>()?;
        ms.sort_by(f64::total_cmp);
        println!("{label:28} min {:7.1} ms   median {:7.1} ms", ms[0], ms[n / 2]);
        Ok(())
    };
    let opts = |adapters| ForwardOptions {
        capture_hidden: false,
        adapters,
        ..Default::default()
    };
    time("forward b2, adapters off", &mut || {
        item.forward(trainer.model(), &x2, &ts, opts(Adapters::Off))?;
        Ok(())
    })?;
    time("forward b2, adapters on", &mut || {
        item.forward(trainer.model(), &x2, &ts, opts(Adapters::On))?;
        Ok(())
    })?;
    time("forward b2 on + backward", &mut || {
        let out = item.forward(trainer.model(), &x2, &ts, opts(Adapters::On))?;
        out.prediction.sqr()?.mean_all()?.backward()?;
        Ok(())
    })?;
    time("full DPO/FocusDPO step", &mut || {
        trainer.step(false)?;
        Ok(())
    })?;
    Ok(())
}
