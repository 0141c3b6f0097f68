//! Arbitrary bytes as a safetensors checkpoint: the loader must return an error or tensors that
//! read back within bounds, and loading a Flux transformer from them must never panic.
//!
//! The body lives in `flux-fuzz` (`crates/flux-fuzz`), which the test suite also runs on
//! stable over its seed inputs and their mutations.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| flux_fuzz::safetensors_header(data));
