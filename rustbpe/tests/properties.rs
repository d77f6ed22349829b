//! Properties over arbitrary Unicode: training never panics and decode(encode(s)) == s.
use proptest::prelude::*;
use rustbpe::{ChunkCounts, Splitter, Tokenizer};

fn train(texts: &[String], vocab_size: u64) -> Tokenizer {
    let mut counts = ChunkCounts::new(Splitter::default());
    counts.add_texts(texts).unwrap();
    Tokenizer::train(counts, vocab_size).unwrap()
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
