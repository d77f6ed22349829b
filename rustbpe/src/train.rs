//! Training: count unique chunks over a stream of text, then learn merges over the unique chunks.
//!
//! Memory grows with the number of distinct chunks, not with the corpus: a chunk seen a million times is
//! one entry with count 1e6. The merge loop keeps exact pair counts and, for each pair, the chunks it may
//! occur in, so each merge only touches the chunks that contain it.
use std::cmp::Ordering;
use std::collections::hash_map::Entry;
use std::collections::BinaryHeap;
use std::hash::Hash;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::{merge_in_place, pool, Pair, Result, Splitter, NUM_BYTE_TOKENS};

/// How often each distinct chunk occurred in the text seen so far.
#[derive(Debug, Clone)]
pub struct ChunkCounts {
    splitter: Splitter,
    tally: Tally<String>,
}

impl ChunkCounts {
    pub fn new(splitter: Splitter) -> Self {
        ChunkCounts {
            splitter,
            tally: Tally::default(),
        }
    }

    pub fn splitter(&self) -> &Splitter {
        &self.splitter
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.tally.short.len() + self.tally.long.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits and counts a batch of texts (in parallel unless it is small); only long chunks new to the
    /// table are copied.
    pub fn add_texts<S: AsRef<str> + Sync>(&mut self, texts: &[S]) -> Result<()> {
        let splitter = &self.splitter;
        let num_bytes: usize = texts.iter().map(|text| text.as_ref().len()).sum();
        let batch: Tally<&str> = if num_bytes < PARALLEL_MIN_BYTES {
            texts.iter().try_fold(Tally::default(), |local, text| {
                count_text(splitter, local, text.as_ref())
            })?
        } else {
            pool::install(|| {
                texts
                    .par_iter()
                    .try_fold(Tally::default, |local, text| {
                        count_text(splitter, local, text.as_ref())
                    })
                    .try_reduce(Tally::default, |a, b| Ok(a.merge(b)))
            })?
        };
        merge_maps(&mut self.tally.short, batch.short);
        for (chunk, n) in batch.long {
            match self.tally.long.get_mut(chunk) {
                Some(total) => *total += n,
                None => {
                    self.tally.long.insert(chunk.to_owned(), n);
                }
            }
        }
        Ok(())
    }

    /// Every distinct chunk's bytes with its count, consuming the table.
    pub fn into_chunks(self) -> impl Iterator<Item = (Vec<u8>, u64)> {
        let Tally { short, long } = self.tally;
        short
            .into_iter()
            .map(|(packed, n)| (unpack(packed), n))
            .chain(long.into_iter().map(|(chunk, n)| (chunk.into_bytes(), n)))
    }
}

/// Batches of fewer bytes are counted on the calling thread: handing them to the pool would cost more than it
/// saves (a stream read one short string at a time, `buffer_size=1`, was slower than the reference).
pub const PARALLEL_MIN_BYTES: usize = 1 << 18;

fn count_text<'t>(
    splitter: &Splitter,
    mut local: Tally<&'t str>,
    text: &'t str,
) -> Result<Tally<&'t str>> {
    splitter.for_each_chunk(text, |chunk| local.add(chunk))?;
    Ok(local)
}

/// Chunks of up to 15 bytes (nearly all of them) packed into one integer: their bytes, then the length in
/// the top byte. Hashing and comparing these never reads the text, which was most of the counting time.
type Packed = u128;
const MAX_PACKED_LEN: usize = 15;

fn pack(chunk: &[u8]) -> Packed {
    let mut bytes = [0u8; 16];
    bytes[..chunk.len()].copy_from_slice(chunk);
    bytes[MAX_PACKED_LEN] = chunk.len() as u8;
    Packed::from_le_bytes(bytes)
}

fn unpack(packed: Packed) -> Vec<u8> {
    let bytes = packed.to_le_bytes();
    bytes[..usize::from(bytes[MAX_PACKED_LEN])].to_vec()
}

/// Chunk counts: short chunks packed, longer ones keyed by their text (`&str` while counting a batch,
/// `String` in the running total).
#[derive(Debug, Clone)]
struct Tally<K> {
    short: FxHashMap<Packed, u64>,
    long: FxHashMap<K, u64>,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Tally {
            short: FxHashMap::default(),
            long: FxHashMap::default(),
        }
    }
}

