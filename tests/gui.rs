//! The Studio window under egui_kittest: interaction tests on the whole app (random tiny base, bundled data)
//! and wgpu snapshot tests of the mask overlay shader. Both render with wgpu; without a GPU that needs a software
//! adapter (lavapipe: `mesa-vulkan-drivers`, see `.ci/run`).

mod studio;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use eframe::egui::accesskit::Role;
use eframe::{egui, egui_wgpu};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use focusdpo::app::overlay::{self, MaskValues, OverlayCallback, RgbaPixels};
use focusdpo::app::state::{Colormap, Tab, ViewSettings};
use focusdpo::app::training::RunStatus;
use focusdpo::app::{Level, StudioApp};
use focusdpo::masks::attention_field::Similarity;
use focusdpo::masks::{Branch, MaskVariant};

/// Long enough for a loaded 2-core machine running the model in a debug-profile test build.
const TIMEOUT: Duration = Duration::from_secs(180);

fn studio(runs_dir: &Path) -> Harness<'static, StudioApp> {
    studio::studio(runs_dir, false)
}

/// Steps frames until `done` holds (the workers run on their own threads meanwhile).
fn step_until(h: &mut Harness<'_, StudioApp>, what: &str, done: impl Fn(&StudioApp) -> bool) {
    studio::step_until(h, what, TIMEOUT, |h| done(h.state()));
}

fn fused_with_attention(app: &StudioApp) -> bool {
    !app.fusion_pending() && app.fused().is_some_and(|f| f.a_focus.is_some())
}

#[test]
fn tau_and_gamma_sliders_refuse_the_mask() {
    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    step_until(&mut h, "the first fused map", fused_with_attention);
    let a_focus = h.state().fused().and_then(|f| f.a_focus).unwrap();

    // τ = 1: A_focus ≤ τ always, Eq. 9 blends.
    h.get_by_role_and_label(Role::Slider, "τ").set_value_accesskit(1.0);
    step_until(&mut h, "the fused map at τ = 1", |a| {
        a.settings().fusion.tau == 1.0 && !a.fusion_pending()
    });
    let blend = h.state().fused().unwrap().clone();
    assert_eq!(blend.branch, Branch::Blend);

    // γ changes the blend.
    h.get_by_role_and_label(Role::Slider, "γ").set_value_accesskit(0.9);
    step_until(&mut h, "the fused map at γ = 0.9", |a| {
        a.settings().fusion.gamma == 0.9 && !a.fusion_pending()
    });
    let blend_09 = h.state().fused().unwrap().clone();
    assert_eq!(blend_09.branch, Branch::Blend);
    assert_ne!(blend.map.values, blend_09.map.values, "γ must change the blended map");

    // τ = 0: any A_focus > 0 switches to M = M_s.
    h.get_by_role_and_label(Role::Slider, "τ").set_value_accesskit(0.0);
    step_until(&mut h, "the fused map at τ = 0", |a| {
        a.settings().fusion.tau == 0.0 && !a.fusion_pending()
    });
    let expected = if a_focus > 0.0 {
        Branch::AttentionOnly
    } else {
        Branch::Blend
    };
    assert_eq!(h.state().fused().unwrap().branch, expected);
    let latency = h.state().latency().fusion.unwrap();
    eprintln!("fusion update latency (τ change): {latency:?}");
}

#[test]
fn variant_selector_and_keyboard_timestep() {
    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    step_until(&mut h, "the first fused map", fused_with_attention);

    h.get_by_role_and_label(Role::ComboBox, "variant").click();
    // The menu opens on the next frame.
    h.run_steps(2);
    h.get_by_label("no-ms").click();
    step_until(&mut h, "the no-ms map", |a| {
        a.settings().fusion.variant == MaskVariant::NoMs && !a.fusion_pending()
    });
    assert_eq!(h.state().fused().unwrap().branch, Branch::Static);

    // → steps the timeline; the new M_s(t) is computed (or taken from the cache) and fused.
    let t0 = h.state().settings().t_index;
    h.state_mut().set_tab(Tab::Inspector);
    h.key_press(egui::Key::ArrowRight);
    step_until(&mut h, "the next timestep", |a| {
        a.settings().t_index == t0 + 1 && a.latency().timestep.is_some() && a.attention().contains_key(&(t0 + 1))
    });
    eprintln!(
        "timestep update latency: {:?}; M_s forward: {:?}",
        h.state().latency().timestep,
        h.state().latency().attention_compute
    );
    // The whole timeline gets filled in the background for the A_focus(t) plot.
    step_until(&mut h, "M_s at every timestep", |a| {
        a.attention().len() == focusdpo::app::state::TIMESTEPS.len()
    });
    // Going back is a cache hit: no forward pass on the way.
    h.key_press(egui::Key::ArrowLeft);
    step_until(&mut h, "the cached timestep", |a| {
        a.settings().t_index == t0 && a.latency().timestep.is_some() && !a.fusion_pending()
    });
    eprintln!("cached timestep update latency: {:?}", h.state().latency().timestep);
}

