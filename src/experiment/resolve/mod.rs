//! Resolution: each study's "Ablated Part" becomes a Studio knob (a run-config key set with the `--set key=value`
//! mechanism of [`crate::train::config::apply_overrides`]), each replacement a value of that knob's type, and each
//! metric an implemented metric id — or a clear [`Unresolved`] entry, while the rest of the plan still resolves.
//!
//! **Knob.** An explicit key written in the part wins (`` `dpo.beta` ``, `(masks.fusion.tau)`, or a unique
//! suffix such as `(focus.tau)` → `masks.fusion.tau`); a key of [`RunConfig`] that has no entry in the table works
//! too, typed after its default value. Otherwise every knob of [`KNOBS`] is scored against the part's words: an
//! alias scores when all its words occur (in any order), a Greek letter counts 3 and a phrase 1 per word; the best
//! knob must beat the runner-up. Words are compared lower-case, `M_s`/`M_{s}` read as `ms`, `w/o` as `without`,
//! and a trailing plural `s` is dropped. When the words tie or name no knob, the replacement values decide
//! ([`knob_for_study`]); every study records why its knob was chosen ([`KnobReason`]).
//!
//! **Values.** Numbers are found in the text (`0.1`, `1e-4`, `3 × 10^-4`, `5.33%`; `top-1` or `HPSv2` are words,
//! not numbers); a value must hold exactly one. A percentage is divided by 100 for fraction knobs (τ, γ). Enum
//! values are matched by keywords (`Difference-based metric: …` → `difference`); some knobs read several keys
//! from one value (`Dynamic … mean + 1 std` → `data.pairs.select=dynamic`, `data.pairs.dynamic=mean-std`,
//! `data.pairs.dynamic_k=1`). A REMOVE study takes the knob's "off" value (λ → 0, `M_s` → variant `no-ms`).

mod knobs;
mod metrics;
mod phrases;
mod values;

use std::collections::BTreeSet;

pub use knobs::*;
pub use metrics::*;
pub use phrases::*;
pub use values::*;

use super::plan::{Action, Plan, Study};

/// One `--set key=value` override.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Override {
    /// Dotted run-config key.
    pub key: String,
    /// Value as `--set` reads it (TOML, or a bare word taken as a string).
    pub value: String,
}

/// The plan-wide overrides that put every cell of a grid on `backbone`: only `model.base` when the rest are the
/// defaults (so the cells of `--base B` stay those of the Studio and of earlier grids), else every model setting.
pub fn model_overrides(backbone: &crate::train::config::ModelSettings) -> Vec<Override> {
    let defaults = crate::train::config::ModelSettings {
        base: backbone.base.clone(),
        ..Default::default()
    };
    if *backbone == defaults {
        return vec![Override::string("model.base", &backbone.base.to_string())];
    }
    toml::Table::try_from(backbone)
        .map(|table| {
            table
                .into_iter()
                .map(|(key, value)| Override::new(&format!("model.{key}"), value.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

impl Override {
    fn new(key: &str, value: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            value: value.into(),
        }
    }

    /// `key = "text"` with `text` quoted as a TOML string (backslashes and quotes in paths escaped).
    pub fn string(key: &str, text: &str) -> Self {
        Self::new(key, toml::Value::String(text.to_string()).to_string())
    }

    /// `key=value`, the form [`crate::train::config::apply_overrides`] takes.
    pub fn arg(&self) -> String {
        format!("{}={}", self.key, self.value)
    }
}

/// What could not be resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum UnresolvedKind {
    /// The ablated part maps to no knob.
    Part,
    /// A replacement value does not fit the knob.
    Value,
    /// A metric maps to no implemented metric.
    Metric,
}

/// One thing of a plan that could not be resolved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Unresolved {
    /// Study title.
    pub study: String,
    /// The study's line in the plan.
    pub line: usize,
    /// Part, value or metric.
    pub kind: UnresolvedKind,
    /// The text as written.
    pub text: String,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            UnresolvedKind::Part => "ablated part",
            UnresolvedKind::Value => "replacement",
            UnresolvedKind::Metric => "metric",
        };
        write!(
            f,
            "study \"{}\" (line {}): {what} `{}`: {}",
            self.study, self.line, self.text, self.reason
        )
    }
}

