//! Resolution: each study's "Ablated Part" becomes a Studio knob (a run-config key set with the `--set key=value`
//! mechanism of [`crate::train::config::apply_overrides`]), each replacement a value of that knob's type, and each
//! metric an implemented metric id — or a clear [`Unresolved`] entry, while the rest of the plan still resolves.
//!
//! **Knob.** An explicit key written in the part wins (`` `dpo.beta` ``, `(masks.fusion.tau)`, or a unique
//! suffix such as `(focus.tau)` → `masks.fusion.tau`); a key of [`RunConfig`] that has no entry in the table works
//! too, typed after its default value. Otherwise every knob of [`KNOBS`] is scored against the part's words: an
//! alias scores when all its words occur (in any order), a Greek letter counts 3 and a phrase 1 per word; the best
//! knob must beat the runner-up. Words are compared lower-case, `M_s`/`M_{s}` read as `ms`, `w/o` as `without`,
//! and a trailing plural `s` is dropped.
//!
//! **Values.** Numbers are found in the text (`0.1`, `1e-4`, `3 × 10^-4`, `5.33%`; `top-1` or `HPSv2` are words,
//! not numbers); a value must hold exactly one. A percentage is divided by 100 for fraction knobs (τ, γ). Enum
//! values are matched by keywords (`Difference-based metric: …` → `difference`); some knobs read several keys
//! from one value (`Dynamic … mean + 1 std` → `data.pairs.select=dynamic`, `data.pairs.dynamic=mean-std`,
//! `data.pairs.dynamic_k=1`). A REMOVE study takes the knob's "off" value (λ → 0, `M_s` → variant `no-ms`).

use std::collections::BTreeSet;

use super::plan::{Action, Plan, Study};
use crate::train::RunConfig;

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

/// A Studio knob an ablation can vary.
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
}

/// The knob a study varies: a table entry, or a run-config key named explicitly that has none.
#[derive(Clone, Debug)]
pub struct Target {
    /// Dotted run-config key.
    pub key: String,
    /// What it is.
    pub summary: String,
    /// How values are read.
    pub kind: KnobKind,
    /// Value a REMOVE study sets.
    pub off: Option<&'static str>,
    /// Value phrases naming something not implemented, with the reason.
    pub unsupported: &'static [(&'static str, &'static str)],
}

impl From<&Knob> for Target {
    fn from(k: &Knob) -> Self {
        Self {
            key: k.key.to_string(),
            summary: k.summary.to_string(),
            kind: k.kind,
            off: k.off,
            unsupported: k.unsupported,
        }
    }
}

impl Target {
    /// A run-config key without a table entry, typed after its default value.
    fn from_config(key: String, default: &toml::Value) -> Result<Self, String> {
        let kind = match default {
            toml::Value::Float(_) => float(f64::MIN, f64::MAX, false, false),
            toml::Value::Integer(_) => KnobKind::Int {
                min: 0,
                max: i64::MAX as u64,
            },
            toml::Value::Boolean(_) => KnobKind::Bool,
            toml::Value::String(_) => KnobKind::Text,
            other => return Err(format!("`{key}` is a {} field; set it with --set", other.type_str())),
        };
        Ok(Self {
            summary: format!("run-config field `{key}`"),
            key,
            kind,
            off: None,
            unsupported: &[],
        })
    }
}

const fn float(min: f64, max: f64, min_open: bool, fraction: bool) -> KnobKind {
    KnobKind::Float {
        min,
        max,
        min_open,
        fraction,
    }
}

