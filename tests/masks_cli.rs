//! `focusdpo masks` end to end on a hand-made item: tensor names, shapes and values, and bad input.

mod common;

use std::path::Path;

use common::{focusdpo, text, write_valid_dataset};
use image::{GrayImage, Luma};
use safetensors::SafeTensors;

fn read_f32(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("tensor {name}: {e}"));
    let vals = t
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), vals)
}

/// M_prior of the fixture at stride 4: the 8×8 px subject at rows 4..12, cols 2..10 covers token rows 1–2 fully
/// and token columns 0 and 2 by exactly half (kept by the ≥ 50 % rule) → 6 tokens.
#[rustfmt::skip]
const PRIOR: [f32; 16] = [
    0., 0., 0., 0.,
    1., 1., 1., 0.,
    1., 1., 1., 0.,
    0., 0., 0., 0.,
];

fn write_ms(root: &Path) -> String {
    // Covers token (1, 1) only → ‖M_s‖₁ = 1, A_focus = 1/6.
    let path = root.join("ms.png");
    GrayImage::from_fn(16, 16, |x, y| {
        Luma([if (4..8).contains(&x) && (4..8).contains(&y) {
            255
        } else {
            0
        }])
    })
    .save(&path)
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn static_variant_writes_prior_detail_and_fused_mask() {
    let dir = tempfile::tempdir().unwrap();
    let root = write_valid_dataset(&dir.path().join("d"));
    let out_file = dir.path().join("m.safetensors");
    let png = dir.path().join("png");
    let out = focusdpo(&[
        "masks",
        "--data",
        root.to_str().unwrap(),
        "--item",
        "ok",
        "--variant",
        "no-ms",
        "--out",
        out_file.to_str().unwrap(),
        "--png",
        png.to_str().unwrap(),
        "--raw-entropy",
        "--window",
        "3",
        "--timesteps",
        "250,750",
        // A variant without M_s never loads the backbone (this file does not exist) and runs no forward.
        "--base",
        "/nonexistent/base.safetensors",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("M_s from none (variant no-ms does not use M_s; no backbone forward)"),
        "{}",
        text(&out)
    );
    let bytes = std::fs::read(&out_file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, prior) = read_f32(&st, "m_prior");
    assert_eq!((shape, prior.as_slice()), (vec![4, 4], &PRIOR[..]));
    let (_, prior0) = read_f32(&st, "m_prior.s0");
    assert_eq!(prior0, PRIOR);
    let (_, m_d) = read_f32(&st, "m_d");
    assert!(m_d.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(m_d.contains(&0.0) && m_d.contains(&1.0), "Eq. 8 spans [0, 1]: {m_d:?}");
    for t in ["250", "750"] {
        let (_, m) = read_f32(&st, &format!("m.t{t}"));
        let want: Vec<f32> = m_d.iter().zip(PRIOR).map(|(d, p)| d * p).collect();
        assert_eq!(m, want, "no-ms: M = M_d ⊙ M_prior");
        assert!(st.tensor(&format!("m_s.t{t}")).is_err(), "no M_s without a source");
    }
    let (shape, _) = read_f32(&st, "c_raw");
    assert_eq!(shape, vec![16, 16]);
    for f in [
        "m_prior.png",
        "m_d.png",
        "m.png",
        "c_raw.png",
        "m_over_winner.png",
        "winner.png",
    ] {
        assert!(png.join(f).is_file(), "{f}");
    }
}

#[test]
fn focus_with_supplied_ms_takes_both_branches_of_eq9() {
    let dir = tempfile::tempdir().unwrap();
    let root = write_valid_dataset(&dir.path().join("d"));
    let ms = write_ms(dir.path());
    let run = |tau: &str| {
        let out_file = dir.path().join(format!("m{tau}.safetensors"));
        let out = focusdpo(&[
            "masks",
            "--data",
            root.to_str().unwrap(),
            "--ms-mask",
            &ms,
            "--tau",
            tau,
            "--gamma",
            "0.3",
            "--out",
            out_file.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        std::fs::read(out_file).unwrap()
    };
    // τ = 0.1 < A_focus = 1/6 → M = M_s.
    let bytes = run("0.1");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, a) = read_f32(&st, "a_focus.t500");
    assert!((a[0] - 1.0 / 6.0).abs() < 1e-6, "{a:?}");
    let (_, ms) = read_f32(&st, "m_s.t500");
    let (_, m) = read_f32(&st, "m.t500");
    assert_eq!(m, ms);
    assert_eq!(ms.iter().sum::<f32>(), 1.0);
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["branch"], "t500=attention");
    // τ = 0.2 ≥ A_focus → M = 0.3·M_s + 0.7·M_d⊙M_prior.
    let bytes = run("0.2");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, m_d) = read_f32(&st, "m_d");
    let (_, m) = read_f32(&st, "m.t500");
    for i in 0..16 {
        let want = 0.3 * ms[i] + 0.7 * m_d[i] * PRIOR[i];
        assert!((m[i] - want).abs() < 1e-6, "cell {i}: {} vs {want}", m[i]);
    }
}

#[test]
fn bad_input_gives_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let root = write_valid_dataset(&dir.path().join("d"));
    let out_file = dir.path().join("x.safetensors");
    let base = [
        "masks",
        "--data",
        root.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--item", "nope"], "no item with id \"nope\""),
        (
            vec!["--base", "/nonexistent/base.safetensors"],
            "needs the attention field M_s",
        ),
        (vec!["--variant", "focal"], "unknown mask variant"),
        (
            vec!["--variant", "prior", "--gamma", "2"],
            "masks.fusion.gamma must be a number in [0, 1], got 2",
        ),
        (
            vec!["--variant", "prior", "--window", "4"],
            "entropy window must be odd",
        ),
        (vec!["--variant", "prior", "--stride", "0"], "stride"),
        (vec!["--variant", "prior", "--timesteps", "1001"], "outside 0..=1000"),
        (vec!["--ms-mask", "/nonexistent/ms.png"], "file not found"),
        (
            vec!["--pool", "max"],
            "'max' for '--pool <POOL>': `max` is none of mean, foreground",
        ),
        (
            vec!["--similarity", "dot"],
            "'dot' for '--similarity <SIMILARITY>': `dot` is none of cosine, squared-norm",
        ),
    ];
    for (extra, expect) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter());
        let out = focusdpo(&args);
        let t = text(&out);
        assert!(!out.status.success(), "{extra:?} should fail");
        assert!(t.contains(expect), "{extra:?}: expected `{expect}` in {t}");
        assert!(!t.contains("panicked"), "{extra:?}: {t}");
    }
    assert!(!out_file.exists(), "nothing written on error");
}

