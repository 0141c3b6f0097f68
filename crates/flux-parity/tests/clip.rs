//! The CLIP encoder against the `flux-tiny/clip` reference folder (or `$FLUX_REFERENCE_DIR`).

use flux_kernels::Cpu;
use flux_parity::clip;
use std::path::PathBuf;

fn folder() -> PathBuf {
    flux_parity::reference_folder("flux-tiny/clip")
}

#[test]
fn the_clip_case_matches_the_reference() {
    let results = clip::run(&Cpu, &folder()).expect("clip folder readable");
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