const VARIANTS: &[Choice] = &[
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

const OBJECTIVES: &[Choice] = &[
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

const QUALITY: &[Choice] = &[
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

const NEGATIVES: &[Choice] = &[
    Choice {
        value: "dataset",
        keywords: &["dataset", "disrupted", "dip", "original loser", "default"],
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
];

const SOURCES: &[Choice] = &[
    Choice {
        value: "reference",
        keywords: &["reference", "frozen"],
    },
    Choice {
        value: "policy",
        keywords: &["policy", "trained", "fine tuned", "lora"],
    },
];

const SIMILARITIES: &[Choice] = &[
    Choice {
        value: "cosine",
        keywords: &["cosine"],
    },
    Choice {
        value: "squared-norm",
        keywords: &["squared norm", "eq 3", "as printed"],
    },
];

const POOLS: &[Choice] = &[
    Choice {
        value: "mean",
        keywords: &["mean", "all tokens", "average"],
    },
    Choice {
        value: "foreground",
        keywords: &["foreground", "subject tokens", "masked"],
    },
];

const MASK_NORMS: &[Choice] = &[
    Choice {
        value: "mean",
        keywords: &["mean", "average", "default"],
    },
    Choice {
        value: "weighted-mean",
        keywords: &["weighted", "area independent", "normalised", "normalized"],
    },
];

const VALIDATION_SELECTION: (&str, &str) = (
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
    },
    Knob {
        key: "dpo.beta",
        summary: "β of Eq. 1 / Eq. 10 (with T·ω(λ_t) folded in)",
        aliases: &["β", "beta", "kl weight", "kl regularization", "dpo temperature"],
        kind: float(0.0, 1e9, true, false),
        off: None,
        unsupported: &[],
    },
    Knob {
        key: "dpo.margin",
        summary: "margin m inside the sigmoid",
        aliases: &["margin", "margin m", "reward margin offset"],
        kind: float(-1e9, 1e9, false, false),
        off: Some("0"),
        unsupported: &[],
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
    },
    Knob {
        key: "dpo.pair_filter_delta",
        summary: "pair filter δ: drop pairs the reference already prefers by more than δ",
        aliases: &["δ", "delta", "margin threshold", "pair filter", "filter threshold"],
        kind: float(-1e9, 1e9, false, false),
        off: None,
        unsupported: &[],
    },
    Knob {
        key: "dpo.mask_norm",
        summary: "reduction of masked errors: mean, weighted-mean",
        aliases: &["mask normalization", "mask normalisation", "error reduction"],
        kind: KnobKind::Choice(MASK_NORMS),
        off: None,
        unsupported: &[],
    },
    Knob {
        key: "lora.rank",
        summary: "LoRA rank r",
        aliases: &["lora rank", "adapter rank", "low rank", "rank r"],
        kind: KnobKind::Int { min: 1, max: 4096 },
        off: None,
        unsupported: &[],
    },
    Knob {
        key: "lora.alpha",
        summary: "LoRA scale numerator α",
        aliases: &["lora alpha", "α", "lora scale"],
        kind: float(0.0, 1e6, true, false),
        off: None,
        unsupported: &[],
    },
    Knob {
        key: "optim.adamw.lr",
        summary: "peak learning rate",
        aliases: &["learning rate", "lr", "step size"],
        kind: float(0.0, 1.0, true, false),
        off: None,
        unsupported: &[],
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
    },
    Knob {
        key: "optim.grad_clip",
        summary: "global gradient-norm clip (0 = off)",
        aliases: &["gradient clipping", "grad clip", "clipping"],
        kind: float(0.0, 1e9, false, false),
        off: Some("0"),
        unsupported: &[],
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
    },
    Knob {
        key: "masks.attention.layers",
        summary: "double-stream blocks averaged in Eq. 3 (empty = all)",
        aliases: &["attention layers", "layers", "blocks", "which layers"],
        kind: KnobKind::IndexList,
        off: None,
        unsupported: &[],
    },
    Knob {
        key: "masks.attention.similarity",
        summary: "similarity of Eq. 3: cosine or squared-norm",
        aliases: &["similarity", "cosine", "squared norm"],
        kind: KnobKind::Choice(SIMILARITIES),
        off: None,
        unsupported: &[],
    },
    Knob {
        key: "masks.attention.pool",
        summary: "pooling of Eq. 3's CLS: mean of all reference tokens or of the foreground",
        aliases: &["cls pooling", "pooling", "cls", "reference pooling", "pool"],
        kind: KnobKind::Choice(POOLS),
        off: None,
        unsupported: &[],
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
        ],
        kind: KnobKind::PairSelection,
        off: Some("all"),
        unsupported: &[VALIDATION_SELECTION],
    },
    Knob {
        key: "data.pairs.top_percent",
        summary: "percent of pairs kept by top-percent selection",
        aliases: &["top percentage", "kept percent", "keep ratio"],
        kind: float(0.0, 100.0, true, false),
        off: None,
        unsupported: &[],
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
    },
    Knob {
        key: "data.pairs.dynamic_k",
        summary: "k of the mean-std rule",
        aliases: &["std multiplier", "dynamic k"],
        kind: float(-1e3, 1e3, false, false),
        off: None,
        unsupported: &[],
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
    },
    Knob {
        key: "data.negatives",
        summary: "loser source: dataset, shuffled (another item's winner), base (a base-model sample)",
        aliases: &[
            "negative",
            "negative sample",
            "negative source",
            "loser",
            "loser image",
            "rejected image",
            "dispreferred",
            "hard negative",
        ],
        kind: KnobKind::Choice(NEGATIVES),
        off: None,
        unsupported: &[],
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
        ],
        kind: KnobKind::Schedule,
        off: None,
        unsupported: &[],
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
    },
];

/// What a metric name maps to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MetricMatch {
    /// An implemented metric id, with a note on what it needs or how it differs from the name.
    Available {
        /// Metric id.
        id: &'static str,
        /// Caveat, if any.
        note: Option<&'static str>,
    },
    /// No implemented metric measures this.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// A metric name and what it maps to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedMetric {
    /// The name as written in the plan.
    pub text: String,
    /// Its mapping.
    pub matched: MetricMatch,
}

