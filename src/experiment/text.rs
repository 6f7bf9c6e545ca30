//! Text clean-up before a plan is parsed: mojibake repair, HTML removal, line endings, byte decoding.
//!
//! Every function here keeps the number of lines of its input (HTML tags spanning lines leave their newlines
//! behind), so the line numbers in warnings are those of the file the user opened.
//!
//! **Mojibake.** Plans often reach us as UTF-8 that was decoded as Windows-1252 (or Latin-1) and re-encoded:
//! `ψ` (UTF-8 `CF 88`) shows up as `Ïˆ`, `—` (`E2 80 94`) as `â€”`. [`repair_mojibake`] undoes that generically:
//! each run of characters that Windows-1252 can encode is turned back into its bytes, and every sub-sequence of
//! those bytes that forms one valid multi-byte UTF-8 character is decoded; any other character is kept as it was.
//! Genuine Latin-1 text survives (`café`: `é` = `E9` is a lead byte that is not followed by continuation bytes),
//! and text that was mangled twice is repaired by applying the step until nothing changes.

use std::borrow::Cow;

/// The 27 characters that Windows-1252 puts in `0x80..=0x9F`, with their byte. The other bytes of that range
/// are undefined in Windows-1252 and decode (like all of `0xA0..=0xFF`) to the code point of the same value.
const CP1252_HIGH: [(char, u8); 27] = [
    ('€', 0x80),
    ('‚', 0x82),
    ('ƒ', 0x83),
    ('„', 0x84),
    ('…', 0x85),
    ('†', 0x86),
    ('‡', 0x87),
    ('ˆ', 0x88),
    ('‰', 0x89),
    ('Š', 0x8A),
    ('‹', 0x8B),
    ('Œ', 0x8C),
    ('Ž', 0x8E),
    ('\u{2018}', 0x91),
    ('\u{2019}', 0x92),
    ('\u{201C}', 0x93),
    ('\u{201D}', 0x94),
    ('•', 0x95),
    ('–', 0x96),
    ('—', 0x97),
    ('˜', 0x98),
    ('™', 0x99),
    ('š', 0x9A),
    ('›', 0x9B),
    ('œ', 0x9C),
    ('ž', 0x9E),
    ('Ÿ', 0x9F),
];

/// Most rounds of [`repair_mojibake`] (text mangled more than this many times is left partly repaired).
const MAX_REPAIR_ROUNDS: usize = 4;

/// The Windows-1252 byte of `c` (C1 control characters count as the byte of the same value, as Latin-1
/// decoders produce them), or `None` when Windows-1252 cannot encode it.
pub fn cp1252_byte(c: char) -> Option<u8> {
    let code = u32::from(c);
    if code < 0x80 || (0x80..=0xFF).contains(&code) {
        return u8::try_from(code).ok();
    }
    CP1252_HIGH.iter().find(|(ch, _)| *ch == c).map(|&(_, b)| b)
}

/// The character Windows-1252 decodes `byte` to (undefined bytes decode to the C1 control of the same value).
pub fn cp1252_char(byte: u8) -> char {
    CP1252_HIGH
        .iter()
        .find(|(_, b)| *b == byte)
        .map_or(char::from(byte), |&(c, _)| c)
}

/// Length of the UTF-8 sequence that `lead` starts, for multi-byte lead bytes only.
fn utf8_sequence_len(lead: u8) -> Option<usize> {
    match lead {
        0xC2..=0xDF => Some(2),
        0xE0..=0xEF => Some(3),
        0xF0..=0xF4 => Some(4),
        _ => None,
    }
}

