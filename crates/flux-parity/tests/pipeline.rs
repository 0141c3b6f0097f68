//! The whole img2img chain against `flux-tiny/pipeline-comfy` (or `$FLUX_REFERENCE_DIR`):
//! every case the manifest lists, in float64 and float32.

use flux_parity::{RunOptions, data::read_json, pipeline};
use std::path::PathBuf;

fn folder(name: &str) -> PathBuf {
    flux_parity::reference_folder(&format!("flux-tiny/{name}"))
}

#[test]
fn every_comfy_pipeline_case_matches_the_reference() {
    let dir = folder("pipeline-comfy");
    let manifest = read_json(&dir.join("manifest.json")).expect("manifest readable");
    let listed = manifest["cases"].as_array().map_or(0, Vec::len);
    let results = pipeline::run_comfy(&dir, &RunOptions::default()).expect("folder readable");
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
    assert!(listed > 0, "the manifest lists no cases");
    // One f64 and one f32 run per listed case.
    assert_eq!(results.len(), 2 * listed, "runs vs cases listed");
}
