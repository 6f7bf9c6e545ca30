//! The Studio on a FLUX-format backbone: a FLUX.1-dev folder of tiny random weights (BFL naming, autoencoder, T5,
//! CLIP) plus UNO's LoRA in a TOML profile, dropped on the window; the inspector computes `M_s` on it, a training
//! run and an ablation grid train on it, and the profile is remembered.

mod studio;

use std::time::Duration;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use focusdpo::app::StudioApp;
use focusdpo::app::experiment_worker::PlanSource;
use focusdpo::app::training::RunStatus;
use focusdpo::model::BaseSource;
use focusdpo::model::testing::{tiny_flux_config, write_tiny_flux_folder, write_tiny_uno_lora};

const TIMEOUT: Duration = Duration::from_secs(180);

fn step_until(h: &mut Harness<'_, StudioApp>, what: &str, done: impl Fn(&Harness<'_, StudioApp>) -> bool) {
    studio::step_until(h, what, TIMEOUT, done);
}

#[test]
fn a_dropped_flux_profile_with_unos_lora_drives_the_inspector_and_training() {
    let runs = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("tempdir");
    let flux = files.path().join("FLUX.1-dev");
    write_tiny_flux_folder(&flux, 4).expect("flux folder");
    write_tiny_uno_lora(&files.path().join("dit_lora.safetensors"), &tiny_flux_config(), 4, 5).expect("lora");
    let profile = files.path().join("uno.toml");
    std::fs::write(
        &profile,
        "transformer = \"FLUX.1-dev/flux1-dev.safetensors\"\nbase_loras = [{ path = \"dit_lora.safetensors\" }]\n\
         autoencoder = \"FLUX.1-dev/ae.safetensors\"\nt5 = \"FLUX.1-dev/text_encoder_2\"\n\
         t5_tokenizer = \"FLUX.1-dev/tokenizer_2/tokenizer.json\"\nt5_max_tokens = 8\n\
         clip = \"FLUX.1-dev/text_encoder\"\nclip_tokenizer = \"FLUX.1-dev/tokenizer/tokenizer.json\"\n\
         reference_px = 32\n",
    )
    .expect("profile");

    let mut h = studio::studio(runs.path(), false);
    step_until(&mut h, "the tiny base", |h| h.state().backbone().is_some());
    h.input_mut()
        .dropped_files
        .push(std::sync::Arc::new(studio::DroppedPath(profile.clone())));
    h.step();
    step_until(&mut h, "the FLUX backbone", |h| {
        h.state()
            .backbone()
            .is_some_and(|b| b.base == BaseSource::File(flux.join("flux1-dev.safetensors")))
    });
    assert!(
        h.query_by_label_contains("flux1-dev.safetensors + dit_lora.safetensors")
            .is_some(),
        "the top bar names the backbone"
    );
    assert_eq!(h.state().settings().backbone_path.as_deref(), Some(profile.as_path()));
    // The inspector: M_s from the FLUX model's hidden states, on its 16 px token grid (64 px items: 4 × 4).
    step_until(&mut h, "M_s on the FLUX backbone", |h| {
        !h.state().attention().is_empty() && h.state().fused().is_some_and(|f| f.a_focus.is_some())
    });
    let at = h.state().attention().values().next().expect("M_s").clone();
    assert_eq!((at.union.grid.height(), at.union.grid.width()), (4, 4));
    // A training run on the same backbone.
    h.get_by_label("Training").click();
    h.step();
    {
        let form = &mut h.state_mut().settings_mut().training;
        form.name = "flux-run".into();
        form.config.steps = 2;
        form.config.lora.rank = 2;
    }
    h.get_by_label("Start run").click();
    step_until(&mut h, "the run to finish", |h| {
        h.state()
            .training()
            .live()
            .is_some_and(|l| matches!(l.status, RunStatus::Finished { .. } | RunStatus::Failed { .. }))
    });
    match &h.state().training().live().expect("run").status {
        RunStatus::Finished { step, .. } => assert_eq!(*step, 2),
        other => panic!("the run on the FLUX backbone did not finish: {other:?}"),
    }
    let config = std::fs::read_to_string(runs.path().join("flux-run/config.toml")).expect("config");
    assert!(
        config.contains("flux1-dev.safetensors") && config.contains("dit_lora.safetensors"),
        "{config}"
    );
    // An ablation grid on the same backbone: every cell's config names its files.
    h.get_by_label("Experiments").click();
    h.step();
    let plan = files.path().join("tiny.md");
    std::fs::write(
        &plan,
        "# Tiny\n\n### Focus threshold\n- **Ablated Part**: focus coverage threshold τ\n- **Action**: REPLACE\n\
         - **Replacement**: 0.3\n- **Metrics**: implicit accuracy, loss\n",
    )
    .expect("plan");
    {
        let settings = &mut h.state_mut().settings_mut().experiments;
        settings.steps = 1;
        settings.seeds = 1;
        settings.evaluate = false;
    }
    h.state_mut().experiments_mut().load(PlanSource::File(plan));
    step_until(&mut h, "the grid", |h| {
        h.state().experiments().plan().is_some() && h.state().experiments().can_run(&h.state().settings().experiments)
    });
    h.get_by_label("Run grid").click();
    step_until(&mut h, "the grid to finish", |h| {
        !h.state().experiments().is_running() && !h.state().experiments().results().is_empty()
    });
    let cells = runs.path().join("tiny/cells");
    let configs: Vec<String> = std::fs::read_dir(&cells)
        .expect("cells")
        .map(|e| std::fs::read_to_string(e.expect("cell").path().join("config.toml")).expect("cell config"))
        .collect();
    assert_eq!(configs.len(), 2, "notices: {:?}", h.state().notices());
    assert!(
        configs
            .iter()
            .all(|c| c.contains("flux1-dev.safetensors") && c.contains("dit_lora.safetensors")),
        "{configs:?}"
    );
    // A profile that names missing files is an error in the window; the backbone in use stays.
    let broken = files.path().join("broken.toml");
    std::fs::write(&broken, "transformer = \"nowhere.safetensors\"\n").expect("profile");
    h.state_mut().open_backbone(broken);
    step_until(&mut h, "the error", |h| {
        h.state()
            .notices()
            .iter()
            .any(|n| n.text.contains("nowhere.safetensors"))
    });
}
