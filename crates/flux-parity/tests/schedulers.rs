//! The sigma schedulers against the `schedulers` reference folder: every listed tensor (and each
//! file's model sigma table) within the allowance of its scheduler.

use flux_parity::{data::read_json, schedulers};
use std::path::PathBuf;

fn folder() -> PathBuf {
    flux_parity::reference_folder("schedulers")
}

#[test]
fn every_scheduler_case_matches_comfyui() {
    let dir = folder();
    let manifest = read_json(&dir.join("manifest.json")).expect("schedulers manifest readable");
    let files = manifest["cases"]
        .as_array()
        .expect("manifest has a `cases` array");
    let entries: usize = files
        .iter()
        .map(|c| c["entries"].as_array().map_or(0, Vec::len))
        .sum();
    // One case per listed tensor plus one per file for its `model_sampling.sigmas` table.
    let listed = entries + files.len();
    let results = schedulers::run(&dir).expect("schedulers folder readable");
    let failed = flux_parity::failure_lines(&results);
    assert!(
        failed.is_empty(),
        "{} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(entries > 0, "manifest lists no scheduler tensors");
    assert_eq!(results.len(), listed, "cases run vs tensors listed");
}
