//! Ablation plans: the two seed plans (HTML wrapper, mojibake) and hand-written plans from other papers parse into
//! the expected studies; random mutations of plans never panic.

use std::path::{Path, PathBuf};

use focusdpo::experiment::resolve::{
    KNOBS, MetricMatch, Resolution, UnresolvedKind, knob_for_part, parse_value, resolve_metric, resolve_plan,
};
use focusdpo::experiment::{Action, Study, parse_plan, read_plan_file};
use focusdpo::train::RunConfig;
use proptest::prelude::*;

fn plan_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/plans")
        .join(name)
}

fn seed(name: &str) -> Vec<Study> {
    let plan = read_plan_file(&plan_path(name)).expect("seed plan parses");
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    plan.studies
}

#[test]
fn seed_001_quality_pair_ranking() {
    let plan = read_plan_file(&plan_path("001_quality_pair_ranking.md")).expect("parses");
    assert_eq!(
        plan.title.as_deref(),
        Some("lm-planner/o3-mini/Effective_Text_to_Image_Alignment_with_Quality_Aware_Pair_Ranking")
    );
    let s = seed("001_quality_pair_ranking.md");
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].title, "Quality Metric Formulation Ablation");
    assert_eq!(
        s[0].ablated_part,
        "The formulation of the quality metric used to rank image preference pairs (currently ψ(xw/c) * (1 - ψ(xl/c)))"
    );
    assert_eq!(s[0].action, Action::Replace);
    assert_eq!(
        s[0].replacements,
        [
            "Difference-based metric: ψ(xw/c) - ψ(xl/c)",
            "Ratio-based metric: ψ(xw/c) / (ψ(xl/c) + ε)"
        ]
    );
    assert_eq!(s[0].metrics, ["Aesthetic Score", "Image Reward", "PickScore", "HPSv2"]);
    assert_eq!(s[0].line, 22);
    assert_eq!(s[1].title, "Dynamic Thresholding Ablation");
    assert_eq!(
        s[1].ablated_part,
        "The fixed top 5.33% data selection strategy for fine-tuning"
    );
    assert_eq!(
        s[1].replacements,
        [
            "Dynamic percentile thresholding based on the quality score distribution",
            "Adaptive thresholding using validation performance"
        ]
    );
    assert_eq!(s[1].metrics, s[0].metrics);
    assert_eq!(s[1].line, 30);
}

#[test]
fn seed_003_intra_class_contrastive() {
    let s = seed("003_intra_class_contrastive.md");
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].title, "Ablation of Margin Threshold");
    assert_eq!(
        s[0].ablated_part,
        "margin threshold (δ) in intra-class contrastive learning"
    );
    assert_eq!(s[0].action, Action::Replace);
    assert_eq!(s[0].replacements, ["0.1", "0.2", "0.3", "0.4", "0.5"]);
    assert_eq!(
        s[0].metrics,
        ["top-1 accuracy", "training stability", "convergence speed"]
    );
    assert_eq!(s[1].title, "Ablation of Balance Parameter");
    assert_eq!(s[1].ablated_part, "balance parameter (λ) in the loss function");
    assert_eq!(s[1].replacements, ["0.01", "0.02", "0.03", "0.04", "0.05"]);
    assert_eq!(s[1].metrics, s[0].metrics);
}