/// An implemented metric and the names that select it.
#[derive(Clone, Copy, Debug)]
pub struct MetricEntry {
    /// Metric id.
    pub id: &'static str,
    /// Phrases that select it.
    pub aliases: &'static [&'static str],
    /// Caveat shown with the mapping.
    pub note: Option<&'static str>,
}

const NEEDS_WEIGHTS: Option<&str> = Some("needs pretrained weights given by the user (see docs/eval.md)");

/// Every implemented metric and its aliases.
pub const METRICS: &[MetricEntry] = &[
    MetricEntry {
        id: "identity_sim",
        aliases: &[
            "identity similarity",
            "id similarity",
            "identity preservation",
            "subject similarity",
            "identity score",
            "face similarity",
        ],
        note: Some("cosine similarity of the built-in identity embedder"),
    },
    MetricEntry {
        id: "dino",
        aliases: &["dino", "dinov2", "dino i", "dino score"],
        note: NEEDS_WEIGHTS,
    },
    MetricEntry {
        id: "clip_i",
        aliases: &["clip i", "clipi", "clip image", "image alignment"],
        note: NEEDS_WEIGHTS,
    },
    MetricEntry {
        id: "clip_t",
        aliases: &[
            "clip t",
            "clipt",
            "clip text",
            "clip score",
            "text alignment",
            "prompt alignment",
        ],
        note: NEEDS_WEIGHTS,
    },
    MetricEntry {
        id: "eer",
        aliases: &["eer", "equal error rate"],
        note: None,
    },
    MetricEntry {
        id: "fmr100",
        aliases: &["fmr100", "fmr 100", "fnmr at 1"],
        note: None,
    },
    MetricEntry {
        id: "fmr1000",
        aliases: &["fmr1000", "fmr 1000", "fnmr at 0 1"],
        note: None,
    },
    MetricEntry {
        id: "fdr",
        aliases: &["fdr", "fisher discriminant ratio"],
        note: None,
    },
    MetricEntry {
        id: "fd_identity",
        aliases: &[
            "fd",
            "fid",
            "frechet",
            "fréchet",
            "frechet distance",
            "fréchet distance",
        ],
        note: Some("Fréchet distance of built-in identity embeddings (no Inception weights here)"),
    },
    MetricEntry {
        id: "cmmd_identity",
        aliases: &["cmmd", "mmd", "maximum mean discrepancy"],
        note: Some("MMD of built-in identity embeddings (no CLIP weights here)"),
    },
    MetricEntry {
        id: "psnr",
        aliases: &["psnr", "peak signal to noise ratio"],
        note: None,
    },
    MetricEntry {
        id: "subject_psnr",
        aliases: &["subject psnr", "masked psnr", "region psnr"],
        note: None,
    },
    MetricEntry {
        id: "gt_fidelity",
        aliases: &["ground truth fidelity", "gt fidelity", "fidelity", "reconstruction"],
        note: None,
    },
    MetricEntry {
        id: "top1_identification",
        aliases: &[
            "top 1",
            "top1",
            "rank 1",
            "identification accuracy",
            "recognition accuracy",
        ],
        note: Some("rank-1 identification of the subject among the references with the built-in identity embedder"),
    },
    MetricEntry {
        id: "implicit_accuracy",
        aliases: &[
            "implicit accuracy",
            "reward accuracy",
            "preference accuracy",
            "pairwise accuracy",
        ],
        note: Some("on the training pairs (last 20 % of the steps) and on held-out pairs (eval::denoise)"),
    },
    MetricEntry {
        id: "reward_margin",
        aliases: &["reward margin", "implicit reward", "margin"],
        note: None,
    },
    MetricEntry {
        id: "loss",
        aliases: &["loss", "training loss"],
        note: None,
    },
    MetricEntry {
        id: "stability",
        aliases: &["stability", "training stability", "loss variance", "gradient spike"],
        note: Some("loss standard deviation over a window and grad-norm spikes"),
    },
    MetricEntry {
        id: "convergence_speed",
        aliases: &[
            "convergence",
            "convergence speed",
            "convergence rate",
            "steps to converge",
        ],
        note: Some("steps to reach a fraction of the final implicit accuracy"),
    },
];

