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
fn resume_takes_the_original_command_and_skips_a_damaged_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("runs/r");
    let run_s = run.to_str().expect("utf-8 path");
    let command = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--base",
            "random:0",
            "--objective",
            "dpo",
            "--out",
            run_s,
            "--plain",
            "--set",
            r#"data.items=["synth-0002"]"#,
            "--set",
            "log.checkpoint_every=1",
        ];
        args.extend_from_slice(extra);
        focusdpo(&args)
    };
    let out = command(&["--steps", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    // The same command with --resume (and more steps) continues; equal values are not a change.
    let out = command(&["--steps", "3", "--resume", "--set", "dpo.beta=2500.0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("finished at step 3"), "{}", text(&out));
    // A real change is refused, named key by key, and nothing is written.
    let metrics_before = std::fs::read(run.join("metrics.jsonl")).expect("metrics");
    let out = command(&["--resume", "--set", "dpo.beta=10", "--seed", "4"]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("dpo.beta: 2500.0 → 10.0") && msg.contains("seed: 0 → 4") && !msg.contains("objective"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(run.join("metrics.jsonl")).expect("metrics"),
        metrics_before
    );
    // A torn last line is kept and the next record starts on a new line; a damaged newest checkpoint is skipped.
    let torn = r#"{"step":4,"lo"#;
    let mut log = String::from_utf8(metrics_before).expect("utf-8");
    log.push_str(torn);
    std::fs::write(run.join("metrics.jsonl"), &log).expect("write");
    std::fs::write(run.join("checkpoints/step-3/lora.safetensors"), b"garbage").expect("damage");
    let out = command(&["--steps", "4", "--resume"]);
    assert!(out.status.success(), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains("warning: resuming from step 2") && msg.contains("step-3") && msg.contains("steps 3..4"),
        "{msg}"
    );
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let after_torn = log
        .split(&format!("{torn}\n"))
        .nth(1)
        .expect("the torn line is kept, then a newline");
    let next: serde_json::Value = serde_json::from_str(after_torn.lines().next().unwrap_or("")).expect("a record");
    assert!(next.get("event").is_some(), "{log}");
    assert!(
        log.contains(r#"{"event":"resume","from_step":2,"skipped":[{"error""#),
        "{log}"
    );
    let (steps, _) = focusdpo::train::run_store::read_metrics(&run).expect("the log still reads");
    assert_eq!(steps.len(), 4);
    // With every checkpoint damaged, resume is a clear error.
    for step in 1..=4 {
        let lora = run.join(format!("checkpoints/step-{step}/lora.safetensors"));
        if lora.is_file() {
            std::fs::write(lora, b"garbage").expect("damage");
        }
    }
    let out = command(&["--steps", "5", "--resume"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no intact checkpoint"), "{}", text(&out));
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

/// `focusdpo train --ranks 2` (two processes joined over TCP, as an external launcher's RANK / WORLD_SIZE would
/// join them) trains exactly like one process accumulating both ranks' pairs (`train.grad_accum = 2`): the same
/// LoRA to 1e-6 after three steps. Rank 0 alone writes the run folder; the other rank logs beside it.
#[test]
fn two_rank_processes_train_like_one_process_accumulating_two_pairs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let common_args = |out: &str| -> Vec<String> {
        [
            "train",
            "--base",
            "random:0",
            "--steps",
            "3",
            "--out",
            out,
            "--plain",
            "--set",
            r#"data.items=["synth-0000", "synth-0001", "synth-0003"]"#,
            "--set",
            "log.checkpoint_every=0",
        ]
        .map(String::from)
        .to_vec()
    };
    let ranks = dir.path().join("ranks");
    let mut args = common_args(ranks.to_str().expect("utf-8"));
    args.extend(["--ranks".into(), "2".into()]);
    let out = focusdpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    let single = dir.path().join("single");
    let mut args = common_args(single.to_str().expect("utf-8"));
    args.extend(["--set".into(), "train.grad_accum=2".into()]);
    let out = focusdpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));

    let load = |run: &std::path::Path| {
        candle_core::safetensors::load(
            run.join("checkpoints/step-3/lora.safetensors"),
            &candle_core::Device::Cpu,
        )
        .expect("the final checkpoint")
    };
    let (a, b) = (load(&ranks), load(&single));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let d = (t - &b[name])
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("same shapes");
        assert!(d <= 1e-6, "{name}: {d}");
    }
    let log = std::fs::read_to_string(ranks.join("metrics.jsonl")).expect("rank 0's log");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"step\":") && l.contains("\"loss\""))
            .count(),
        3,
        "{log}"
    );
    let rank1 = std::fs::read_to_string(dir.path().join("ranks.rank-1.log")).expect("rank 1's log");
    assert!(rank1.contains("step 3"), "{rank1}");
}

/// A launcher's world of one (`WORLD_SIZE=1`) runs the collective path — on a GPU that is NCCL — and trains
/// exactly like a plain run.
#[test]
fn a_world_of_one_trains_like_a_plain_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |name: &str, world: bool| {
        let out = dir.path().join(name);
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_focusdpo"));
        cmd.args(["train", "--base", "random:0", "--steps", "2", "--plain", "--out"])
            .arg(&out)
            .args(["--set", r#"data.items=["synth-0000", "synth-0001"]"#]);
        if world {
            cmd.env("WORLD_SIZE", "1").env("RANK", "0");
        }
        let o = cmd.output().expect("runs");
        assert!(o.status.success(), "{}", text(&o));
        candle_core::safetensors::load(
            out.join("checkpoints/step-2/lora.safetensors"),
            &candle_core::Device::Cpu,
        )
        .expect("checkpoint")
    };
    let (world, plain) = (run("world", true), run("plain", false));
    assert_eq!(world.len(), plain.len());
    for (name, t) in &world {
        let d = (t - &plain[name])
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("same shapes");
        assert_eq!(d, 0.0, "{name}: the same LoRA, bit for bit");
    }
}

/// A pretraining run of the micro model (width 64, one block of each kind) on 32 px items, one a step: seconds.
const MICRO_PRETRAIN: [&str; 16] = [
    "--set",
    "model.hidden_size=64",
    "--set",
    "model.num_heads=2",
    "--set",
    "model.axes_dim=[8, 12, 12]",
    "--set",
    "model.depth=1",
    "--set",
    "model.depth_single_blocks=1",
    "--set",
    "data.size_px=32",
    "--set",
    "reference_px=16",
    "--set",
    "batch=1",
];

/// A pretraining run forked from another's checkpoint with changed settings, and a run resumed with `--set`: the
/// new settings are in config.toml, metrics.jsonl records where each change came from, and the model's shape
/// cannot change.
#[test]
fn pretrain_forks_and_resumes_with_changed_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (a_s, b_s) = (a.to_str().expect("utf-8"), b.to_str().expect("utf-8"));
    let mut micro = MICRO_PRETRAIN.to_vec();
    micro.extend(["--set", "checkpoint_every=1"]);
    let mut first = vec!["pretrain", "--out", a_s, "--steps", "2", "--plain"];
    first.extend(micro);
    let out = focusdpo(&first);
    assert!(out.status.success(), "{}", text(&out));
    let out = focusdpo(&[
        "pretrain",
        "--out",
        b_s,
        "--fork",
        a_s,
        "--fork-step",
        "1",
        "--steps",
        "2",
        "--set",
        "subject_weight=2.0",
        "--plain",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("step 2:"), "{}", text(&out));
    let config = std::fs::read_to_string(b.join("config.toml")).expect("config");
    assert!(config.contains("subject_weight = 2.0"), "{config}");
    assert!(b.join("checkpoints/step-1/raw.safetensors").is_file());
    assert!(b.join("checkpoints/step-2/raw.safetensors").is_file());
    let metrics = std::fs::read_to_string(b.join("metrics.jsonl")).expect("metrics");
    assert!(
        metrics.contains(r#""event":"fork""#) && metrics.contains(r#""from_step":1"#),
        "{metrics}"
    );
    // Forking into a folder that holds a run, or from a step the parent does not have, is refused.
    let out = focusdpo(&["pretrain", "--out", b_s, "--fork", a_s]);
    assert!(
        !out.status.success() && text(&out).contains("already"),
        "{}",
        text(&out)
    );
    let c = dir.path().join("c");
    let out = focusdpo(&[
        "pretrain",
        "--out",
        c.to_str().expect("utf-8"),
        "--fork",
        a_s,
        "--fork-step",
        "7",
    ]);
    assert!(!out.status.success() && text(&out).contains("step 7"), "{}", text(&out));
    // Resuming with a new learning rate: config.toml changes, the log says so.
    let out = focusdpo(&[
        "pretrain",
        "--out",
        a_s,
        "--resume",
        "--steps",
        "3",
        "--set",
        "optim.adamw.lr=1e-4",
        "--plain",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let config = std::fs::read_to_string(a.join("config.toml")).expect("config");
    assert!(config.contains("lr = 0.0001"), "{config}");
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).expect("metrics");
    assert!(
        metrics.contains(r#""event":"config""#) && metrics.contains("optim.adamw.lr=1e-4"),
        "{metrics}"
    );
    // The model's shape cannot change under a checkpoint.
    let out = focusdpo(&["pretrain", "--out", a_s, "--resume", "--set", "model.depth=2"]);
    assert!(!out.status.success() && text(&out).contains("model"), "{}", text(&out));
    let after = std::fs::read_to_string(a.join("config.toml")).expect("config");
    assert_eq!(after, config, "a refused change leaves config.toml as it was");

    // The exported base carries the sampler settings the run recommends, and `eval` uses them unless a flag says
    // otherwise; at export only those can be set.
    let file = dir.path().join("base.safetensors");
    let f_s = file.to_str().expect("utf-8");
    let out = focusdpo(&["pretrain", "--out", a_s, "--export", f_s, "--set", "batch=4"]);
    assert!(
        !out.status.success() && text(&out).contains("sampling.*"),
        "{}",
        text(&out)
    );
    let out = focusdpo(&[
        "pretrain",
        "--out",
        a_s,
        "--export",
        f_s,
        "--set",
        "sampling.reference_cfg_scale=2.5",
        "--set",
        "sampling.steps=3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let base = focusdpo::model::BaseModel::load_file(&file, &candle_core::Device::Cpu).expect("exported base");
    assert_eq!(base.sampling.reference_cfg_scale, Some(2.5));
    assert_eq!(base.sampling.steps, Some(3));
    assert_eq!(base.sampling.cfg_scale, None);
    let sampler_of = |extra: &[&str]| {
        let ev = dir.path().join(format!("eval{}", extra.len()));
        let mut args = vec![
            "eval",
            "--base",
            f_s,
            "--out",
            ev.to_str().expect("utf-8"),
            "--single",
            "1",
            "--multi",
            "0",
        ];
        args.extend(extra);
        let out = focusdpo(&args);
        assert!(out.status.success(), "{}", text(&out));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ev.join("eval.json")).expect("eval.json")).expect("json");
        // What was asked (`config.sampler`: only the flags given, and the two flags with clap defaults) and what was
        // used (`sampler`: resolved against the base).
        let asked = &json["config"]["sampler"];
        assert!(asked.get("steps").is_none(), "no --steps given: {asked}");
        json["sampler"].clone()
    };
    let recommended = sampler_of(&[]);
    assert_eq!(recommended["reference_cfg_scale"], 2.5, "{recommended}");
    assert_eq!(recommended["steps"], 3, "{recommended}");
    assert_eq!(
        recommended["cfg_scale"], 3.0,
        "the sampler's default where the base says nothing"
    );
    let overridden = sampler_of(&["--ref-cfg", "1"]);
    assert_eq!(overridden["reference_cfg_scale"], 1.0, "{overridden}");
    assert_eq!(overridden["steps"], 3, "{overridden}");
}

/// `--stop-after` ends a run at the step that crosses the time, with a checkpoint, so `--resume` continues it;
/// a bad time or device is refused before anything is written.
#[test]
fn pretrain_stops_after_its_time_with_a_checkpoint_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let r = run.to_str().expect("utf-8");
    let mut micro = MICRO_PRETRAIN.to_vec();
    micro.extend(["--set", "checkpoint_every=100"]);
    for (flag, says) in [
        ("--stop-after=-1", "--stop-after"),
        ("--device=gpu", "not cpu, cuda or cuda:N"),
    ] {
        let mut args = vec!["pretrain", "--out", r, "--steps", "5", flag, "--plain"];
        args.extend(&micro);
        let out = focusdpo(&args);
        assert!(!out.status.success() && text(&out).contains(says), "{}", text(&out));
        assert!(!run.exists(), "a refused run writes nothing");
    }
    let mut args = vec!["pretrain", "--out", r, "--steps", "5", "--stop-after", "0", "--plain"];
    args.extend(micro);
    let out = focusdpo(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("stopped at step 1"), "{}", text(&out));
    assert!(
        run.join("checkpoints/step-1/raw.safetensors").is_file(),
        "a checkpoint at the stop"
    );
    let out = focusdpo(&["pretrain", "--out", r, "--resume", "--plain"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("step 2:") && text(&out).contains("finished at step 5"),
        "{}",
        text(&out)
    );
}
