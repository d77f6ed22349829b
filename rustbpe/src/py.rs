//! Python bindings: `rustbpe.Tokenizer`, API-compatible with the `rustbpe` package on PyPI.
//!
//! Heavy work (splitting, counting, merging, batch encode/decode) runs with the GIL released. Errors from
//! the plain-Rust side become `ValueError`s; a non-string from the training iterator is a `TypeError`; an
//! exception raised by the iterator itself propagates unchanged.
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::{BpeError, ChunkCounts, Splitter};

impl From<BpeError> for PyErr {
    fn from(err: BpeError) -> PyErr {
        PyValueError::new_err(err.to_string())
    }
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

    /// Train from a (streaming) iterator of strings: `buffer_size` strings are pulled at a time with the
    /// GIL held, then split and counted in parallel with the GIL released. `vocab_size` counts the 256
    /// byte tokens; fewer merges are learned if the text runs out of pairs. `pattern=None` uses the
    /// default split pattern (GPT-4's with `\p{N}{1,2}`).
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
        let splitter = match pattern {
            Some(p) => Splitter::new(p)?,
            None => Splitter::default(),
        };
        let mut counts = ChunkCounts::new(splitter);
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size);
        let mut position = 0usize;
        let mut items = iterator.try_iter()?;
        loop {
            buffer.clear();
            for item in items.by_ref().take(buffer_size) {
                let item = item?;
                let text = item.extract::<String>().map_err(|_| {
                    let type_name = item
                        .get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| "?".to_string());
                    PyTypeError::new_err(format!(
                        "train_from_iterator expects str items, item {position} is {type_name}"
                    ))
                })?;
                buffer.push(text);
                position += 1;
            }
            if buffer.is_empty() {
                break;
            }
            py.detach(|| counts.add_texts(&buffer))?;
        }
        drop(buffer);
        self.inner = py.detach(|| crate::Tokenizer::train(counts, vocab_size))?;
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

    /// Decode token ids to a string (invalid UTF-8 becomes U+FFFD).
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
    m.add("DEFAULT_PATTERN", crate::DEFAULT_PATTERN)?;
    Ok(())
}
