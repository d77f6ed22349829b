//! Byte-level BPE training for nanochat. Plain Rust here; the Python bindings live in `py.rs`.
#![deny(unsafe_code)]

mod py;

/// Ids 0..=255 are raw bytes; merge i produces id 256 + i.
pub const NUM_BYTE_TOKENS: u32 = 256;
