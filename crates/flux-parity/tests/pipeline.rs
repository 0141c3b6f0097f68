//! The whole img2img chain against `flux-tiny/pipeline-comfy` (or `$FLUX_REFERENCE_DIR`):
//! every case the manifest lists, in float64 and float32.

use flux_kernels::Cpu;
use flux_parity::{data::read_json, pipeline};
use std::path::PathBuf;

fn folder(name: &str) -> PathBuf {
    flux_parity::reference_folder(&format!("flux-tiny/{name}"))
}

#[test]
fn every_comfy_pipeline_case_matches_the_reference() {
    let dir = folder("pipeline-comfy");
    let manifest = read_json(&dir.join("manifest.json")).expect("manifest readable");
    let listed = manifest["cases"].as_array().map_or(0, Vec::len);
    let results = pipeline::run_comfy(&Cpu, &dir).expect("folder readable");
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

#[test]
fn every_bfl_pipeline_run_matches_the_reference() {
    let dir = folder("pipeline");
    let manifest = read_json(&dir.join("manifest.json")).expect("manifest readable");
    assert_eq!(manifest["kind"], "flux-pipeline");
    let config_name = manifest["config"].as_str().unwrap_or("config.json");
    let config = read_json(&dir.join(config_name)).expect("config readable");
    let listed = config["runs"].as_array().map_or(0, Vec::len);
    assert!(listed > 0, "the config lists no runs");
    let results = flux_parity::bfl::run(&Cpu, &dir).expect("folder readable");
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
    // One f64 and one f32 run per listed run.
    assert_eq!(results.len(), 2 * listed, "runs checked vs runs listed");
}

#[test]
fn bfl_schedule_of_the_dev_run_is_bit_exact() {
    // The first shifted value is 0.99999994, not 1: PyTorch's reciprocal-then-multiply in float32.
    let s = flux_parity::bfl::bfl_schedule(6, 20, true);
    assert_eq!(s[0], 0.99999994);
    assert_eq!(s[6], 0.0);
    let unshifted = flux_parity::bfl::bfl_schedule(6, 20, false);
    assert_eq!(unshifted[0], 1.0);
}
