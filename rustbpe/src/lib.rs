//! Byte-level BPE for nanochat: train merges from a stream of text, then encode and decode with them.
//!
//! Plain Rust here (the Python bindings live in `py.rs`), so `cargo test` exercises everything without an
//! interpreter. Ids 0..=255 are raw bytes and merge `i` produces id `256 + i`; merges are chosen by highest
//! pair count with ties broken toward the smaller pair, the rule the reference `rustbpe` package uses, so
//! both produce identical merges on the same input.
#![deny(unsafe_code)]

mod pool;
mod py;
pub mod split;
pub mod train;

use std::fmt;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

pub use split::{Splitter, GPT4_PATTERN};
pub use train::{ChunkCounts, Event};

/// Ids 0..=255 are raw bytes; merge i produces id 256 + i.
pub const NUM_BYTE_TOKENS: u32 = 256;

/// Two adjacent token ids.
pub type Pair = (u32, u32);

/// Everything that can go wrong, each with a message that names the bad argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BpeError {
    VocabTooSmall(i64),
    BadPattern {
        pattern: String,
        reason: String,
    },
    SplitFailed(String),
    UnknownToken(u32),
    NotUtf8 {
        bytes: Vec<u8>,
        error: std::str::Utf8Error,
    },
}

impl fmt::Display for BpeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BpeError::VocabTooSmall(n) => write!(
                f,
                "vocab_size must be at least {NUM_BYTE_TOKENS} (one token per byte), got {n}"
            ),
            BpeError::BadPattern { pattern, reason } => {
                write!(f, "pattern {pattern:?} does not compile: {reason}")
            }
            BpeError::SplitFailed(reason) => {
                write!(f, "the split pattern failed on this input: {reason}")
            }
            // the reference package's wording, which callers may match on
            BpeError::UnknownToken(id) => write!(f, "Unknown token id: {id}"),
            BpeError::NotUtf8 { error, .. } => {
                write!(f, "the decoded bytes are not UTF-8: {error}")
            }
        }
    }
}

impl std::error::Error for BpeError {}

pub type Result<T> = std::result::Result<T, BpeError>;

/// A trained (or empty: bytes only) byte-level BPE vocabulary plus the split pattern it was trained with.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    splitter: Splitter,
    merges: Vec<Pair>,
    /// pair -> merged id; a lower id is an earlier, higher-priority merge.
    merge_ids: FxHashMap<Pair, u32>,
    /// bytes of every token, indexed by id.
    token_bytes: Vec<Vec<u8>>,
    /// whole-chunk lookup: most chunks of real text are a single token, found here without merging.
    bytes_to_id: FxHashMap<Vec<u8>, u32>,
}

/// Untrained, as the reference's: bytes only and an empty pattern, so `encode` returns no ids until training.
impl Default for Tokenizer {
    fn default() -> Self {
        let empty = Splitter::new("").expect("the empty pattern compiles");
        Self::from_merges(empty, Vec::new())
    }
}

impl Tokenizer {
    /// Builds the vocabulary from merges in order (merge i makes id 256 + i).
    pub fn from_merges(splitter: Splitter, merges: Vec<Pair>) -> Self {
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut merge_ids = FxHashMap::default();
        for (i, &(a, b)) in merges.iter().enumerate() {
            let id = NUM_BYTE_TOKENS + i as u32;
            let mut bytes = token_bytes[a as usize].clone();
            bytes.extend_from_slice(&token_bytes[b as usize]);
            token_bytes.push(bytes);
            merge_ids.insert((a, b), id);
        }
        let bytes_to_id = token_bytes
            .iter()
            .enumerate()
            .map(|(id, bytes)| (bytes.clone(), id as u32))
            .collect();
        Tokenizer {
            splitter,
            merges,
            merge_ids,
            token_bytes,
            bytes_to_id,
        }
    }