impl<'t> Tally<&'t str> {
    fn add(&mut self, chunk: &'t str) {
        if chunk.len() <= MAX_PACKED_LEN {
            *self.short.entry(pack(chunk.as_bytes())).or_default() += 1;
        } else {
            *self.long.entry(chunk).or_default() += 1;
        }
    }

    fn merge(mut self, other: Self) -> Self {
        merge_maps(&mut self.short, other.short);
        merge_maps(&mut self.long, other.long);
        self
    }
}

/// Adds the counts of `from` into `into`, iterating over the smaller of the two.
fn merge_maps<K: Hash + Eq>(into: &mut FxHashMap<K, u64>, mut from: FxHashMap<K, u64>) {
    if into.len() < from.len() {
        std::mem::swap(into, &mut from);
    }
    for (key, n) in from {
        *into.entry(key).or_default() += n;
    }
}

/// A heap entry: the pair's count when pushed, which may since have dropped (it is then re-checked).
#[derive(Debug, PartialEq, Eq)]
struct Candidate {
    count: i64,
    pair: Pair,
}

impl Ord for Candidate {
    /// Max-heap order: higher count first; on equal counts the smaller pair comes first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.count
            .cmp(&other.count)
            .then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What training reports while it runs: milestones worth logging, and a tick between merges where the caller
/// may stop it by returning an error (the Python binding checks for Ctrl-C there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message(String),
    Tick,
}

/// Learns up to `num_merges` merges: each time the most frequent adjacent pair (ties: the smaller pair).
///
/// Counts never rise after a pair first appears (every pair a merge creates contains the new id), so a
/// lazily updated max-heap is exact: a popped entry whose count is stale is re-pushed with the true count.
pub fn learn_merges<E>(
    counts: ChunkCounts,
    num_merges: usize,
    on_event: &mut impl FnMut(Event) -> std::result::Result<(), E>,
) -> std::result::Result<Vec<Pair>, E> {
    learn_merges_with(counts, num_merges, PARALLEL_MIN_CHUNKS, on_event)
}

/// A merge whose pair is listed in at least this many chunks is applied on the crate's threads.
const PARALLEL_MIN_CHUNKS: usize = 2048;