const LEARNED_SCORER: &str = "needs a learned preference/aesthetic scorer whose weights are not available here, and \
                              its scores mean nothing on synthetic shapes";

/// Metric names known to be unavailable, with the reason.
pub const UNAVAILABLE_METRICS: &[(&[&str], &str)] = &[
    (&["aesthetic", "aesthetic score", "laion aesthetic"], LEARNED_SCORER),
    (&["imagereward", "image reward"], LEARNED_SCORER),
    (&["pickscore", "pick score"], LEARNED_SCORER),
    (&["hpsv2", "hps", "human preference score"], LEARNED_SCORER),
    (
        &["human evaluation", "user study", "human rating"],
        "needs human raters",
    ),
];

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

/// Lower-case words of a text: `M_s`, `M_{s}`, `$M_s$` read as `ms`; `w/o` as `without`; `%` is a word; a
/// trailing plural `s` of words longer than three letters is dropped.
pub fn words(text: &str) -> Vec<String> {
    let lower = text.to_lowercase().replace("w/o", "without");
    let mut out = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<String>| {
        if !word.is_empty() {
            let w = std::mem::take(word);
            let stemmed = match w.strip_suffix('s') {
                Some(stem) if w.chars().count() > 3 && !stem.ends_with('s') => stem.to_string(),
                _ => w,
            };
            out.push(stemmed);
        }
    };
    for c in lower.chars() {
        if c.is_alphanumeric() {
            word.push(c);
        } else if matches!(c, '_' | '{' | '}' | '$' | '\\') {
            // Joins subscripts: M_s, M_{prior}.
        } else {
            flush(&mut word, &mut out);
            if c == '%' {
                out.push("%".into());
            }
        }
    }
    flush(&mut word, &mut out);
    out
}

fn is_symbol(phrase: &str) -> bool {
    let mut chars = phrase.chars();
    matches!((chars.next(), chars.next()), (Some(c), None) if !c.is_ascii())
}

/// Score of `phrases` against `text_words`: a phrase counts when all its words occur; a single non-ASCII
/// symbol (a Greek letter) counts 3, other phrases one per word.
fn phrase_score(phrases: &[&str], text_words: &[String]) -> usize {
    phrases
        .iter()
        .filter_map(|p| {
            let pw = words(p);
            let hit = !pw.is_empty() && pw.iter().all(|w| text_words.contains(w));
            hit.then(|| if is_symbol(p) { 3 } else { pw.len() })
        })
        .sum()
}

/// The unique best-scoring entry, or the tied ones.
fn best<T: Copy>(scored: impl Iterator<Item = (T, usize)>) -> Result<T, Vec<T>> {
    let mut all: Vec<(T, usize)> = scored.filter(|&(_, s)| s > 0).collect();
    all.sort_by_key(|a| std::cmp::Reverse(a.1));
    match all.as_slice() {
        [] => Err(Vec::new()),
        [(only, _)] => Ok(*only),
        [(first, s1), (_, s2), ..] if s1 > s2 => Ok(*first),
        [(_, top), ..] => Err(all.iter().filter(|(_, s)| s == top).map(|(t, _)| *t).collect()),
    }
}

/// The knob table entry of `key`.
pub fn knob(key: &str) -> Option<&'static Knob> {
    KNOBS.iter().find(|k| k.key == key)
}

/// Dotted identifiers (`a.b`, `a.b.c`) and back-quoted words of a text: candidate explicit keys.
fn explicit_key_candidates(text: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut quoted = text
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.trim().to_string())
        .collect::<Vec<_>>();
    quoted.retain(|q| !q.is_empty() && q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'));
    out.extend(quoted.into_iter().map(|q| (q, true)));
    for token in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')) {
        let token = token.trim_matches('.');
        let parts: Vec<&str> = token.split('.').collect();
        let identifier = |p: &&str| p.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if parts.len() >= 2 && parts.iter().all(identifier) && !out.iter().any(|(t, _)| t == token) {
            out.push((token.to_string(), false));
        }
    }
    out
}

/// The default run config as a TOML table (for keys outside the knob table).
fn default_config_value(key: &str) -> Option<toml::Value> {
    let mut value = toml::Value::Table(toml::Table::try_from(RunConfig::default()).ok()?);
    for part in key.split('.') {
        value = value.as_table()?.get(part)?.clone();
    }
    Some(value)
}

