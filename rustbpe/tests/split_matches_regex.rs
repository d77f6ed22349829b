//! The hand-written splitter must cut text exactly where fancy-regex cuts it with the same pattern, for every
//! member of the GPT-4 family (`\p{N}{1,k}`, k = 1..9).
use std::sync::LazyLock;

use fancy_regex::Regex;
use proptest::prelude::*;
use rustbpe::split::gpt4_family;
use rustbpe::{Splitter, GPT4_PATTERN};

/// For each digit-group limit k = 1..9 (index k - 1): the hand-written splitter and fancy-regex.
static FAMILY: LazyLock<Vec<(Splitter, Regex)>> = LazyLock::new(|| {
    (1..=9)
        .map(|k| {
            let pattern = gpt4_family(k);
            (
                Splitter::new(&pattern).unwrap(),
                Regex::new(&pattern).unwrap(),
            )
        })
        .collect()
});

fn regex_chunks(max_digits: usize, text: &str) -> Vec<String> {
    FAMILY[max_digits - 1]
        .1
        .find_iter(text)
        .map(|m| m.unwrap().as_str().to_string())
        .collect()
}

fn fast_chunks(max_digits: usize, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    FAMILY[max_digits - 1]
        .0
        .for_each_chunk(text, |c| out.push(c.to_string()))
        .unwrap();
    out
}

/// Characters from every class the pattern distinguishes, including the awkward ones: control and format
/// characters (`\x0b \x0c \x85`, U+2028/9, zero-width and soft hyphen), Unicode spaces, case-folded
/// contraction letters (ſ, K), combining marks, letter-like numbers, emoji.
const ALPHABET: &[char] = &[
    'a', 'b', 's', 'S', 't', 'd', 'm', 'l', 'L', 'v', 'e', 'E', 'r', 'R', 'ſ', 'K', 'x', 'Z', 'é',
    'ß', '日', 'Ж', 'ǅ', 'ʰ', '0', '7', '9', '٣', 'Ⅻ', '½', '²', ' ', ' ', ' ', ' ', '\t', '\n',
    '\n', '\r', '\u{0}', '\u{b}', '\u{c}', '\u{1c}', '\u{85}', '\u{a0}', '\u{ad}', '\u{200b}',
    '\u{200d}', '\u{2028}', '\u{2029}', '\u{3000}', '\u{feff}', '\'', '"', '.', ',', '-', '(', '!',
    '\u{301}', '🎉', '_', '$',
];

fn mixed_text(len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHABET), len)
        .prop_map(|chars| chars.into_iter().collect())
}

/// Long runs of one class (digits, spaces, line breaks, letters) joined by single characters.
fn runs_text() -> impl Strategy<Value = String> {
    let run =
        (prop::sample::select(ALPHABET), 1usize..300).prop_map(|(c, n)| c.to_string().repeat(n));
    prop::collection::vec(run, 1..20).prop_map(|runs| runs.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn every_digit_limit_matches_regex(max_digits in 1usize..=9, text in mixed_text(0..60)) {
        prop_assert_eq!(fast_chunks(max_digits, &text), regex_chunks(max_digits, &text));
    }

    #[test]
    fn arbitrary_unicode_matches_regex(max_digits in 1usize..=9, text in any::<String>()) {
        prop_assert_eq!(fast_chunks(max_digits, &text), regex_chunks(max_digits, &text));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(60))]

    #[test]
    fn long_inputs_match_regex(max_digits in 1usize..=9, text in mixed_text(500..4000)) {
        prop_assert_eq!(fast_chunks(max_digits, &text), regex_chunks(max_digits, &text));
    }

    #[test]
    fn long_runs_match_regex(max_digits in 1usize..=9, text in runs_text()) {
        prop_assert_eq!(fast_chunks(max_digits, &text), regex_chunks(max_digits, &text));
    }
}

#[test]
fn gpt4_is_the_family_member_with_threes() {
    assert_eq!(gpt4_family(3), GPT4_PATTERN);
}

#[test]
fn known_cuts() {
    let text = "Hello world's  don'T\n\n  x 12345 ſ'ſ 'll (a) ...\r\n  ";
    assert_eq!(
        fast_chunks(2, text),
        [
            "Hello", " world", "'s", " ", " don", "'T", "\n\n", " ", " x", " ", "12", "34", "5",
            " ſ", "'ſ", " '", "ll", " (", "a", ")", " ...\r\n", "  "
        ]
    );
    assert_eq!(fast_chunks(3, "12345")[..], ["123", "45"]);
    for max_digits in 1..=9 {
        assert_eq!(
            fast_chunks(max_digits, text),
            regex_chunks(max_digits, text)
        );
    }
}