#[test]
fn learning_rate_plan_with_inline_values_and_plain_fields() {
    let text = "# Some other paper\n\nWe think the learning rate matters.\n\n## Learning-rate sweep\n\
                * Action: vary\n* Metrics: loss; implicit accuracy\n* Replacement: 1e-4, 3e-4\n\
                * Ablated Part: learning rate of AdamW\n";
    let plan = parse_plan(text).expect("parses");
    assert_eq!(plan.title.as_deref(), Some("Some other paper"));
    assert_eq!(plan.studies.len(), 1);
    let s = &plan.studies[0];
    assert_eq!(s.title, "Learning-rate sweep");
    assert_eq!(s.ablated_part, "learning rate of AdamW");
    assert_eq!(s.action, Action::Replace);
    assert_eq!(s.replacements, ["1e-4", "3e-4"]);
    assert_eq!(s.metrics, ["loss", "implicit accuracy"]);
    assert_eq!(s.line, 5);
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

#[test]
fn remove_plan_with_plus_bullets_and_numbered_items() {
    let text = "### Without the complexity map\n+ __Ablated Part__: M_d (Eq. 7-8)\n+ **Action**: REMOVE\n\
                + **Metrics**:\n    1. identity similarity\n    2. EER\n\n### LoRA rank\n\
                - **Ablated Part:** LoRA rank\n- **Action:** Replace\n- **Replacement:** [4, 16]\n";
    let plan = parse_plan(text).expect("parses");
    assert_eq!(plan.studies.len(), 2);
    assert_eq!(plan.studies[0].action, Action::Remove);
    assert_eq!(plan.studies[0].ablated_part, "M_d (Eq. 7-8)");
    assert!(plan.studies[0].replacements.is_empty());
    assert_eq!(plan.studies[0].metrics, ["identity similarity", "EER"]);
    assert_eq!(plan.studies[1].replacements, ["4", "16"]);
    assert_eq!(plan.studies[1].line, 8);
    // The second study names no metrics: a warning with its line, not an error.
    assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
    assert_eq!(plan.warnings[0].line, 8);
}

#[test]
fn windows_line_endings_and_cp1252_bytes() {
    let unix = std::fs::read_to_string(plan_path("003_intra_class_contrastive.md")).expect("reads");
    let windows = unix.replace('\n', "\r\n");
    assert_eq!(
        parse_plan(&windows).expect("parses").studies,
        seed("003_intra_class_contrastive.md")
    );

    // A plan saved as Windows-1252 bytes (not UTF-8) reads with one warning.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plan.md");
    std::fs::write(&path, b"### Caf\xe9 study\r\n- Ablated Part: \x93steps\x94\r\n- Action: REPLACE\r\n- Replacement: 50\r\n- Metrics: loss\r\n")
        .expect("writes");
    let plan = read_plan_file(&path).expect("parses");
    assert_eq!(plan.studies[0].title, "Café study");
    assert_eq!(plan.studies[0].ablated_part, "\u{201C}steps\u{201D}");
    assert_eq!(plan.warnings.len(), 1);
}

#[test]
fn missing_fields_and_unknown_fields_warn_with_lines() {
    let text = "### Odd study\n- **Ablated Part**: β\n- **Budget**: 2 GPU hours\n\n### Empty heading\n\n### Only metrics\n- **Metrics**: loss\n";
    let plan = parse_plan(text).expect("parses");
    assert_eq!(plan.studies.len(), 2);
    let lines: Vec<(usize, &str)> = plan.warnings.iter().map(|w| (w.line, w.message.as_str())).collect();
    assert!(lines.iter().any(|(l, m)| *l == 3 && m.contains("Budget")), "{lines:?}");
    assert!(
        lines.iter().any(|(l, m)| *l == 1 && m.contains("no Action")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|(l, m)| *l == 7 && m.contains("no Ablated Part")),
        "{lines:?}"
    );
}

#[test]
fn missing_file_names_the_path() {
    let err = read_plan_file(Path::new("no/such/plan.md")).expect_err("missing");
    assert!(err.to_string().contains("no/such/plan.md"), "{err}");
}

fn resolve(name: &str) -> Resolution {
    resolve_plan(&read_plan_file(&plan_path(name)).expect("parses"))
}

/// `(value text, ["key=value", …])` per resolved cell of study `i`.
fn grid(r: &Resolution, i: usize) -> Vec<(String, Vec<String>)> {
    r.studies[i]
        .values
        .iter()
        .map(|v| (v.text.clone(), v.overrides.iter().map(|o| o.arg()).collect()))
        .collect()
}

fn metric_ids(r: &Resolution, i: usize) -> Vec<Option<&'static str>> {
    r.studies[i]
        .metrics
        .iter()
        .map(|m| match m.matched {
            MetricMatch::Available { id, .. } => Some(id),
            MetricMatch::Unavailable { .. } => None,
        })
        .collect()
}

