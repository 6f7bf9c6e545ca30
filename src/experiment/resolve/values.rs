//! Replacement values: numbers, choices and the compound values some knobs read, typed after the knob.

use super::*;

/// A number found in a text.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Number {
    pub(super) value: f64,
    pub(super) percent: bool,
}

/// Numbers of a text that stand alone (`0.1`, `-3`, `1e-4`, `3 × 10^-4`, `5.33%`), not those inside words
/// (`top-1`, `HPSv2`, `M_1`).
pub(super) fn numbers(text: &str) -> Vec<Number> {
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
pub(super) fn power_of_ten_suffix(rest: &str) -> Option<(i32, usize)> {
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
pub(super) fn single_number(text: &str) -> Result<Number, String> {
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
pub(super) fn toml_float(v: f64) -> String {
    let s = format!("{v}");
    if s.contains(['.', 'e', 'E', 'i', 'N']) {
        s
    } else {
        format!("{s}.0")
    }
}

pub(super) fn parse_float(text: &str, min: f64, max: f64, min_open: bool, fraction: bool) -> Result<String, String> {
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

pub(super) fn parse_int(text: &str, min: u64, max: u64) -> Result<u64, String> {
    let n = single_number(text)?;
    if n.value.fract() != 0.0 || n.value < min as f64 || n.value > max as f64 {
        return Err(format!("{} is not a whole number in {min}..={max}", n.value));
    }
    // The range check above makes this cast exact.
    Ok(n.value as u64)
}

pub(super) fn parse_choice(text: &str, choices: &[Choice]) -> Result<&'static str, String> {
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

pub(super) fn pair_selection(text: &str) -> Result<Vec<Override>, String> {
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

pub(super) fn schedule(text: &str) -> Result<Vec<Override>, String> {
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

pub(super) fn index_list(text: &str) -> Result<String, String> {
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

pub(super) fn boolean(text: &str) -> Result<bool, String> {
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
pub(super) fn removal(knob: &Target, part: &str) -> Result<Vec<Override>, String> {
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
