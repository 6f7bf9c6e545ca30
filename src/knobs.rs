//! The knob registry: every run-config knob a researcher varies, declared once — key, type and range, value names
//! and aliases, what a REMOVE study sets, a one-line doc — with the default read from [`RunConfig::default`].
//!
//! Everything else reads it: [`RunConfig::validate`] checks each knob's range ([`check`]), `--set` goes through the
//! same validation, the CLI's typed flags parse the knobs' enums ([`ConfigEnum`] `FromStr`), the Studio draws its
//! forms from it (a widget per knob, its range and doc), and the plan resolver
//! ([`crate::experiment::resolve`]) matches "Ablated Part" texts against the aliases. Adding a knob is a config
//! field and an entry here.

use crate::config_enum::ConfigEnum;
use crate::train::RunConfig;
use crate::train::config::ConfigError;

/// How a knob's values are read.
#[derive(Clone, Copy, Debug)]
pub enum KnobKind {
    /// A real number in `[min, max]` (`min` excluded when `min_open`); `%` divides by 100 when `fraction`.
    Float {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
        /// Whether `min` itself is excluded.
        min_open: bool,
        /// Whether the knob is a fraction (then `10%` means 0.1; otherwise `5.33%` means 5.33).
        fraction: bool,
    },
    /// A whole number in `[min, max]`.
    Int {
        /// Lower bound.
        min: u64,
        /// Upper bound.
        max: u64,
    },
    /// One of named values, matched by keywords.
    Choice(&'static [Choice]),
    /// `data.pairs.select` with its percent and dynamic-threshold keys.
    PairSelection,
    /// `schedule.kind` with `schedule.sft_steps` read from a number in the value.
    Schedule,
    /// A list of block indices (`masks.attention.layers`).
    IndexList,
    /// `true`/`false` (also on/off, yes/no, enabled/disabled): run-config booleans without a table entry.
    Bool,
    /// Any text, passed on as a TOML string: run-config strings without a table entry.
    Text,
}

/// A named value of a [`KnobKind::Choice`] knob.
#[derive(Clone, Copy, Debug)]
pub struct Choice {
    /// The value written to the config.
    pub value: &'static str,
    /// Phrases that select it (all words of a phrase must occur).
    pub keywords: &'static [&'static str],
}

/// A knob of the run config: declared once here.
#[derive(Clone, Copy, Debug)]
pub struct Knob {
    /// Dotted run-config key.
    pub key: &'static str,
    /// What it is, for reports and docs.
    pub summary: &'static str,
    /// Phrases of "Ablated Part" texts that name it.
    pub aliases: &'static [&'static str],
    /// How values are read.
    pub kind: KnobKind,
    /// Value a REMOVE study sets (`None`: REMOVE is unresolved unless the kind handles it).
    pub off: Option<&'static str>,
    /// Value phrases that name something this Studio does not implement, with the reason.
    pub unsupported: &'static [(&'static str, &'static str)],
    /// The config names of a named-value knob's enum (its serde names, [`ConfigEnum::ALL`]): what the Studio's
    /// menus list, and what a test holds the resolver's named values to.
    pub names: Option<fn() -> Vec<String>>,
}

pub const fn float(min: f64, max: f64, min_open: bool, fraction: bool) -> KnobKind {
    KnobKind::Float {
        min,
        max,
        min_open,
        fraction,
    }
}

pub const VARIANTS: &[Choice] = &[
    Choice {
        value: "focus",
        keywords: &["focus", "full", "eq 9", "focusdpo", "all three", "fused"],
    },
    Choice {
        value: "uniform",
        keywords: &[
            "uniform",
            "no mask",
            "without mask",
            "without weighting",
            "no weighting",
            "plain dpo",
        ],
    },
    Choice {
        value: "prior",
        keywords: &[
            "mprior only",
            "only mprior",
            "prior only",
            "configuration i",
            "config i",
        ],
    },
    Choice {
        value: "complexity",
        keywords: &["md only", "only md", "complexity only", "configuration ii", "config ii"],
    },
    Choice {
        value: "unconstrained",
        keywords: &[
            "unconstrained",
            "configuration iii",
            "config iii",
            "eq 11",
            "without prior constraint",
        ],
    },
    Choice {
        value: "no-ms",
        keywords: &[
            "without ms",
            "no ms",
            "remove ms",
            "md mprior",
            "without attention",
            "without semantic",
        ],
    },
    Choice {
        value: "no-md",
        keywords: &[
            "without md",
            "no md",
            "remove md",
            "ms only",
            "only ms",
            "without complexity",
        ],
    },
];

