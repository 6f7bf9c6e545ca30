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
        "--trajectory",
        dir.path().join("steps.png").to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let sheet = image::open(&out_png).expect("sheet").to_rgb8();
    // One reference and two images in a row.
    assert!(
        sheet.width() >= 3 * 32 && sheet.height() >= 32,
        "{:?}",
        sheet.dimensions()
    );
    // The trajectory: per seed a row of inputs and a row of predictions, two steps and the image in each.
    let steps = image::open(dir.path().join("steps.png")).expect("trajectory").to_rgb8();
    assert!(
        (3 * 32..4 * 32).contains(&steps.width()) && (4 * 32..5 * 32).contains(&steps.height()),
        "{:?}",
        steps.dimensions()
    );
    assert!(text(&out).contains("2 step(s), t = 1.000, 0.500"), "{}", text(&out));

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
    assert_eq!(report["config"]["crop"], "located");
    // The former crop at the ideal boxes on request, named in the report.
    let boxed = dir.path().join("boxed");
    let out = focusdpo(&[
        "eval",
        "--base",
        "random:0",
        "--single",
        "1",
        "--multi",
        "0",
        "--samples",
        "1",
        "--steps",
        "1",
        "--crop",
        "ideal-box",
        "--out",
        boxed.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let md = std::fs::read_to_string(boxed.join("eval.md")).expect("eval.md");
    assert!(md.contains("cropped at the ideal target's boxes"), "{md}");

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
    // Without a FocusDPO group there is no claim to check.
    assert!(!md.contains("The paper's claim"), "{md}");

    // FocusDPO "runs" that are copies of the DPO runs: every FocusDPO − DPO difference is 0, so the strict link
    // (FocusDPO > DPO) holds nowhere and no metric's claim is reproduced; the groups can be renamed.
    let mut argv = vec!["report", base_eval.to_str().expect("utf-8")];
    let mut copies = Vec::new();
    for (k, run) in runs.iter().enumerate() {
        let copy = dir.path().join(format!("mine-s{}", k + 1));
        std::fs::create_dir_all(copy.join("eval")).expect("mkdir");
        let run = std::path::Path::new(run);
        std::fs::copy(run.join("eval/eval.json"), copy.join("eval/eval.json")).expect("copy eval.json");
        std::fs::copy(run.join("metrics.jsonl"), copy.join("metrics.jsonl")).expect("copy metrics");
        copies.push(copy.to_str().expect("utf-8").to_string());
    }
    argv.extend(runs.iter().map(String::as_str));
    argv.extend(copies.iter().map(String::as_str));
    argv.extend(["--out", table.to_str().expect("utf-8"), "--claim", "base,sft,dpo,mine"]);
    let out = focusdpo(&argv);
    assert!(out.status.success(), "{}", text(&out));
    let md = std::fs::read_to_string(&table).expect("table");
    assert!(md.contains("### The paper's claim: mine > dpo ≥ sft ≥ base"), "{md}");
    let row = md
        .lines()
        .find(|l| l.starts_with("| single: identity sim ↑ | +0.0"))
        .unwrap_or_else(|| panic!("{md}"));
    assert!(row.ends_with("(not worse) | – | – | not shown |"), "{row}");
    assert!(md.contains("Reproduced on 0 of "), "{md}");
    let out = focusdpo(&["report", base_eval.to_str().expect("utf-8"), "--claim", "base,dpo"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("give four group names"), "{}", text(&out));

    // A folder with neither an eval nor metrics is an error naming it.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let out = focusdpo(&["report", empty.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("empty"), "{}", text(&out));
}

/// The paper's benchmark: a DreamBench file in UNO's format (paths relative to it), images saved per set,
/// CLIP-I / CLIP-T from CLIP weights (a tiny CLIP of the parity fixtures), DINO absent without DINOv2 weights.
#[test]
fn eval_reads_unos_dreambench_json_and_reports_clip_scores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refs = dir.path().join("dreambooth/dataset");
    std::fs::create_dir_all(refs.join("cat")).expect("mkdir");
    image::RgbImage::from_fn(40, 40, |x, y| image::Rgb([200, (x * 6) as u8, (y * 6) as u8]))
        .save(refs.join("cat/00.png"))
        .expect("png");
    image::RgbImage::from_pixel(30, 30, image::Rgb([20, 90, 200]))
        .save(refs.join("cat/01.png"))
        .expect("png");
    let json = dir.path().join("dreambench_multiip.json");
    std::fs::write(
        &json,
        r#"[{"prompt": "a red cat on grass", "image_paths": ["./dreambooth/dataset/cat/00.png"]},
            {"prompt": "a red cat and a blue dog", "image_paths": ["./dreambooth/dataset/cat/00.png", "./dreambooth/dataset/cat/01.png"]},
            {"prompt": "a cat", "image_paths": ["./dreambooth/dataset/cat/01.png"]}]"#,
    )
    .expect("json");
    let clip = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parity/clip_model");
    let out = dir.path().join("eval");
    let run = focusdpo(&[
        "eval",
        "--base",
        "random:0",
        "--dreambench",
        json.to_str().expect("utf-8"),
        "--limit",
        "2",
        "--samples",
        "2",
        "--steps",
        "2",
        "--clip",
        clip.to_str().expect("utf-8"),
        "--clip-tokenizer",
        clip.join("tokenizer.json").to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    let md = std::fs::read_to_string(out.join("dreambench.md")).expect("dreambench.md");
    assert!(md.contains("| dreambench_multiip | 2 | 4 | – | 0."), "{md}");
    assert!(out.join("dreambench_multiip/1_1.png").is_file());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("dreambench.json")).expect("json")).expect("parses");
    assert_eq!(report["seed"], 3407);
    assert!(report["sets"][0]["clip_t"].is_number());
    // A missing reference is named with its entry.
    std::fs::write(&json, r#"[{"prompt": "x", "image_paths": ["missing.jpg"]}]"#).expect("json");
    let run = focusdpo(&[
        "eval",
        "--base",
        "random:0",
        "--dreambench",
        json.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(!run.status.success());
    assert!(
        text(&run).contains("entry 0") && text(&run).contains("missing.jpg"),
        "{}",
        text(&run)
    );
}
