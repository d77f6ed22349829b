//! Python bindings: `rustbpe.Tokenizer`, a drop-in for the `rustbpe` package on PyPI (docs/tokenizer.md lists
//! where it differs).
//!
//! Heavy work (splitting, counting, merging, batch encode/decode) runs with the GIL released. Errors from the
//! plain-Rust side become `ValueError`s (`UnicodeDecodeError` for bytes that are not UTF-8); a non-string from
//! the training iterator is a `TypeError`; an exception raised by the iterator, or by a string that cannot be
//! encoded (a lone surrogate), propagates unchanged. Progress goes to the Python logger `rustbpe`.
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyTypeError, PyUnicodeDecodeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyString};

use crate::train::PARALLEL_MIN_BYTES;
use crate::{BpeError, ChunkCounts, Event, Splitter, GPT4_PATTERN};

impl From<BpeError> for PyErr {
    fn from(err: BpeError) -> PyErr {
        match err {
            BpeError::NotUtf8 { bytes, error } => {
                Python::attach(|py| PyUnicodeDecodeError::new_err_from_utf8(py, &bytes, error))
            }
            other => PyValueError::new_err(other.to_string()),
        }
    }
}

/// How often a training run in Rust looks for Ctrl-C (and other signals Python handles).
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// The Python logger `rustbpe` (the reference package logs there too), and the signal check that goes with
/// each visit to Python.
struct Progress {
    logger: Py<PyAny>,
    last_check: Instant,
}

impl Progress {
    fn new(py: Python<'_>) -> PyResult<Self> {
        let logger = py
            .import("logging")?
            .call_method1("getLogger", ("rustbpe",))?
            .unbind();
        Ok(Progress {
            logger,
            last_check: Instant::now(),
        })
    }

    fn info(&mut self, py: Python<'_>, message: String) -> PyResult<()> {
        self.last_check = Instant::now();
        py.check_signals()?;
        self.logger.bind(py).call_method1("info", (message,))?;
        Ok(())
    }

    /// Called from Rust with the GIL released: takes it briefly to log, or to check for signals once per
    /// interval. A KeyboardInterrupt raised there stops training.
    fn on_event(&mut self, event: Event) -> PyResult<()> {
        match event {
            Event::Message(message) => Python::attach(|py| self.info(py, message)),
            Event::Tick if self.last_check.elapsed() >= SIGNAL_CHECK_INTERVAL => {
                self.last_check = Instant::now();
                Python::attach(|py| py.check_signals())
            }
            Event::Tick => Ok(()),
        }
    }
}

/// Pulls up to `count` strings from the iterator; `position` numbers the items for error messages.
fn next_batch<'py>(
    items: &mut Bound<'py, PyIterator>,
    count: usize,
    position: &mut usize,
) -> PyResult<Vec<Bound<'py, PyString>>> {
    let mut batch = Vec::with_capacity(count);
    for item in items.by_ref().take(count) {
        let item = item?;
        let text = item.cast_into::<PyString>().map_err(|err| {
            let type_name = err
                .into_inner()
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".to_string());
            PyTypeError::new_err(format!(
                "train_from_iterator expects str items, item {position} is {type_name}"
            ))
        })?;
        // the real cause of a string Rust cannot read (a lone surrogate is a UnicodeEncodeError)
        text.to_str()?;
        batch.push(text);
        *position += 1;
    }
    Ok(batch)
}

/// A byte-level BPE tokenizer: train it from an iterator of strings, then encode and decode.
#[pyclass(module = "rustbpe", name = "Tokenizer")]
#[derive(Default)]
struct PyTokenizer {
    inner: crate::Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Train from a (streaming) iterator of strings: `buffer_size` strings are pulled at a time with the GIL
    /// held while the previous batch is split and counted on other threads, reading the strings in place.
    /// `vocab_size` counts the 256 byte tokens; fewer merges are learned if the text runs out of pairs.
    /// `pattern=None` uses GPT-4's split pattern (`GPT4_PATTERN`), as the reference package does.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: usize,
        pattern: Option<&str>,
    ) -> PyResult<()> {
        let vocab_size = u64::try_from(vocab_size)
            .ok()
            .filter(|&v| v >= u64::from(crate::NUM_BYTE_TOKENS))
            .ok_or(BpeError::VocabTooSmall(vocab_size))?;
        if buffer_size == 0 {
            return Err(PyValueError::new_err(
                "buffer_size must be at least 1, got 0",
            ));
        }
        let mut counts = ChunkCounts::new(Splitter::new(pattern.unwrap_or(GPT4_PATTERN))?);
        let mut progress = Progress::new(py)?;
        progress.info(
            py,
            format!("Processing sequences from iterator (buffer_size: {buffer_size})"),
        )?;
        let mut items = iterator.try_iter()?;
        let mut position = 0usize;
        let mut batch = next_batch(&mut items, buffer_size, &mut position)?;
        while !batch.is_empty() {
            py.check_signals()?;
            let texts: Vec<&str> = batch
                .iter()
                .map(|text| text.to_str())
                .collect::<PyResult<_>>()?;
            let num_bytes: usize = texts.iter().map(|text| text.len()).sum();
            let next = if num_bytes < PARALLEL_MIN_BYTES {
                // too little to be worth a thread: count it here, then pull the next batch
                py.detach(|| counts.add_texts(&texts))?;
                next_batch(&mut items, buffer_size, &mut position)
            } else {
                // count this batch on other threads while this one pulls the next from Python
                let (counted, next) = std::thread::scope(|scope| {
                    let counting = scope.spawn(|| counts.add_texts(&texts));
                    let next = next_batch(&mut items, buffer_size, &mut position);
                    (py.detach(|| counting.join()), next)
                });
                counted.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
                next
            };
            batch = next?;
        }
        progress.info(
            py,
            format!(
                "Processed {position} sequences total, {} unique",
                counts.len()
            ),
        )?;
        self.inner = py.detach(|| {
            crate::Tokenizer::train_with_events(counts, vocab_size, &mut |event| {
                progress.on_event(event)
            })
        })?;
        Ok(())
    }

    /// The split pattern (regex) chunks are cut with.
    fn get_pattern(&self) -> &str {
        self.inner.pattern()
    }

    /// Every token as `(bytes, id)`, ids 0..vocab_size in order (tiktoken's mergeable ranks).
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.inner
            .mergeable_ranks()
            .map(|(bytes, id)| (PyBytes::new(py, bytes), id))
            .collect()
    }

    /// Number of tokens: 256 bytes plus the learned merges.
    #[getter]
    fn vocab_size(&self) -> u32 {
        self.inner.vocab_size()
    }

    /// Encode a string into token ids.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        Ok(py.detach(|| self.inner.encode(text))?)
    }

    /// Encode many strings in parallel; one id list per string.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        Ok(py.detach(|| self.inner.batch_encode(&texts))?)
    }

    /// Decode token ids to a string; ids whose bytes are not UTF-8 raise UnicodeDecodeError.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        Ok(self.inner.decode(&ids)?)
    }

    /// Decode many id lists in parallel.
    fn batch_decode(&self, py: Python<'_>, batch: Vec<Vec<u32>>) -> PyResult<Vec<String>> {
        Ok(py.detach(|| self.inner.batch_decode(&batch))?)
    }

    fn __repr__(&self) -> String {
        format!("Tokenizer(vocab_size={})", self.inner.vocab_size())
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add("GPT4_PATTERN", crate::GPT4_PATTERN)?;
    Ok(())
}
