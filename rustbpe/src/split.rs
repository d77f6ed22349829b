//! Pre-tokenization: cutting text into the chunks BPE works inside (merges never cross a chunk boundary).
//!
//! Any fancy-regex pattern works. The GPT-4 pattern family (`\p{N}{1,k}` for k = 1..9: GPT-4's own has 3,
//! nanochat's 2) is also implemented by hand below: a backtracking regex spent most of training's time here, and a
//! single forward scan over character classes gives the same chunks several times faster. The classes come
//! from `regex-syntax`, the tables fancy-regex itself compiles the pattern with, so they agree exactly;
//! `tests/split_matches_regex.rs` checks the two paths against each other on arbitrary Unicode.
use std::sync::OnceLock;

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};

/// GPT-4's split pattern: the default when training is given no pattern, as in the reference package.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The GPT-4 pattern with `\p{N}{1,max_digits}` (nanochat's has 2).
pub fn gpt4_family(max_digits: usize) -> String {
    GPT4_PATTERN.replace(r"\p{N}{1,3}", &format!(r"\p{{N}}{{1,{max_digits}}}"))
}

/// A compiled split pattern.
#[derive(Debug, Clone)]
pub struct Splitter {
    pattern: String,
    regex: Regex,
    /// `Some(k)` when the pattern is the GPT-4 family with `\p{N}{1,k}`: then the hand-written scanner runs.
    max_digits: Option<usize>,
}

/// GPT-4's pattern, the default for training.
impl Default for Splitter {
    fn default() -> Self {
        Splitter::new(GPT4_PATTERN).expect("the GPT-4 pattern compiles")
    }
}

impl Splitter {
    /// Compiles `pattern` (fancy-regex syntax: look-around and possessive quantifiers are allowed).
    pub fn new(pattern: &str) -> crate::Result<Self> {
        let regex = Regex::new(pattern).map_err(|e| crate::BpeError::BadPattern {
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })?;
        let max_digits = (1..=9).find(|&k| gpt4_family(k) == pattern);
        Ok(Splitter {
            pattern: pattern.to_string(),
            regex,
            max_digits,
        })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Calls `f` on each chunk of `text`, in order; text the pattern does not match is skipped, as in
    /// tiktoken.
    pub fn for_each_chunk<'t>(
        &self,
        text: &'t str,
        mut f: impl FnMut(&'t str),
    ) -> crate::Result<()> {
        if let Some(max_digits) = self.max_digits {
            let scanner = Scanner {
                text,
                classes: classes(),
                max_digits,
            };
            let mut start = 0;
            while start < text.len() {
                let end = scanner.chunk_end(start);
                f(&text[start..end]);
                start = end;
            }
            return Ok(());
        }
        for found in self.regex.find_iter(text) {
            let found = found.map_err(|e| crate::BpeError::SplitFailed(e.to_string()))?;
            f(found.as_str());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Letter,
    Number,
    /// `\r` or `\n` (also whitespace)
    LineBreak,
    /// any other `\s`
    Space,
    /// none of the above: punctuation, symbols, marks, ...
    Other,
}

/// The character classes the pattern uses, as sorted ranges from regex-syntax's Unicode tables.
struct Classes {
    ascii: [Kind; 128],
    letters: Vec<(char, char)>,
    numbers: Vec<(char, char)>,
    spaces: Vec<(char, char)>,
    /// case-insensitive forms of the letters in `'s 'd 'm 't 'll 've 're` (`ſ` matches `s`, for one)
    contraction_letters: [Vec<(char, char)>; 8],
}

const CONTRACTION_LETTERS: [char; 8] = ['s', 'd', 'm', 't', 'l', 'v', 'e', 'r'];

fn class_ranges(pattern: &str) -> Vec<(char, char)> {
    let hir = regex_syntax::parse(pattern).expect("a fixed class pattern parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|r| (r.start(), r.end()))
            .collect(),
        other => panic!("unexpected class {other:?} for {pattern}"),
    }
}

fn in_ranges(ranges: &[(char, char)], c: char) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut classes = Classes {
            ascii: [Kind::Other; 128],
            letters: class_ranges(r"\p{L}"),
            numbers: class_ranges(r"\p{N}"),
            spaces: class_ranges(r"\s"),
            contraction_letters: CONTRACTION_LETTERS.map(|c| class_ranges(&format!("(?i){c}"))),
        };
        for byte in 0..128u8 {
            classes.ascii[byte as usize] = classes.kind_slow(char::from(byte));
        }
        classes
    })
}