pub const OBJECTIVES: &[Choice] = &[
    Choice {
        value: "sft",
        keywords: &["sft", "supervised", "fine tuning only"],
    },
    Choice {
        value: "dpo",
        keywords: &["dpo", "diffusion dpo", "uniform dpo"],
    },
    Choice {
        value: "focus-dpo",
        keywords: &["focusdpo", "focus dpo", "focus", "weighted dpo"],
    },
];

pub const QUALITY: &[Choice] = &[
    Choice {
        value: "product",
        keywords: &["product", "multiplicative", "multiply", "original", "default"],
    },
    Choice {
        value: "difference",
        keywords: &["difference", "subtraction", "subtract", "minus", "gap"],
    },
    Choice {
        value: "ratio",
        keywords: &["ratio", "quotient", "divide", "division", "relative"],
    },
];

pub const NEGATIVES: &[Choice] = &[
    Choice {
        value: "dataset",
        keywords: &[
            "dataset",
            "disrupted",
            "dip",
            "original loser",
            "losing image",
            "original rejected",
            "default",
        ],
    },
    Choice {
        value: "shuffled",
        keywords: &[
            "shuffled",
            "shuffle",
            "random",
            "other item",
            "another item",
            "other subject",
            "another subject",
            "different subject",
            "other identity",
            "another identity",
            "different identity",
            "other class",
            "different class",
            "mismatched",
        ],
    },
    Choice {
        value: "base",
        keywords: &[
            "base model",
            "generated",
            "sample",
            "self generated",
            "model output",
            "base",
        ],
    },
    Choice {
        value: "augmented",
        keywords: &[
            "augmented",
            "augmentation",
            "augment",
            "augmented winner",
            "augmented version",
            "augmented copy",
            "photometric",
            "geometric",
            "corrupted",
            "distorted",
            "degraded",
            "transformed",
            "noisy",
        ],
    },
];

pub const SOURCES: &[Choice] = &[
    Choice {
        value: "reference",
        keywords: &["reference", "frozen"],
    },
    Choice {
        value: "policy",
        keywords: &["policy", "trained", "fine tuned", "lora"],
    },
];

pub const SIMILARITIES: &[Choice] = &[
    Choice {
        value: "cosine",
        keywords: &["cosine"],
    },
    Choice {
        value: "squared-norm",
        keywords: &["squared norm", "eq 3", "as printed"],
    },
];

pub const POOLS: &[Choice] = &[
    Choice {
        value: "mean",
        keywords: &["mean", "all tokens", "average"],
    },
    Choice {
        value: "foreground",
        keywords: &["foreground", "subject tokens", "masked"],
    },
];

pub const MASK_NORMS: &[Choice] = &[
    Choice {
        value: "mean",
        keywords: &["mean", "average", "default"],
    },
    Choice {
        value: "weighted-mean",
        keywords: &["weighted", "area independent", "normalised", "normalized"],
    },
];

pub const VALIDATION_SELECTION: (&str, &str) = (
    "validation",
    "selecting pairs by validation performance is not implemented: pairs are selected by their quality scores \
     (fixed top-k% or a dynamic threshold on the score distribution)",
);