/// On the bundled base and item, Eq. 3 with the CLS pooled over the reference's foreground places the subjects
/// better than the mean over all reference tokens (mostly background): A_focus falls (docs/masks.md).
#[test]
fn foreground_pooling_lowers_a_focus_on_the_bundled_base() {
    let dir = tempfile::tempdir().unwrap();
    let a_focus = |pool: &str| {
        let out_file = dir.path().join(format!("{pool}.safetensors"));
        let out = focusdpo(&[
            "masks",
            "--item",
            "synth-0003",
            "--timesteps",
            "100",
            "--pool",
            pool,
            "--out",
            out_file.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let bytes = std::fs::read(&out_file).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        read_f32(&st, "a_focus.t100").1[0]
    };
    let (mean, foreground) = (a_focus("mean"), a_focus("foreground"));
    assert!(
        foreground < mean - 0.2,
        "A_focus: foreground {foreground} vs mean {mean}"
    );
}

/// A 1024 px item (65 704 tokens a sequence on the tiny model) once aborted the process allocating 69 GB of
/// attention scores. Now every size either runs (O(L) attention) or is refused by the memory plan with the numbers
/// and what to change: `M_s` and a training step over a memory limit (`FOCUSDPO_MEMORY_LIMIT_GB`, the limit a
/// shared machine sets); `focusdpo plan` shows what block checkpointing saves at that size.
#[test]
fn a_1024_px_item_is_planned_not_aborted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d1024");
    let out = focusdpo(&[
        "dip",
        "synth",
        "--out",
        common_str(&data),
        "--items",
        "1",
        "--size",
        "1024",
        "--subjects",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let limited = |args: &[&str], gb: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_focusdpo"))
            .args(args)
            .env("FOCUSDPO_MEMORY_LIMIT_GB", gb)
            .output()
            .expect("runs")
    };
    let masks_out = dir.path().join("m.safetensors");
    let run = limited(
        &[
            "masks",
            "--data",
            common_str(&data),
            "--item",
            "synth-0000",
            "--timesteps",
            "500",
            "--out",
            common_str(&masks_out),
        ],
        "0.5",
    );
    let msg = text(&run);
    assert_eq!(run.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("the M_s forward (65704 tokens a sequence) needs about") && msg.contains("0.50 GB are available"),
        "{msg}"
    );
    assert!(!masks_out.exists());
    let train = |extra: &str| {
        limited(
            &[
                "train",
                "--data",
                common_str(&data),
                "--steps",
                "1",
                "--set",
                extra,
                "--out",
                common_str(&dir.path().join("run")),
                "--plain",
            ],
            "8",
        )
    };
    let run = train("train.checkpoint_blocks=false");
    let msg = text(&run);
    assert_eq!(run.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("a focus-dpo step") && msg.contains("train.checkpoint_blocks = true"),
        "{msg}"
    );
    let activations = |extra: &[&str]| -> f64 {
        let mut args = vec!["plan", "--size", "1024", "--references", "2"];
        args.extend_from_slice(extra);
        let run = focusdpo(&args);
        let msg = text(&run);
        assert!(run.status.success() && msg.contains("65704 tokens a sequence"), "{msg}");
        let line = msg
            .lines()
            .find(|l| l.trim_start().starts_with("activations"))
            .expect("activations line");
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("GB")
    };
    let (plain, ckpt) = (activations(&[]), activations(&["--checkpoint-blocks"]));
    assert!(ckpt * 3.0 < plain, "checkpointing: {plain} GB → {ckpt} GB");
    // bf16 activations (`model.activations`) are planned at half the bytes (rounded to the printed 0.01 GB).
    let narrow = activations(&["--checkpoint-blocks", "--activations", "bf16"]);
    assert!(
        (2.0 * narrow - ckpt).abs() <= 0.02,
        "bf16 activations: {ckpt} GB → {narrow} GB"
    );
}

fn common_str(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}