/// A knob named explicitly: a full key, a unique dotted suffix / last segment of a table key, or any
/// run-config key.
fn explicit_knob(text: &str) -> Result<Option<Target>, String> {
    for (candidate, quoted) in explicit_key_candidates(text) {
        if let Some(k) = knob(&candidate) {
            return Ok(Some(k.into()));
        }
        if candidate.contains('.') {
            let suffix = format!(".{candidate}");
            let last = candidate.rsplit('.').next().unwrap_or_default();
            let by_suffix: Vec<&Knob> = KNOBS.iter().filter(|k| k.key.ends_with(&suffix)).collect();
            let by_last: Vec<&Knob> = KNOBS
                .iter()
                .filter(|k| k.key.rsplit('.').next() == Some(last))
                .collect();
            if let [only] = by_suffix.as_slice() {
                return Ok(Some((*only).into()));
            }
            if let [only] = by_last.as_slice() {
                return Ok(Some((*only).into()));
            }
        }
        if let Some(v) = default_config_value(&candidate).filter(|v| !v.is_table()) {
            return Target::from_config(candidate, &v).map(Some);
        }
        if quoted && candidate.contains('.') {
            return Err(format!("`{candidate}` names no Studio knob or run-config key"));
        }
    }
    Ok(None)
}

/// All knob keys, for "known knobs" in reports.
pub fn known_knobs() -> String {
    KNOBS.iter().map(|k| k.key).collect::<Vec<_>>().join(", ")
}

/// The knob an ablated-part text names (module docs), or why none.
pub fn knob_for_part(part: &str) -> Result<Target, String> {
    if let Some(target) = explicit_knob(part)? {
        return Ok(target);
    }
    let part_words = words(part);
    let found = best(KNOBS.iter().map(|k| (k, phrase_score(k.aliases, &part_words))));
    found.map(Target::from).map_err(|tied| {
        if tied.is_empty() {
            format!("no knob matches; known knobs: {}", known_knobs())
        } else {
            let keys: Vec<&str> = tied.iter().map(|k| k.key).collect();
            format!(
                "ambiguous between {}; write the key explicitly, e.g. `({})`",
                keys.join(", "),
                keys.first().copied().unwrap_or_default()
            )
        }
    })
}

/// A number found in a text.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Number {
    value: f64,
    percent: bool,
}

/// Numbers of a text that stand alone (`0.1`, `-3`, `1e-4`, `3 × 10^-4`, `5.33%`), not those inside words
/// (`top-1`, `HPSv2`, `M_1`).
fn numbers(text: &str) -> Vec<Number> {
    let text = text.replace('−', "-").replace(['×', '·'], "*");
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = i;
        let prev = start.checked_sub(1).map(|p| chars[p]);
        let mut j = i;
        if matches!(chars[j], '-' | '+') {
            let sign_ok = prev.is_none_or(|p| p.is_whitespace() || matches!(p, '(' | '=' | ',' | '[' | ':' | '{'));
            if !sign_ok {
                i += 1;
                continue;
            }
            j += 1;
        }
        let digits_start = j;
        while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
            j += 1;
        }
        let mantissa: String = chars[digits_start..j].iter().collect();
        let mantissa_ok = mantissa.chars().any(|c| c.is_ascii_digit()) && mantissa.matches('.').count() <= 1;
        // `top-1` and `HPSv2` are words; in `0.1-0.5` both ends are numbers.
        let before_prev = start.checked_sub(2).map(|p| chars[p]);
        let hyphenated = prev == Some('-') && before_prev.is_some_and(|b| b.is_alphabetic() || b == '_');
        let glued =
            digits_start == start && (prev.is_some_and(|p| p.is_alphanumeric() || p == '_' || p == '.') || hyphenated);
        if !mantissa_ok || glued {
            i = j.max(i + 1);
            continue;
        }
        // Exponent: e-4.
        if j < chars.len() && matches!(chars[j], 'e' | 'E') {
            let mut k = j + 1;
            if k < chars.len() && matches!(chars[k], '-' | '+') {
                k += 1;
            }
            let exp_digits = chars[k..].iter().take_while(|c| c.is_ascii_digit()).count();
            if exp_digits > 0 {
                j = k + exp_digits;
            }
        }
        let literal: String = chars[start..j].iter().collect();
        let Ok(mut value) = literal.trim_end_matches('.').parse::<f64>() else {
            i = j.max(i + 1);
            continue;
        };
        // Scientific notation written out: 3 * 10^-4.
        let rest: String = chars[j..].iter().collect();
        if let Some((exponent, used)) = power_of_ten_suffix(&rest) {
            // Through the decimal literal, so 3 × 10^-4 is exactly the f64 of 3e-4.
            value = format!("{}e{exponent}", literal.trim_end_matches('.'))
                .parse()
                .unwrap_or(value * 10f64.powi(exponent));
            j += used;
        }
        // A number glued to a following letter is part of a word (2nd, 3x).
        if j < chars.len() && chars[j].is_alphabetic() {
            i = j;
            continue;
        }
        let percent = chars[j..].iter().find(|c| !c.is_whitespace()) == Some(&'%');
        out.push(Number { value, percent });
        i = j.max(i + 1);
    }
    out
}

