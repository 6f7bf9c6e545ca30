//! Finding the knob of the registry ([`crate::knobs`]) a study's "Ablated Part" names, and why.

use super::*;
pub use crate::knobs::*;

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

/// Dotted identifiers (`a.b`, `a.b.c`) and back-quoted words of a text: candidate explicit keys.
pub(super) fn explicit_key_candidates(text: &str) -> Vec<(String, bool)> {
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

/// A knob named explicitly: a full key, a unique dotted suffix / last segment of a table key, or any
/// run-config key.
pub(super) fn explicit_knob(text: &str) -> Result<Option<Target>, String> {
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

/// The knob an ablated-part text names by its words alone (module docs), or why none.
pub fn knob_for_part(part: &str) -> Result<Target, String> {
    knob_for_study(part, &[]).map(|(target, _)| target)
}

/// On what a study's knob was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Basis {
    /// Its key is written in the part.
    Explicit,
    /// The part's words name it better than any other knob.
    Words,
    /// The part's words name several knobs (or none); the replacement values fit it best.
    Values,
}

/// A knob considered for a study and not chosen.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Alternative {
    /// Its key.
    pub key: String,
    /// Its aliases found in the part.
    pub words: Vec<String>,
    /// How many replacement values fit it.
    pub fit: usize,
}

/// Why a study's knob was chosen: shown by `focusdpo ablate --dry-run`, results.md and the Studio.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KnobReason {
    /// Found in the study's title, the part naming no knob.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub from_title: bool,
    /// On what it was chosen.
    pub basis: Basis,
    /// Its aliases found in the part.
    pub words: Vec<String>,
    /// Replacement values that fit it.
    pub fit: usize,
    /// Replacement values of the study.
    pub values: usize,
    /// The other knobs considered (those whose words tie with it, or whose values fit too).
    pub alternatives: Vec<Alternative>,
}

impl KnobReason {
    /// One line: how it was found, the value fit, and the alternatives.
    pub fn text(&self) -> String {
        let quoted = |w: &[String]| w.iter().map(|w| format!("`{w}`")).collect::<Vec<_>>().join(", ");
        let mut out = if self.from_title {
            "the part names no knob; the title's ".to_string()
        } else {
            String::new()
        };
        out += &match self.basis {
            Basis::Explicit => "key written in the part".to_string(),
            Basis::Words => format!("words {}", quoted(&self.words)),
            Basis::Values if self.words.is_empty() => "no knob named; the values decide".to_string(),
            Basis::Values => {
                let mut all = self.words.clone();
                for w in self.alternatives.iter().flat_map(|a| &a.words) {
                    if !all.contains(w) {
                        all.push(w.clone());
                    }
                }
                format!("words {} name several knobs; the values decide", quoted(&all))
            }
        };
        if self.values > 0 {
            out.push_str(&format!("; {}/{} values fit", self.fit, self.values));
        }
        if !self.alternatives.is_empty() {
            let alts: Vec<String> = self
                .alternatives
                .iter()
                .map(|a| format!("{} ({}/{})", a.key, a.fit, self.values))
                .collect();
            out.push_str(&format!("; also considered: {}", alts.join(", ")));
        }
        out
    }
}

/// The aliases of `phrases` whose words all occur in `text_words`.
fn matched_phrases(phrases: &[&str], text_words: &[String]) -> Vec<String> {
    phrases
        .iter()
        .filter(|p| phrase_score(&[p], text_words) > 0)
        .map(|p| p.to_string())
        .collect()
}

/// Whether `text` is a value name of `choices` rather than a text that merely contains one: a keyword of a choice
/// covers at least half of its words (`shuffled` or `other subject's image`, not `full moon phase`).
fn names_a_value(choices: &[Choice], text: &str) -> bool {
    const FILLER: &[&str] = &[
        "the", "a", "an", "of", "s", "from", "with", "by", "its", "their", "as", "one", "using",
    ];
    let w: Vec<String> = words(text)
        .into_iter()
        .filter(|w| !FILLER.contains(&w.as_str()))
        .collect();
    let covered = choices
        .iter()
        .flat_map(|c| c.keywords.iter())
        .filter(|k| phrase_score(&[k], &w) > 0)
        .map(|k| words(k).len())
        .max()
        .unwrap_or(0);
    !w.is_empty() && 2 * covered >= w.len()
}

/// How narrow a knob's values are: a value that fits a narrow knob says more than one that fits a wide one
/// (named choices, then compound values, then whole numbers, then real numbers by the width of their range).
fn specificity(kind: &KnobKind) -> (u8, f64) {
    match *kind {
        KnobKind::Choice(_) => (5, 0.0),
        KnobKind::PairSelection | KnobKind::Schedule => (4, 0.0),
        KnobKind::Bool => (3, 0.0),
        KnobKind::Int { min, max } => (2, -((max - min) as f64)),
        KnobKind::IndexList => (2, f64::NEG_INFINITY),
        KnobKind::Float { min, max, .. } => (1, -(max - min)),
        KnobKind::Text => (0, 0.0),
    }
}

/// Orders the more specific knob ([`specificity`]) first.
fn more_specific_first(a: &Knob, b: &Knob) -> std::cmp::Ordering {
    let (sa, sb) = (specificity(&a.kind), specificity(&b.kind));
    sb.0.cmp(&sa.0).then(sb.1.total_cmp(&sa.1))
}