    /// Learns `vocab_size - 256` merges (fewer if the text runs out of pairs) from counted chunks, which
    /// are consumed so that their memory is freed while the merges are learned.
    pub fn train(counts: ChunkCounts, vocab_size: u64) -> Result<Self> {
        Self::train_with_events(counts, vocab_size, &mut |_| Ok(()))
    }

    /// `train`, reporting progress to `on_event`, which may stop training by returning an error.
    pub fn train_with_events<E: From<BpeError>>(
        counts: ChunkCounts,
        vocab_size: u64,
        on_event: &mut impl FnMut(Event) -> std::result::Result<(), E>,
    ) -> std::result::Result<Self, E> {
        if vocab_size < u64::from(NUM_BYTE_TOKENS) {
            return Err(BpeError::VocabTooSmall(vocab_size as i64).into());
        }
        let num_merges =
            usize::try_from(vocab_size - u64::from(NUM_BYTE_TOKENS)).unwrap_or(usize::MAX);
        let splitter = counts.splitter().clone();
        let merges = train::learn_merges(counts, num_merges, on_event)?;
        Ok(Self::from_merges(splitter, merges))
    }

    pub fn pattern(&self) -> &str {
        self.splitter.pattern()
    }

    pub fn splitter(&self) -> &Splitter {
        &self.splitter
    }

    pub fn merges(&self) -> &[Pair] {
        &self.merges
    }

    pub fn vocab_size(&self) -> u32 {
        self.token_bytes.len() as u32
    }

    /// Every token's bytes with its id (= its rank in tiktoken's terms), in id order.
    pub fn mergeable_ranks(&self) -> impl Iterator<Item = (&[u8], u32)> {
        self.token_bytes
            .iter()
            .enumerate()
            .map(|(id, bytes)| (bytes.as_slice(), id as u32))
    }

    /// Splits `text` with the pattern and applies the merges to each chunk.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut scratch = Vec::new();
        self.splitter.for_each_chunk(text, |chunk| {
            self.encode_chunk(chunk.as_bytes(), &mut ids, &mut scratch)
        })?;
        Ok(ids)
    }

    /// Encodes many texts in parallel on the crate's thread pool.
    pub fn batch_encode<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        pool::install(|| texts.par_iter().map(|t| self.encode(t.as_ref())).collect())
    }

    /// Appends the ids of one chunk: lowest-id merge first, as training applied them.
    fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>, ids: &mut Vec<u32>) {
        if let Some(&id) = self.bytes_to_id.get(chunk) {
            out.push(id);
            return;
        }
        ids.clear();
        ids.extend(chunk.iter().map(|&b| u32::from(b)));
        loop {
            let best = ids
                .windows(2)
                .filter_map(|w| {
                    self.merge_ids
                        .get(&(w[0], w[1]))
                        .map(|&id| (id, (w[0], w[1])))
                })
                .min();
            let Some((new_id, pair)) = best else { break };
            let len = merge_in_place(ids, pair, new_id, |_, _| {});
            ids.truncate(len);
        }
        out.extend_from_slice(ids);
    }

    /// The bytes the ids stand for; an id outside the vocabulary is an error.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let bytes = self
                .token_bytes
                .get(id as usize)
                .ok_or(BpeError::UnknownToken(id))?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }

    /// Decodes to text; bytes that are not valid UTF-8 (a token cut mid-character) are an error, as in the
    /// reference package (tiktoken's `decode_bytes` is the way to get them anyway).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        String::from_utf8(self.decode_bytes(ids)?).map_err(|e| BpeError::NotUtf8 {
            error: e.utf8_error(),
            bytes: e.into_bytes(),
        })
    }

    /// Decodes many id lists in parallel.
    pub fn batch_decode<I: AsRef<[u32]> + Sync>(&self, batch: &[I]) -> Result<Vec<String>> {
        pool::install(|| {
            batch
                .par_iter()
                .map(|ids| self.decode(ids.as_ref()))
                .collect()
        })
    }
}