/// `* 10^-4` (also `x 10^-4`, `*10^(-4)`) at the start of `rest`: the exponent and the characters used.
fn power_of_ten_suffix(rest: &str) -> Option<(i32, usize)> {
    let trimmed = rest.trim_start();
    let after_op = trimmed.strip_prefix(['*', 'x'])?.trim_start();
    let after_ten = after_op.strip_prefix("10")?.trim_start();
    let after_caret = after_ten.strip_prefix('^').unwrap_or(after_ten).trim_start();
    let inner = after_caret.strip_prefix('(').unwrap_or(after_caret);
    let sign_len = usize::from(inner.starts_with(['-', '+']));
    let digits = inner[sign_len..].chars().take_while(char::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let exponent: i32 = inner[..sign_len + digits].parse().ok()?;
    let mut end = rest.len() - inner.len() + sign_len + digits;
    if rest[end..].starts_with(')') && after_caret.starts_with('(') {
        end += 1;
    }
    Some((exponent, rest[..end].chars().count()))
}

/// The one number of a value.
fn single_number(text: &str) -> Result<Number, String> {
    let all = numbers(text);
    let mut distinct: Vec<Number> = Vec::new();
    for n in all {
        if !distinct.contains(&n) {
            distinct.push(n);
        }
    }
    match distinct.as_slice() {
        [n] => Ok(*n),
        [] => Err("no number in it".into()),
        _ => Err("it holds several numbers; write one value per Replacement".into()),
    }
}

/// Formats a number for TOML (`0.1`, `1e-4`, integers without a dot for int fields).
fn toml_float(v: f64) -> String {
    let s = format!("{v}");
    if s.contains(['.', 'e', 'E', 'i', 'N']) {
        s
    } else {
        format!("{s}.0")
    }
}

fn parse_float(text: &str, min: f64, max: f64, min_open: bool, fraction: bool) -> Result<String, String> {
    let n = single_number(text)?;
    let v = if n.percent && fraction {
        n.value / 100.0
    } else {
        n.value
    };
    let below = if min_open { v <= min } else { v < min };
    if !v.is_finite() || below || v > max {
        let open = if min_open { "(" } else { "[" };
        return Err(format!("{v} is outside {open}{min}, {max}]"));
    }
    Ok(toml_float(v))
}

fn parse_int(text: &str, min: u64, max: u64) -> Result<u64, String> {
    let n = single_number(text)?;
    if n.value.fract() != 0.0 || n.value < min as f64 || n.value > max as f64 {
        return Err(format!("{} is not a whole number in {min}..={max}", n.value));
    }
    // The range check above makes this cast exact.
    Ok(n.value as u64)
}

fn parse_choice(text: &str, choices: &[Choice]) -> Result<&'static str, String> {
    let value_words = words(text);
    let exact = choices.iter().find(|c| words(c.value) == value_words);
    if let Some(c) = exact {
        return Ok(c.value);
    }
    best(
        choices
            .iter()
            .map(|c| (c.value, phrase_score(c.keywords, &value_words))),
    )
    .map_err(|tied| {
        let names: Vec<&str> = choices.iter().map(|c| c.value).collect();
        if tied.is_empty() {
            format!("matches none of {}", names.join(", "))
        } else {
            format!("ambiguous between {}", tied.join(", "))
        }
    })
}

