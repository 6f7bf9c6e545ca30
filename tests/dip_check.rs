//! `focusdpo dip check` finds every kind of defect, names line/field/file, and sets the exit code.

mod common;

use common::{focusdpo, line, text, write_valid_dataset};
use image::{GrayImage, Luma, RgbImage};
use serde_json::Value;

#[test]
fn valid_dataset_passes() {
    let dir = tempfile::tempdir().unwrap();
    let root = write_valid_dataset(dir.path());
    let out = focusdpo(&["dip", "check", root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 valid item(s) (1 single-subject, 0 multi-subject), 0 invalid"),
        "{}",
        text(&out)
    );
}

#[test]
fn every_defect_is_reported_with_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let root = write_valid_dataset(dir.path());
    std::fs::write(root.join("garbage.png"), b"this is not a png").unwrap();
    RgbImage::new(8, 8).save(root.join("small.png")).unwrap();
    GrayImage::from_fn(16, 16, |x, _| Luma([if x < 4 { 128 } else { 0 }]))
        .save(root.join("grey.png"))
        .unwrap();
    GrayImage::new(16, 16).save(root.join("empty.png")).unwrap();
    let lines = [
        line("ok", "w.png", "l.png", "m.png"),            // 1 valid
        line("missing", "nope.png", "l.png", "m.png"),    // 2 missing file (winner)
        line("garbage", "w.png", "garbage.png", "m.png"), // 3 undecodable (loser)
        line("small", "w.png", "small.png", "m.png"),     // 4 size mismatch (loser)
        line("grey", "w.png", "l.png", "grey.png"),       // 5 non-binary mask
        line("empty", "w.png", "l.png", "empty.png"),     // 6 empty mask
        line("ok", "w.png", "l.png", "m.png"),            // 7 duplicate id
        "{\"id\": \"broken\", ".to_string(),              // 8 malformed JSON
        line("extra", "w.png", "l.png", "m.png").replace("\"category\"", "\"colour\":1,\"category\""), // 9 unknown
        line("twomasks", "w.png", "l.png", "m.png").replace("[\"m.png\"]", "[\"m.png\",\"m.png\"]"), // 10 count
        line("escape", "../w.png", "l.png", "m.png"),     // 11 path outside
        line("same", "w.png", "w.png", "m.png"),          // 12 warning only
    ];
    std::fs::write(root.join("metadata.jsonl"), lines.join("\n")).unwrap();

    let out = focusdpo(&["dip", "check", root.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let problems = report["problems"].as_array().unwrap();
    let find = |code: &str| {
        problems
            .iter()
            .find(|p| p["code"] == code)
            .unwrap_or_else(|| panic!("no {code} in {problems:#?}"))
    };
    for (code, line, field) in [
        ("missing-file", 2, "winner"),
        ("undecodable-image", 3, "loser"),
        ("size-mismatch", 4, "loser"),
        ("non-binary-mask", 5, "masks[0]"),
        ("empty-mask", 6, "masks[0]"),
        ("duplicate-id", 7, "id"),
        ("unknown-field", 9, "colour"),
        ("subject-count", 10, "masks"),
        ("path-outside-dataset", 11, "winner"),
    ] {
        let p = find(code);
        assert_eq!(p["line"], line, "{code}: {p}");
        assert_eq!(p["field"], field, "{code}: {p}");
        assert_eq!(p["severity"], "error", "{code}: {p}");
        assert!(
            p["message"].as_str().unwrap().contains("metadata.jsonl"),
            "{code} names the manifest: {p}"
        );
    }
    assert_eq!(find("malformed-line")["line"], 8);
    assert_eq!(find("same-file")["severity"], "warning");
    assert!(find("missing-file")["message"].as_str().unwrap().contains("nope.png"));
    assert_eq!(report["lines"], 12);
    assert_eq!(report["valid_items"], 2, "ok and same");
    assert_eq!(report["invalid_items"], 10);
}

#[test]
fn missing_folder_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = focusdpo(&["dip", "check", dir.path().join("absent").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("not a DIP dataset"), "{}", text(&out));
    assert!(!text(&out).contains("panicked"));
}

#[test]
fn non_utf8_and_binary_manifest_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let root = write_valid_dataset(dir.path());
    let mut bytes = std::fs::read(root.join("metadata.jsonl")).unwrap();
    bytes.extend_from_slice(b"\xff\xfe\x00garbage\n\x00\x01\x02\n");
    std::fs::write(root.join("metadata.jsonl"), bytes).unwrap();
    let out = focusdpo(&["dip", "check", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("malformed-line"), "{}", text(&out));
    assert!(!text(&out).contains("panicked"));
}
