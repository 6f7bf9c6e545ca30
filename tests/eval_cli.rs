//! `focusdpo sample`, `focusdpo eval` and `focusdpo report` as a user runs them (tiny random base, few steps).

mod common;

use common::{focusdpo, text};

#[test]
fn sample_writes_a_sheet_and_rejects_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reference = dir.path().join("ref.png");
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 30, 30]))
        .save(&reference)
        .expect("reference");
    let out_png = dir.path().join("out.png");
    let out = focusdpo(&[
        "sample",
        "--base",
        "random:0",
        "--prompt",
        "a red ball on grass",
        "--reference",
        reference.to_str().expect("utf-8"),
        "--seeds",
        "0,1",
        "--steps",
        "2",
        "--size",
        "32",
        "--out",
        out_png.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let sheet = image::open(&out_png).expect("sheet").to_rgb8();
    // One reference and two images in a row.
    assert!(
        sheet.width() >= 3 * 32 && sheet.height() >= 32,
        "{:?}",
        sheet.dimensions()
    );

    // A size that is not a multiple of the patch, and a reference that is not an image: errors, no panic.
    let out = focusdpo(&[
        "sample",
        "--base",
        "random:0",
        "--prompt",
        "x",
        "--reference",
        reference.to_str().expect("utf-8"),
        "--size",
        "30",
        "--out",
        out_png.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let bogus = dir.path().join("bogus.png");
    std::fs::write(&bogus, b"not a png").expect("write");
    let out = focusdpo(&[
        "sample",
        "--base",
        "random:0",
        "--prompt",
        "x",
        "--reference",
        bogus.to_str().expect("utf-8"),
        "--out",
        out_png.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bogus.png"), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
}

#[test]
fn eval_then_report_compares_a_base_with_a_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base_eval = dir.path().join("base");
    let out = focusdpo(&[
        "eval",
        "--base",
        "random:0",
        "--single",
        "2",
        "--multi",
        "1",
        "--samples",
        "1",
        "--steps",
        "2",
        "--out",
        base_eval.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for f in ["eval.json", "eval.md", "samples-single.png", "samples-multi.png"] {
        assert!(base_eval.join(f).is_file(), "missing {f}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base_eval.join("eval.json")).expect("read")).expect("json");
    assert_eq!(report["splits"]["single"]["items"], 2);
    assert_eq!(report["splits"]["multi"]["items"], 1);

    // Two seeds of a one-step DPO run, each evaluated in its eval/ folder.
    let mut runs = Vec::new();
    for seed in ["1", "2"] {
        let run = dir.path().join(format!("dpo-s{seed}"));
        let run_s = run.to_str().expect("utf-8").to_string();
        let out = focusdpo(&[
            "train",
            "--base",
            "random:0",
            "--objective",
            "dpo",
            "--steps",
            "2",
            "--seed",
            seed,
            "--out",
            &run_s,
            "--plain",
            "--set",
            r#"data.items=["synth-0002"]"#,
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let out = focusdpo(&[
            "eval",
            "--run",
            &run_s,
            "--single",
            "2",
            "--multi",
            "0",
            "--samples",
            "1",
            "--steps",
            "2",
            "--out",
            run.join("eval").to_str().expect("utf-8"),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        runs.push(run_s);
    }
    let table = dir.path().join("results.md");
    let mut argv = vec!["report", base_eval.to_str().expect("utf-8")];
    argv.extend(runs.iter().map(String::as_str));
    argv.extend(["--out", table.to_str().expect("utf-8")]);
    let out = focusdpo(&argv);
    assert!(out.status.success(), "{}", text(&out));
    let md = std::fs::read_to_string(&table).expect("table");
    assert!(md.contains("| metric | base (n=1) | dpo (n=2) |"), "{md}");
    assert!(md.contains("single: identity sim ↑"), "{md}");
    assert!(md.contains("implicit acc."), "{md}");

    // A folder with neither an eval nor metrics is an error naming it.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let out = focusdpo(&["report", empty.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("empty"), "{}", text(&out));
}