#[test]
fn seed_003_resolves_to_delta_and_lambda_sweeps() {
    let r = resolve("003_intra_class_contrastive.md");
    assert_eq!(r.studies[0].knob.as_deref(), Some("dpo.pair_filter_delta"));
    assert_eq!(r.studies[1].knob.as_deref(), Some("dpo.sft_lambda"));
    let expect = |key: &str, values: [&str; 5]| -> Vec<(String, Vec<String>)> {
        values
            .iter()
            .map(|v| (v.to_string(), vec![format!("{key}={v}")]))
            .collect()
    };
    assert_eq!(
        grid(&r, 0),
        expect("dpo.pair_filter_delta", ["0.1", "0.2", "0.3", "0.4", "0.5"])
    );
    assert_eq!(
        grid(&r, 1),
        expect("dpo.sft_lambda", ["0.01", "0.02", "0.03", "0.04", "0.05"])
    );
    let ids = vec![
        Some("top1_identification"),
        Some("stability"),
        Some("convergence_speed"),
    ];
    assert_eq!(metric_ids(&r, 0), ids);
    assert_eq!(metric_ids(&r, 1), ids);
    assert!(r.unresolved.is_empty(), "{:?}", r.unresolved);
}

#[test]
fn seed_001_resolves_data_knobs_and_reports_the_rest() {
    let r = resolve("001_quality_pair_ranking.md");
    assert_eq!(r.studies[0].knob.as_deref(), Some("data.pairs.quality"));
    assert_eq!(
        grid(&r, 0),
        [
            (
                "Difference-based metric: ψ(xw/c) - ψ(xl/c)".to_string(),
                vec!["data.pairs.quality=difference".to_string()]
            ),
            (
                "Ratio-based metric: ψ(xw/c) / (ψ(xl/c) + ε)".to_string(),
                vec!["data.pairs.quality=ratio".to_string()]
            ),
        ]
    );
    assert_eq!(r.studies[1].knob.as_deref(), Some("data.pairs.select"));
    assert_eq!(
        grid(&r, 1),
        [(
            "Dynamic percentile thresholding based on the quality score distribution".to_string(),
            vec!["data.pairs.select=dynamic".to_string()]
        )]
    );
    // The validation-driven threshold and the four learned-scorer metrics of each study are reported.
    let values: Vec<_> = r
        .unresolved
        .iter()
        .filter(|u| u.kind == UnresolvedKind::Value)
        .collect();
    assert_eq!(values.len(), 1);
    assert_eq!(values[0].text, "Adaptive thresholding using validation performance");
    assert_eq!(values[0].line, 30);
    assert!(
        values[0].to_string().contains("Dynamic Thresholding Ablation"),
        "{}",
        values[0]
    );
    let metrics: Vec<_> = r
        .unresolved
        .iter()
        .filter(|u| u.kind == UnresolvedKind::Metric)
        .collect();
    assert_eq!(metrics.len(), 8);
    assert!(metrics.iter().all(|m| m.reason.contains("learned")), "{metrics:?}");
    assert_eq!(metric_ids(&r, 0), [None, None, None, None]);
}

#[test]
fn other_papers_resolve_and_unknown_parts_do_not_stop_the_plan() {
    let text = "### LR\n- Ablated Part: learning rate\n- Action: REPLACE\n- Replacement: 1e-4, 3e-4\n- Metrics: loss\n\n\
                ### Heads\n- Ablated Part: number of attention heads of the text encoder\n- Action: REPLACE\n\
                - Replacement: 4, 8\n- Metrics: EER\n\n### No M_d\n- Ablated Part: M_d\n- Action: REMOVE\n\
                - Metrics: identity similarity, CLIP-T\n";
    let r = resolve_plan(&parse_plan(text).expect("parses"));
    assert_eq!(grid(&r, 0)[1].1, ["optim.adamw.lr=0.0003"]);
    assert_eq!(r.studies[1].knob, None);
    assert_eq!(
        grid(&r, 2),
        [("REMOVE".to_string(), vec!["masks.fusion.variant=no-md".to_string()])]
    );
    assert_eq!(metric_ids(&r, 2), [Some("identity_sim"), Some("clip_t")]);
    assert_eq!(r.unresolved.len(), 1, "{:?}", r.unresolved);
    let msg = r.unresolved[0].to_string();
    assert!(
        msg.contains("Heads") && msg.contains("line 7") && msg.contains("masks.fusion.tau"),
        "{msg}"
    );
}