#[test]
fn opening_a_bad_dataset_shows_an_error_and_keeps_running() {
    let runs = tempfile::tempdir().unwrap();
    let not_a_dataset = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    step_until(&mut h, "the bundled item", |a| a.item_id().is_some());

    let field = h.get_by_role(Role::TextInput);
    field.focus();
    field.set_text_value_accesskit(&not_a_dataset.path().display().to_string());
    h.step();
    h.get_by_label("Open").click();
    step_until(&mut h, "the error", |a| {
        a.notices().iter().any(|n| n.level == Level::Error)
    });
    let error = &h
        .state()
        .notices()
        .iter()
        .find(|n| n.level == Level::Error)
        .unwrap()
        .text;
    assert!(error.contains("cannot open dataset"), "{error}");
    assert!(
        h.query_by_label_contains("cannot open dataset").is_some(),
        "the error is shown in the window"
    );
    // The previous item is still inspectable.
    assert!(h.state().item_id().is_some());
}

#[test]
fn training_run_starts_streams_curves_and_stops_within_one_step() {
    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    step_until(&mut h, "the base model", |a| a.training().can_start());
    h.get_by_label("Training").click();
    h.step();
    {
        let form = &mut h.state_mut().settings_mut().training;
        form.name = "gui-test".into();
        form.config.steps = 1000;
        form.config.lora.rank = 2;
    }
    h.get_by_label("Start run").click();
    step_until(&mut h, "two logged steps", |a| {
        a.training().live().is_some_and(|l| l.curves.len() >= 2)
    });
    // The status bar shows the frame time while the run trains.
    let frames = h.state().frame_stats().expect("frame times are recorded");
    assert!(frames.frames > 0 && frames.worst >= frames.mean, "{frames:?}");
    assert!(
        h.query_by_label_contains("ms worst").is_some(),
        "frame time in the status bar"
    );
    h.get_by_label("Stop").click();
    let stopped_after = h.state().training().live().unwrap().curves.len() as u64;
    step_until(&mut h, "the run to stop", |a| {
        a.training()
            .live()
            .is_some_and(|l| matches!(l.status, RunStatus::Finished { .. } | RunStatus::Failed { .. }))
    });
    match &h.state().training().live().unwrap().status {
        RunStatus::Finished { step, stopped } => {
            assert!(stopped);
            // The step in flight when Stop was clicked may complete; no other.
            assert!(
                *step <= stopped_after + 1,
                "stopped at {step}, clicked after {stopped_after}"
            );
        }
        other => panic!("run did not stop cleanly: {other:?}"),
    }
    assert!(runs.path().join("gui-test").join("metrics.jsonl").is_file());
    // The finished run shows up among the past runs for overlaying.
    step_until(&mut h, "the past-runs list", |a| {
        a.training()
            .past()
            .iter()
            .any(|r| r.name == "gui-test" && !r.curves.is_empty())
    });
    // The curves are smoothed as TensorBoard does, the raw values drawn faint behind (0 turns it off).
    assert_eq!(h.state().settings().plots.smoothing, 0.6);
    assert!(h.query_by_label("smoothing").is_some());
    h.state_mut().settings_mut().plots.smoothing = 0.0;
    h.step();
}

/// The inspector edits the run config's own attention type: the similarity of Eq. 3 is a choice there, and
/// switching it recomputes `M_s` with it (Eq. 4's top-K keeps the same tokens here, so the maps may be equal).
#[test]
fn similarity_choice_recomputes_the_attention_field() {
    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    step_until(&mut h, "the first fused map", fused_with_attention);
    let t = h.state().settings().t_index;
    assert_eq!(h.state().attention()[&t].choice.similarity, Similarity::Cosine);
    h.get_by_label("squared-norm").click();
    step_until(&mut h, "M_s with the squared-norm similarity", |a| {
        a.attention()
            .get(&t)
            .is_some_and(|at| at.choice.similarity == Similarity::SquaredNorm)
    });
    assert_eq!(h.state().settings().attention.similarity, Similarity::SquaredNorm);
}

/// The training form is drawn from the knob registry: every knob has its row (the main ones, then "more knobs").
#[test]
fn training_form_shows_every_registry_knob() {
    let runs = tempfile::tempdir().unwrap();
    let mut h = studio(runs.path());
    h.get_by_label("Training").click();
    h.step();
    h.get_by_label_contains("more knobs (").click();
    h.step();
    h.step();
    for k in focusdpo::knobs::KNOBS {
        assert!(h.query_all_by_label(k.key).next().is_some(), "no row for {}", k.key);
    }
}

