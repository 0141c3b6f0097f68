//! Safetensors checkpoints, memory-mapped and validated before use.
//!
//! [`Weights`] opens one file, a list of shards or a directory, checks every header (dtype, shape,
//! byte ranges inside the file and non-overlapping, no absurd ranks or dimensions) and hands
//! tensors to a backend without copying them: the CPU backend keeps a range of the mapping.
//! Tensors can be renamed, prefixes stripped and several stored tensors joined along their first
//! dimension, which is how other key layouts (ComfyUI, diffusers) are mapped onto one set of
//! names.

use flux_kernels::{Backend, ByteView, DType, HostData, KernelError, ModelOps, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most dimensions a stored tensor may have.
const MAX_RANK: usize = 8;
/// Largest single dimension accepted (anything bigger is a corrupt or hostile header).
const MAX_DIM: usize = 1 << 36;
/// How the shard index of a sharded checkpoint is named (`model.safetensors.index.json`).
const INDEX_SUFFIX: &str = ".safetensors.index.json";

/// An error loading weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// A file could not be opened or mapped.
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    /// A file is not a valid safetensors file.
    #[error("{path}: invalid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    /// A tensor the model needs is absent.
    #[error("tensor {name} not found in {files}")]
    Missing { name: String, files: String },
    /// A tensor has another shape than the model needs.
    #[error("tensor {name}: expected shape {expected:?}, found {found:?} (in {files})")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        files: String,
    },
    /// A tensor is stored in a dtype the loader cannot use.
    #[error("tensor {name}: unsupported dtype {dtype} (in {files})")]
    DType {
        name: String,
        dtype: String,
        files: String,
    },
    /// A shard index (`*.safetensors.index.json`) is unreadable or does not match its shards.
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },
    /// The model configuration cannot be derived from the tensors.
    #[error("{0}")]
    Config(String),
    /// A backend operation failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// Where one stored tensor's bytes are.
#[derive(Clone, Debug)]
struct Piece {
    file: usize,
    start: usize,
    len: usize,
}

/// One tensor: dtype, shape and the byte ranges that make it up (several when joined).
#[derive(Clone, Debug)]
struct Entry {
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
    pieces: Vec<Piece>,
}

struct File {
    path: PathBuf,
    bytes: flux_kernels::model_ops::ByteOwner,
}

/// The tensors of one or more safetensors files.
#[derive(Clone)]
pub struct Weights {
    files: Arc<Vec<File>>,
    entries: HashMap<String, Entry>,
    dir: Option<PathBuf>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files_desc())
            .field("tensors", &self.entries.len())
            .finish_non_exhaustive()
    }
}

fn map_dtype(d: safetensors::Dtype) -> std::result::Result<DType, String> {
    match d {
        safetensors::Dtype::F64 => Ok(DType::F64),
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::F16 => Ok(DType::F16),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::F8_E4M3 => Ok(DType::F8E4M3),
        other => Err(format!("{other:?}")),
    }
}

/// Parses and validates a safetensors header over the whole file `bytes`.
fn parse(path: &Path, bytes: &[u8], file: usize) -> Result<Vec<(String, Entry)>, WeightError> {
    let fmt = |message: String| WeightError::Format {
        path: path.to_path_buf(),
        message,
    };
    // The crate checks the header length against the file, the JSON, that the data ranges are
    // contiguous, non-overlapping and end exactly at the end of the file, and that every range
    // holds exactly shape x dtype bytes (with overflow checks).
    let (n, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| fmt(e.to_string()))?;
    let base = 8 + n;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        if info.shape.len() > MAX_RANK {
            return Err(fmt(format!(
                "tensor {name}: rank {} exceeds {MAX_RANK}",
                info.shape.len()
            )));
        }
        if let Some(d) = info.shape.iter().find(|&&d| d > MAX_DIM) {
            return Err(fmt(format!(
                "tensor {name}: dimension {d} is absurdly large"
            )));
        }
        let (s, e) = info.data_offsets;
        let start = base
            .checked_add(s)
            .filter(|&st| e >= s && st.checked_add(e - s).is_some_and(|end| end <= bytes.len()))
            .ok_or_else(|| {
                fmt(format!(
                    "tensor {name}: byte range {s}..{e} outside the file"
                ))
            })?;
        out.push((
            name,
            Entry {
                dtype: map_dtype(info.dtype),
                shape: info.shape.clone(),
                pieces: vec![Piece {
                    file,
                    start,
                    len: e - s,
                }],
            },
        ));
    }
    Ok(out)
}

