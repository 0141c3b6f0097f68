//! Declares the `flux_pg_tests` cfg for the PostgreSQL store tests: set when a PostgreSQL
//! server can be used (`FLUX_TEST_PG_URL`, `FLUX_PG_BIN`, or the distribution's
//! `/usr/lib/postgresql/*/bin`) or required (`CI` or `FLUX_REQUIRE_POSTGRES=1` set), where a missing server fails the tests.
//! Without it those tests are ignored, so a machine without PostgreSQL never counts them as
//! passed.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(flux_pg_tests)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in [
        "CI",
        "FLUX_REQUIRE_POSTGRES",
        "FLUX_TEST_PG_URL",
        "FLUX_PG_BIN",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let distribution = Path::new("/usr/lib/postgresql");
    if distribution.is_dir() {
        println!("cargo::rerun-if-changed={}", distribution.display());
    }
    let env_set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    let pg_bin =
        std::env::var_os("FLUX_PG_BIN").is_some_and(|dir| Path::new(&dir).join("initdb").is_file());
    let installed = std::fs::read_dir(distribution).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.path().join("bin").join("initdb").is_file())
    });
    let required = env_set("CI") || std::env::var("FLUX_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    if required || env_set("FLUX_TEST_PG_URL") || pg_bin || installed {
        println!("cargo::rustc-cfg=flux_pg_tests");
    }
}
