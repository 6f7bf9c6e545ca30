//! The metric table: metric names of plans mapped to implemented metric ids, or the reason they are unavailable.

use super::*;

/// What a metric name maps to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MetricMatch {
    /// An implemented metric id, with a note on what it needs or how it differs from the name.
    Available {
        /// Metric id.
        id: &'static str,
        /// Caveat, if any.
        note: Option<&'static str>,
        /// Measured against the plan's baseline rather than as it is (`None`: as it is).
        #[serde(skip_serializing_if = "Option::is_none")]
        derived: Option<Derivation>,
    },
    /// No implemented metric measures this.
    Unavailable {
        /// Why.
        reason: String,
    },
}

impl MetricMatch {
    /// How reports name the mapping: the id, or for a derived metric `Δ id` / `Δ% id` with "vs baseline";
    /// `None` when unavailable.
    pub fn shown_id(&self) -> Option<String> {
        match self {
            MetricMatch::Available { id, derived: None, .. } => Some(id.to_string()),
            MetricMatch::Available {
                id, derived: Some(d), ..
            } => Some(format!("{} {id} vs baseline", d.label())),
            MetricMatch::Unavailable { .. } => None,
        }
    }
}

/// A metric taken against the plan's baseline cell of the same seed, then averaged over seeds with its 95 % CI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Derivation {
    /// `value − baseline`: a change, gain or improvement.
    Change,
    /// `(value − baseline) / |baseline|` in percent: a relative change or improvement ratio.
    RelativeChange,
}

impl Derivation {
    /// The prefix of its value ids (`change:single.eer`).
    pub fn prefix(self) -> &'static str {
        match self {
            Derivation::Change => "change:",
            Derivation::RelativeChange => "relchange:",
        }
    }

    /// The prefix of its column labels.
    pub fn label(self) -> &'static str {
        match self {
            Derivation::Change => "Δ",
            Derivation::RelativeChange => "Δ%",
        }
    }

    /// The derivation of a value id and the id it derives from (`None` for a plain id).
    pub fn split(id: &str) -> Option<(Derivation, &str)> {
        [Derivation::Change, Derivation::RelativeChange]
            .into_iter()
            .find_map(|d| id.strip_prefix(d.prefix()).map(|rest| (d, rest)))
    }
}

/// Words of a metric name that ask for a change against the baseline.
pub const CHANGE_WORDS: &[&str] = &[
    "improvement",
    "gain",
    "change",
    "delta",
    "δ",
    "increase",
    "decrease",
    "reduction",
    "drop",
    "difference",
    "baseline",
];

/// Words that make that change relative.
pub const RELATIVE_WORDS: &[&str] = &["relative", "ratio", "percent", "percentage", "%", "fold"];

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

pub(super) const NEEDS_WEIGHTS: Option<&str> = Some("needs pretrained weights given by the user (see docs/eval.md)");

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
        id: "identity_is",
        aliases: &["inception score", "inception", "is score"],
        note: Some(
            "Inception-style score exp(E KL(p(y|x) ‖ p(y))) over the benchmark's identity classes, p(y|x) from the \
             built-in identity classifier (softmax of cosine similarities to one reference per identity, T = 0.1); \
             not Inception-v3's ImageNet score",
        ),
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

pub(super) const LEARNED_SCORER: &str = "needs a learned preference/aesthetic scorer whose weights are not available here, and \
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

/// Abbreviations that name a metric only as the whole name (compared lower-case without spaces and punctuation:
/// `IS`, `ID-Sim`, `Top-1 Acc.`), since as words they would occur in other names.
pub const ABBREVIATIONS: &[(&str, &str)] = &[
    ("is", "identity_is"),
    ("id", "identity_sim"),
    ("idsim", "identity_sim"),
    ("idsimilarity", "identity_sim"),
    ("r1", "top1_identification"),
    ("top1acc", "top1_identification"),
    ("acc", "implicit_accuracy"),
    ("prefacc", "implicit_accuracy"),
];

/// A name lower-case with only its letters and digits (`Top-1 Acc.` → `top1acc`).
fn squashed(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Maps a metric name to an implemented metric or the reason it is unavailable.
pub fn resolve_metric(name: &str) -> MetricMatch {
    if let Some((_, id)) = ABBREVIATIONS.iter().find(|(a, _)| *a == squashed(name))
        && let Some(m) = METRICS.iter().find(|m| m.id == *id)
    {
        return MetricMatch::Available {
            id: m.id,
            note: m.note,
            derived: None,
        };
    }
    let w = words(name);
    let plain = resolve_metric_words(&w);
    // "Improvement ratio of identity similarity over the baseline": the metric named by the other words, taken
    // against the baseline; unless the words that ask for it belong to the metric's own name ("Fisher
    // discriminant ratio", "peak signal to noise ratio").
    let asks: Vec<&str> = CHANGE_WORDS
        .iter()
        .chain(RELATIVE_WORDS)
        .copied()
        .filter(|p| phrase_score(&[p], &w) > 0)
        .collect();
    let own_name = |id: &str| {
        METRICS.iter().filter(|m| m.id == id).any(|m| {
            m.aliases
                .iter()
                .filter(|a| phrase_score(&[a], &w) > 0)
                .any(|a| words(a).iter().any(|aw| asks.contains(&aw.as_str())))
        })
    };
    let plain_owns = matches!(&plain, MetricMatch::Available { id, .. } if own_name(id));
    if !asks.is_empty() && !plain_owns {
        const FILLER: &[&str] = &[
            "over", "vs", "versus", "to", "than", "compared", "the", "in", "of", "on", "from", "wrt", "against", "rate",
        ];
        let rest: Vec<String> = w
            .iter()
            .filter(|x| !asks.contains(&x.as_str()) && !FILLER.contains(&x.as_str()))
            .cloned()
            .collect();
        if let MetricMatch::Available { id, note, .. } = resolve_metric_words(&rest) {
            let relative = RELATIVE_WORDS.iter().any(|r| asks.contains(r));
            return MetricMatch::Available {
                id,
                note,
                derived: Some(if relative {
                    Derivation::RelativeChange
                } else {
                    Derivation::Change
                }),
            };
        }
    }
    plain
}

fn resolve_metric_words(w: &[String]) -> MetricMatch {
    let w = w.to_vec();
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
        (Ok(m), _) => MetricMatch::Available {
            id: m.id,
            note: m.note,
            derived: None,
        },
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

/// The metric table as Markdown (docs/experiments.md embeds it).
pub fn metric_table_markdown() -> String {
    let mut out = String::from("| metric id | names in \"Metrics\" | note |\n|---|---|---|\n");
    for m in METRICS {
        let mut names = m.aliases.join(", ");
        let abbreviations: Vec<String> = ABBREVIATIONS
            .iter()
            .filter(|(_, id)| *id == m.id)
            .map(|(a, _)| format!("`{a}`"))
            .collect();
        if !abbreviations.is_empty() {
            names.push_str(&format!("; as the whole name: {}", abbreviations.join(", ")));
        }
        out.push_str(&format!("| `{}` | {} | {} |\n", m.id, names, m.note.unwrap_or("")));
    }
    for (aliases, reason) in UNAVAILABLE_METRICS {
        out.push_str(&format!("| unavailable | {} | {} |\n", aliases.join(", "), reason));
    }
    out
}
