//! The torch-compatible generator against the `rng` reference folder: every case bit-exact.

use flux_parity::{data::read_json, rng};
use std::path::PathBuf;

fn folder() -> PathBuf {
    flux_parity::reference_folder("rng")
}

#[test]
fn every_rng_case_is_bit_exact() {
    let dir = folder();
    let manifest = read_json(&dir.join("manifest.json")).expect("rng manifest readable");
    let listed = manifest["cases"].as_array().map_or(0, Vec::len);
    let results = rng::run(&dir).expect("rng folder readable");
    let failed = flux_parity::failure_lines(&results);
    assert!(
        failed.is_empty(),
        "{} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(listed > 0, "manifest lists no cases");
    assert_eq!(results.len(), listed, "cases run vs cases listed");
}

fn samplers_folder() -> PathBuf {
    flux_parity::reference_folder("samplers")
}

#[test]
fn brownian_tree_draws_match_the_recorded_sde_noise() {
    let dir = samplers_folder();
    let manifest = read_json(&dir.join("manifest.json")).expect("samplers manifest readable");
    let listed = manifest["cases"].as_array().map_or(0, |c| {
        c.iter().filter(|c| rng::uses_only_brownian(c)).count()
    });
    let results = rng::run_brownian(&dir).expect("samplers folder readable");
    for r in &results {
        eprintln!("{r}");
    }
    let failed = flux_parity::failure_lines(&results);
    assert!(
        failed.is_empty(),
        "{} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(listed > 0, "manifest lists no Brownian-tree case");
    assert_eq!(results.len(), listed, "cases run vs cases listed");
}