/// `learn_merges`, applying a merge in parallel when its chunk list has at least `parallel_min_chunks` entries.
fn learn_merges_with<E>(
    counts: ChunkCounts,
    num_merges: usize,
    parallel_min_chunks: usize,
    on_event: &mut impl FnMut(Event) -> std::result::Result<(), E>,
) -> std::result::Result<Vec<Pair>, E> {
    on_event(Event::Message(format!(
        "Starting BPE training: {num_merges} merges to compute"
    )))?;
    // All chunks' ids back to back (one allocation, visited in order), each shrinking in place as merges
    // apply; spans say where each chunk lives. Single-byte chunks hold no pair and are left out.
    let mut ids: Vec<u32> = Vec::new();
    let mut spans: Vec<Span> = Vec::with_capacity(counts.len());
    for (chunk, n) in counts.into_chunks() {
        if chunk.len() >= 2 {
            spans.push(Span {
                start: ids.len(),
                len: chunk.len(),
                weight: n as i64,
            });
            ids.extend(chunk.iter().map(|&b| u32::from(b)));
        }
    }
    on_event(Event::Message(format!(
        "Computing initial pair counts from {} unique sequences",
        spans.len()
    )))?;
    let mut pairs = count_pairs(&ids, &spans);
    on_event(Event::Message(format!(
        "Building heap with {} unique pairs",
        pairs.len()
    )))?;
    let mut heap: BinaryHeap<Candidate> = pairs
        .iter()
        .map(|(&pair, state)| Candidate {
            count: state.count,
            pair,
        })
        .collect();

    on_event(Event::Message("Starting merge loop".to_string()))?;
    // Each merge shortens the chunks by at least one id, so this bounds the work however large a
    // vocabulary is asked for; the tables below grow with the merges actually made, not the request.
    let limit = num_merges.min(ids.len());
    let mut merges = Vec::new();
    let mut last_percent = 0;
    // The pairs a merge creates all contain its new id, as (x, new) or (new, y): tally them in arrays
    // indexed by x and y instead of hashing each occurrence, and publish them once the merge is done.
    let (mut with_left, mut with_right) = (NewPairs::default(), NewPairs::default());
    let threads = pool::install(rayon::current_num_threads);
    while merges.len() < limit {
        on_event(Event::Tick)?;
        let Some(top) = heap.pop() else { break };
        let Some(count) = pairs.get(&top.pair).map(|state| state.count) else {
            continue;
        };
        if count != top.count {
            heap.push(Candidate {
                count,
                pair: top.pair,
            });
            continue;
        }
        let new_id = NUM_BYTE_TOKENS + merges.len() as u32;
        merges.push(top.pair);
        with_left.make_room(new_id);
        with_right.make_room(new_id);
        let merged = pairs
            .remove(&top.pair)
            .expect("a popped live pair is in the table");
        if threads > 1 && merged.chunks.len() >= parallel_min_chunks {
            let runs = merged
                .chunks
                .chunks(merged.chunks.len().div_ceil(4 * threads));
            let changes = merge_runs(&mut ids, &spans, runs.clone(), top.pair, new_id);
            for (run, changes) in runs.zip(changes) {
                for (&w, len) in run.iter().zip(changes.lens) {
                    spans[w as usize].len = len;
                }
                // pairs without the new id only lose occurrences, so adding up a run's losses first is exact
                for (pair, delta) in changes.old_pairs {
                    let state = pairs
                        .get_mut(&pair)
                        .expect("a pair being removed was counted");
                    state.count += delta;
                    if state.count == 0 {
                        pairs.remove(&pair);
                    }
                }
                for (x, (count, words)) in changes.with_left {
                    with_left.absorb(x, count, words);
                }
                for (y, (count, words)) in changes.with_right {
                    with_right.absorb(y, count, words);
                }
            }
        } else {
            for w in merged.chunks {
                let span = &mut spans[w as usize];
                let weight = span.weight;
                span.len =
                    merge_in_place(&mut ids[span.range()], top.pair, new_id, |(x, y), delta| {
                        if y == new_id {
                            with_left.add(x, delta * weight, w);
                        } else if x == new_id {
                            with_right.add(y, delta * weight, w);
                        } else if (x, y) != top.pair {
                            let state = pairs
                                .get_mut(&(x, y))
                                .expect("a pair being removed was counted");
                            state.count += delta * weight;
                            if state.count == 0 {
                                pairs.remove(&(x, y));
                            }
                        }
                    });
            }
        }
        let created = with_left
            .drain()
            .map(|(x, count, list)| ((x, new_id), count, list))
            .chain(
                with_right
                    .drain()
                    .map(|(y, count, list)| ((new_id, y), count, list)),
            );
        for (pair, count, chunks) in created {
            if count > 0 {
                pairs.insert(pair, PairState { count, chunks });
                heap.push(Candidate { count, pair });
            }
        }
        let percent = merges.len() * 100 / num_merges;
        if percent > last_percent {
            last_percent = percent;
            on_event(Event::Message(format!(
                "Progress: {percent}% ({}/{num_merges} merges) - Last merge: {:?} -> {new_id} (frequency: {count})",
                merges.len(),
                top.pair
            )))?;
        }
    }
    on_event(Event::Message(format!(
        "Finished training: {} merges completed",
        merges.len()
    )))?;
    Ok(merges)
}

/// What applying one merge changed in a run of consecutive chunks: their new lengths (in run order), the
/// weighted losses of pairs without the new id, and the weighted counts and chunk lists (ascending) of the
/// pairs it created, keyed by the token beside the new id.
#[derive(Default)]
struct RunChanges {
    lens: Vec<usize>,
    old_pairs: FxHashMap<Pair, i64>,
    with_left: FxHashMap<u32, (i64, Vec<u32>)>,
    with_right: FxHashMap<u32, (i64, Vec<u32>)>,
}

