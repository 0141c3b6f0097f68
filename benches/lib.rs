//! criterion benches of flux-kernels live beside this file, one per subject
//! (`cargo bench -p flux-benches --bench NAME`).
