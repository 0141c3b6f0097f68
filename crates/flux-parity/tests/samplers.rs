//! Sampler parity against the reference data (`$FLUX_REFERENCE_DIR/samplers`, else the repo's
//! `testdata/samplers`): the same checks as `flux parity`.

use flux_kernels::Cpu;
use flux_parity::{CaseResult, samplers};
use flux_samplers::Sampler;
use std::path::PathBuf;
use std::str::FromStr;

fn folder() -> PathBuf {
    flux_parity::reference_folder("samplers")
}

/// `(sampler name, case name)` of every manifest case, in manifest order.
fn manifest_cases() -> Vec<(String, String)> {
    let path = folder().join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
    v["cases"]
        .as_array()
        .expect("manifest has a `cases` array")
        .iter()
        .map(|c| {
            (
                c["sampler"]
                    .as_str()
                    .expect("case has `sampler`")
                    .to_string(),
                c["name"].as_str().expect("case has `name`").to_string(),
            )
        })
        .collect()
}

fn run_all() -> Vec<CaseResult> {
    samplers::run(&Cpu, &folder()).expect("sampler reference folder readable")
}

#[test]
fn every_case_of_an_implemented_sampler_passes() {
    let cases = manifest_cases();
    assert!(!cases.is_empty(), "the manifest lists no cases");
    let results = run_all();
    assert_eq!(results.len(), cases.len(), "one result per manifest case");
    let mut checked = 0;
    let mut failures = Vec::new();
    for ((sampler, name), r) in cases.iter().zip(&results) {
        assert_eq!(&r.name, name, "results come in manifest order");
        let s = Sampler::from_str(sampler).expect("the manifest names known samplers");
        if !s.is_implemented() {
            continue;
        }
        checked += 1;
        if !r.passed() {
            failures.push(r.to_string());
        }
    }
    assert!(checked > 0, "no case of an implemented sampler was run");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_sampler_is_implemented() {
    let missing: Vec<&str> = Sampler::ALL
        .iter()
        .filter(|s| !s.is_implemented())
        .map(|s| s.name())
        .collect();
    assert!(
        missing.is_empty(),
        "{} samplers are not implemented yet: {}",
        missing.len(),
        missing.join(", ")
    );
}

#[test]
fn every_manifest_case_passes() {
    let results = run_all();
    assert_eq!(results.len(), manifest_cases().len());
    let failed = flux_parity::failure_lines(&results);
    assert!(
        failed.is_empty(),
        "{} cases failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