/// Applies the merge `pair -> new_id` to each run of chunks on the crate's threads. The runs come from an
/// ascending chunk list, so each owns a disjoint slice of the id buffer, carved here without copying.
fn merge_runs<'a>(
    ids: &mut [u32],
    spans: &[Span],
    runs: impl Iterator<Item = &'a [u32]>,
    pair: Pair,
    new_id: u32,
) -> Vec<RunChanges> {
    let mut work: Vec<(&[u32], usize, &mut [u32])> = Vec::new();
    let (mut rest, mut rest_start) = (ids, 0);
    for run in runs {
        let first = &spans[run[0] as usize];
        let last = &spans[run[run.len() - 1] as usize];
        let (_, from_first) = std::mem::take(&mut rest).split_at_mut(first.start - rest_start);
        let (region, after) = from_first.split_at_mut(last.start + last.len - first.start);
        work.push((run, first.start, region));
        (rest, rest_start) = (after, last.start + last.len);
    }
    pool::install(|| {
        work.into_par_iter()
            .map(|(run, base, region)| {
                let mut changes = RunChanges::default();
                for &w in run {
                    let span = &spans[w as usize];
                    let weight = span.weight;
                    let local = span.start - base..span.start - base + span.len;
                    let len = merge_in_place(&mut region[local], pair, new_id, |(x, y), delta| {
                        let delta = delta * weight;
                        if y == new_id {
                            tally_new_pair(&mut changes.with_left, x, delta, w);
                        } else if x == new_id {
                            tally_new_pair(&mut changes.with_right, y, delta, w);
                        } else if (x, y) != pair {
                            *changes.old_pairs.entry((x, y)).or_default() += delta;
                        }
                    });
                    changes.lens.push(len);
                }
                changes
            })
            .collect()
    })
}

fn tally_new_pair(table: &mut FxHashMap<u32, (i64, Vec<u32>)>, other: u32, delta: i64, word: u32) {
    let (count, words) = table.entry(other).or_default();
    if delta > 0 && words.last() != Some(&word) {
        words.push(word);
    }
    *count += delta;
}

/// Spans counted per rayon task when the initial pair counts are taken in parallel.
const SPANS_PER_TASK: usize = 1 << 12;

/// Every pair's count and the chunks it occurs in (ascending), counted on the crate's threads: each tallies
/// runs of consecutive spans and the tallies are added up in span order.
fn count_pairs(ids: &[u32], spans: &[Span]) -> FxHashMap<Pair, PairState> {
    pool::install(|| {
        spans
            .par_chunks(SPANS_PER_TASK)
            .enumerate()
            .fold(FxHashMap::default, |mut local, (part, run)| {
                for (i, span) in run.iter().enumerate() {
                    let w = (part * SPANS_PER_TASK + i) as u32;
                    for pair in ids[span.range()].windows(2).map(|p| (p[0], p[1])) {
                        let state: &mut PairState = local.entry(pair).or_default();
                        state.count += span.weight;
                        if state.chunks.last() != Some(&w) {
                            state.chunks.push(w);
                        }
                    }
                }
                local
            })
            .reduce(FxHashMap::default, add_pair_states)
    })
}

/// `left` + `right`, where every chunk in `left` comes before every chunk in `right`: chunk lists stay
/// ascending. The smaller table is walked.
fn add_pair_states(
    left: FxHashMap<Pair, PairState>,
    right: FxHashMap<Pair, PairState>,
) -> FxHashMap<Pair, PairState> {
    let from_right = left.len() >= right.len();
    let (mut into, from) = if from_right {
        (left, right)
    } else {
        (right, left)
    };
    for (pair, mut state) in from {
        match into.entry(pair) {
            Entry::Vacant(slot) => {
                slot.insert(state);
            }
            Entry::Occupied(mut slot) => {
                let kept = slot.get_mut();
                kept.count += state.count;
                if from_right {
                    kept.chunks.append(&mut state.chunks);
                } else {
                    state.chunks.append(&mut kept.chunks);
                    kept.chunks = state.chunks;
                }
            }
        }
    }
    into
}

#[derive(Debug, Default)]
struct PairState {
    count: i64,
    chunks: Vec<u32>,
}

/// Where one distinct chunk's ids live in the shared buffer, and how often the chunk occurred.
struct Span {
    start: usize,
    len: usize,
    weight: i64,
}

impl Span {
    fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }
}

/// Counts and chunk lists of the pairs one merge creates, indexed by the token beside the new id; the
/// arrays grow by one slot per merge.
#[derive(Default)]
struct NewPairs {
    counts: Vec<i64>,
    words: Vec<Vec<u32>>,
    touched: Vec<u32>,
}

impl NewPairs {
    /// Room for every id up to and including `new_id`.
    fn make_room(&mut self, new_id: u32) {
        let len = new_id as usize + 1;
        self.counts.resize(len, 0);
        self.words.resize_with(len, Vec::new);
    }

