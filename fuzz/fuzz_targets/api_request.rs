//! Request parsing and validation of the job API: any bytes give a validated request (within
//! bounds, runnable, read back unchanged when written again) or a 400/413 error naming what is
//! wrong, never a panic.
//!
//! The body lives in `flux-fuzz` (`crates/flux-fuzz`), which the test suite also runs on
//! stable over its seed inputs and their mutations.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| flux_fuzz::api_request(data));