/// The example plans of docs/plans/ (the paper's own ablations) resolve completely.
#[test]
fn docs_example_plans_resolve_completely() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/plans");
    let tau_gamma = resolve_plan(&read_plan_file(&dir.join("focusdpo_a3_tau_gamma.md")).expect("parses"));
    assert!(tau_gamma.unresolved.is_empty(), "{:?}", tau_gamma.unresolved);
    assert_eq!(grid(&tau_gamma, 0)[0].1, ["masks.fusion.tau=0.05"]);
    assert_eq!(grid(&tau_gamma, 1)[3].1, ["masks.fusion.gamma=0.9"]);
    let masks = resolve_plan(&read_plan_file(&dir.join("focusdpo_masks.md")).expect("parses"));
    assert!(masks.unresolved.is_empty(), "{:?}", masks.unresolved);
    let variants: Vec<Vec<String>> = masks.studies[..2]
        .iter()
        .flat_map(|s| s.values.iter().map(|v| v.overrides.iter().map(|o| o.arg()).collect()))
        .collect();
    let expected: Vec<Vec<String>> = ["no-ms", "no-md", "uniform", "prior", "complexity", "unconstrained"]
        .iter()
        .map(|v| vec![format!("masks.fusion.variant={v}")])
        .collect();
    assert_eq!(variants, expected);
    assert_eq!(grid(&masks, 2)[1].1, ["objective=dpo"]);
    let gamma = resolve_plan(&read_plan_file(&dir.join("focusdpo_a3_gamma_tau05.md")).expect("parses"));
    assert!(gamma.unresolved.is_empty(), "{:?}", gamma.unresolved);
    assert_eq!(grid(&gamma, 0)[0].1, ["masks.fusion.gamma=0.1"]);
}

/// Every override the seed plans and a plan of every existing knob resolve to applies to a default config and
/// validates, the data/schedule knobs (pair quality/selection, negatives, schedule) included.
#[test]
fn resolved_overrides_apply_to_the_default_config() {
    let own = [
        ("τ", "0.05, 20%"),
        ("γ", "0.5"),
        (
            "mask variant",
            "without M_s; w/o M_d; M_prior only; Configuration III; uniform",
        ),
        ("objective", "SFT, Diffusion-DPO, FocusDPO"),
        ("β", "5000"),
        ("margin m", "0.5"),
        ("LoRA rank", "4, 16"),
        ("steps", "50"),
        ("attention layers", "0 and 1; all"),
        ("hidden state source", "policy"),
    ]
    .iter()
    .map(|(part, values)| format!("### {part}\n- Ablated Part: {part}\n- Replacement: {values}\n- Metrics: loss\n"))
    .collect::<String>();
    let own = own.as_str();
    let mut plans = vec![resolve_plan(&parse_plan(own).expect("parses"))];
    plans.push(resolve("001_quality_pair_ranking.md"));
    plans.push(resolve("003_intra_class_contrastive.md"));
    let mut applied = 0;
    for r in &plans {
        assert!(
            r.unresolved.iter().all(|u| u.kind != UnresolvedKind::Part),
            "{:?}",
            r.unresolved
        );
        for study in &r.studies {
            for value in &study.values {
                let args: Vec<String> = value.overrides.iter().map(|o| o.arg()).collect();
                if args.is_empty() {
                    continue;
                }
                let cfg = RunConfig::default()
                    .with_overrides(&args)
                    .unwrap_or_else(|e| panic!("{}: {args:?}: {e}", study.title));
                cfg.validate()
                    .unwrap_or_else(|e| panic!("{}: {args:?}: {e}", study.title));
                applied += 1;
            }
        }
    }
    assert!(applied >= 25, "{applied}");
}

