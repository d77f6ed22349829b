//! Pre-tokenization: cutting text into the chunks BPE works inside (merges never cross a chunk boundary).
use fancy_regex::Regex;

/// GPT-4's split pattern with digits grouped in ones and twos (`\p{N}{1,2}`) instead of threes, which
/// spends fewer tokens on numbers in a small vocabulary.
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// A compiled split pattern.
#[derive(Debug, Clone)]
pub struct Splitter {
    pattern: String,
    regex: Regex,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter::new(DEFAULT_PATTERN).expect("the default pattern compiles")
    }
}

impl Splitter {
    /// Compiles `pattern` (fancy-regex syntax: look-around and possessive quantifiers are allowed).
    pub fn new(pattern: &str) -> crate::Result<Self> {
        let regex = Regex::new(pattern).map_err(|e| crate::BpeError::BadPattern {
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Splitter {
            pattern: pattern.to_string(),
            regex,
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
        for found in self.regex.find_iter(text) {
            let found = found.map_err(|e| crate::BpeError::SplitFailed(e.to_string()))?;
            f(found.as_str());
        }
        Ok(())
    }
}
