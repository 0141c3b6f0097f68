//! The T5 encoder against the `flux-tiny/t5` reference folder (or `$FLUX_REFERENCE_DIR`).

use flux_kernels::Cpu;
use flux_parity::t5;
use std::path::PathBuf;

fn folder() -> PathBuf {
    flux_parity::reference_folder("flux-tiny/t5")
}

#[test]
fn the_t5_case_matches_the_reference() {
    let results = t5::run(&Cpu, &folder()).expect("t5 folder readable");
    for r in &results {
        eprintln!("{r}");
    }
    // The folder holds one case (no `<case>.` prefix).
    assert_eq!(results.len(), 1, "cases run vs the folder's single case");
    assert!(
        results.iter().all(flux_parity::CaseResult::passed),
        "{}",
        results[0]
    );
}