/// One round of the repair (module docs); `None` when nothing changed.
fn repair_round(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let decoded = cp1252_byte(c)
            .and_then(utf8_sequence_len)
            .and_then(|len| decode_sequence(&chars[i..], len).map(|d| (d, len)));
        match decoded {
            Some((d, len)) => {
                out.push(d);
                changed = true;
                i += len;
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    changed.then_some(out)
}

/// Decodes `chars[..len]`, re-encoded as Windows-1252 bytes, as one UTF-8 character.
fn decode_sequence(chars: &[char], len: usize) -> Option<char> {
    let bytes: Vec<u8> = chars
        .get(..len)?
        .iter()
        .map(|&c| cp1252_byte(c))
        .collect::<Option<_>>()?;
    let s = std::str::from_utf8(&bytes).ok()?;
    let mut it = s.chars();
    let c = it.next()?;
    it.next().is_none().then_some(c)
}

/// Repairs UTF-8 text that was decoded as Windows-1252 / Latin-1 (module docs). Borrowed when nothing changed.
pub fn repair_mojibake(text: &str) -> Cow<'_, str> {
    if text.is_ascii() {
        return Cow::Borrowed(text);
    }
    let mut current: Option<String> = None;
    for _ in 0..MAX_REPAIR_ROUNDS {
        match repair_round(current.as_deref().unwrap_or(text)) {
            Some(next) => current = Some(next),
            None => break,
        }
    }
    current.map_or(Cow::Borrowed(text), Cow::Owned)
}

/// Decodes a plan file's bytes: UTF-8 (a byte-order mark is dropped), or Windows-1252 when the bytes are not
/// valid UTF-8. Returns the text and whether the fallback was used.
pub fn decode_bytes(bytes: &[u8]) -> (String, bool) {
    let bytes = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), false),
        Err(_) => (bytes.iter().map(|&b| cp1252_char(b)).collect(), true),
    }
}

/// `\r\n` and lone `\r` become `\n`.
pub fn normalize_newlines(text: &str) -> Cow<'_, str> {
    if text.contains('\r') {
        Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Longest tag we accept; a `<` that is not closed within this many characters is text (`x < y` in prose).
const MAX_TAG_CHARS: usize = 4096;

/// Removes HTML tags, comments and the contents of `<style>` / `<script>`, keeping every newline. Headings
/// (`<h1>`–`<h6>`) become Markdown headings, `<li>` a bullet and `<strong>`/`<b>` bold markers, so a plan
/// written in HTML reads like one written in Markdown. A `<` that does not start a tag is kept.
pub fn strip_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut skipping: Option<&'static str> = None;
    while let Some(pos) = rest.find('<') {
        push_kept(&mut out, &rest[..pos], skipping.is_some());
        let after = &rest[pos..];
        let Some(tag) = parse_tag(after) else {
            if skipping.is_none() {
                out.push('<');
            }
            rest = &after[1..];
            continue;
        };
        out.extend(tag.text.chars().filter(|&c| c == '\n'));
        match skipping {
            Some(end) => {
                if tag.closing && tag.name == end {
                    skipping = None;
                }
            }
            None => match (tag.name.as_str(), tag.closing) {
                ("style", false) => skipping = Some("style"),
                ("script", false) => skipping = Some("script"),
                (h, false) if is_heading(h) => {
                    let level = h[1..].parse::<usize>().unwrap_or(2);
                    out.push_str(&"#".repeat(level));
                    out.push(' ');
                }
                ("li", false) => out.push_str("- "),
                ("strong" | "b", _) => out.push_str("**"),
                _ => {}
            },
        }
        rest = &after[tag.text.len()..];
    }
    push_kept(&mut out, rest, skipping.is_some());
    decode_entities(&out)
}

fn is_heading(name: &str) -> bool {
    name.len() == 2 && name.starts_with('h') && matches!(name.as_bytes()[1], b'1'..=b'6')
}

fn push_kept(out: &mut String, s: &str, skipping: bool) {
    if skipping {
        out.extend(s.chars().filter(|&c| c == '\n'));
    } else {
        out.push_str(s);
    }
}

/// A tag or comment at the start of the text.
struct Tag<'a> {
    /// The whole tag, `<` to `>`.
    text: &'a str,
    /// Lower-case element name (empty for comments and doctypes).
    name: String,
    /// `</name>`.
    closing: bool,
}

fn parse_tag(s: &str) -> Option<Tag<'_>> {
    if let Some(body) = s.strip_prefix("<!--") {
        let end = body.find("-->")?;
        return Some(Tag {
            text: &s[..4 + end + 3],
            name: String::new(),
            closing: false,
        });
    }
    let inner = &s[1..];
    let (closing, inner) = match inner.strip_prefix('/') {
        Some(r) => (true, r),
        None => (false, inner),
    };
    let name_len = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '!' || c == '-'))
        .unwrap_or(inner.len());
    let name = &inner[..name_len];
    let first = name.chars().next()?;
    if !(first.is_ascii_alphabetic() || first == '!') {
        return None;
    }
    let next = inner[name_len..].chars().next()?;
    if !(next.is_whitespace() || next == '>' || next == '/') {
        return None;
    }
    let window_end = s.char_indices().nth(MAX_TAG_CHARS).map_or(s.len(), |(i, _)| i);
    let close = s[..window_end].find('>')?;
    Some(Tag {
        text: &s[..=close],
        name: name.to_ascii_lowercase(),
        closing,
    })
}