/// A replacement and the overrides it sets.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedValue {
    /// The replacement as written (for REMOVE: `REMOVE`).
    pub text: String,
    /// Overrides of this cell (one replacement may set several keys).
    pub overrides: Vec<Override>,
}

/// A study mapped onto a knob.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ResolvedStudy {
    /// Study title.
    pub title: String,
    /// Line of the study in the plan.
    pub line: usize,
    /// The knob's key (`None` when the part is unresolved).
    pub knob: Option<String>,
    /// Why that knob: matched words, value fit, the alternatives (`None` when the part is unresolved).
    pub reason: Option<KnobReason>,
    /// One entry per resolved replacement.
    pub values: Vec<ResolvedValue>,
    /// Every metric with its mapping.
    pub metrics: Vec<ResolvedMetric>,
}

/// A whole plan resolved: what runs, and what was left out.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Resolution {
    /// Studies in plan order (also those whose part is unresolved, with no values).
    pub studies: Vec<ResolvedStudy>,
    /// Everything left out, in plan order.
    pub unresolved: Vec<Unresolved>,
}

/// Resolves one study: its knob, a value per replacement, its metrics; problems go to `unresolved`.
pub fn resolve_study(study: &Study, unresolved: &mut Vec<Unresolved>) -> ResolvedStudy {
    let title = if study.title.is_empty() {
        study.ablated_part.clone()
    } else {
        study.title.clone()
    };
    let mut report = |kind, text: &str, reason: String| {
        unresolved.push(Unresolved {
            study: title.clone(),
            line: study.line,
            kind,
            text: text.to_string(),
            reason,
        });
    };
    let mut values = Vec::new();
    let candidates: &[String] = match study.action {
        Action::Remove => &[],
        _ => &study.replacements,
    };
    // A part that names no knob (or several equally) leaves it to the title ("Ablation of Margin Threshold"),
    // when the title's own words name one.
    let from_title = || {
        knob_for_study(&study.title, candidates)
            .ok()
            .filter(|(_, why)| why.basis != Basis::Values || !why.words.is_empty())
            .map(|(k, why)| {
                (
                    k,
                    KnobReason {
                        from_title: true,
                        ..why
                    },
                )
            })
    };
    let (knob, reason) = match knob_for_study(&study.ablated_part, candidates) {
        Ok((k, why)) => (Some(k), Some(why)),
        Err(reason) => match from_title() {
            Some((k, why)) => (Some(k), Some(why)),
            None => {
                report(UnresolvedKind::Part, &study.ablated_part, reason);
                (None, None)
            }
        },
    };
    if let Some(k) = &knob {
        match &study.action {
            Action::Remove => match removal(k, &study.ablated_part) {
                Ok(overrides) => values.push(ResolvedValue {
                    text: "REMOVE".into(),
                    overrides,
                }),
                Err(reason) => report(UnresolvedKind::Value, "REMOVE", reason),
            },
            Action::Replace | Action::Add | Action::Other(_) => {
                if study.replacements.is_empty() {
                    report(
                        UnresolvedKind::Value,
                        "",
                        "the study lists no Replacement values".into(),
                    );
                }
                for text in &study.replacements {
                    match parse_value(k, text) {
                        Ok(overrides) => values.push(ResolvedValue {
                            text: text.clone(),
                            overrides,
                        }),
                        Err(reason) => report(
                            UnresolvedKind::Value,
                            text,
                            format!("{} ({}): {reason}", k.key, k.summary),
                        ),
                    }
                }
            }
        }
    }
    let metrics = study
        .metrics
        .iter()
        .map(|m| {
            let matched = resolve_metric(m);
            if let MetricMatch::Unavailable { reason } = &matched {
                report(UnresolvedKind::Metric, m, reason.clone());
            }
            ResolvedMetric {
                text: m.clone(),
                matched,
            }
        })
        .collect();
    ResolvedStudy {
        title,
        line: study.line,
        knob: knob.map(|k| k.key),
        reason,
        values,
        metrics,
    }
}