/// Every knob the alias table knows (docs/experiments.md lists them; a test keeps the two in sync).
pub const KNOBS: &[Knob] = &[
    Knob {
        key: "masks.fusion.tau",
        summary: "focus coverage threshold τ of Eq. 9",
        aliases: &[
            "τ",
            "tau",
            "focus coverage threshold",
            "coverage threshold",
            "focus threshold",
        ],
        kind: float(0.0, 1.0, false, true),
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "masks.fusion.gamma",
        summary: "fusion coefficient γ of Eq. 9",
        aliases: &[
            "γ",
            "gamma",
            "fusion coefficient",
            "fusion weight",
            "mixing coefficient",
        ],
        kind: float(0.0, 1.0, false, true),
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "masks.fusion.variant",
        summary: "weight-map configuration: focus, uniform, prior, complexity, unconstrained, no-ms, no-md",
        aliases: &[
            "mask variant",
            "mask configuration",
            "weight map",
            "spatial weighting",
            "ms",
            "md",
            "mprior",
            "prior mask",
            "complexity map",
            "attention field",
            "mask",
        ],
        kind: KnobKind::Choice(VARIANTS),
        off: None,
        unsupported: &[],
        names: Some(<crate::masks::MaskVariant as ConfigEnum>::config_names),
    },
    Knob {
        key: "objective",
        summary: "training objective: sft, dpo, focus-dpo",
        aliases: &[
            "objective",
            "training objective",
            "preference objective",
            "loss type",
            "focusdpo",
        ],
        kind: KnobKind::Choice(OBJECTIVES),
        off: None,
        unsupported: &[],
        names: Some(<crate::train::objective::ObjectiveKind as ConfigEnum>::config_names),
    },
    Knob {
        key: "dpo.beta",
        summary: "β of Eq. 1 / Eq. 10 (with T·ω(λ_t) folded in)",
        aliases: &["β", "beta", "kl weight", "kl regularization", "dpo temperature"],
        kind: float(0.0, 1e9, true, false),
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "dpo.margin",
        summary: "margin m inside the sigmoid",
        aliases: &["margin", "margin m", "reward margin offset"],
        kind: float(-1e9, 1e9, false, false),
        off: Some("0"),
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "dpo.sft_lambda",
        summary: "λ of the SFT regulariser",
        aliases: &[
            "λ",
            "lambda",
            "balance parameter",
            "balance weight",
            "sft weight",
            "sft regularizer",
            "sft regulariser",
        ],
        kind: float(0.0, 1e9, false, false),
        off: Some("0"),
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "dpo.pair_filter_delta",
        summary: "pair filter δ: drop pairs the reference already prefers by more than δ",
        aliases: &["δ", "delta", "margin threshold", "pair filter", "filter threshold"],
        kind: float(-1e9, 1e9, false, false),
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "dpo.mask_norm",
        summary: "reduction of masked errors: mean, weighted-mean",
        aliases: &["mask normalization", "mask normalisation", "error reduction"],
        kind: KnobKind::Choice(MASK_NORMS),
        off: None,
        unsupported: &[],
        names: Some(<crate::train::objective::MaskNorm as ConfigEnum>::config_names),
    },
    Knob {
        key: "lora.rank",
        summary: "LoRA rank r",
        aliases: &["lora rank", "adapter rank", "low rank", "rank r"],
        kind: KnobKind::Int { min: 1, max: 4096 },
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "lora.alpha",
        summary: "LoRA scale numerator α",
        aliases: &["lora alpha", "α", "lora scale"],
        kind: float(0.0, 1e6, true, false),
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "optim.adamw.lr",
        summary: "peak learning rate",
        aliases: &["learning rate", "lr", "step size"],
        kind: float(0.0, 1.0, true, false),
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "optim.warmup_steps",
        summary: "linear warm-up steps",
        aliases: &["warmup", "warm up"],
        kind: KnobKind::Int {
            min: 0,
            max: 1_000_000_000,
        },
        off: Some("0"),
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "optim.decay",
        summary: "learning-rate decay after the warm-up: constant, linear or cosine (to 0 at the last step)",
        aliases: &[
            "lr schedule",
            "learning rate schedule",
            "lr decay",
            "learning rate decay",
            "cosine schedule",
        ],
        kind: KnobKind::Choice(&[
            Choice {
                value: "constant",
                keywords: &["constant"],
            },
            Choice {
                value: "linear",
                keywords: &["linear"],
            },
            Choice {
                value: "cosine",
                keywords: &["cosine"],
            },
        ]),
        off: Some("constant"),
        unsupported: &[],
        names: Some(<crate::train::config::LrDecay as ConfigEnum>::config_names),
    },
    Knob {
        key: "optim.decay_from",
        summary: "step the learning-rate decay starts after (0 = the end of the warm-up)",
        aliases: &["decay start", "cooldown start"],
        kind: KnobKind::Int {
            min: 0,
            max: 1_000_000_000,
        },
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "optim.grad_clip",
        summary: "global gradient-norm clip (0 = off)",
        aliases: &["gradient clipping", "grad clip", "clipping"],
        kind: float(0.0, 1e9, false, false),
        off: Some("0"),
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "steps",
        summary: "optimiser steps",
        aliases: &[
            "steps",
            "training steps",
            "iterations",
            "training length",
            "training budget",
            "number of updates",
        ],
        kind: KnobKind::Int {
            min: 1,
            max: crate::train::config::MAX_STEPS,
        },
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "masks.attention.source",
        summary: "hidden states of M_s: reference or policy",
        aliases: &[
            "attention source",
            "hidden state source",
            "hidden states",
            "policy states",
            "reference states",
        ],
        kind: KnobKind::Choice(SOURCES),
        off: None,
        unsupported: &[],
        names: Some(<crate::train::config::HiddenSource as ConfigEnum>::config_names),
    },
    Knob {
        key: "masks.attention.layers",
        summary: "double-stream blocks averaged in Eq. 3 (empty = all)",
        aliases: &["attention layers", "layers", "blocks", "which layers"],
        kind: KnobKind::IndexList,
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "masks.attention.similarity",
        summary: "similarity of Eq. 3: cosine or squared-norm",
        aliases: &["similarity", "cosine", "squared norm"],
        kind: KnobKind::Choice(SIMILARITIES),
        off: None,
        unsupported: &[],
        names: Some(<crate::masks::attention_field::Similarity as ConfigEnum>::config_names),
    },
    Knob {
        key: "masks.attention.pool",
        summary: "pooling of Eq. 3's CLS: mean of all reference tokens or of the foreground",
        aliases: &["cls pooling", "pooling", "cls", "reference pooling", "pool"],
        kind: KnobKind::Choice(POOLS),
        off: None,
        unsupported: &[],
        names: Some(<crate::masks::attention_field::ReferencePool as ConfigEnum>::config_names),
    },
    Knob {
        key: "data.pairs.quality",
        summary: "pair-quality formula: product ψ_w·(1−ψ_l), difference ψ_w−ψ_l, ratio ψ_w/(ψ_l+ε)",
        aliases: &[
            "ψ",
            "psi",
            "quality metric",
            "pair quality",
            "quality score",
            "quality formula",
            "quality function",
        ],
        kind: KnobKind::Choice(QUALITY),
        off: None,
        unsupported: &[],
        names: Some(<crate::train::pairs::PairQuality as ConfigEnum>::config_names),
    },
    Knob {
        key: "data.pairs.select",
        summary: "pair selection: all, top-percent (data.pairs.top_percent), dynamic (data.pairs.dynamic, dynamic_k)",
        aliases: &[
            "data selection",
            "pair selection",
            "selection strategy",
            "subset selection",
            "top %",
            "top percent",
            "top k",
            "fixed top",
            "fixed threshold",
            "dynamic threshold",
            "threshold selection",
            "quality filtering",
            "data filtering",
            "pairs kept",
        ],
        kind: KnobKind::PairSelection,
        off: Some("all"),
        unsupported: &[VALIDATION_SELECTION],
        names: Some(<crate::train::pairs::PairSelect as ConfigEnum>::config_names),
    },
    Knob {
        key: "data.pairs.top_percent",
        summary: "percent of pairs kept by top-percent selection",
        aliases: &["top percentage", "kept percent", "keep ratio"],
        kind: float(0.0, 100.0, true, false),
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "data.pairs.dynamic",
        summary: "dynamic threshold rule: mean-std (q ≥ mean + k·std) or otsu",
        aliases: &["dynamic rule", "threshold rule", "otsu"],
        kind: KnobKind::Choice(&[
            Choice {
                value: "mean-std",
                keywords: &["mean", "std", "standard deviation", "sigma"],
            },
            Choice {
                value: "otsu",
                keywords: &["otsu"],
            },
        ]),
        off: None,
        unsupported: &[],
        names: Some(<crate::train::pairs::DynamicThreshold as ConfigEnum>::config_names),
    },
    Knob {
        key: "data.pairs.dynamic_k",
        summary: "k of the mean-std rule",
        aliases: &["std multiplier", "dynamic k"],
        kind: float(-1e3, 1e3, false, false),
        off: None,
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "data.pairs.bottom_percent",
        summary: "drop the lowest-quality k% of pairs",
        aliases: &[
            "bottom",
            "bottom k",
            "lowest quality",
            "low quality pair",
            "filter low quality",
            "worst pair",
        ],
        kind: float(0.0, 100.0, false, false),
        off: Some("0"),
        unsupported: &[],
        names: None,
    },
    Knob {
        key: "data.negatives",
        summary: "loser source: dataset, shuffled (another item's or subject's winner), base (a base-model sample), \
                  augmented (a seeded augmentation of the winner)",
        aliases: &[
            "negative",
            "negative sample",
            "negative source",
            "loser",
            "loser image",
            "rejected image",
            "rejected sample",
            "dispreferred",
            "hard negative",
        ],
        kind: KnobKind::Choice(NEGATIVES),
        off: None,
        unsupported: &[],
        names: Some(<crate::train::negatives::LoserSource as ConfigEnum>::config_names),
    },
    Knob {
        key: "schedule.kind",
        summary: "joint SFT+DPO or sequential SFT→DPO (schedule.sft_steps)",
        aliases: &[
            "schedule",
            "training schedule",
            "joint",
            "sequential",
            "sft then dpo",
            "two stage",
            "multi stage",
            "curriculum",
            "sft warm up",
            "supervised warm up",
        ],
        kind: KnobKind::Schedule,
        off: None,
        unsupported: &[],
        names: Some(<crate::train::config::ScheduleKind as ConfigEnum>::config_names),
    },
    Knob {
        key: "schedule.sft_steps",
        summary: "SFT steps before DPO in the sequential schedule",
        aliases: &["sft steps", "sft phase", "sft stage length"],
        kind: KnobKind::Int {
            min: 0,
            max: crate::train::config::MAX_STEPS,
        },
        off: None,
        unsupported: &[],
        names: None,
    },
];

