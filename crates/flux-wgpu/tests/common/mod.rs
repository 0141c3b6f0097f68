//! Device selection shared by the wgpu tests.
//!
//! The tests are ignored unless the crate was built with `FLUX_REQUIRE_ADAPTER=1` (CI sets it
//! and installs a software Vulkan driver), so a machine without a GPU never counts them as
//! passed. Run with `--run-ignored all` (nextest) or `--ignored` (cargo test) to try them
//! anyway: without an adapter they then print "skipped: no adapter" and return, unless
//! `FLUX_REQUIRE_ADAPTER=1` is set at run time, which makes a missing adapter a failure.

use flux_wgpu::{Wgpu, WgpuOptions};

/// The backend under test, or `None` (after saying so) when no adapter exists and none is
/// required.
pub fn backend_with(options: WgpuOptions) -> Option<Wgpu> {
    match Wgpu::with_options(options) {
        Ok(be) => Some(be),
        Err(e) => {
            let required = std::env::var("FLUX_REQUIRE_ADAPTER").is_ok_and(|v| v == "1")
                || cfg!(flux_adapter_tests);
            assert!(!required, "FLUX_REQUIRE_ADAPTER=1 but {e}");
            eprintln!("skipped: no adapter ({e})");
            None
        }
    }
}

/// The default backend (see [`backend_with`]).
pub fn backend() -> Option<Wgpu> {
    backend_with(WgpuOptions::default())
}
