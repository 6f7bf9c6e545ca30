//! Times whole training steps of the tiny default on the CPU and prints one JSON line (median and min milliseconds,
//! peak resident memory): the Rust side of `scripts/reference/cpu_step_ratio.py`, which runs the same steps in
//! diffusers + peft and prints the ratio.
//!
//! ```text
//! cargo run --release --example step_time -- dpo [STEPS]        # one Diffusion-DPO pair (batch 2), LoRA rank 8
//! cargo run --release --example step_time -- sft [STEPS]
//! cargo run --release --example step_time -- focus-dpo [STEPS]
//! cargo run --release --example step_time -- pretrain [STEPS]   # batch 8, two subjects, every weight trained
//! ```
//!
//! Random weights (the time does not depend on them); the bundled pair `synth-0005` (two subjects: 256 target + 2 × 64
//! reference + 40 text tokens); the first two steps are warm-up and not counted.

use std::time::Instant;

use candle_core::Device;
use focusdpo::model::{BaseModel, Config};
use focusdpo::train::RunConfig;
use focusdpo::train::pretrain::{PretrainConfig, PretrainData, Pretrainer, SubjectMix};
use focusdpo::train::session::{Trainer, load_items};

/// Peak resident memory of this process (Linux `VmHWM`), MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    focusdpo::alloc::tune_for_tensors();
    let mut args = std::env::args().skip(1);
    let kind = args.next().unwrap_or_else(|| "dpo".into());
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    anyhow::ensure!(steps >= 1, "STEPS must be at least 1");
    let device = Device::Cpu;
    let mut step: Box<dyn FnMut() -> anyhow::Result<()>> = if kind == "pretrain" {
        let cfg = PretrainConfig {
            steps: 1_000_000,
            data: PretrainData {
                subjects: SubjectMix::Two,
                ..PretrainData::default()
            },
            // Every step with its references, as PyTorch's side of the comparison.
            reference_dropout: 0.0,
            ..PretrainConfig::default()
        };
        let mut p = Pretrainer::new(cfg, &device)?;
        Box::new(move || p.step().map(|_| ()).map_err(Into::into))
    } else {
        let base = BaseModel::random(&Config::tiny(), 4, 0, &device)?;
        let cfg = RunConfig {
            steps: 1_000_000,
            ..RunConfig::default()
        }
        .with_overrides(&[
            format!("objective=\"{kind}\""),
            r#"data.items=["synth-0005"]"#.into(),
            "log.checkpoint_every=0".into(),
        ])?;
        let items = load_items(&cfg, &base, &device)?;
        let mut t = Trainer::new(cfg, base, items)?;
        Box::new(move || t.step(false).map(|_| ()).map_err(Into::into))
    };
    for _ in 0..2 {
        step()?;
    }
    let mut ms: Vec<f64> = (0..steps)
        .map(|_| {
            let start = Instant::now();
            step().map(|()| start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<anyhow::Result<_>>()?;
    ms.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "impl": "focusdpo (candle)",
            "kind": kind,
            "steps": steps,
            "median_ms": ms[ms.len() / 2],
            "min_ms": ms[0],
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