    /// A chunk's first change to a new pair is always an addition (its removals follow an addition in
    /// the same chunk), so an empty chunk list marks a pair not seen yet in this merge.
    fn add(&mut self, other: u32, delta: i64, word: u32) {
        let i = other as usize;
        if delta > 0 {
            let list = &mut self.words[i];
            if list.is_empty() {
                self.touched.push(other);
            }
            if list.last() != Some(&word) {
                list.push(word);
            }
        }
        self.counts[i] += delta;
    }

    /// Adds a run's tally for the pair with `other` (its chunks come after any already listed).
    fn absorb(&mut self, other: u32, count: i64, mut words: Vec<u32>) {
        let i = other as usize;
        if self.words[i].is_empty() {
            self.touched.push(other);
        }
        self.words[i].append(&mut words);
        self.counts[i] += count;
    }

    /// Every pair touched since the last drain as (other token, count, chunk list), leaving all empty.
    fn drain(&mut self) -> impl Iterator<Item = (u32, i64, Vec<u32>)> + '_ {
        let NewPairs {
            counts,
            words,
            touched,
        } = self;
        touched.drain(..).map(move |other| {
            let i = other as usize;
            (
                other,
                std::mem::take(&mut counts[i]),
                std::mem::take(&mut words[i]),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_chunks_count_alike() {
        for len in 0..=MAX_PACKED_LEN {
            let chunk: Vec<u8> = (1..=len as u8).collect();
            assert_eq!(unpack(pack(&chunk)), chunk);
        }
        let long = "x".repeat(40);
        let texts = [format!("ab {long} ab"), format!("{long} ab")];
        let mut counts = ChunkCounts::new(Splitter::default());
        counts.add_texts(&texts).unwrap();
        counts.add_texts(&texts[..1]).unwrap();
        let mut chunks: Vec<(Vec<u8>, u64)> = counts.into_chunks().collect();
        chunks.sort();
        let expected = [
            (b" ab".to_vec(), 3),
            (format!(" {long}").into_bytes(), 2),
            (b"ab".to_vec(), 2),
            (long.into_bytes(), 1),
        ];
        assert_eq!(chunks, expected);
    }

    #[test]
    fn parallel_pair_counts_equal_a_serial_count() {
        // enough chunks for many rayon tasks, with pairs shared across tasks
        let words: Vec<Vec<u32>> = (0..5 * SPANS_PER_TASK as u32)
            .map(|i| vec![i % 7, i % 5, (i / 3) % 11, i % 7])
            .collect();
        let mut ids = Vec::new();
        let mut spans = Vec::new();
        for (i, word) in words.iter().enumerate() {
            spans.push(Span {
                start: ids.len(),
                len: word.len(),
                weight: 1 + (i % 3) as i64,
            });
            ids.extend_from_slice(word);
        }
        let mut expected: FxHashMap<Pair, PairState> = FxHashMap::default();
        for (w, span) in spans.iter().enumerate() {
            for pair in ids[span.range()].windows(2).map(|p| (p[0], p[1])) {
                let state = expected.entry(pair).or_default();
                state.count += span.weight;
                if state.chunks.last() != Some(&(w as u32)) {
                    state.chunks.push(w as u32);
                }
            }
        }
        let counted = count_pairs(&ids, &spans);
        assert_eq!(counted.len(), expected.len());
        for (pair, state) in &expected {
            assert_eq!(counted[pair].count, state.count);
            assert_eq!(counted[pair].chunks, state.chunks, "chunk list of {pair:?}");
        }
    }

    #[test]
    fn parallel_merges_equal_serial_merges() {
        // Thousands of distinct chunks sharing pairs, so early merges touch far more chunks than the threshold.
        let letters = |mut i: u32| {
            let mut word = String::new();
            while i > 0 {
                word.push(char::from(b'a' + (i % 7) as u8));
                i /= 7;
            }
            word
        };
        let texts: Vec<String> = (0..4000u32)
            .map(|i| {
                format!(
                    "ab{}e {}ab the{}",
                    letters(i),
                    letters(i * 31),
                    letters(i % 50)
                )
            })
            .collect();
        let mut counts = ChunkCounts::new(Splitter::default());
        counts.add_texts(&texts).unwrap();
        assert!(counts.len() > 3000);
        let learn = |min_chunks| {
            learn_merges_with(counts.clone(), 500, min_chunks, &mut |_| Ok::<(), ()>(())).unwrap()
        };
        assert_eq!(learn(16), learn(usize::MAX));
    }
}
