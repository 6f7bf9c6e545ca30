//! The bundled plans (docs/plans) and the seed plans (tests/data/plans) resolve exactly as they did before plans
//! could be resolved by their values (`tests/data/plans/resolved.json`, written by the resolver of commit
//! "Split experiment/resolve.rs along its seams"): same knobs, values, overrides, metrics and left-out items.
//! `UPDATE_GOLDEN=1 cargo test --test plan_regression` rewrites the file — only for a change meant to alter them.

use std::path::{Path, PathBuf};

use focusdpo::experiment::read_plan_file;
use focusdpo::experiment::resolve::resolve_plan;

fn plans() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["docs/plans", "tests/data/plans"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .expect("plan folder")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

/// A plan's resolution as JSON, without why each knob was chosen (which the older resolver did not say).
fn resolved(path: &Path) -> serde_json::Value {
    let resolution = resolve_plan(&read_plan_file(path).expect("plan"));
    let mut v = serde_json::to_value(&resolution).expect("json");
    for study in v["studies"].as_array_mut().expect("studies") {
        study.as_object_mut().expect("study").remove("reason");
    }
    v
}

#[test]
fn bundled_and_seed_plans_resolve_as_before() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let golden_path = root.join("tests/data/plans/resolved.json");
    let now: serde_json::Map<String, serde_json::Value> = plans()
        .iter()
        .map(|p| {
            let name = p
                .strip_prefix(root)
                .expect("under the crate")
                .to_string_lossy()
                .into_owned();
            (name, resolved(p))
        })
        .collect();
    assert!(now.len() >= 5, "{:?}", now.keys());
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let text = serde_json::to_string_pretty(&now).expect("json") + "\n";
        std::fs::write(&golden_path, text).expect("writes the golden file");
        return;
    }
    let golden: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&golden_path).expect("golden file")).expect("golden json");
    assert_eq!(
        golden.keys().collect::<Vec<_>>(),
        now.keys().collect::<Vec<_>>(),
        "the plans"
    );
    for (name, want) in &golden {
        assert!(
            &now[name] == want,
            "{name} resolves differently now:\n{}",
            serde_json::to_string_pretty(&now[name]).unwrap_or_default()
        );
    }
}
