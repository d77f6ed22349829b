//! The hand-written splitter must cut text exactly where fancy-regex cuts it with the same pattern.
use std::sync::LazyLock;

use fancy_regex::Regex;
use proptest::prelude::*;
use rustbpe::{Splitter, DEFAULT_PATTERN};

const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Compiled once per pattern: the hand-written splitter and fancy-regex.
fn compiled(pattern: &str) -> &'static (Splitter, Regex) {
    static DEFAULT: LazyLock<(Splitter, Regex)> = LazyLock::new(|| {
        (
            Splitter::new(DEFAULT_PATTERN).unwrap(),
            Regex::new(DEFAULT_PATTERN).unwrap(),
        )
    });
    static GPT4: LazyLock<(Splitter, Regex)> = LazyLock::new(|| {
        (
            Splitter::new(GPT4_PATTERN).unwrap(),
            Regex::new(GPT4_PATTERN).unwrap(),
        )
    });
    if pattern == DEFAULT_PATTERN {
        &DEFAULT
    } else {
        &GPT4
    }
}

fn regex_chunks(pattern: &str, text: &str) -> Vec<String> {
    let (_, regex) = compiled(pattern);
    regex
        .find_iter(text)
        .map(|m| m.unwrap().as_str().to_string())
        .collect()
}

fn fast_chunks(pattern: &str, text: &str) -> Vec<String> {
    let (splitter, _) = compiled(pattern);
    let mut out = Vec::new();
    splitter
        .for_each_chunk(text, |c| out.push(c.to_string()))
        .unwrap();
    out
}

/// Characters from every class the pattern distinguishes, including the awkward ones: Unicode spaces,
/// case-folded contraction letters (ſ, K), combining marks, letter-like numbers, emoji.
const ALPHABET: &[char] = &[
    'a', 'b', 's', 'S', 't', 'd', 'm', 'l', 'L', 'v', 'e', 'E', 'r', 'R', 'ſ', 'K', 'x', 'Z', 'é',
    'ß', '日', 'Ж', 'ǅ', 'ʰ', '0', '7', '٣', 'Ⅻ', '½', '²', ' ', ' ', ' ', ' ', '\t', '\n', '\r',
    '\u{b}', '\u{c}', '\u{85}', '\u{a0}', '\u{2028}', '\u{3000}', '\'', '"', '.', ',', '-', '(',
    '!', '\u{301}', '🎉', '_', '$',
];

fn mixed_text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHABET), 0..40)
        .prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn default_pattern_matches_regex(text in mixed_text()) {
        prop_assert_eq!(fast_chunks(DEFAULT_PATTERN, &text), regex_chunks(DEFAULT_PATTERN, &text));
    }

    #[test]
    fn gpt4_pattern_matches_regex(text in mixed_text()) {
        prop_assert_eq!(fast_chunks(GPT4_PATTERN, &text), regex_chunks(GPT4_PATTERN, &text));
    }

    #[test]
    fn arbitrary_unicode_matches_regex(text in any::<String>()) {
        prop_assert_eq!(fast_chunks(DEFAULT_PATTERN, &text), regex_chunks(DEFAULT_PATTERN, &text));
    }
}

#[test]
fn known_cuts() {
    let text = "Hello world's  don'T\n\n  x 12345 ſ'ſ 'll (a) ...\r\n  ";
    assert_eq!(
        fast_chunks(DEFAULT_PATTERN, text),
        [
            "Hello", " world", "'s", " ", " don", "'T", "\n\n", " ", " x", " ", "12", "34", "5",
            " ſ", "'ſ", " '", "ll", " (", "a", ")", " ...\r\n", "  "
        ]
    );
    assert_eq!(
        fast_chunks(DEFAULT_PATTERN, text),
        regex_chunks(DEFAULT_PATTERN, text)
    );
}