/// The knob table entry of `key`.
pub fn knob(key: &str) -> Option<&'static Knob> {
    KNOBS.iter().find(|k| k.key == key)
}

/// The default run config as a TOML table (for keys outside the knob table).
pub fn default_config_value(key: &str) -> Option<toml::Value> {
    // Serialised once: the Studio's forms read the defaults every frame.
    static DEFAULTS: std::sync::OnceLock<Option<toml::Table>> = std::sync::OnceLock::new();
    let table = DEFAULTS.get_or_init(|| toml::Table::try_from(RunConfig::default()).ok());
    value_at(table.as_ref()?, key).cloned()
}

/// All knob keys, for "known knobs" in reports.
pub fn known_knobs() -> String {
    KNOBS.iter().map(|k| k.key).collect::<Vec<_>>().join(", ")
}

/// "number in [0, 1]", "number > 0", "number" (bounds beyond ±1e8 are "no bound").
pub fn range_text(min: f64, max: f64, min_open: bool) -> String {
    const UNBOUNDED: f64 = 1e8;
    match (min > -UNBOUNDED, max < UNBOUNDED) {
        (true, true) => format!("number in {}{min}, {max}]", if min_open { "(" } else { "[" }),
        (true, false) => format!("number {} {min}", if min_open { ">" } else { "≥" }),
        (false, true) => format!("number ≤ {max}"),
        (false, false) => "number".into(),
    }
}