fn pair_selection(text: &str) -> Result<Vec<Override>, String> {
    let w = words(text);
    let dynamic_words = [
        "dynamic",
        "adaptive",
        "distribution",
        "otsu",
        "automatic",
        "mean",
        "std",
        "statistical",
    ];
    if dynamic_words.iter().any(|d| w.iter().any(|x| x == d)) {
        let mut out = vec![Override::new("data.pairs.select", "dynamic")];
        if w.iter().any(|x| x == "otsu") {
            out.push(Override::new("data.pairs.dynamic", "otsu"));
        } else if phrase_score(&["mean", "std", "standard deviation", "sigma"], &w) > 0 {
            out.push(Override::new("data.pairs.dynamic", "mean-std"));
            if let Ok(n) = single_number(text) {
                out.push(Override::new("data.pairs.dynamic_k", toml_float(n.value)));
            }
        }
        return Ok(out);
    }
    if phrase_score(&["all", "no selection", "no filter", "full dataset", "every pair"], &w) > 0 {
        return Ok(vec![Override::new("data.pairs.select", "all")]);
    }
    match single_number(text) {
        Ok(n) if n.value > 0.0 && n.value <= 100.0 => Ok(vec![
            Override::new("data.pairs.select", "top-percent"),
            Override::new("data.pairs.top_percent", toml_float(n.value)),
        ]),
        Ok(n) => Err(format!("{} is not a percentage in (0, 100]", n.value)),
        Err(_) => Err("expected `all`, a top percentage (`10%`) or a dynamic rule (`mean + 1 std`, `otsu`)".into()),
    }
}

fn schedule(text: &str) -> Result<Vec<Override>, String> {
    const KINDS: &[Choice] = &[
        Choice {
            value: "joint",
            keywords: &["joint", "simultaneous", "combined", "together", "mixed"],
        },
        Choice {
            value: "sequential",
            keywords: &["sequential", "two stage", "then", "followed", "staged", "first"],
        },
    ];
    let kind = parse_choice(text, KINDS)?;
    let mut out = vec![Override::new("schedule.kind", kind)];
    if kind == "sequential"
        && let Ok(n) = single_number(text)
    {
        if n.value.fract() == 0.0 && n.value >= 0.0 {
            out.push(Override::new("schedule.sft_steps", format!("{}", n.value as u64)));
        } else {
            return Err(format!("{} is not a whole number of SFT steps", n.value));
        }
    }
    Ok(out)
}

fn index_list(text: &str) -> Result<String, String> {
    let w = words(text);
    if phrase_score(&["all"], &w) > 0 && numbers(text).is_empty() {
        return Ok("[]".into());
    }
    let mut indices = Vec::new();
    for n in numbers(text) {
        if n.value.fract() != 0.0 || n.value < 0.0 || n.value > 1e6 {
            return Err(format!("{} is not a block index", n.value));
        }
        indices.push((n.value as u64).to_string());
    }
    if indices.is_empty() {
        return Err("expected block indices (`0, 2`) or `all`".into());
    }
    Ok(format!("[{}]", indices.join(", ")))
}

fn boolean(text: &str) -> Result<bool, String> {
    let w = words(text);
    let on = phrase_score(&["true", "on", "yes", "enabled", "enable", "with"], &w);
    let off = phrase_score(&["false", "off", "no", "disabled", "disable", "without"], &w);
    match on.cmp(&off) {
        std::cmp::Ordering::Greater => Ok(true),
        std::cmp::Ordering::Less => Ok(false),
        std::cmp::Ordering::Equal => Err("expected true/false (on/off, enabled/disabled)".into()),
    }
}

/// The overrides one replacement value sets on `knob`, or why it does not fit.
pub fn parse_value(knob: &Target, text: &str) -> Result<Vec<Override>, String> {
    let value_words = words(text);
    for (phrase, reason) in knob.unsupported {
        if phrase_score(&[phrase], &value_words) > 0 {
            return Err((*reason).to_string());
        }
    }
    let single = |v: String| Ok(vec![Override::new(&knob.key, v)]);
    match knob.kind {
        KnobKind::Float {
            min,
            max,
            min_open,
            fraction,
        } => single(parse_float(text, min, max, min_open, fraction)?),
        KnobKind::Int { min, max } => single(parse_int(text, min, max)?.to_string()),
        KnobKind::Choice(choices) => single(parse_choice(text, choices)?.to_string()),
        KnobKind::PairSelection => pair_selection(text),
        KnobKind::Schedule => schedule(text),
        KnobKind::IndexList => single(index_list(text)?),
        KnobKind::Bool => single(boolean(text)?.to_string()),
        KnobKind::Text => single(toml::Value::String(text.trim().to_string()).to_string()),
    }
}

/// The value a REMOVE study sets on `knob`, or why there is none.
fn removal(knob: &Target, part: &str) -> Result<Vec<Override>, String> {
    if let Some(off) = knob.off {
        return Ok(vec![Override::new(&knob.key, off)]);
    }
    match knob.kind {
        // "REMOVE M_s" is the choice named "without M_s".
        KnobKind::Choice(choices) => {
            if let Ok(v) = parse_choice(&format!("without {part}"), choices) {
                return Ok(vec![Override::new(&knob.key, v)]);
            }
        }
        KnobKind::Bool => return Ok(vec![Override::new(&knob.key, "false")]),
        _ => {}
    }
    Err(format!(
        "`{}` has no off value; write a REPLACE study with the values to try",
        knob.key
    ))
}

