//! Arbitrary bytes as an input image: decoding, the resize rule and the tensor conversion must
//! return an error or a well-formed image, never panic, for PNG, JPEG, WebP or garbage.
//!
//! The body lives in `flux-fuzz` (`crates/flux-fuzz`), which the test suite also runs on
//! stable over its seed inputs and their mutations.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| flux_fuzz::image_decode(data));
