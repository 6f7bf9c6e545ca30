//! Shared fixtures for the CLI tests: small hand-made DIP datasets written with the `image` crate.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{GrayImage, Luma, Rgb, RgbImage};

/// Runs the `focusdpo` binary with `args`.
pub fn focusdpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_focusdpo"))
        .args(args)
        .output()
        .expect("the focusdpo binary runs")
}

/// stdout + stderr as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A 16×16 scene: textured left half, flat right half, a red square subject at rows 4..12, cols 2..10.
pub fn winner() -> RgbImage {
    RgbImage::from_fn(16, 16, |x, y| {
        if (2..10).contains(&x) && (4..12).contains(&y) {
            Rgb([220, 30, 30])
        } else if x < 8 {
            let v = ((x * 37 + y * 91) % 200) as u8;
            Rgb([v, v / 2, 255 - v])
        } else {
            Rgb([40, 120, 40])
        }
    })
}

/// The subject's mask (0/255).
pub fn mask() -> GrayImage {
    GrayImage::from_fn(16, 16, |x, y| {
        Luma([if (2..10).contains(&x) && (4..12).contains(&y) {
            255
        } else {
            0
        }])
    })
}

/// The winner with the subject's colour changed.
pub fn loser() -> RgbImage {
    let mut l = winner();
    for (x, y, p) in l.enumerate_pixels_mut() {
        if (2..10).contains(&x) && (4..12).contains(&y) {
            *p = Rgb([30, 30, 220]);
        }
    }
    l
}

/// Writes a one-item valid dataset (`ok`) with its images, and returns the folder.
pub fn write_valid_dataset(root: &Path) -> PathBuf {
    std::fs::create_dir_all(root).unwrap();
    winner().save(root.join("w.png")).unwrap();
    loser().save(root.join("l.png")).unwrap();
    winner().save(root.join("r.png")).unwrap();
    mask().save(root.join("m.png")).unwrap();
    std::fs::write(
        root.join("metadata.jsonl"),
        format!("{}\n", line("ok", "w.png", "l.png", "m.png")),
    )
    .unwrap();
    root.to_path_buf()
}

/// One manifest line for a single-subject item.
pub fn line(id: &str, winner: &str, loser: &str, mask: &str) -> String {
    format!(
        r#"{{"id":"{id}","prompt":"a red square","references":["r.png"],"winner":"{winner}","loser":"{loser}","masks":["{mask}"],"category":"object"}}"#
    )
}