/// Random edits of a seed plan: byte-level noise, deleted, duplicated and swapped lines.
fn mutated_plan() -> impl Strategy<Value = String> {
    let base = std::fs::read_to_string(plan_path("001_quality_pair_ranking.md")).unwrap_or_default()
        + &std::fs::read_to_string(plan_path("003_intra_class_contrastive.md")).unwrap_or_default();
    let lines: Vec<String> = base.lines().map(str::to_string).collect();
    let n = lines.len().max(1);
    (
        proptest::collection::vec((0..n, 0..4u8, any::<String>()), 0..24),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(move |(edits, noise)| {
            let mut out = lines.clone();
            for (i, kind, s) in edits {
                let i = i % out.len().max(1);
                match kind {
                    0 if !out.is_empty() => {
                        out.remove(i);
                    }
                    1 => out.insert(i.min(out.len()), s),
                    2 if !out.is_empty() => {
                        let mut line = out[i].clone();
                        let cut = line
                            .char_indices()
                            .nth(s.len() % (line.chars().count() + 1))
                            .map_or(line.len(), |(p, _)| p);
                        line.insert_str(cut, &s);
                        out[i] = line;
                    }
                    _ if !out.is_empty() => {
                        let j = (i + s.len()) % out.len();
                        out.swap(i, j);
                    }
                    _ => {}
                }
            }
            let mut text = out.join("\n");
            text.push_str(&String::from_utf8_lossy(&noise));
            text
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn mutated_plans_never_panic(text in mutated_plan()) {
        if let Ok(plan) = parse_plan(&text) {
            let resolution = resolve_plan(&plan);
            let _ = focusdpo::experiment::grid::build_grid(&resolution, &[], &[0, 1]);
            let lines = text.split(['\n', '\r']).count().max(1);
            for s in &plan.studies {
                prop_assert!(s.line >= 1 && s.line <= lines);
            }
            for w in &plan.warnings {
                prop_assert!(w.line >= 1 && w.line <= lines);
            }
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in "(\\PC|[\\r\\n\\t<>*_#:`-]){0,400}") {
        let _ = parse_plan(&text);
    }

    #[test]
    fn arbitrary_parts_and_values_never_panic(
        part in "(\\PC|[ .`()%_×^-]){0,80}",
        value in "(\\PC|[ .,%eE×^()+-]|[0-9]){0,60}",
    ) {
        if let Ok(target) = knob_for_part(&part) {
            let _ = parse_value(&target, &value);
        }
        for knob in KNOBS {
            let _ = parse_value(&knob.into(), &value);
        }
        let _ = resolve_metric(&value);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (text, _) = focusdpo::experiment::text::decode_bytes(&bytes);
        let _ = parse_plan(&text);
    }
}

/// Writes a plan `name` with `text` into `dir`.
fn plan_file(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let plan = dir.join(name);
    std::fs::write(&plan, text).expect("writes the plan");
    plan
}

fn focusdpo(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_focusdpo"))
        .args(args)
        .output()
        .expect("the focusdpo binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn ablate_dry_run_prints_the_grid_and_what_is_left_out() {
    let plan = plan_path("001_quality_pair_ranking.md");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("runs");
    let (ok, text) = focusdpo(&[
        "ablate",
        plan.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
        "--seeds",
        "2",
        "--dry-run",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("data.pairs.quality=difference"), "{text}");
    assert!(
        text.contains("Adaptive thresholding using validation performance"),
        "{text}"
    );
    assert!(text.contains("grid: 8 cells (2 baseline), 8 distinct runs"), "{text}");
    assert!(!out.exists(), "a dry run writes nothing");
}

/// Trains a two-cell grid for two steps on a random base and evaluates each cell on a one-item benchmark, then
/// re-runs it: finished cells are neither trained nor evaluated again; the out-of-range value is reported.
#[test]
fn ablate_runs_cells_once_and_writes_results_csv() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plan = plan_file(
        tmp.path(),
        "plan.md",
        "### tau\n- Ablated Part: τ\n- Replacement: 0.3\n- Metrics: identity similarity, loss, HPSv2\n\n\
         ### broken\n- Ablated Part: `masks.fusion.tau`\n- Replacement: 7\n- Metrics: loss\n",
    );
    let out = tmp.path().join("runs");
    let args = [
        "ablate",
        plan.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
        "--steps",
        "2",
        "--base",
        "random:0",
        "--eval-single",
        "1",
        "--eval-multi",
        "0",
        "--eval-samples",
        "1",
        "--eval-steps",
        "2",
    ];
    let (ok, text) = focusdpo(&args);
    assert!(ok, "{text}");
    assert!(
        text.contains("2 run (0 resumed), 0 finished earlier, 0 running on other workers, 0 failed; 2 evaluated, 0 evaluated earlier"),
        "{text}"
    );
    assert!(
        text.contains("outside [0, 1]"),
        "the out-of-range value is reported: {text}"
    );
    let csv = std::fs::read_to_string(out.join("results.csv")).expect("results.csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[0].contains(",single.identity_sim,"), "{csv}");
    assert!(rows[1].contains(",baseline,baseline,0,finished,2,"), "{csv}");
    assert!(rows[2].contains(",tau,0.3,0,finished,2,"), "{csv}");
    assert!(out.join("resolution.json").is_file());
    let cells: Vec<PathBuf> = std::fs::read_dir(out.join("cells"))
        .expect("cells")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(cells.len(), 2);
    for c in &cells {
        assert!(c.join("eval.json").is_file(), "{}", c.display());
    }
    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    assert!(
        md.contains("## tau") && md.contains("| value | n | single: identity sim ↑ |"),
        "{md}"
    );
    assert!(md.contains("| 0.3 (`masks.fusion.tau=0.3`) | 1 |"), "{md}");
    assert!(md.contains("metric `HPSv2`"), "{md}");
    assert!(md.contains("replacement `7`"), "{md}");
    let png = std::fs::read(out.join("plots/tau.png")).expect("plot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let (ok, text) = focusdpo(&args);
    assert!(ok, "{text}");
    assert!(
        text.contains("0 run (0 resumed), 2 finished earlier, 0 running on other workers, 0 failed; 0 evaluated, 2 evaluated earlier"),
        "{text}"
    );
}

/// A cell whose run was interrupted resumes from its checkpoint: its metrics log keeps the earlier steps.
#[test]
fn ablate_resumes_an_interrupted_cell() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plan = plan_file(
        tmp.path(),
        "plan.md",
        "### tau\n- Ablated Part: τ\n- Replacement: 0.3\n- Metrics: loss\n",
    );
    let out = tmp.path().join("runs");
    let common = [
        "ablate",
        plan.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
        "--base",
        "random:0",
        "--no-eval",
        "--set",
        "log.checkpoint_every=1",
    ];
    let with_steps = |steps: &str| {
        let mut a: Vec<&str> = common.to_vec();
        a.extend(["--steps", steps]);
        focusdpo(&a)
    };
    let (ok, text) = with_steps("2");
    assert!(ok, "{text}");
    // Make the baseline cell look interrupted after step 1 of 2: no finished marker, no step-2 checkpoint.
    let baseline = std::fs::read_dir(out.join("cells"))
        .expect("cells")
        .map(|e| e.expect("entry").path())
        .find(|p| std::fs::read_to_string(p.join("cell.json")).is_ok_and(|t| t.contains("\"study\": \"baseline\"")))
        .expect("baseline cell");
    std::fs::remove_file(baseline.join("finished.json")).expect("removes marker");
    std::fs::remove_dir_all(baseline.join("checkpoints/step-2")).expect("removes the last checkpoint");
    let (ok, text) = with_steps("2");
    assert!(ok, "{text}");
    assert!(text.contains("1 run (1 resumed), 1 finished earlier"), "{text}");
    assert!(text.contains("resuming an interrupted run"), "{text}");
    let log = std::fs::read_to_string(baseline.join("metrics.jsonl")).expect("log");
    assert!(log.contains("\"event\":\"resume\""), "{log}");
    assert!(log.contains("\"from_step\":1"), "{log}");
    assert!(baseline.join("checkpoints/step-2").is_dir(), "step 2 was trained again");
}

/// Several workers share one results folder: three processes run a four-cell grid at once, one of them is killed
/// mid-cell, and a later worker takes the dead worker's cell over once its lease has expired and resumes it.
/// Every cell finishes; only the killed cell was claimed twice; `focusdpo report` assembles the results.
#[test]
fn concurrent_workers_share_a_grid_and_take_over_a_dead_workers_cell() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().expect("tempdir");
    let plan = plan_file(
        tmp.path(),
        "plan.md",
        "### tau\n- Ablated Part: τ\n- Replacement: 0.2; 0.4; 0.6\n- Metrics: loss\n",
    );
    let out = tmp.path().join("runs");
    let args: Vec<String> = [
        "ablate",
        plan.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
        "--base",
        "random:0",
        "--no-eval",
        "--no-plots",
        "--steps",
        "12",
        "--set",
        "log.checkpoint_every=1",
        "--lease-seconds",
        "3",
    ]
    .map(String::from)
    .to_vec();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_focusdpo"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("a worker starts")
    };
    let mut workers: Vec<std::process::Child> = (0..3).map(|_| spawn()).collect();
    // Kill the worker of the first claimed cell that has a checkpoint.
    let started = Instant::now();
    let killed: (String, u32) = loop {
        assert!(started.elapsed() < Duration::from_secs(300), "no cell got a checkpoint");
        let claims = std::fs::read_dir(out.join("claims")).into_iter().flatten().flatten();
        let found = claims.filter_map(|e| {
            let id = e.path().file_stem()?.to_string_lossy().to_string();
            let claim: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            let pid: u32 = claim["worker"].as_str()?.rsplit(':').next()?.parse().ok()?;
            out.join("cells")
                .join(&id)
                .join("checkpoints/step-1")
                .is_dir()
                .then_some((id, pid))
        });
        if let Some(f) = found.into_iter().next() {
            break f;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let victim = workers
        .iter()
        .position(|w| w.id() == killed.1)
        .expect("a worker of ours holds it");
    let mut dead = workers.remove(victim);
    dead.kill().expect("kill");
    dead.wait().expect("reaped");
    for w in workers {
        let o = w.wait_with_output().expect("worker ends");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // The dead worker's claim expires; a new worker takes the cell over and resumes it.
    std::thread::sleep(Duration::from_millis(3200));
    let (ok, text) = focusdpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");
    let cells: Vec<PathBuf> = std::fs::read_dir(out.join("cells"))
        .expect("cells")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(cells.len(), 4);
    for c in &cells {
        assert!(c.join("finished.json").is_file(), "{} finished", c.display());
        let attempts: Vec<serde_json::Value> = std::fs::read_to_string(c.join("attempts.jsonl"))
            .expect("attempts")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        let id = c.file_name().expect("name").to_string_lossy().to_string();
        if id == killed.0 {
            assert_eq!(attempts.len(), 2, "{id}: {attempts:?}");
            assert_eq!(attempts[1]["resume"], true, "{attempts:?}");
            let from = attempts[1]["took_over_from"].as_str().expect("taken over");
            assert!(from.ends_with(&format!(":{}", killed.1)), "{attempts:?}");
        } else {
            assert_eq!(attempts.len(), 1, "{id} ran once: {attempts:?}");
        }
    }
    assert!(
        std::fs::read_dir(out.join("claims")).expect("claims").next().is_none(),
        "every claim released"
    );
    let (ok, text) = focusdpo(&["report", out.to_str().expect("utf-8 path")]);
    assert!(ok, "{text}");
    assert!(
        text.contains("4 cells: 4 finished, 0 failed, 0 claimed by a worker, 0 waiting"),
        "{text}"
    );
    let csv = std::fs::read_to_string(out.join("results.csv")).expect("results.csv");
    assert_eq!(csv.lines().filter(|l| l.contains(",finished,12,")).count(), 4, "{csv}");
}

/// `--slurm` writes a job array with one task per cell running this command on its cell, and runs nothing.
#[test]
fn ablate_slurm_writes_a_job_array_and_shards_select_cells() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plan = plan_file(
        tmp.path(),
        "plan with space.md",
        "### tau\n- Ablated Part: τ\n- Replacement: 0.2; 0.4\n- Metrics: loss\n",
    );
    let out = tmp.path().join("runs");
    let (ok, text) = focusdpo(&[
        "ablate",
        plan.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
        "--steps",
        "3",
        "--slurm",
        "--slurm-gpus",
        "2",
        "--slurm-time=01:00:00",
        "--slurm-partition",
        "a100",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("(3 array tasks)"), "{text}");
    let script = std::fs::read_to_string(out.join("ablate.sbatch")).expect("script");
    for want in [
        "#SBATCH --array=0-2",
        "#SBATCH --job-name=focusdpo-plan-with-space",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --time=01:00:00",
        "#SBATCH --partition=a100",
        " --steps 3 --cell",
        "--cell \"${CELLS[$SLURM_ARRAY_TASK_ID]}\"",
        "plan with space.md'",
    ] {
        assert!(script.contains(want), "{want} in\n{script}");
    }
    let task = script
        .lines()
        .find(|l| l.contains("--cell"))
        .expect("the task's command");
    assert!(
        !task.contains("--slurm"),
        "the tasks run, they do not write scripts: {task}"
    );
    let ids: Vec<&str> = script
        .lines()
        .find_map(|l| l.strip_prefix("CELLS=("))
        .expect("cell list")
        .trim_end_matches(')')
        .split(' ')
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(
        !out.join("cells").read_dir().expect("cells").any(|_| true),
        "nothing ran"
    );
    let (ok, text) = focusdpo(&["report", out.to_str().expect("utf-8 path")]);
    assert!(ok, "{text}");
    assert!(
        text.contains("3 cells: 0 finished, 0 failed, 0 claimed by a worker, 3 waiting"),
        "{text}"
    );
    // Bad selections are refused with what to change.
    for (flag, value, expected) in [
        ("--shard", "2/2", "expected I/N with 0 ≤ I < N"),
        ("--cell", "0123", "not a cell of this grid"),
    ] {
        let (ok, text) = focusdpo(&[
            "ablate",
            plan.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
            "--steps",
            "3",
            flag,
            value,
        ]);
        assert!(!ok && text.contains(expected), "{flag} {value}: {text}");
    }
}

/// The five plans of docs/plans/other-papers resolve as docs/experiments.md shows (the `--dry-run` output up to
/// the grid); `UPDATE_DOCS=1` rewrites the blocks from the binary.
#[test]
fn docs_other_paper_plans_resolve_as_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc_path = root.join("docs/experiments.md");
    let mut doc = std::fs::read_to_string(&doc_path).expect("docs/experiments.md");
    let mut plans: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("docs/plans/other-papers"))
        .expect("plans")
        .map(|e| e.expect("entry").path())
        .collect();
    plans.sort();
    assert_eq!(plans.len(), 5, "{plans:?}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    for plan in &plans {
        let name = plan.file_name().expect("name").to_string_lossy().into_owned();
        let (ok, text) = focusdpo(&[
            "ablate",
            plan.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
            "--dry-run",
        ]);
        assert!(ok, "{name}: {text}");
        let resolved = text.split("\ngrid:").next().unwrap_or_default().trim_end();
        let begin = format!("<!-- resolved:{name}:begin -->\n```text\n");
        let end = format!("\n```\n<!-- resolved:{name}:end -->");
        let (Some(b), Some(e)) = (doc.find(&begin), doc.find(&end)) else {
            panic!("docs/experiments.md has no block for {name}");
        };
        if std::env::var_os("UPDATE_DOCS").is_some() {
            doc.replace_range(b + begin.len()..e, resolved);
        } else {
            assert_eq!(
                &doc[b + begin.len()..e],
                resolved,
                "{name}: docs/experiments.md is stale"
            );
        }
    }
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&doc_path, doc).expect("writes docs/experiments.md");
    }
    // Every study but the distillation temperature resolves every value.
    for plan in &plans {
        let r = resolve_plan(&read_plan_file(plan).expect("parses"));
        for u in &r.unresolved {
            assert!(
                u.study == "Distillation temperature" && u.kind == UnresolvedKind::Part,
                "{}: {u}",
                plan.display()
            );
        }
    }
}