/// Resolves every study of a plan.
pub fn resolve_plan(plan: &Plan) -> Resolution {
    let mut unresolved = Vec::new();
    let studies = plan.studies.iter().map(|s| resolve_study(s, &mut unresolved)).collect();
    Resolution { studies, unresolved }
}

/// Every override key a resolution sets, sorted.
pub fn override_keys(resolution: &Resolution) -> BTreeSet<String> {
    resolution
        .studies
        .iter()
        .flat_map(|s| s.values.iter().flat_map(|v| v.overrides.iter().map(|o| o.key.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(part: &str) -> Result<String, String> {
        knob_for_part(part).map(|k| k.key)
    }

    fn value(k: &str, text: &str) -> Result<Vec<String>, String> {
        let knob = knob(k).ok_or("no knob")?;
        parse_value(&knob.into(), text).map(|o| o.iter().map(Override::arg).collect())
    }

    #[test]
    fn words_join_subscripts_and_drop_plurals() {
        assert_eq!(
            words("M_s, M_{prior} and $M_d$ w/o steps"),
            ["ms", "mprior", "and", "md", "without", "step"]
        );
        assert_eq!(words("top 5.33%"), ["top", "5", "33", "%"]);
        assert_eq!(words("(δ)"), ["δ"]);
    }

    #[test]
    fn numbers_stand_alone() {
        let v = |t: &str| numbers(t).iter().map(|n| n.value).collect::<Vec<_>>();
        assert_eq!(v("0.1"), [0.1]);
        assert_eq!(v("lr = 1e-4"), [1e-4]);
        assert_eq!(v("3 × 10^-4"), [3e-4]);
        assert_eq!(v("2*10^(-3)"), [2e-3]);
        assert_eq!(v("top-1 accuracy on HPSv2 with M_1"), Vec::<f64>::new());
        assert_eq!(v("−0.5 and .25"), [-0.5, 0.25]);
        assert!(numbers("5.33%")[0].percent);
        assert_eq!(v("the 2nd run"), Vec::<f64>::new());
        assert_eq!(v("0.1-0.5"), [0.1, 0.5]);
    }

    #[test]
    fn parts_map_to_knobs() {
        assert_eq!(
            key("margin threshold (δ) in intra-class contrastive learning").as_deref(),
            Ok("dpo.pair_filter_delta")
        );
        assert_eq!(
            key("balance parameter (λ) in the loss function").as_deref(),
            Ok("dpo.sft_lambda")
        );
        assert_eq!(key("the focus coverage threshold").as_deref(), Ok("masks.fusion.tau"));
        assert_eq!(key("fusion coefficient γ").as_deref(), Ok("masks.fusion.gamma"));
        assert_eq!(key("M_s (attention field)").as_deref(), Ok("masks.fusion.variant"));
        assert_eq!(key("learning rate of AdamW").as_deref(), Ok("optim.adamw.lr"));
        assert_eq!(key("the LoRA rank").as_deref(), Ok("lora.rank"));
        assert_eq!(key("number of training steps").as_deref(), Ok("steps"));
        assert_eq!(key("SFT steps before DPO").as_deref(), Ok("schedule.sft_steps"));
        assert_eq!(
            key("joint vs sequential SFT→DPO schedule").as_deref(),
            Ok("schedule.kind")
        );
        assert_eq!(key("source of negative samples").as_deref(), Ok("data.negatives"));
        assert_eq!(
            key("bottom-k% filtering by pair quality").as_deref(),
            Ok("data.pairs.bottom_percent")
        );
        assert_eq!(key("DPO β").as_deref(), Ok("dpo.beta"));
    }

    #[test]
    fn explicit_keys_win() {
        assert_eq!(
            key("the threshold (masks.fusion.gamma)").as_deref(),
            Ok("masks.fusion.gamma")
        );
        assert_eq!(key("KL weight `dpo.beta`").as_deref(), Ok("dpo.beta"));
        assert_eq!(key("focus threshold (focus.tau)").as_deref(), Ok("masks.fusion.tau"));
        assert_eq!(key("`steps`").as_deref(), Ok("steps"));
        assert_eq!(
            key("`optim.adamw.weight_decay`").as_deref(),
            Ok("optim.adamw.weight_decay")
        );
        let wd = knob_for_part("`optim.adamw.weight_decay`").expect("config key");
        assert_eq!(
            parse_value(&wd, "0.01").map(|o| o[0].arg()),
            Ok("optim.adamw.weight_decay=0.01".into())
        );
        let targets = knob_for_part("(lora.targets.modulation)").expect("config key");
        assert_eq!(
            parse_value(&targets, "enabled").map(|o| o[0].arg()),
            Ok("lora.targets.modulation=true".into())
        );
        assert!(key("`no.such.key`").is_err_and(|e| e.contains("names no Studio knob")));
        // "e.g." is not a key.
        assert_eq!(key("e.g. the learning rate").as_deref(), Ok("optim.adamw.lr"));
    }

    #[test]
    fn unknown_parts_list_the_known_knobs() {
        let err = key("the number of attention heads in the text encoder").expect_err("unknown");
        assert!(
            err.contains("masks.fusion.tau") && err.contains("data.negatives"),
            "{err}"
        );
    }

    fn study(part: &str, values: &[&str]) -> Result<(String, KnobReason), String> {
        let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        knob_for_study(part, &values).map(|(t, why)| (t.key, why))
    }

    #[test]
    fn values_decide_between_knobs_the_words_tie_on() {
        // "β and τ" names both (a Greek letter scores 3 each): β's range holds 500, τ's does not.
        let (key, why) = study("the β and τ trade-off", &["500", "1000", "2500"]).expect("resolves");
        assert_eq!(key, "dpo.beta");
        assert_eq!((why.basis, why.fit, why.values), (Basis::Values, 3, 3));
        assert_eq!(why.alternatives.len(), 1);
        assert_eq!(
            (why.alternatives[0].key.as_str(), why.alternatives[0].fit),
            ("masks.fusion.tau", 0)
        );
        assert!(why.text().contains("the values decide") && why.text().contains("masks.fusion.tau (0/3)"));
        // Values that fit are resolved even when some do not: 0.3 fits both, 5000 only β.
        let (key, why) = study("β or τ", &["0.3", "5000"]).expect("resolves");
        assert_eq!((key.as_str(), why.fit), ("dpo.beta", 2));
        // Fractions fit τ and β alike, and β's range is wider: the narrower τ is the more specific fit.
        let (key, _) = study("β or τ", &["0.1", "50%"]).expect("resolves");
        assert_eq!(key, "masks.fusion.tau");
        // τ and γ: same range, same fit: still ambiguous, and the message says why.
        let err = study("τ and γ", &["0.3", "0.5"]).expect_err("ambiguous");
        assert!(
            err.contains("masks.fusion.tau, masks.fusion.gamma") && err.contains("equally"),
            "{err}"
        );
        // Words fit the choice knob whose value names they contain.
        let (key, why) = study("mask and similarity", &["cosine", "squared norm"]).expect("resolves");
        assert_eq!((key.as_str(), why.fit), ("masks.attention.similarity", 2));
    }

    #[test]
    fn value_names_decide_when_no_knob_is_named() {
        let (key, why) = study(
            "what the model is contrasted against",
            &["the dataset's loser", "another subject's image", "a base-model sample"],
        )
        .expect("resolves");
        assert_eq!(key, "data.negatives");
        assert_eq!((why.basis, why.fit), (Basis::Values, 3));
        assert!(why.words.is_empty());
        assert!(
            why.text()
                .starts_with("no knob named; the values decide; 3/3 values fit"),
            "{}",
            why.text()
        );
        // One word that merely occurs in a value name is not enough, nor are numbers alone.
        assert!(study("the moon phase", &["full"]).is_err());
        assert!(study("the moon phase", &["full moon", "new moon"]).is_err());
        assert!(study("number of attention heads", &["4", "8"]).is_err());
    }

    #[test]
    fn every_loser_source_of_preference_pair_papers_has_a_name() {
        for (text, want) in [
            ("the dataset's loser", "dataset"),
            ("original rejected image from DIP", "dataset"),
            ("another subject's image", "shuffled"),
            ("an image of a different identity", "shuffled"),
            ("a base-model sample", "base"),
            ("self-generated samples", "base"),
            ("an augmented copy of the winner", "augmented"),
            ("photometric and geometric augmentation", "augmented"),
            ("corrupted winner", "augmented"),
        ] {
            assert_eq!(
                value("data.negatives", text),
                Ok(vec![format!("data.negatives={want}")]),
                "{text}"
            );
        }
        let (key, why) = study(
            "negatives",
            &[
                "dataset loser",
                "other identity's image",
                "base model samples",
                "augmented winner",
            ],
        )
        .expect("resolves");
        assert_eq!((key.as_str(), why.fit), ("data.negatives", 4));
    }

    #[test]
    fn values_overrule_a_weaker_word_match_and_titles_stand_in_for_a_silent_part() {
        // "lowest quality" names the bottom filter (2 words), "pair quality" the quality formula (2 words) and
        // "quality" alone nothing: a tie the values break, as before…
        let (key, _) = study("dropping the lowest-quality pairs", &["5%", "10%"]).expect("resolves");
        assert_eq!(key, "data.pairs.bottom_percent");
        // …and a word winner that holds fewer values than another named knob gives way to it.
        // ("warm up" scores 2 for the warm-up steps, "curriculum" 1 for the schedule, which holds both values.)
        let (key, why) =
            study("the curriculum of the warm-up", &["joint", "sequential, 50 SFT steps"]).expect("resolves");
        assert_eq!(key, "schedule.kind");
        assert_eq!((why.basis, why.fit), (Basis::Values, 2));
        assert_eq!(
            (why.alternatives[0].key.as_str(), why.alternatives[0].fit),
            ("optim.warmup_steps", 1)
        );
        // A part that names nothing: the title's words.
        let text = "### Ablation of Margin Threshold\n- Ablated Part: the filtering of anchors\n\
                    - Replacement: 0.1, 0.2\n- Metrics: loss\n";
        let r = resolve_plan(&crate::experiment::parse_plan(text).expect("parses"));
        assert_eq!(r.studies[0].knob.as_deref(), Some("dpo.pair_filter_delta"));
        let why = r.studies[0].reason.as_ref().expect("reason");
        assert!(
            why.from_title && why.text().starts_with("the part names no knob; the title's words"),
            "{}",
            why.text()
        );
        assert!(r.unresolved.is_empty(), "{:?}", r.unresolved);
    }

    /// Every knob is reachable from a plan by its first alias, every named value by its first keyword, and the
    /// named values of each enum knob are exactly the enum's values (a value added to a config enum without a
    /// name here fails).
    #[test]
    fn every_knob_and_enum_value_is_reachable_from_a_plan() {
        use crate::config_enum::ConfigEnum;
        for k in KNOBS {
            assert_eq!(
                knob_for_part(k.aliases[0]).map(|t| t.key),
                Ok(k.key.to_string()),
                "{}",
                k.aliases[0]
            );
            if let KnobKind::Choice(choices) = k.kind {
                for c in choices {
                    assert_eq!(
                        parse_value(&k.into(), c.keywords[0]).map(|o| o[0].value.clone()),
                        Ok(c.value.to_string()),
                        "{}: {}",
                        k.key,
                        c.keywords[0]
                    );
                }
            }
        }
        for k in KNOBS {
            let names = k.value_names();
            match k.kind {
                KnobKind::Choice(choices) => {
                    let mut have: Vec<String> = choices.iter().map(|c| c.value.to_string()).collect();
                    let mut want = names;
                    have.sort();
                    want.sort();
                    assert_eq!(
                        have, want,
                        "{}: the resolver's named values and the config enum differ",
                        k.key
                    );
                }
                KnobKind::PairSelection | KnobKind::Schedule => assert!(!names.is_empty(), "{}", k.key),
                _ => assert!(names.is_empty(), "{}", k.key),
            }
        }
        // The compound knobs read every value of theirs.
        for (text, want) in [("all", "all"), ("top 10%", "top-percent"), ("otsu", "dynamic")] {
            let o = parse_value(&knob("data.pairs.select").expect("knob").into(), text).expect(text);
            assert_eq!(o[0].value, want);
        }
        assert!(crate::train::pairs::PairSelect::config_names().len() == 3);
        for (text, want) in [("joint", "joint"), ("sequential, 5 SFT steps", "sequential")] {
            let o = parse_value(&knob("schedule.kind").expect("knob").into(), text).expect(text);
            assert_eq!(o[0].value, want);
        }
        assert_eq!(
            crate::train::config::ScheduleKind::config_names(),
            ["joint", "sequential"]
        );
    }

    #[test]
    fn the_reason_says_how_the_knob_was_found() {
        let (_, why) = study("focus coverage threshold τ", &["0.1", "2"]).expect("resolves");
        assert_eq!((why.basis, why.fit, why.values), (Basis::Words, 1, 2));
        assert!(why.text().starts_with("words `τ`"), "{}", why.text());
        let (_, why) = study("(dpo.beta)", &["100"]).expect("resolves");
        assert_eq!(why.basis, Basis::Explicit);
        assert_eq!(why.text(), "key written in the part; 1/1 values fit");
    }

    #[test]
    fn values_parse_into_the_knob_type() {
        assert_eq!(
            value("masks.fusion.tau", "0.2"),
            Ok(vec!["masks.fusion.tau=0.2".into()])
        );
        assert_eq!(
            value("masks.fusion.tau", "20%"),
            Ok(vec!["masks.fusion.tau=0.2".into()])
        );
        assert!(value("masks.fusion.tau", "1.5").is_err_and(|e| e.contains("outside")));
        assert_eq!(
            value("optim.adamw.lr", "3e-4"),
            Ok(vec!["optim.adamw.lr=0.0003".into()])
        );
        assert_eq!(value("lora.rank", "rank 16"), Ok(vec!["lora.rank=16".into()]));
        assert!(value("lora.rank", "4.5").is_err());
        assert!(value("dpo.beta", "0.1 or 0.2").is_err_and(|e| e.contains("several")));
        assert_eq!(
            value("masks.fusion.variant", "without M_s"),
            Ok(vec!["masks.fusion.variant=no-ms".into()])
        );
        assert_eq!(
            value("masks.fusion.variant", "w/o M_d"),
            Ok(vec!["masks.fusion.variant=no-md".into()])
        );
        assert_eq!(
            value("masks.fusion.variant", "M_prior only (Configuration I)"),
            Ok(vec!["masks.fusion.variant=prior".into()])
        );
        assert_eq!(
            value("masks.fusion.variant", "Configuration III"),
            Ok(vec!["masks.fusion.variant=unconstrained".into()])
        );
        assert_eq!(value("objective", "Diffusion-DPO"), Ok(vec!["objective=dpo".into()]));
        assert_eq!(value("objective", "SFT"), Ok(vec!["objective=sft".into()]));
        assert_eq!(
            value("masks.attention.layers", "blocks 0 and 2"),
            Ok(vec!["masks.attention.layers=[0, 2]".into()])
        );
    }

    #[test]
    fn data_and_schedule_values() {
        assert_eq!(
            value("data.pairs.quality", "Difference-based metric: ψ(xw/c) - ψ(xl/c)"),
            Ok(vec!["data.pairs.quality=difference".into()])
        );
        assert_eq!(
            value("data.pairs.quality", "Ratio-based metric: ψ(xw/c) / (ψ(xl/c) + ε)"),
            Ok(vec!["data.pairs.quality=ratio".into()])
        );
        assert_eq!(
            value(
                "data.pairs.select",
                "Dynamic percentile thresholding based on the quality score distribution"
            ),
            Ok(vec!["data.pairs.select=dynamic".into()])
        );
        assert_eq!(
            value("data.pairs.select", "mean + 1.5 std"),
            Ok(vec![
                "data.pairs.select=dynamic".into(),
                "data.pairs.dynamic=mean-std".into(),
                "data.pairs.dynamic_k=1.5".into()
            ])
        );
        assert_eq!(
            value("data.pairs.select", "Otsu's threshold"),
            Ok(vec![
                "data.pairs.select=dynamic".into(),
                "data.pairs.dynamic=otsu".into()
            ])
        );
        assert_eq!(
            value("data.pairs.select", "top 5.33%"),
            Ok(vec![
                "data.pairs.select=top-percent".into(),
                "data.pairs.top_percent=5.33".into()
            ])
        );
        assert!(
            value(
                "data.pairs.select",
                "Adaptive thresholding using validation performance"
            )
            .is_err_and(|e| e.contains("validation"))
        );
        assert_eq!(
            value("data.negatives", "another item's winner (shuffled)"),
            Ok(vec!["data.negatives=shuffled".into()])
        );
        assert_eq!(
            value("data.negatives", "samples of the base model"),
            Ok(vec!["data.negatives=base".into()])
        );
        assert_eq!(
            value("schedule.kind", "sequential: 50 SFT steps, then DPO"),
            Ok(vec!["schedule.kind=sequential".into(), "schedule.sft_steps=50".into()])
        );
        assert_eq!(value("schedule.kind", "joint"), Ok(vec!["schedule.kind=joint".into()]));
        assert_eq!(
            value("data.pairs.bottom_percent", "10%"),
            Ok(vec!["data.pairs.bottom_percent=10.0".into()])
        );
    }

    #[test]
    fn removal_uses_the_off_value() {
        let remove = |part: &str| {
            let k = knob_for_part(part)?;
            removal(&k, part).map(|o| o.iter().map(Override::arg).collect::<Vec<_>>())
        };
        assert_eq!(remove("M_d (Eq. 7-8)"), Ok(vec!["masks.fusion.variant=no-md".into()]));
        assert_eq!(
            remove("the attention field M_s"),
            Ok(vec!["masks.fusion.variant=no-ms".into()])
        );
        assert_eq!(remove("SFT regulariser λ"), Ok(vec!["dpo.sft_lambda=0".into()]));
        assert!(remove("focus coverage threshold τ").is_err_and(|e| e.contains("no off value")));
    }

    #[test]
    fn metrics_map_or_say_why_not() {
        let id = |m: &str| match resolve_metric(m) {
            MetricMatch::Available { id, .. } => id.to_string(),
            MetricMatch::Unavailable { reason } => format!("unavailable: {reason}"),
        };
        assert_eq!(id("top-1 accuracy"), "top1_identification");
        assert_eq!(id("training stability"), "stability");
        assert_eq!(id("convergence speed"), "convergence_speed");
        assert_eq!(id("EER"), "eer");
        assert_eq!(id("CLIP-T"), "clip_t");
        assert_eq!(id("DINO"), "dino");
        assert_eq!(id("FID"), "fd_identity");
        assert_eq!(id("implicit reward accuracy"), "implicit_accuracy");
        for m in ["Aesthetic Score", "Image Reward", "PickScore", "HPSv2"] {
            assert!(id(m).contains("learned"), "{m}: {}", id(m));
        }
        assert!(id("BLEU").contains("no implemented metric"));
    }

    #[test]
    fn derived_metrics_abbreviations_and_the_inception_style_score() {
        let shown = |m: &str| resolve_metric(m).shown_id().unwrap_or_else(|| "unavailable".into());
        for (name, want) in [
            (
                "Improvement ratio of identity similarity over the baseline",
                "Δ% identity_sim vs baseline",
            ),
            ("Δ EER", "Δ eer vs baseline"),
            ("loss reduction", "Δ loss vs baseline"),
            (
                "Relative gain (%) in top-1 identification",
                "Δ% top1_identification vs baseline",
            ),
            (
                "gain in implicit accuracy vs. baseline",
                "Δ implicit_accuracy vs baseline",
            ),
            // Words of the metric's own name are not asking for a change.
            ("Fisher discriminant ratio", "fdr"),
            ("peak signal-to-noise ratio", "psnr"),
            ("reward margin", "reward_margin"),
            // Case, punctuation, abbreviations.
            ("IS", "identity_is"),
            ("Inception Score", "identity_is"),
            ("ID-Sim", "identity_sim"),
            ("id sim.", "identity_sim"),
            ("Top-1 Acc.", "top1_identification"),
            ("eer", "eer"),
            ("improvement in aesthetic score", "unavailable"),
        ] {
            assert_eq!(shown(name), want, "{name}");
        }
        // "is" inside a longer name is a word, not the abbreviation.
        assert_ne!(shown("loss is stable"), "identity_is");
    }

    #[test]
    fn alias_table_lists_every_knob() {
        let table = alias_table_markdown();
        for k in KNOBS {
            assert!(table.contains(&format!("`{}`", k.key)));
            for a in k.aliases {
                assert!(table.contains(a), "{a}");
            }
        }
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    const DOC: &str = include_str!("../../../docs/experiments.md");

    /// The text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` of docs/experiments.md.
    fn section(name: &str) -> &'static str {
        let begin = format!("<!-- {name}:begin -->\n");
        let end = format!("<!-- {name}:end -->");
        DOC.split_once(&begin)
            .and_then(|(_, rest)| rest.split_once(&end))
            .map_or("", |(inside, _)| inside)
    }

    /// Rewrites the generated tables of docs/experiments.md:
    /// `cargo test --lib experiment::resolve::doc_tests -- --ignored`.
    #[test]
    #[ignore = "rewrites docs/experiments.md"]
    fn bless_docs_tables() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/experiments.md");
        let mut doc = std::fs::read_to_string(&path).expect("docs/experiments.md");
        for (name, table) in [("knobs", alias_table_markdown()), ("metrics", metric_table_markdown())] {
            let begin = format!("<!-- {name}:begin -->\n");
            let end = format!("<!-- {name}:end -->");
            let (Some(b), Some(e)) = (doc.find(&begin), doc.find(&end)) else {
                panic!("docs/experiments.md lacks the {name} markers");
            };
            doc.replace_range(b + begin.len()..e, &table);
        }
        std::fs::write(&path, doc).expect("writes docs/experiments.md");
    }

    #[test]
    fn docs_tables_match_the_code() {
        let knobs = alias_table_markdown();
        assert!(
            section("knobs") == knobs,
            "docs/experiments.md knob table is stale; replace it with:\n{knobs}"
        );
        let metrics = metric_table_markdown();
        assert!(
            section("metrics") == metrics,
            "docs/experiments.md metric table is stale; replace it with:\n{metrics}"
        );
    }
}
