//! Shared fixtures of the Studio's egui_kittest tests: the whole app on the bundled dataset with a random tiny base
//! (wgpu; lavapipe without a GPU), stepping frames until a condition holds, and files dropped on the window.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::Harness;
use focusdpo::app::{StudioApp, StudioOptions};
use focusdpo::model::BaseSource;
use focusdpo::train::config::ModelSettings;

/// The Studio at 1400 × 900 on the bundled dataset and base `random:0`, runs under `runs_dir`.
pub fn studio(runs_dir: &Path, persist: bool) -> Harness<'static, StudioApp> {
    let options = StudioOptions {
        dataset: Some(focusdpo::dip::bundled_dataset_dir()),
        backbone: Some(ModelSettings {
            base: BaseSource::Random(0),
            ..ModelSettings::default()
        }),
        runs_dir: runs_dir.to_path_buf(),
        persist,
        frame_stats_to_stderr: false,
    };
    Harness::builder()
        .with_size(egui::vec2(1400.0, 900.0))
        .wgpu()
        .build_eframe(move |cc| StudioApp::new(cc, options))
}

/// Steps frames until `done` holds (the workers run on their own threads meanwhile); fails after `timeout`.
pub fn step_until(
    h: &mut Harness<'_, StudioApp>,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Harness<'_, StudioApp>) -> bool,
) {
    let start = Instant::now();
    while !done(h) {
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}; notices: {:?}",
            h.state().notices()
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
}

/// A file dropped on the window (what eframe hands over on a native drop).
#[derive(Debug)]
pub struct DroppedPath(pub PathBuf);

impl egui::DroppedFile for DroppedPath {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}