#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<flux_kernels::model_ops::ByteOwner, WeightError> {
    let io = |e: std::io::Error| WeightError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok(Arc::new(Vec::<u8>::new()));
    }
    // SAFETY: the mapping is read-only and lives as long as every tensor that uses it (they hold
    // the Arc). Checkpoint files are not expected to change while loaded; if another process
    // truncated one, reads could fault, which is the accepted contract of memory-mapped loading
    // (the same as every safetensors loader that maps files).
    let m = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
    Ok(Arc::new(m))
}

impl Weights {
    /// Opens a file, a shard index (`*.safetensors.index.json`), or a directory: its
    /// `transformer/` subfolder if present; in the folder, its shard index if it has one, else
    /// every `*.safetensors` file in it (shards).
    pub fn open(path: &Path) -> Result<Self, WeightError> {
        let io = |e: std::io::Error| WeightError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if path.is_dir() {
            let dir = if path.join("transformer").is_dir() {
                path.join("transformer")
            } else {
                path.to_path_buf()
            };
            let mut files = Vec::new();
            let mut indexes = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(io)?.flatten() {
                let p = entry.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(INDEX_SUFFIX) {
                    indexes.push(p);
                } else if p.extension().is_some_and(|x| x == "safetensors") {
                    files.push(p);
                }
            }
            indexes.sort();
            files.sort();
            match indexes.as_slice() {
                [one] => return Self::open_index(one),
                [] => {}
                _ => {
                    return Err(WeightError::Io {
                        path: dir,
                        message: format!(
                            "several shard indexes ({}); pass the one to use",
                            indexes
                                .iter()
                                .filter_map(|p| p.file_name())
                                .map(|n| n.to_string_lossy().into_owned())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
            }
            if files.is_empty() {
                return Err(WeightError::Io {
                    path: dir,
                    message: "no .safetensors file in this directory".into(),
                });
            }
            let mut w = Self::open_files(&files)?;
            w.dir = Some(dir);
            Ok(w)
        } else if path.to_string_lossy().ends_with(INDEX_SUFFIX) {
            Self::open_index(path)
        } else {
            Self::open_files(&[path.to_path_buf()])
        }
    }

    /// Opens the shards a `*.safetensors.index.json` names (its `weight_map`: tensor name ->
    /// shard file in the same folder) and checks that every tensor it lists is in the shard it
    /// names.
    pub fn open_index(index: &Path) -> Result<Self, WeightError> {
        let bad = |message: String| WeightError::Index {
            path: index.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(index).map_err(|e| WeightError::Io {
            path: index.to_path_buf(),
            message: e.to_string(),
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON shard index: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| bad("no `weight_map` object (tensor name -> shard file)".into()))?;
        let dir = index.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut wanted: Vec<(&str, &str)> = Vec::with_capacity(map.len());
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                bad(format!(
                    "weight_map entry `{name}`: expected a shard file name, found {file}"
                ))
            })?;
            let plain = Path::new(file)
                .file_name()
                .is_some_and(|n| n == std::ffi::OsStr::new(file));
            if !plain {
                return Err(bad(format!(
                    "weight_map entry `{name}`: shard `{file}` is not a file name in the index's folder"
                )));
            }
            wanted.push((name, file));
        }
        let mut shards: Vec<&str> = wanted.iter().map(|(_, f)| *f).collect();
        shards.sort_unstable();
        shards.dedup();
        if shards.is_empty() {
            return Err(bad("the weight_map is empty".into()));
        }
        let mut paths = Vec::with_capacity(shards.len());
        for s in &shards {
            let p = dir.join(s);
            if !p.is_file() {
                return Err(bad(format!(
                    "names shard {s}, which does not exist (looked for {})",
                    p.display()
                )));
            }
            paths.push(p);
        }
        let mut w = Self::open_files(&paths)?;
        for (name, file) in wanted {
            let shard = shards.binary_search(&file).unwrap_or(usize::MAX);
            let stored = w
                .entries
                .get(name)
                .and_then(|e| e.pieces.first())
                .map(|p| p.file);
            match stored {
                Some(i) if i == shard => {}
                Some(i) => {
                    return Err(bad(format!(
                        "tensor {name} is listed in shard {file} but stored in {}",
                        shards.get(i).copied().unwrap_or("another shard")
                    )));
                }
                None => {
                    return Err(bad(format!(
                        "tensor {name} is listed in shard {file} but that shard does not hold it"
                    )));
                }
            }
        }
        w.dir = Some(dir);
        Ok(w)
    }

    /// Opens the given files as one set of tensors (a name in two files is an error).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, WeightError> {
        let mut files = Vec::new();
        for p in paths {
            files.push(File {
                path: p.clone(),
                bytes: map_file(p)?,
            });
        }
        let dir = paths
            .first()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf);
        Self::from_files(files, dir)
    }

    /// Tensors of an in-memory safetensors file (`label` names it in errors).
    pub fn from_bytes(bytes: Vec<u8>, label: &str) -> Result<Self, WeightError> {
        Self::from_files(
            vec![File {
                path: PathBuf::from(label),
                bytes: Arc::new(bytes),
            }],
            None,
        )
    }

    fn from_files(files: Vec<File>, dir: Option<PathBuf>) -> Result<Self, WeightError> {
        let mut entries = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for (name, e) in parse(&f.path, (*f.bytes).as_ref(), i)? {
                if entries.contains_key(&name) {
                    return Err(WeightError::Format {
                        path: f.path.clone(),
                        message: format!("tensor {name} is also stored in another shard"),
                    });
                }
                entries.insert(name, e);
            }
        }
        Ok(Self {
            files: Arc::new(files),
            entries,
            dir,
        })
    }

