//! The autoencoder against the `flux-tiny/vae` reference folder (or `$FLUX_REFERENCE_DIR`):
//! every image case, float64 and float32.

use flux_kernels::Cpu;
use flux_parity::{data::read_json, vae};
use std::path::PathBuf;

fn folder() -> PathBuf {
    flux_parity::reference_folder("flux-tiny/vae")
}

#[test]
fn every_vae_case_matches_the_reference() {
    let dir = folder();
    let config = read_json(&dir.join("config.json")).expect("vae config readable");
    let listed = vae::case_names(&config, &dir.join("config.json")).expect("images listed");
    let results = vae::run(&Cpu, &dir).expect("vae folder readable");
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
    assert!(!listed.is_empty(), "config lists no images");
    assert_eq!(results.len(), listed.len(), "cases run vs cases listed");
}