impl Knob {
    /// Checks `value` (a TOML value of the run config) against the knob's type and range; the message says what
    /// the knob takes.
    pub fn check(&self, value: &toml::Value) -> Result<(), String> {
        match self.kind {
            KnobKind::Float { min, max, min_open, .. } => {
                let v = match value {
                    toml::Value::Float(f) => *f,
                    toml::Value::Integer(i) => *i as f64,
                    other => return Err(format!("must be a number, got {other}")),
                };
                let above = if min_open { v > min } else { v >= min };
                if v.is_finite() && above && v <= max {
                    Ok(())
                } else {
                    Err(format!("must be a {}, got {v}", range_text(min, max, min_open)))
                }
            }
            KnobKind::Int { min, max } => match value.as_integer() {
                Some(v) if v >= 0 && (min..=max).contains(&(v as u64)) => Ok(()),
                Some(v) => Err(format!("must be a whole number in {min}..={max}, got {v}")),
                None => Err(format!("must be a whole number, got {value}")),
            },
            _ => Ok(()),
        }
    }

    /// The knob's numeric bounds (`None` for named values and lists).
    pub fn bounds(&self) -> Option<(f64, f64)> {
        match self.kind {
            KnobKind::Float { min, max, .. } => Some((min, max)),
            KnobKind::Int { min, max } => Some((min as f64, max as f64)),
            _ => None,
        }
    }

    /// The value names of a named-value knob, in the enum's order (empty for other knobs).
    pub fn value_names(&self) -> Vec<String> {
        self.names.map(|names| names()).unwrap_or_default()
    }

    /// The knob's default (from [`RunConfig::default`]); `None` for an optional field that is off by default.
    pub fn default_value(&self) -> Option<toml::Value> {
        default_config_value(self.key)
    }
}

