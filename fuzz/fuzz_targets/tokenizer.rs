//! Arbitrary prompt text through the prompt tokenizers, and arbitrary bytes as a
//! `tokenizer.json`: every prompt gives rows of exactly the requested length (or an error), and a
//! malformed tokenizer file is an error, never a panic.
//!
//! The body lives in `flux-fuzz` (`crates/flux-fuzz`), which the test suite also runs on
//! stable over its seed inputs and their mutations.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| flux_fuzz::tokenizer(data));