/// The knob a study varies, from its ablated part and its replacement values, with why:
///
/// 1. a key written in the part wins;
/// 2. else the knob whose aliases score best on the part's words (module docs), when it beats the runner-up;
/// 3. else — the words tie between several knobs, or name none — the replacement values decide among the tied
///    knobs (or, when none is named, among the knobs of named values): the knob most values fit ([`parse_value`]:
///    numbers only fit numeric knobs whose type and range hold them, words only fit named choices they contain)
///    wins, then the most specific one ([`specificity`]). With no knob named, at least two values and more than
///    half of them must be value names of the knob ([`names_a_value`]).
pub fn knob_for_study(part: &str, values: &[String]) -> Result<(Target, KnobReason), String> {
    let fit_of = |t: &Target| values.iter().filter(|v| parse_value(t, v).is_ok()).count();
    if let Some(target) = explicit_knob(part)? {
        let fit = fit_of(&target);
        return Ok((
            target,
            KnobReason {
                from_title: false,
                basis: Basis::Explicit,
                words: Vec::new(),
                fit,
                values: values.len(),
                alternatives: Vec::new(),
            },
        ));
    }
    let part_words = words(part);
    let scored: Vec<(&Knob, usize)> = KNOBS
        .iter()
        .map(|k| (k, phrase_score(k.aliases, &part_words)))
        .collect();
    let alternative = |k: &Knob| Alternative {
        key: k.key.to_string(),
        words: matched_phrases(k.aliases, &part_words),
        fit: fit_of(&k.into()),
    };
    match best(scored.iter().map(|&(k, s)| (k, s))) {
        Ok(k) => {
            let target = Target::from(k);
            let fit = fit_of(&target);
            // Several knobs named, one by more words: still, when another named knob holds more of the values,
            // the values decide among the named ones (fit, then words, then specificity).
            let named: Vec<(&Knob, usize)> = scored.iter().copied().filter(|&(_, s)| s > 0).collect();
            let mut ranked: Vec<(&Knob, usize, usize)> =
                named.iter().map(|&(o, s)| (o, s, fit_of(&o.into()))).collect();
            if ranked.iter().any(|&(_, _, f)| f > fit) {
                ranked.sort_by(|a, b| {
                    b.2.cmp(&a.2)
                        .then(b.1.cmp(&a.1))
                        .then_with(|| more_specific_first(a.0, b.0))
                });
                let (chosen, _, chosen_fit) = ranked[0];
                return Ok((
                    chosen.into(),
                    KnobReason {
                        from_title: false,
                        basis: Basis::Values,
                        words: matched_phrases(chosen.aliases, &part_words),
                        fit: chosen_fit,
                        values: values.len(),
                        alternatives: ranked[1..].iter().map(|(o, _, _)| alternative(o)).collect(),
                    },
                ));
            }
            Ok((
                target,
                KnobReason {
                    from_title: false,
                    basis: Basis::Words,
                    words: matched_phrases(k.aliases, &part_words),
                    fit,
                    values: values.len(),
                    alternatives: Vec::new(),
                },
            ))
        }
        Err(tied) => {
            let named = !tied.is_empty();
            // Named by no word, a study is only taken for a knob whose value names its values are: numbers
            // alone fit too many knobs to say which one a plan means.
            let pool: Vec<&Knob> = if named {
                tied
            } else {
                KNOBS.iter().filter(|k| matches!(k.kind, KnobKind::Choice(_))).collect()
            };
            let fit_in_pool = |k: &Knob| match k.kind {
                KnobKind::Choice(choices) if !named => values
                    .iter()
                    .filter(|v| names_a_value(choices, v) && parse_value(&k.into(), v).is_ok())
                    .count(),
                _ => fit_of(&k.into()),
            };
            let mut ranked: Vec<(&Knob, usize)> = pool
                .iter()
                .map(|&k| (k, fit_in_pool(k)))
                .filter(|&(_, fit)| {
                    if named {
                        fit > 0
                    } else {
                        fit >= 2 && 2 * fit > values.len()
                    }
                })
                .collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| more_specific_first(a.0, b.0)));
            let same =
                |a: &(&Knob, usize), b: &(&Knob, usize)| a.1 == b.1 && specificity(&a.0.kind) == specificity(&b.0.kind);
            let keys = |ks: &[&Knob]| ks.iter().map(|k| k.key).collect::<Vec<_>>().join(", ");
            match ranked.as_slice() {
                [first, rest @ ..] if rest.first().is_none_or(|second| !same(first, second)) => {
                    let k = first.0;
                    let alternatives = if named {
                        pool.iter().filter(|o| o.key != k.key).map(|o| alternative(o)).collect()
                    } else {
                        rest.iter().map(|(o, _)| alternative(o)).collect()
                    };
                    Ok((
                        k.into(),
                        KnobReason {
                            from_title: false,
                            basis: Basis::Values,
                            words: matched_phrases(k.aliases, &part_words),
                            fit: first.1,
                            values: values.len(),
                            alternatives,
                        },
                    ))
                }
                [first, ..] => {
                    let top: Vec<&Knob> = ranked.iter().filter(|r| same(r, first)).map(|r| r.0).collect();
                    Err(format!(
                        "ambiguous between {}: the part's words {} and the values fit {} equally; write the key \
                         explicitly, e.g. `({})`",
                        keys(&top),
                        if named { "name each" } else { "name none" },
                        if top.len() == 2 { "both" } else { "them" },
                        top[0].key
                    ))
                }
                [] if named && values.is_empty() => Err(format!(
                    "ambiguous between {}; write the key explicitly, e.g. `({})`",
                    keys(&pool),
                    pool[0].key
                )),
                [] if named => Err(format!(
                    "ambiguous between {}; no replacement value fits one of them; write the key explicitly, e.g. \
                     `({})`",
                    keys(&pool),
                    pool[0].key
                )),
                [] => Err(format!("no knob matches; known knobs: {}", known_knobs())),
            }
        }
    }
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
