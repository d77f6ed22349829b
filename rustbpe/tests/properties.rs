//! Properties over arbitrary input: training never panics, decode(encode(s)) == s, and the incremental merge
//! loop learns exactly the merges of textbook BPE, which recounts every pair from scratch at each step.
use std::collections::HashMap;

use proptest::prelude::*;
use rustbpe::{ChunkCounts, Splitter, Tokenizer};

fn train(texts: &[String], vocab_size: u64) -> Tokenizer {
    let mut counts = ChunkCounts::new(Splitter::default());
    counts.add_texts(texts).unwrap();
    Tokenizer::train(counts, vocab_size).unwrap()
}

/// Textbook BPE over the same chunks: recount all pairs, merge the most frequent (ties: the smaller pair).
fn naive_merges(texts: &[String], num_merges: usize) -> Vec<(u32, u32)> {
    let splitter = Splitter::default();
    let mut words: HashMap<Vec<u32>, u64> = HashMap::new();
    for text in texts {
        splitter
            .for_each_chunk(text, |chunk| {
                *words
                    .entry(chunk.bytes().map(u32::from).collect())
                    .or_default() += 1
            })
            .unwrap();
    }
    let mut merges = Vec::new();
    while merges.len() < num_merges {
        let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
        for (word, n) in &words {
            for w in word.windows(2) {
                *pairs.entry((w[0], w[1])).or_default() += n;
            }
        }
        let Some((&best, _)) = pairs
            .iter()
            .max_by(|(p, n), (q, m)| n.cmp(m).then_with(|| q.cmp(p)))
        else {
            break;
        };
        let new_id = 256 + merges.len() as u32;
        merges.push(best);
        let mut merged: HashMap<Vec<u32>, u64> = HashMap::new();
        for (word, n) in words {
            let mut out = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && (word[i], word[i + 1]) == best {
                    out.push(new_id);
                    i += 2;
                } else {
                    out.push(word[i]);
                    i += 1;
                }
            }
            *merged.entry(out).or_default() += n;
        }
        words = merged;
    }
    merges
}

/// Small corpora over few symbols, so pairs repeat, runs (`aaaa`) overlap and counts tie often.
fn small_corpus() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[abc ]{0,24}|[ab]{0,40}|[a-e1-3 ,é]{0,16}", 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn training_on_anything_round_trips(texts in prop::collection::vec(any::<String>(), 0..8),
                                        vocab_size in 256u64..400,
                                        probe in any::<String>()) {
        let tok = train(&texts, vocab_size);
        prop_assert!(u64::from(tok.vocab_size()) <= vocab_size);
        for text in texts.iter().chain(std::iter::once(&probe)) {
            let ids = tok.encode(text).unwrap();
            prop_assert_eq!(&tok.decode(&ids).unwrap(), text);
        }
    }

    #[test]
    fn repetitive_text_round_trips(unit in "[ab ]{1,4}", repeats in 1usize..60, vocab_size in 256u64..300) {
        let text = unit.repeat(repeats);
        let tok = train(std::slice::from_ref(&text), vocab_size);
        let ids = tok.encode(&text).unwrap();
        prop_assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn merges_equal_a_naive_recount(texts in small_corpus(), num_merges in 0usize..80) {
        let tok = train(&texts, 256 + num_merges as u64);
        prop_assert_eq!(tok.merges(), &naive_merges(&texts, num_merges)[..]);
    }
}
