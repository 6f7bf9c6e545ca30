//! The Studio's inspector under egui_kittest: a dataset folder dropped on the window opens, the image views pan
//! and zoom with the pointer, and the settings written at exit are the ones read at the next launch.

mod studio;

use std::collections::HashMap;
use std::time::Duration;

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use focusdpo::app::StudioApp;
use focusdpo::app::state::Settings;
use focusdpo::dip::synth::{NegativeSource, SubjectCount, SynthConfig, synthesize, write_dataset};

const TIMEOUT: Duration = Duration::from_secs(180);

fn step_until(h: &mut Harness<'_, StudioApp>, what: &str, done: impl Fn(&Harness<'_, StudioApp>) -> bool) {
    studio::step_until(h, what, TIMEOUT, done);
}

#[test]
fn a_dropped_dataset_folder_opens() {
    let runs = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let items = synthesize(&SynthConfig {
        items: 3,
        subjects: SubjectCount::One,
        size_px: 64,
        seed: 77,
        negatives: NegativeSource::Perturbed,
    })
    .expect("synth");
    write_dataset(data.path(), &items).expect("write");

    let mut h = studio::studio(runs.path(), false);
    step_until(&mut h, "the bundled dataset", |h| {
        h.query_by_label_contains("48 items").is_some()
    });
    h.input_mut()
        .dropped_files
        .push(std::sync::Arc::new(studio::DroppedPath(
            data.path().join("metadata.jsonl"),
        )));
    h.step();
    step_until(&mut h, "the dropped dataset", |h| {
        h.query_by_label_contains("3 items").is_some()
    });
    assert_eq!(h.state().settings().dataset_dir.as_deref(), Some(data.path()));
}

#[test]
fn image_views_zoom_pan_and_reset() {
    let runs = tempfile::tempdir().expect("tempdir");
    let mut h = studio::studio(runs.path(), false);
    step_until(&mut h, "the first item", |h| h.state().item_id().is_some());
    h.step();
    // The winner view: the node labelled "winner (x_0^w)" is its caption; the image is below it.
    let caption = h.get_by_label("winner (x_0^w)").rect();
    let centre = egui::pos2(caption.min.x + 150.0, caption.max.y + 150.0);
    h.input_mut().events.push(egui::Event::PointerMoved(centre));
    h.step();
    h.input_mut().events.push(egui::Event::Zoom(2.0));
    h.step();
    h.step();
    let zoomed = h.state().pan_zoom();
    assert!(zoomed.zoom > 1.5, "pinch over the image zooms: {zoomed:?}");
    assert!(h.query_by_label_contains("zoom ×").is_some(), "the zoom is shown");

    // Drag: the centre moves opposite to the pointer.
    let press = |pressed| egui::Event::PointerButton {
        pos: centre,
        button: egui::PointerButton::Primary,
        pressed,
        modifiers: egui::Modifiers::NONE,
    };
    h.input_mut().events.push(press(true));
    h.step();
    for k in 1..=5 {
        h.input_mut()
            .events
            .push(egui::Event::PointerMoved(centre + egui::vec2(12.0 * k as f32, 0.0)));
        h.step();
    }
    h.input_mut().events.push(egui::Event::PointerButton {
        pos: centre + egui::vec2(60.0, 0.0),
        button: egui::PointerButton::Primary,
        pressed: false,
        modifiers: egui::Modifiers::NONE,
    });
    h.step();
    let panned = h.state().pan_zoom();
    assert!(panned.centre[0] < zoomed.centre[0], "{zoomed:?} → {panned:?}");

    // Double-click resets.
    h.input_mut().events.push(egui::Event::PointerMoved(centre));
    h.step();
    // (both clicks in one frame: the harness advances time between frames by more than egui's double-click delay)
    for _ in 0..2 {
        h.input_mut().events.push(press(true));
        h.input_mut().events.push(press(false));
    }
    h.step();
    h.step();
    assert_eq!(h.state().pan_zoom(), Default::default());
}

/// eframe's storage, in memory.
#[derive(Default)]
struct MemoryStorage(HashMap<String, String>);

impl eframe::Storage for MemoryStorage {
    fn get_string(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
    fn set_string(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
    fn remove_string(&mut self, key: &str) {
        self.0.remove(key);
    }
    fn flush(&mut self) {}
}

#[test]
fn settings_are_saved_for_the_next_launch() {
    let runs = tempfile::tempdir().expect("tempdir");
    let mut h = studio::studio(runs.path(), true);
    step_until(&mut h, "the first item", |h| h.state().item_id().is_some());
    h.state_mut().settings_mut().fusion.tau = 0.37;
    h.state_mut().settings_mut().t_index = 5;
    let mut storage = MemoryStorage::default();
    eframe::App::save(h.state_mut(), &mut storage);
    let restored: Settings = eframe::get_value(&storage, eframe::APP_KEY).expect("settings were saved");
    assert_eq!(&restored, h.state().settings());
    assert_eq!(restored.fusion.tau, 0.37);

    // Without persistence nothing is written.
    let mut h = studio::studio(runs.path(), false);
    h.step();
    let mut storage = MemoryStorage::default();
    eframe::App::save(h.state_mut(), &mut storage);
    assert!(storage.0.is_empty());
}