/// Replaces every non-overlapping occurrence of `pair` (left to right) with `new_id` in place and returns
/// the new length, reporting each change to the neighbouring pairs as `(pair, +1 | -1)`. The left
/// neighbour is read from the output already written, so runs like `a a a` and back-to-back matches
/// update the counts exactly.
pub(crate) fn merge_in_place(
    ids: &mut [u32],
    (a, b): Pair,
    new_id: u32,
    mut delta: impl FnMut(Pair, i64),
) -> usize {
    let n = ids.len();
    let (mut read, mut write) = (0, 0);
    while read < n {
        if read + 1 < n && ids[read] == a && ids[read + 1] == b {
            if write > 0 {
                let left = ids[write - 1];
                delta((left, a), -1);
                delta((left, new_id), 1);
            }
            delta((a, b), -1);
            if read + 2 < n {
                let right = ids[read + 2];
                delta((b, right), -1);
                delta((new_id, right), 1);
            }
            ids[write] = new_id;
            read += 2;
        } else {
            ids[write] = ids[read];
            read += 1;
        }
        write += 1;
    }
    write
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained(texts: &[&str], vocab_size: u64) -> Tokenizer {
        let mut counts = ChunkCounts::new(Splitter::default());
        counts.add_texts(texts).unwrap();
        Tokenizer::train(counts, vocab_size).unwrap()
    }

    #[test]
    fn ties_go_to_the_smaller_pair() {
        // (a,a) and (h,e) both occur 30 times; (97,97) < (104,101) so "aa" is merge 0.
        let mut texts = Vec::new();
        for _ in 0..10 {
            texts.push("hello world aaaa");
            texts.push("hello there");
        }
        let tok = trained(&texts, 258);
        assert_eq!(tok.merges(), &[(97, 97), (104, 101)]);
    }

    #[test]
    fn merge_in_place_counts_runs_exactly() {
        let mut ids = vec![1, 1, 1, 1, 1];
        let mut net: FxHashMap<Pair, i64> = FxHashMap::default();
        let len = merge_in_place(&mut ids, (1, 1), 9, |p, d| *net.entry(p).or_default() += d);
        assert_eq!(ids[..len], [9, 9, 1]);
        // before: (1,1)x4; after: (9,9)x1, (9,1)x1
        assert_eq!(net[&(1, 1)], -4);
        assert_eq!(net[&(9, 9)], 1);
        assert_eq!(net[&(9, 1)], 1);
    }

    #[test]
    fn round_trip_and_vocab_size() {
        let tok = trained(&["the cat sat on the mat", "the dog"], 300);
        assert!(tok.vocab_size() <= 300 && tok.vocab_size() > 256);
        for text in ["the cat", "ünïcødé 日本語 🎉", "", "  \n\t x"] {
            assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
        }
        assert_eq!(tok.encode("the").unwrap().len(), 1);
    }

    #[test]
    fn errors_name_the_problem() {
        let counts = ChunkCounts::new(Splitter::default());
        let err = Tokenizer::train(counts, 100).unwrap_err();
        assert!(err.to_string().contains("at least 256"));
        let err = Tokenizer::default().decode(&[256]).unwrap_err();
        assert_eq!(err.to_string(), "Unknown token id: 256");
        let err = Tokenizer::default().decode(&[0xc3]).unwrap_err();
        assert!(matches!(err, BpeError::NotUtf8 { bytes, .. } if bytes == [0xc3]));
        assert!(Splitter::new("(").is_err());
    }

    #[test]
    fn batch_apis_match_single_calls() {
        let tok = trained(&["abc abc abd", "xyz"], 270);
        let texts = ["abc", "abd xyz", ""];
        let batch = tok.batch_encode(&texts).unwrap();
        for (text, ids) in texts.iter().zip(&batch) {
            assert_eq!(&tok.encode(text).unwrap(), ids);
        }
        assert_eq!(tok.batch_decode(&batch).unwrap(), texts);
    }
}
