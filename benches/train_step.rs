//! The training hot paths on the tiny default (random weights: speed does not depend on them) with one bundled
//! single-subject pair: the MMDiT forward at batch 1 (256 target + 64 reference + 40 text tokens), a full
//! Diffusion-DPO step and a full FocusDPO step (policy + reference pass at batch 2, masks, backward, AdamW), and a
//! pretraining step (batch 8, every weight trained). `scripts/reference/cpu_step_ratio.py` compares the same steps
//! with diffusers + peft on PyTorch.

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{Criterion, criterion_group};
use focusdpo::model::{Adapters, BaseModel, Config, ForwardOptions};
use focusdpo::train::RunConfig;
use focusdpo::train::objective::ObjectiveKind;
use focusdpo::train::pretrain::{PretrainConfig, PretrainData, Pretrainer, SubjectMix};
use focusdpo::train::session::{Trainer, load_items};

fn trainer(objective: ObjectiveKind) -> Trainer {
    let device = Device::Cpu;
    let base = BaseModel::random(&Config::tiny(), 4, 0, &device).expect("base");
    let cfg = RunConfig {
        objective,
        steps: 1_000_000,
        ..RunConfig::default()
    }
    .with_overrides(&[r#"data.items=["synth-0000"]"#.into()])
    .expect("config");
    let items = load_items(&cfg, &base, &device).expect("items");
    Trainer::new(cfg, base, items).expect("trainer")
}

fn bench_steps(c: &mut Criterion) {
    focusdpo::alloc::tune_for_tensors();
    let mut group = c.benchmark_group("tiny_b1");
    group.sample_size(10);
    {
        let t = trainer(ObjectiveKind::Dpo);
        let item = &t.items()[0];
        let ts = Tensor::new(&[0.5f32], &Device::Cpu).expect("t");
        for (name, capture) in [("forward", false), ("forward_capture", true)] {
            group.bench_function(name, |b| {
                b.iter(|| {
                    item.forward(
                        t.model(),
                        black_box(&item.x0_w),
                        &ts,
                        ForwardOptions {
                            capture_hidden: capture,
                            adapters: Adapters::On,
                            ..Default::default()
                        },
                    )
                    .expect("forward")
                })
            });
        }
    }
    for (name, objective) in [
        ("sft_step", ObjectiveKind::Sft),
        ("dpo_step", ObjectiveKind::Dpo),
        ("focus_dpo_step", ObjectiveKind::FocusDpo),
    ] {
        let mut t = trainer(objective);
        group.bench_function(name, |b| b.iter(|| t.step(false).expect("step")));
    }
    group.finish();
    // Pretraining's step: batch 8 of two-subject scenes (rendered in the step), every weight trained, EMA.
    let mut group = c.benchmark_group("tiny_pretrain_b8");
    group.sample_size(10);
    let cfg = PretrainConfig {
        steps: 1_000_000,
        data: PretrainData {
            subjects: SubjectMix::Two,
            ..PretrainData::default()
        },
        ..PretrainConfig::default()
    };
    let mut p = Pretrainer::new(cfg, &Device::Cpu).expect("pretrainer");
    group.bench_function("pretrain_step", |b| b.iter(|| p.step().expect("step")));
    group.finish();
}

criterion_group!(benches, bench_steps);

/// `criterion_main!` plus the font registration: criterion draws its report plots with plotters, whose `ab_glyph`
/// text (this crate's plots enable it) panics without a registered font.
fn main() {
    focusdpo::experiment::plot::register_font().expect("the bundled plot font registers");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
