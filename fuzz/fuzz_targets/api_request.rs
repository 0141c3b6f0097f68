//! Request parsing and validation of the job API: any bytes give a validated request or a
//! 400/413 error naming what is wrong, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match flux_api::parse_request(data) {
        Ok(req) => {
            assert!((1..=flux_api::request::MAX_STEPS).contains(&req.params.steps));
            assert!((0.0..=1.0).contains(&req.params.denoise));
            assert!(!req.params.prompt.trim().is_empty());
        }
        Err(e) => {
            assert!(matches!(e.status.as_u16(), 400 | 413), "{e}");
            assert!(!e.message.is_empty());
        }
    }
});