/// A past run's sample sheets are listed and the newest is shown (decoded off the GUI thread); the slider picks
/// another checkpoint's.
#[test]
fn past_runs_sample_sheets_are_shown_by_checkpoint() {
    let runs = tempfile::tempdir().unwrap();
    let dir = runs.path().join("old-run");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), "{\"step\":1,\"loss\":0.7}\n").unwrap();
    for step in [10, 20] {
        let img = image::RgbImage::from_pixel(40, 20, image::Rgb([step as u8, 0, 0]));
        focusdpo::train::samples::write_png(&focusdpo::train::samples::sheet_path(&dir, step), &img).unwrap();
    }
    let mut h = studio(runs.path());
    h.get_by_label("Training").click();
    step_until(&mut h, "the newest sheet on screen", |a| {
        a.training()
            .sheet
            .shown_path()
            .is_some_and(|p| p.ends_with("samples/step-20.png"))
    });
    assert!(h.query_by_label("step 20").is_some());
    h.state_mut().training_mut().sheet.step = Some(10);
    step_until(&mut h, "the older sheet", |a| {
        a.training()
            .sheet
            .shown_path()
            .is_some_and(|p| p.ends_with("samples/step-10.png"))
    });
}

// ---- snapshot tests of the overlay shader ----------------------------------------------------------------------

fn test_image() -> Arc<RgbaPixels> {
    let (w, h) = (16u32, 16u32);
    let rgba = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [(x * 16) as u8, (y * 16) as u8, 128, 255]))
        .collect();
    Arc::new(RgbaPixels {
        width: w,
        height: h,
        rgba,
    })
}

fn test_mask() -> Arc<MaskValues> {
    Arc::new(MaskValues {
        cols: 4,
        rows: 4,
        values: (0..16).map(|i| i as f32 / 15.0).collect(),
    })
}

fn test_prior() -> Arc<MaskValues> {
    let values = (0..16)
        .map(|i| {
            let (x, y) = (i % 4, i / 4);
            if (1..=2).contains(&x) && (1..=3).contains(&y) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Arc::new(MaskValues {
        cols: 4,
        rows: 4,
        values,
    })
}

fn snapshot_overlay(name: &str, settings: ViewSettings, uv_origin: [f32; 2], uv_per_widget: [f32; 2]) {
    let render_state = egui_kittest::wgpu::create_render_state(
        egui_kittest::wgpu::default_wgpu_setup(),
        egui_wgpu::RendererOptions::PREDICTABLE,
    );
    overlay::register(&render_state);
    let (image, mask, prior) = (test_image(), test_mask(), test_prior());
    let mut h = Harness::builder()
        .with_size(egui::vec2(128.0, 128.0))
        .renderer(egui_kittest::wgpu::WgpuTestRenderer::from_render_state(render_state))
        .build_ui(move |ui| {
            let rect = egui::Rect::from_min_size(egui::pos2(0.0, 0.0), egui::vec2(128.0, 128.0));
            ui.painter().add(egui_wgpu::Callback::new_paint_callback(
                rect,
                OverlayCallback {
                    view: egui::Id::unique("snapshot"),
                    image: Arc::clone(&image),
                    mask: Some(Arc::clone(&mask)),
                    prior: Some(Arc::clone(&prior)),
                    settings,
                    uv_origin,
                    uv_per_widget,
                    widget_size_points: [128.0, 128.0],
                },
            ));
        });
    h.run();
    h.snapshot(name);
}

#[test]
fn overlay_snapshot_viridis_nearest_with_contour() {
    let settings = ViewSettings {
        colormap: Colormap::Viridis,
        opacity: 0.7,
        smooth: false,
        contour: true,
    };
    snapshot_overlay("overlay_viridis_nearest_contour", settings, [0.0, 0.0], [1.0, 1.0]);
}

#[test]
fn overlay_snapshot_magma_smooth() {
    let settings = ViewSettings {
        colormap: Colormap::Magma,
        opacity: 0.8,
        smooth: true,
        contour: false,
    };
    snapshot_overlay("overlay_magma_smooth", settings, [0.0, 0.0], [1.0, 1.0]);
}

#[test]
fn overlay_snapshot_grey_zoomed_and_panned() {
    let settings = ViewSettings {
        colormap: Colormap::Grey,
        opacity: 0.5,
        smooth: false,
        contour: true,
    };
    // Zoom ×2 on the top-left quadrant's centre: image uv [0, 0.5]² fills the widget... shifted by a quarter.
    snapshot_overlay("overlay_grey_zoom", settings, [0.125, 0.125], [0.5, 0.5]);
}
