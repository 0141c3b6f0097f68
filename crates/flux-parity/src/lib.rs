//! Parity checks against the reference data: one module per manifest `kind`.
//!
//! A reference directory holds a `manifest.json` whose `kind` names its format (scheduler files
//! have none and are recognised by their `schedulers_*.safetensors` files). [`run_dir`] walks a
//! directory recursively, runs every case of every kind it knows, and reports kinds it does not
//! handle as skipped, never as passed.

pub mod bfl;
pub mod clip;
pub mod data;
pub mod pipeline;
pub mod report;
pub mod rng;
pub mod samplers;
pub mod schedulers;
pub mod t5;
pub mod transformer;
pub mod vae;

pub use report::{CaseResult, Outcome, Summary, failure_lines};

use flux_kernels::Backend;
use std::path::{Path, PathBuf};

/// The reference folder `sub` (e.g. `samplers`, `flux-tiny/vae`): under the directory named by
/// `FLUX_REFERENCE_DIR` when that is set, else under the repository's `testdata/`.
pub fn reference_folder(sub: &str) -> PathBuf {
    match std::env::var_os("FLUX_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir).join(sub),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata")
            .join(sub),
    }
}

/// One reference folder found by the walk.
#[derive(Clone, Debug)]
pub struct Folder {
    /// Its path.
    pub path: PathBuf,
    /// Its kind (`manifest.json`'s `kind`, or `schedulers`; empty when `problem` is set).
    pub kind: String,
    /// Why its `manifest.json` could not be read or classified (unreadable, invalid JSON,
    /// neither `kind` nor `cases`): the folder is then one failed result, and the walk goes on.
    pub problem: Option<String>,
}

/// Finds every reference folder under `root` (or `root` itself), sorted by path.
pub fn find_folders(root: &Path) -> Result<Vec<Folder>, data::DataError> {
    let mut out = Vec::new();
    walk(root, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<Folder>) -> Result<(), data::DataError> {
    match data::folder_kind(dir) {
        Ok(Some(kind)) => out.push(Folder {
            path: dir.to_path_buf(),
            kind,
            problem: None,
        }),
        Ok(None) => {}
        Err(e) => out.push(Folder {
            path: dir.to_path_buf(),
            kind: String::new(),
            problem: Some(e.to_string()),
        }),
    }
    let entries = std::fs::read_dir(dir).map_err(|e| data::DataError::io(dir, &e))?;
    let mut subdirs: Vec<PathBuf> = entries
        .filter_map(std::result::Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for d in subdirs {
        walk(&d, out)?;
    }
    Ok(())
}

/// Runs every case of one folder on `be`. Kinds without a checker yield one skipped result;
/// cases that need f64 on a backend without it are reported as skipped.
pub fn run_folder<B: Backend>(be: &B, folder: &Folder) -> Vec<CaseResult> {
    if let Some(problem) = &folder.problem {
        return vec![CaseResult::failed(
            &folder.path.display().to_string(),
            problem,
        )];
    }
    let result = match folder.kind.as_str() {
        "rng" => rng::run(&folder.path),
        "flux-transformer" => transformer::run(be, &folder.path),
        // The sampler cases replay their recorded noise; those whose noise came from the
        // Brownian tree also check the tree's own draws (on the host, whatever the backend).
        "samplers" => samplers::run(be, &folder.path).map(|mut out| {
            match rng::run_brownian(&folder.path) {
                Ok(tree) => out.extend(tree),
                Err(e) => out.push(CaseResult::failed(
                    &format!("{} (brownian tree)", folder.path.display()),
                    &e.to_string(),
                )),
            }
            out
        }),
        "schedulers" => schedulers::run(&folder.path),
        "flux-vae" => vae::run(be, &folder.path),
        "t5-encoder" => t5::run(be, &folder.path),
        "clip-text" => clip::run(be, &folder.path),
        "flux-pipeline-comfy" => pipeline::run_comfy(be, &folder.path),
        "flux-pipeline" => bfl::run(be, &folder.path),
        _ => Ok(vec![CaseResult::skipped(
            &folder.path.display().to_string(),
            &format!("kind '{}' is not checked yet", folder.kind),
        )]),
    };
    result.unwrap_or_else(|e: data::DataError| {
        vec![CaseResult::failed(
            &folder.path.display().to_string(),
            &e.to_string(),
        )]
    })
}

/// Runs every folder under `root` on `be`.
pub fn run_dir<B: Backend>(be: &B, root: &Path) -> Result<Vec<CaseResult>, data::DataError> {
    let folders = find_folders(root)?;
    if folders.is_empty() {
        return Err(data::DataError::Format {
            path: root.to_path_buf(),
            message: "no reference folder (manifest.json or schedulers_*.safetensors) found".into(),
        });
    }
    Ok(folders.iter().flat_map(|f| run_folder(be, f)).collect())
}