impl Classes {
    fn kind_slow(&self, c: char) -> Kind {
        if c == '\r' || c == '\n' {
            Kind::LineBreak
        } else if in_ranges(&self.letters, c) {
            Kind::Letter
        } else if in_ranges(&self.numbers, c) {
            Kind::Number
        } else if in_ranges(&self.spaces, c) {
            Kind::Space
        } else {
            Kind::Other
        }
    }

    #[inline]
    fn kind(&self, c: char) -> Kind {
        if c.is_ascii() {
            self.ascii[c as usize]
        } else {
            self.kind_slow(c)
        }
    }

    fn is_contraction_letter(&self, c: char, index: usize) -> bool {
        in_ranges(&self.contraction_letters[index], c)
    }
}

/// One forward pass over `text`, each step returning where the chunk starting at `start` ends. Each step
/// mirrors the pattern's alternatives in order, as the regex engine tries them.
struct Scanner<'t> {
    text: &'t str,
    classes: &'static Classes,
    max_digits: usize,
}

impl Scanner<'_> {
    /// The char at byte offset `at` and the offset just after it.
    #[inline]
    fn char_at(&self, at: usize) -> Option<(char, usize)> {
        let c = self.text[at..].chars().next()?;
        Some((c, at + c.len_utf8()))
    }

    #[inline]
    fn kind_at(&self, at: usize) -> Option<(Kind, usize)> {
        self.char_at(at)
            .map(|(c, next)| (self.classes.kind(c), next))
    }

    /// The offset after the longest run of chars starting at `at` whose kind satisfies `keep`.
    #[inline]
    fn skip_while(&self, mut at: usize, keep: impl Fn(Kind) -> bool) -> usize {
        while let Some((kind, next)) = self.kind_at(at) {
            if !keep(kind) {
                break;
            }
            at = next;
        }
        at
    }

    /// `'(?i:[sdmt]|ll|ve|re)` after the apostrophe at `after_quote - 1`.
    fn contraction_end(&self, after_quote: usize) -> Option<usize> {
        let (first, next) = self.char_at(after_quote)?;
        if (0..4).any(|i| self.classes.is_contraction_letter(first, i)) {
            return Some(next);
        }
        let (second, end) = self.char_at(next)?;
        let pairs = [(4, 4), (5, 6), (7, 6)]; // ll, ve, re
        pairs
            .iter()
            .any(|&(a, b)| {
                self.classes.is_contraction_letter(first, a)
                    && self.classes.is_contraction_letter(second, b)
            })
            .then_some(end)
    }

    fn chunk_end(&self, start: usize) -> usize {
        let (c, after) = self.char_at(start).expect("start is inside the text");
        let kind = self.classes.kind(c);
        let is_letter = |k| k == Kind::Letter;
        // '(?i:[sdmt]|ll|ve|re)
        if c == '\'' {
            if let Some(end) = self.contraction_end(after) {
                return end;
            }
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}+
        if kind == Kind::Letter {
            return self.skip_while(after, is_letter);
        }
        if matches!(kind, Kind::Space | Kind::Other)
            && matches!(self.kind_at(after), Some((Kind::Letter, _)))
        {
            return self.skip_while(after, is_letter);
        }
        // \p{N}{1,k}
        if kind == Kind::Number {
            let mut end = after;
            for _ in 1..self.max_digits {
                match self.kind_at(end) {
                    Some((Kind::Number, next)) => end = next,
                    _ => break,
                }
            }
            return end;
        }
        //  ?[^\s\p{L}\p{N}]++[\r\n]*
        let others_from = if c == ' ' && matches!(self.kind_at(after), Some((Kind::Other, _))) {
            Some(after)
        } else if kind == Kind::Other {
            Some(start)
        } else {
            None
        };
        if let Some(from) = others_from {
            let end = self.skip_while(from, |k| k == Kind::Other);
            return self.skip_while(end, |k| k == Kind::LineBreak);
        }
        // Only whitespace is left: the run of it starting here decides the rest.
        let mut run_end = start;
        let mut last_line_break_end = None;
        let mut last_char_start = start;
        while let Some((kind, next)) = self.kind_at(run_end) {
            match kind {
                Kind::LineBreak => last_line_break_end = Some(next),
                Kind::Space => {}
                _ => break,
            }
            last_char_start = run_end;
            run_end = next;
        }
        // \s*[\r\n]
        if let Some(end) = last_line_break_end {
            return end;
        }
        // \s+(?!\S): the whole run at the end of the text, else all but its last char
        if run_end == self.text.len() || last_char_start == start {
            // \s+ (a single space before a non-space also lands here)
            return run_end;
        }
        last_char_start
    }
}
