//! Words and phrases: how plan texts are compared with the tables' aliases.

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

pub(super) fn is_symbol(phrase: &str) -> bool {
    let mut chars = phrase.chars();
    matches!((chars.next(), chars.next()), (Some(c), None) if !c.is_ascii())
}

/// Score of `phrases` against `text_words`: a phrase counts when all its words occur; a single non-ASCII
/// symbol (a Greek letter) counts 3, other phrases one per word.
pub(super) fn phrase_score(phrases: &[&str], text_words: &[String]) -> usize {
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
pub(super) fn best<T: Copy>(scored: impl Iterator<Item = (T, usize)>) -> Result<T, Vec<T>> {
    let mut all: Vec<(T, usize)> = scored.filter(|&(_, s)| s > 0).collect();
    all.sort_by_key(|a| std::cmp::Reverse(a.1));
    match all.as_slice() {
        [] => Err(Vec::new()),
        [(only, _)] => Ok(*only),
        [(first, s1), (_, s2), ..] if s1 > s2 => Ok(*first),
        [(_, top), ..] => Err(all.iter().filter(|(_, s)| s == top).map(|(t, _)| *t).collect()),
    }
}