/// Decodes the common named entities and numeric character references; anything else is kept.
fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        let decoded = after
            .find(';')
            .filter(|&end| end <= 10)
            .and_then(|end| entity_char(&after[1..end]).map(|c| (c, end)));
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &after[end + 1..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn entity_char(name: &str) -> Option<char> {
    match name {
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        "nbsp" => Some('\u{A0}'),
        _ => {
            let num = name.strip_prefix('#')?;
            let code = match num.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => num.parse().ok()?,
            };
            char::from_u32(code).filter(|&c| c != '\n' && c != '\r')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mangles `s` the way the seed files were: its UTF-8 bytes read as Windows-1252.
    fn mangle(s: &str) -> String {
        s.bytes().map(cp1252_char).collect()
    }

    #[test]
    fn mojibake_of_any_text_is_repaired() {
        for original in [
            "ψ(x_w/c) — λ, τ, δ, ε",
            "🧠 Reasoning Trace",
            "📋 Plan",
            "γ ∈ [0, 1]",
            "日本語",
        ] {
            assert_eq!(repair_mojibake(&mangle(original)), original, "{original}");
            assert_eq!(
                repair_mojibake(&mangle(&mangle(original))),
                original,
                "twice: {original}"
            );
        }
    }

    #[test]
    fn clean_text_is_left_alone() {
        for s in [
            "plain ascii",
            "café naïve à la",
            "ψ and λ already fine",
            "50 °C ± 2",
            "½ ¼",
        ] {
            assert!(
                matches!(repair_mojibake(s), Cow::Borrowed(_)) || repair_mojibake(s) == s,
                "{s}"
            );
            assert_eq!(repair_mojibake(s), s);
        }
    }

    #[test]
    fn seed_file_strings_are_repaired() {
        assert_eq!(repair_mojibake("Ïˆ(xw/c) * (1 - Ïˆ(xl/c))"), "ψ(xw/c) * (1 - ψ(xl/c))");
        assert_eq!(repair_mojibake("(Î´) (Î») Ï„ Îµ â€” ðŸ§\u{A0}"), "(δ) (λ) τ ε — 🧠");
    }

    #[test]
    fn windows_1252_bytes_decode() {
        let (text, fallback) = decode_bytes(b"caf\xe9 \x93quoted\x94");
        assert!(fallback);
        assert_eq!(text, "café \u{201C}quoted\u{201D}");
        let (text, fallback) = decode_bytes("\u{FEFF}ψ".as_bytes());
        assert!(!fallback);
        assert_eq!(text, "ψ");
    }

    #[test]
    fn html_is_removed_and_lines_are_kept() {
        let html = "<style>\n.a { color: red; }\n</style>\n<div style=\"x\"\n class=\"y\">\n<h2 style=\"c\">Plan</h2>\nx < 3 and a<b>bold</b>\n&amp; &#955; &lt;tag&gt;\n<!-- gone -->done</div>";
        let text = strip_html(html);
        assert_eq!(text.lines().count(), html.lines().count());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1].trim(), "");
        assert_eq!(lines[5], "## Plan");
        assert_eq!(lines[6], "x < 3 and a**bold**");
        assert_eq!(lines[7], "& λ <tag>");
        assert_eq!(lines[8], "done");
    }

    #[test]
    fn unclosed_tags_and_odd_input_do_not_panic() {
        for s in [
            "<",
            "<div",
            "<style>never closed",
            "&#xFFFFFFFF;",
            "&#;",
            "<<>>",
            "</",
            "<!--",
            "<a\n",
        ] {
            let _ = strip_html(s);
        }
        assert_eq!(strip_html("a <b"), "a <b");
        assert_eq!(normalize_newlines("a\r\nb\rc"), "a\nb\nc");
    }
}
