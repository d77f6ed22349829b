//! Times the training phases on a corpus file of NUL-separated documents:
//! `cargo run --release --example phases -- corpus.bin 32768`.
use std::time::Instant;

use rustbpe::{train, ChunkCounts, Splitter};

/// CPU seconds this process has used so far (user + system), from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|t| t.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}

/// A `/proc/self/status` memory field (VmRSS: now, VmHWM: peak) in MB.
fn memory_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
    });
    kb.unwrap_or(0.0) / 1e3
}

fn report(what: &str, wall: Instant, cpu: f64, extra: String) {
    println!(
        "{what}: wall {:.2}s cpu {:.2}s rss {:.0}MB peak {:.0}MB {extra}",
        wall.elapsed().as_secs_f64(),
        cpu_seconds() - cpu,
        memory_mb("VmRSS"),
        memory_mb("VmHWM")
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).expect("corpus file");
    let vocab_size: usize = args[2].parse().expect("vocab size");
    let docs: Vec<&str> = text.split('\0').collect();

    let (start, cpu) = (Instant::now(), cpu_seconds());
    let mut splits = 0usize;
    let splitter = Splitter::default();
    for doc in &docs {
        splitter.for_each_chunk(doc, |_| splits += 1).unwrap();
    }
    report(
        "split only (1 thread)",
        start,
        cpu,
        format!("{splits} chunks"),
    );

    let (start, cpu) = (Instant::now(), cpu_seconds());
    let mut counts = ChunkCounts::new(Splitter::default());
    for batch in docs.chunks(8192) {
        counts.add_texts(batch).unwrap();
    }
    report(
        "split+count (pool)",
        start,
        cpu,
        format!("{} unique", counts.len()),
    );

    let (start, cpu) = (Instant::now(), cpu_seconds());
    let merges = train::learn_merges(counts, vocab_size - 256, &mut |event| {
        if let train::Event::Message(message) = event {
            if !message.starts_with("Progress") {
                println!(
                    "  {:.2}s cpu {:.2}s: {message}",
                    start.elapsed().as_secs_f64(),
                    cpu_seconds() - cpu
                );
            }
        }
        Ok::<(), ()>(())
    })
    .unwrap();
    report("merges", start, cpu, format!("{}", merges.len()));
}
