//! Every command on a FLUX-format backbone: a FLUX.1-dev folder as downloaded (tiny random weights, BFL naming, no
//! metadata) plus UNO's LoRA in x-flux naming, opened with `--backbone DIR --base-lora FILE`.

mod common;

use std::path::{Path, PathBuf};

use common::{focusdpo, text};
use focusdpo::model::testing::{tiny_flux_config, write_tiny_flux_folder, write_tiny_uno_lora};

struct Backbone {
    _dir: tempfile::TempDir,
    flux: PathBuf,
    lora: PathBuf,
}

fn backbone() -> Backbone {
    let dir = tempfile::tempdir().expect("tempdir");
    let flux = dir.path().join("FLUX.1-dev");
    write_tiny_flux_folder(&flux, 1).expect("flux folder");
    let lora = dir.path().join("dit_lora.safetensors");
    write_tiny_uno_lora(&lora, &tiny_flux_config(), 4, 2).expect("lora");
    Backbone { _dir: dir, flux, lora }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn masks_train_and_sample_run_on_a_flux_folder_with_unos_lora() {
    let b = backbone();
    let out = tempfile::tempdir().expect("tempdir");
    let masks = out.path().join("m.safetensors");
    let run = focusdpo(&[
        "masks",
        "--item",
        "synth-0001",
        "--backbone",
        s(&b.flux),
        "--base-lora",
        s(&b.lora),
        "--reference-px",
        "32",
        "--timesteps",
        "500",
        "--out",
        s(&masks),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    let msg = text(&run);
    assert!(
        msg.contains("token grid 4×4") && msg.contains("dit_lora.safetensors"),
        "{msg}"
    );

    let run_dir = out.path().join("runs/flux");
    let lora = format!("{}:0.5", s(&b.lora));
    let train = |steps: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--backbone",
            s(&b.flux),
            "--base-lora",
            &lora,
            "--set",
            "model.reference_px=32",
            "--set",
            r#"data.items=["synth-0001"]"#,
            "--steps",
            steps,
            "--out",
            s(&run_dir),
            "--plain",
        ];
        args.extend_from_slice(extra);
        focusdpo(&args)
    };
    let run = train("1", &[]);
    assert!(run.status.success(), "{}", text(&run));
    let config = std::fs::read_to_string(run_dir.join("config.toml")).expect("config");
    assert!(
        config.contains("flux1-dev.safetensors") && config.contains("dit_lora.safetensors") && config.contains("0.5"),
        "{config}"
    );
    // The run resumes with the same command, and its model samples.
    let run = train("2", &["--resume"]);
    assert!(run.status.success(), "{}", text(&run));
    let sheet = out.path().join("samples.png");
    let run = focusdpo(&[
        "sample",
        "--run",
        s(&run_dir),
        "--item",
        "synth-0001",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--out",
        s(&sheet),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(sheet.is_file());
    let eval = out.path().join("eval");
    let run = focusdpo(&[
        "eval",
        "--backbone",
        s(&b.flux),
        "--base-lora",
        s(&b.lora),
        "--single",
        "1",
        "--multi",
        "1",
        "--samples",
        "1",
        "--steps",
        "2",
        "--out",
        s(&eval),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    let report = std::fs::read_to_string(eval.join("eval.md")).expect("eval.md");
    assert!(report.contains("dit_lora.safetensors"), "{report}");
    // The paper's benchmark on the same backbone (UNO's JSON format).
    let refs = out.path().join("refs");
    std::fs::create_dir_all(&refs).expect("mkdir");
    image::RgbImage::from_pixel(40, 40, image::Rgb([200, 30, 30]))
        .save(refs.join("00.png"))
        .expect("png");
    let json = out.path().join("dreambench_singleip.json");
    std::fs::write(&json, r#"[{"prompt": "a red cat", "image_paths": ["refs/00.png"]}]"#).expect("json");
    let run = focusdpo(&[
        "eval",
        "--backbone",
        s(&b.flux),
        "--base-lora",
        s(&b.lora),
        "--dreambench",
        s(&json),
        "--samples",
        "1",
        "--steps",
        "2",
        "--size",
        "32",
        "--reference-px",
        "32",
        "--out",
        s(&eval),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(eval.join("dreambench_singleip/0_0.png").is_file());
    let plan = out.path().join("plan.md");
    std::fs::write(
        &plan,
        "# Plan\n\n## Study: Focus coverage threshold\n- **Ablated Part**: the focus coverage threshold τ\n- \
         **Replacement**: 0.3\n",
    )
    .expect("plan");
    let run = focusdpo(&[
        "ablate",
        s(&plan),
        "--backbone",
        s(&b.flux),
        "--base-lora",
        s(&b.lora),
        "--set",
        "model.reference_px=32",
        "--set",
        r#"data.items=["synth-0001"]"#,
        "--steps",
        "1",
        "--no-eval",
        "--no-plots",
        "--out",
        s(&out.path().join("grid")),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(text(&run).contains("grid: 2 cells"), "{}", text(&run));
    let cells = std::fs::read_dir(out.path().join("grid/cells")).expect("cells").count();
    assert_eq!(cells, 2);
}

#[test]
fn missing_backbone_files_are_named_before_anything_loads() {
    let b = backbone();
    std::fs::remove_file(b.flux.join("ae.safetensors")).expect("rm");
    std::fs::remove_dir_all(b.flux.join("tokenizer")).expect("rm");
    let out = tempfile::tempdir().expect("tempdir");
    let run = focusdpo(&[
        "masks",
        "--item",
        "synth-0001",
        "--backbone",
        s(&b.flux),
        "--base-lora",
        "/nowhere/dit_lora.safetensors",
        "--out",
        s(&out.path().join("m.safetensors")),
    ]);
    assert!(!run.status.success());
    let msg = text(&run);
    assert!(
        msg.contains("nothing was loaded")
            && msg.contains("base_loras[0] = /nowhere/dit_lora.safetensors")
            && msg.contains("autoencoder = ")
            && msg.contains("clip_tokenizer"),
        "{msg}"
    );
    let run = focusdpo(&[
        "masks",
        "--item",
        "synth-0001",
        "--backbone",
        s(&b.lora),
        "--out",
        s(&out.path().join("m.safetensors")),
    ]);
    assert!(!run.status.success());
    assert!(text(&run).contains("dit_lora.safetensors"), "{}", text(&run));
}

/// A run on UNO (FLUX + UNO's LoRA at scale 0.5), trained on attention only, exported in x-flux naming: UNO's
/// LoRA and ours in one file, which merged into the plain FLUX transformer gives exactly the run's model; the
/// kohya and PEFT exports hold the run's LoRA alone; a run that also adapted MLPs is refused for x-flux, naming why.
#[test]
fn export_lora_writes_the_whole_fine_tuned_uno_in_xflux_naming() {
    use focusdpo::model::BaseModel;
    let b = backbone();
    let out = tempfile::tempdir().expect("tempdir");
    let lora = format!("{}:0.5", s(&b.lora));
    let train = |name: &str, mlp: &str| {
        let dir = out.path().join(name);
        let run = focusdpo(&[
            "train",
            "--backbone",
            s(&b.flux),
            "--base-lora",
            &lora,
            "--set",
            "model.reference_px=32",
            "--set",
            r#"data.items=["synth-0001"]"#,
            "--set",
            &format!("lora.targets.mlp={mlp}"),
            "--set",
            "optim.adamw.lr=0.01",
            "--steps",
            "2",
            "--out",
            s(&dir),
            "--plain",
        ]);
        assert!(run.status.success(), "{}", text(&run));
        dir
    };
    let run_dir = train("attn", "false");
    let file = out.path().join("export/uno_focusdpo.safetensors");
    let run = focusdpo(&["export-lora", "--run", s(&run_dir), "--format", "xflux", "-o", s(&file)]);
    assert!(run.status.success(), "{}", text(&run));
    let msg = text(&run);
    // UNO's rank 4 + ours (rank 8) = 12.
    assert!(msg.contains("rank 12") && msg.contains("--lora_rank 12"), "{msg}");

    let device = candle_core::Device::Cpu;
    let (run_model, step) = focusdpo::train::session::load_run_model(&run_dir, &device).expect("run model");
    assert_eq!(step, 2);
    let exported = BaseModel::load_file(&b.flux.join("flux1-dev.safetensors"), &device)
        .expect("flux")
        .with_base_lora(&file, 1.0)
        .expect("the export loads as a base LoRA");
    let mut changed = 0;
    for (want, got) in run_model.mmdit.linears().into_iter().zip(exported.mmdit.linears()) {
        assert_eq!(want.path(), got.path());
        let mut w = want.weight().clone();
        if let Some(ad) = want.adapter() {
            let delta = ad
                .full_rows_b()
                .and_then(|b| b.matmul(ad.a.as_tensor()))
                .and_then(|d| d.affine(ad.scale, 0.0))
                .expect("delta");
            if delta
                .abs()
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|m| m.to_scalar::<f32>())
                .expect("max")
                > 0.0
            {
                changed += 1;
            }
            w = (w + delta).expect("sum");
        }
        let diff = focusdpo::model::testing::max_abs_diff(&w, got.weight()).expect("diff");
        assert!(diff < 1e-5, "{}: {diff}", want.path());
    }
    assert!(changed > 0, "the run's LoRA changed no layer");

    // kohya and PEFT: the run's LoRA alone.
    let kohya = out.path().join("export/focusdpo_kohya.safetensors");
    let run = focusdpo(&[
        "export-lora",
        "--run",
        s(&run_dir),
        "--format",
        "kohya",
        "-o",
        s(&kohya),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(text(&run).contains("dit_lora.safetensors"), "{}", text(&run));
    let peft = out.path().join("export/peft");
    let run = focusdpo(&["export-lora", "--run", s(&run_dir), "--format", "peft", "-o", s(&peft)]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(peft.join("adapter_model.safetensors").is_file() && peft.join("adapter_config.json").is_file());

    let mlp_dir = train("mlp", "true");
    let run = focusdpo(&["export-lora", "--run", s(&mlp_dir), "--format", "xflux", "-o", s(&file)]);
    assert!(!run.status.success());
    let msg = text(&run);
    assert!(
        msg.contains("_mlp.") && msg.contains("lora.targets.mlp = false"),
        "{msg}"
    );
}