/// Maps a metric name to an implemented metric or the reason it is unavailable.
pub fn resolve_metric(name: &str) -> MetricMatch {
    let w = words(name);
    // A known-unavailable name wins over an equal or weaker partial match ("Image Reward" vs "reward margin").
    let best_available = best(METRICS.iter().map(|m| (m, phrase_score(m.aliases, &w))));
    let best_unavailable = UNAVAILABLE_METRICS
        .iter()
        .map(|(aliases, reason)| (*reason, phrase_score(aliases, &w)))
        .max_by_key(|&(_, s)| s)
        .filter(|&(_, s)| s > 0);
    let available_score = |m: &MetricEntry| phrase_score(m.aliases, &w);
    match (best_available, best_unavailable) {
        (Ok(m), Some((reason, s))) if s >= available_score(m) => MetricMatch::Unavailable {
            reason: reason.to_string(),
        },
        (Ok(m), _) => MetricMatch::Available { id: m.id, note: m.note },
        (_, Some((reason, _))) => MetricMatch::Unavailable {
            reason: reason.to_string(),
        },
        (Err(tied), None) if !tied.is_empty() => MetricMatch::Unavailable {
            reason: format!(
                "ambiguous between {}",
                tied.iter().map(|m| m.id).collect::<Vec<_>>().join(", ")
            ),
        },
        _ => MetricMatch::Unavailable {
            reason: format!(
                "no implemented metric matches; implemented: {}",
                METRICS.iter().map(|m| m.id).collect::<Vec<_>>().join(", ")
            ),
        },
    }
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
    let knob = match knob_for_part(&study.ablated_part) {
        Ok(k) => Some(k),
        Err(reason) => {
            report(UnresolvedKind::Part, &study.ablated_part, reason);
            None
        }
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

/// The alias table as Markdown (docs/experiments.md embeds it; a test keeps the two equal).
pub fn alias_table_markdown() -> String {
    let mut out = String::from("| key | what | aliases in \"Ablated Part\" | values |\n|---|---|---|---|\n");
    for k in KNOBS {
        let values = match k.kind {
            KnobKind::Float { min, max, min_open, .. } => range_text(min, max, min_open),
            KnobKind::Int { min, max } => format!("whole number in {min}..={max}"),
            KnobKind::Choice(c) => c
                .iter()
                .map(|c| format!("`{}` ({})", c.value, c.keywords.join(", ")))
                .collect::<Vec<_>>()
                .join("; "),
            KnobKind::PairSelection => {
                "`all`; `N%` → top-percent; dynamic/adaptive/distribution/mean+k·std/otsu → dynamic".into()
            }
            KnobKind::Schedule => "`joint`; `sequential` (+ a number → schedule.sft_steps)".into(),
            KnobKind::IndexList => "block indices (`0, 2`) or `all`".into(),
            KnobKind::Bool => "true / false".into(),
            KnobKind::Text => "any text".into(),
        };
        let off = k.off.map(|o| format!("; REMOVE → `{o}`")).unwrap_or_default();
        out.push_str(&format!(
            "| `{}` | {} | {} | {}{} |\n",
            k.key,
            k.summary,
            k.aliases.join(", "),
            values.replace('|', "\\|"),
            off
        ));
    }
    out
}

/// "number in [0, 1]", "number > 0", "number" (bounds beyond ±1e8 are "no bound").
fn range_text(min: f64, max: f64, min_open: bool) -> String {
    const UNBOUNDED: f64 = 1e8;
    match (min > -UNBOUNDED, max < UNBOUNDED) {
        (true, true) => format!("number in {}{min}, {max}]", if min_open { "(" } else { "[" }),
        (true, false) => format!("number {} {min}", if min_open { ">" } else { "≥" }),
        (false, true) => format!("number ≤ {max}"),
        (false, false) => "number".into(),
    }
}

/// The metric table as Markdown (docs/experiments.md embeds it).
pub fn metric_table_markdown() -> String {
    let mut out = String::from("| metric id | names in \"Metrics\" | note |\n|---|---|---|\n");
    for m in METRICS {
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            m.id,
            m.aliases.join(", "),
            m.note.unwrap_or("")
        ));
    }
    for (aliases, reason) in UNAVAILABLE_METRICS {
        out.push_str(&format!("| unavailable | {} | {} |\n", aliases.join(", "), reason));
    }
    out
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

    const DOC: &str = include_str!("../../docs/experiments.md");

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