/// A clap value parser for a numeric CLI flag that sets knob `key`: the number, checked against the knob's declared
/// range (`#[arg(long, value_parser = knobs::flag::<f32>("masks.fusion.tau"))]`).
pub fn flag<T>(key: &'static str) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + Into<f64> + Copy,
    T::Err: std::fmt::Display,
{
    move |text: &str| {
        let v: T = text.trim().parse().map_err(|e: T::Err| e.to_string())?;
        let k = knob(key).ok_or_else(|| format!("`{key}` is no knob"))?;
        k.check(&toml::Value::Float(v.into()))
            .map_err(|e| format!("{key} {e}"))?;
        Ok(v)
    }
}

/// The value at dotted `key` of a config serialised as a TOML table.
pub fn value_at<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// Every knob's value in `cfg` checked against its declared type and range ([`Knob::check`]); the error names
/// the key.
pub fn check(cfg: &RunConfig) -> Result<(), ConfigError> {
    let table = toml::Table::try_from(cfg).map_err(|e| ConfigError::Invalid {
        field: "run config",
        message: e.to_string(),
    })?;
    for k in KNOBS {
        if let Some(value) = value_at(&table, k.key) {
            k.check(value)
                .map_err(|message| ConfigError::Invalid { field: k.key, message })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every knob is a field of the run config, its default passes its own check, and its declared kind matches
    /// the field's type.
    #[test]
    fn every_knob_is_a_config_field_whose_default_fits() {
        for k in KNOBS {
            let Some(d) = k.default_value() else {
                // An optional field (None = off): it must still take a value of its kind.
                assert!(
                    matches!(k.kind, KnobKind::Float { .. }),
                    "{} is no run-config field",
                    k.key
                );
                let set = format!("{}=0", k.key);
                assert!(RunConfig::default().with_overrides(&[set]).is_ok(), "{}", k.key);
                continue;
            };
            assert_eq!(k.check(&d), Ok(()), "{}", k.key);
            let type_fits = match k.kind {
                KnobKind::Float { .. } => d.is_float(),
                KnobKind::Int { .. } => d.is_integer(),
                KnobKind::Choice(_) | KnobKind::PairSelection | KnobKind::Schedule => {
                    d.as_str().is_some_and(|s| k.value_names().iter().any(|n| n == s))
                }
                KnobKind::IndexList => d.is_array(),
                KnobKind::Bool => d.is_bool(),
                KnobKind::Text => d.is_str(),
            };
            assert!(type_fits, "{}: default {d} does not fit {:?}", k.key, k.kind);
        }
        let mut keys: Vec<&str> = KNOBS.iter().map(|k| k.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), KNOBS.len(), "a knob is declared twice");
    }

    #[test]
    fn flags_check_the_declared_range() {
        let tau = flag::<f32>("masks.fusion.tau");
        assert_eq!(tau("0.25"), Ok(0.25));
        let e = tau("1.5").unwrap_err();
        assert!(e.contains("masks.fusion.tau") && e.contains("[0, 1]"), "{e}");
        assert!(tau("x").is_err());
    }

    /// Validation reads the registry: an out-of-range value is refused with the key and the declared range.
    #[test]
    fn validation_names_the_key_and_the_declared_range() {
        let err = |set: &str| {
            RunConfig::default()
                .with_overrides(&[set.to_string()])
                .expect("parses")
                .validate()
                .expect_err(set)
                .to_string()
        };
        let e = err("dpo.beta=0");
        assert!(e.contains("`dpo.beta`") && e.contains("number > 0"), "{e}");
        let e = err("masks.fusion.tau=1.5");
        assert!(e.contains("`masks.fusion.tau`") && e.contains("[0, 1]"), "{e}");
        let e = err("lora.rank=0");
        assert!(e.contains("`lora.rank`") && e.contains("1..=4096"), "{e}");
        let e = err("steps=0");
        assert!(e.contains("`steps`"), "{e}");
        let e = err("optim.adamw.lr=nan");
        assert!(e.contains("`optim.adamw.lr`"), "{e}");
        assert!(
            RunConfig::default()
                .with_overrides(&["masks.fusion.gamma=1".into(), "lora.rank=4096".into()])
                .expect("parses")
                .validate()
                .is_ok(),
            "the bounds themselves are allowed"
        );
    }
}