    /// The directory the files came from (where a `config.json` may sit).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn files_desc(&self) -> String {
        let v: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        v.join(", ")
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The stored dtype of `name` (`None` when absent or of an unsupported dtype).
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.entries.get(name).and_then(|e| e.dtype.clone().ok())
    }

    /// The same tensors restricted to names starting with `prefix`, with the prefix removed.
    pub fn strip_prefix(&self, prefix: &str) -> Self {
        let entries = self
            .entries
            .iter()
            .filter_map(|(k, e)| k.strip_prefix(prefix).map(|s| (s.to_string(), e.clone())))
            .collect();
        Self {
            files: self.files.clone(),
            entries,
            dir: self.dir.clone(),
        }
    }

    /// Builds a new set of names: each `(new, sources)` pair joins the sources along dim 0
    /// (one source is a plain rename). With `swap_halves` the single source's two halves along
    /// dim 0 are exchanged. Names not mentioned are dropped.
    pub fn remap(&self, plan: &[(String, Vec<String>, bool)]) -> Result<Self, WeightError> {
        let mut entries = HashMap::new();
        for (new, sources, swap) in plan {
            let mut joined: Option<Entry> = None;
            for s in sources {
                let e = self.entry(s)?.clone();
                joined = Some(match joined {
                    None => e,
                    Some(mut j) => {
                        if j.dtype != e.dtype
                            || j.shape.get(1..) != e.shape.get(1..)
                            || e.shape.is_empty()
                        {
                            return Err(WeightError::Shape {
                                name: s.clone(),
                                expected: j.shape.clone(),
                                found: e.shape.clone(),
                                files: self.files_desc(),
                            });
                        }
                        j.shape[0] += e.shape[0];
                        j.pieces.extend(e.pieces);
                        j
                    }
                });
            }
            let Some(mut e) = joined else { continue };
            if *swap {
                e = Self::swapped(new, e)?;
            }
            entries.insert(new.clone(), e);
        }
        Ok(Self {
            files: self.files.clone(),
            entries,
            dir: self.dir.clone(),
        })
    }

    /// The same tensors with some stored shapes replaced by others of the same element count
    /// (e.g. a linear weight `[o, i]` read as a 1x1 convolution `[o, i, 1, 1]`).
    pub fn reshaped(&self, changes: &[(String, Vec<usize>)]) -> Result<Self, WeightError> {
        let mut entries = self.entries.clone();
        for (name, shape) in changes {
            let e = entries.get_mut(name).ok_or_else(|| WeightError::Missing {
                name: name.clone(),
                files: self.files_desc(),
            })?;
            if e.shape.iter().product::<usize>() != shape.iter().product::<usize>() {
                return Err(WeightError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: e.shape.clone(),
                    files: self.files_desc(),
                });
            }
            e.shape.clone_from(shape);
        }
        Ok(Self {
            files: self.files.clone(),
            entries,
            dir: self.dir.clone(),
        })
    }

    fn swapped(name: &str, e: Entry) -> Result<Entry, WeightError> {
        let rows = e.shape.first().copied().unwrap_or(0);
        if e.pieces.len() != 1 || !rows.is_multiple_of(2) {
            return Err(WeightError::Config(format!(
                "tensor {name}: cannot swap the halves of shape {:?}",
                e.shape
            )));
        }
        let p = &e.pieces[0];
        let h = p.len / 2;
        Ok(Entry {
            pieces: vec![
                Piece {
                    file: p.file,
                    start: p.start + h,
                    len: p.len - h,
                },
                Piece {
                    file: p.file,
                    start: p.start,
                    len: h,
                },
            ],
            ..e
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightError> {
        self.entries.get(name).ok_or_else(|| WeightError::Missing {
            name: name.to_string(),
            files: self.files_desc(),
        })
    }

    /// The bytes of an entry: a view into the mapping, or a joined copy for multi-piece entries.
    fn bytes(&self, e: &Entry) -> Result<ByteView, WeightError> {
        if let [p] = e.pieces.as_slice() {
            return Ok(ByteView::new(
                self.files[p.file].bytes.clone(),
                p.start,
                p.len,
            )?);
        }
        let mut v = Vec::with_capacity(e.pieces.iter().map(|p| p.len).sum());
        for p in &e.pieces {
            let b = ByteView::new(self.files[p.file].bytes.clone(), p.start, p.len)?;
            v.extend_from_slice(b.bytes());
        }
        Ok(ByteView::from_vec(v))
    }

    fn checked(&self, name: &str, shape: &[usize]) -> Result<(&Entry, DType), WeightError> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(WeightError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
                files: self.files_desc(),
            });
        }
        let dtype = e.dtype.clone().map_err(|d| WeightError::DType {
            name: name.to_string(),
            dtype: d,
            files: self.files_desc(),
        })?;
        Ok((e, dtype))
    }

    /// The fp8 scale stored beside `name` (`<layer>.scale_weight`), if any.
    fn scale_for(&self, name: &str) -> Result<Option<f32>, WeightError> {
        let Some(base) = name.strip_suffix(".weight") else {
            return Ok(None);
        };
        let sname = format!("{base}.scale_weight");
        if !self.contains(&sname) {
            return Ok(None);
        }
        let v = self.host_f64(&sname)?;
        match v.as_slice() {
            [s] => Ok(Some(*s as f32)),
            _ => Err(WeightError::Config(format!(
                "tensor {sname}: expected one scale value, found {}",
                v.len()
            ))),
        }
    }

    /// The tensor `name`, which must have `shape`, in its stored dtype (no copy on the CPU).
    pub fn get<B: Backend>(
        &self,
        backend: &B,
        name: &str,
        shape: &[usize],
    ) -> Result<Tensor<B>, WeightError> {
        let (e, dtype) = self.checked(name, shape)?;
        let scale = if dtype == DType::F8E4M3 {
            self.scale_for(name)?
        } else {
            None
        };
        Ok(backend.upload_weight(self.bytes(e)?, shape, dtype, scale)?)
    }

    /// The tensor `name`, which must have `shape`, converted to the compute dtype `dtype`
    /// (for small tensors: biases, norm scales).
    pub fn get_as<B: Backend>(
        &self,
        backend: &B,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor<B>, WeightError> {
        let t = self.get(backend, name, shape)?;
        Ok(ModelOps::cast(backend, &t, dtype)?)
    }

    /// The tensor `name` widened to f64 on the host (any shape).
    pub fn host_f64(&self, name: &str) -> Result<Vec<f64>, WeightError> {
        let shape = self.entry(name)?.shape.clone();
        let (e, dtype) = self.checked(name, &shape)?;
        let b = self.bytes(e)?;
        let cpu = flux_kernels::Cpu;
        let t = cpu.upload_weight(b, &shape, dtype, None)?;
        Ok(flux_kernels::SamplerOps::download_f64(&cpu, &t)?)
    }
}

/// Uploads host f64 values in the compute dtype (helper for models).
pub fn upload<B: Backend>(
    b: &B,
    v: &[f64],
    shape: &[usize],
    dtype: DType,
) -> Result<Tensor<B>, WeightError> {
    Ok(b.upload(HostData::F64(v), shape, dtype)?)
}
