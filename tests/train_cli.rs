//! `focusdpo train` and the backbone-fed `focusdpo masks` as a user runs them.

mod common;

use common::{focusdpo, text};

#[test]
fn train_writes_a_run_and_resume_continues_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("runs/a");
    let run_s = run.to_str().expect("utf-8 path");
    let dump = dir.path().join("step1.safetensors");
    let out = focusdpo(&[
        "train",
        "--base",
        "random:0",
        "--objective",
        "focus-dpo",
        "--steps",
        "1",
        "--out",
        run_s,
        "--plain",
        "--set",
        r#"data.items=["synth-0002"]"#,
        "--dump-step",
        "1",
        dump.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("finished at step 1"), "{}", text(&out));
    assert!(text(&out).contains("pairs: kept 1 of 1"), "{}", text(&out));
    for f in [
        "config.toml",
        "pairs.json",
        "metrics.jsonl",
        "checkpoints/step-1/lora.safetensors",
        "checkpoints/step-1/optimizer.safetensors",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    assert!(dump.is_file());
    let out = focusdpo(&["train", "--out", run_s, "--resume", "--steps", "2", "--plain"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(run.join("checkpoints/step-2/lora.safetensors").is_file());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    assert!(
        metrics.contains(r#""event":"resume""#) && metrics.contains(r#""step":2"#),
        "{metrics}"
    );
    // Starting a new run in the same folder is refused.
    let out = focusdpo(&["train", "--base", "random:0", "--steps", "1", "--out", run_s]);
    assert!(!out.status.success());
    assert!(text(&out).contains("already"), "{}", text(&out));
}

#[test]
fn train_reports_bad_settings_without_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("r");
    let run_s = run.to_str().expect("utf-8 path");
    let out = focusdpo(&["train", "--out", run_s, "--set", "dpo.betta=1"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("betta"), "{}", text(&out));
    let out = focusdpo(&["train", "--out", run_s, "--set", "data.pairs.select=top-k"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("top-k"), "{}", text(&out));
    let out = focusdpo(&["train", "--out", run_s, "--set", "data.pairs.top_percent=0"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("data.pairs.top_percent"), "{}", text(&out));
    let out = focusdpo(&["train", "--out", run_s, "--objective", "ppo"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("ppo"), "{}", text(&out));
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "steps = 3\n[masks.fusion]\ntau = \"high\"\n").expect("write");
    let out = focusdpo(&["train", "--out", run_s, "--config", cfg.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("bad.toml") && msg.contains("line 3"), "{msg}");
    assert!(!run.exists(), "nothing is written for a bad config");
}

#[test]
fn masks_fills_m_s_from_the_backbone_per_timestep() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("m.safetensors");
    let out = focusdpo(&[
        "masks",
        "--item",
        "synth-0001",
        "--base",
        "random:0",
        "--timesteps",
        "200,800",
        "--out",
        out_file.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let bytes = std::fs::read(&out_file).expect("written");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    for n in [
        "m_s.t200",
        "m_s.t800",
        "m.t200",
        "m.t800",
        "a_focus.t200",
        "a_focus.t800",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n} in {names:?}");
    }
    let m_s = st.tensor("m_s.t200").expect("m_s");
    assert_eq!(m_s.shape(), &[16, 16]);
    // M_s ⊆ M_prior (Eq. 6).
    let as_f32 = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .expect(name)
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let (ms, prior) = (as_f32("m_s.t200"), as_f32("m_prior"));
    assert!(ms.iter().zip(&prior).all(|(s, p)| *s <= *p));
    // A bundled base that does not exist yet (or a bad file) is reported for variants that need M_s.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a model").expect("write");
    let out = focusdpo(&[
        "masks",
        "--item",
        "synth-0001",
        "--base",
        bad.to_str().expect("utf-8"),
        "--out",
        out_file.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bad.safetensors"), "{}", text(&out));
}
