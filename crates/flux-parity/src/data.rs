//! Reading reference folders: manifests and safetensors files of golden tensors.

use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An error reading reference data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    /// A file is not in the expected format.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
}

impl DataError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, e: &std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    /// A format error on `path`.
    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// The kind of a reference folder: `manifest.json`'s `kind`, `schedulers` for a folder of
/// `schedulers_*.safetensors` files, or `None` when it is not a reference folder.
pub fn folder_kind(dir: &Path) -> Result<Option<String>, DataError> {
    let manifest = dir.join("manifest.json");
    if manifest.is_file() {
        let v = read_json(&manifest)?;
        if let Some(k) = v.get("kind").and_then(serde_json::Value::as_str) {
            return Ok(Some(k.to_string()));
        }
        // The sampler and scheduler manifests predate the `kind` field.
        if v.get("cases").is_some() && has_file_with(dir, "schedulers_", ".safetensors") {
            return Ok(Some("schedulers".into()));
        }
        if v.get("cases").is_some() {
            return Ok(Some("samplers".into()));
        }
        return Err(DataError::format(
            &manifest,
            "manifest has neither `kind` nor `cases`",
        ));
    }
    if has_file_with(dir, "schedulers_", ".safetensors") {
        return Ok(Some("schedulers".into()));
    }
    Ok(None)
}

fn has_file_with(dir: &Path, prefix: &str, suffix: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(std::result::Result::ok).any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(prefix) && n.ends_with(suffix)
        })
    })
}

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, &e))?;
    serde_json::from_str(&text).map_err(|e| DataError::format(path, format!("invalid JSON: {e}")))
}

/// A golden tensor widened to f64 (integers converted exactly where they fit).
#[derive(Clone, Debug)]
pub struct Golden {
    /// Shape.
    pub shape: Vec<usize>,
    /// The dtype stored in the file.
    pub dtype: Dtype,
    /// Values widened to f64.
    pub data: Vec<f64>,
}

/// All tensors of one safetensors file, widened to f64.
#[derive(Debug)]
pub struct GoldenFile {
    path: PathBuf,
    tensors: HashMap<String, Golden>,
}

impl GoldenFile {
    /// Reads every tensor of `path`.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, &e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| DataError::format(path, format!("invalid safetensors: {e}")))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = widen(view.dtype(), view.data()).ok_or_else(|| {
                DataError::format(
                    path,
                    format!("tensor {name}: unsupported dtype {:?}", view.dtype()),
                )
            })?;
            tensors.insert(
                name,
                Golden {
                    shape: view.shape().to_vec(),
                    dtype: view.dtype(),
                    data,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// The tensor `name`, or an error naming the file and the tensor.
    pub fn get(&self, name: &str) -> Result<&Golden, DataError> {
        self.tensors
            .get(name)
            .ok_or_else(|| DataError::format(&self.path, format!("missing tensor {name}")))
    }

    /// The tensor `name` if present.
    pub fn try_get(&self, name: &str) -> Option<&Golden> {
        self.tensors.get(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn widen(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f64>> {
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    Some(match dtype {
        Dtype::F64 => chunks::<8>(bytes).map(f64::from_le_bytes).collect(),
        Dtype::F32 => chunks::<4>(bytes)
            .map(|a| f64::from(f32::from_le_bytes(a)))
            .collect(),
        Dtype::F16 => chunks::<2>(bytes)
            .map(|a| half::f16::from_le_bytes(a).to_f64())
            .collect(),
        Dtype::BF16 => chunks::<2>(bytes)
            .map(|a| half::bf16::from_le_bytes(a).to_f64())
            .collect(),
        Dtype::I64 => chunks::<8>(bytes)
            .map(|a| i64::from_le_bytes(a) as f64)
            .collect(),
        Dtype::I32 => chunks::<4>(bytes)
            .map(|a| f64::from(i32::from_le_bytes(a)))
            .collect(),
        _ => return None,
    })
}
