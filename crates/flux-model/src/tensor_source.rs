//! Where the autoencoder and the text encoders get their parameters: any map from tensor name to
//! backend tensor, checked for presence and shape when a network is built.

use flux_kernels::{Backend, KernelError, Tensor};
use std::collections::HashMap;

/// An error building or running the autoencoder or a text encoder.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A parameter the network needs is not in the weights.
    #[error("missing tensor `{name}`{hint}")]
    Missing { name: String, hint: String },
    /// A parameter has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A configuration value or an input does not fit the network.
    #[error("{0}")]
    Invalid(String),
    /// A backend op failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// A named set of parameter tensors on backend `B`.
pub trait TensorSource<B: Backend> {
    /// Whether `name` is present.
    fn contains(&self, name: &str) -> bool;

    /// Takes the tensor `name` out of the source (each parameter is used once).
    fn take(&mut self, name: &str) -> Option<Tensor<B>>;

    /// Some names of the source, for error hints.
    fn sample_names(&self, n: usize) -> Vec<String>;

    /// The tensor `name`, which must have `shape`.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor<B>, NetError> {
        let t = self.take(name).ok_or_else(|| NetError::Missing {
            name: name.into(),
            hint: {
                let names = self.sample_names(3);
                if names.is_empty() {
                    " (the weights are empty)".into()
                } else {
                    format!(" (the weights hold e.g. {})", names.join(", "))
                }
            },
        })?;
        if t.shape() != shape {
            return Err(NetError::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t)
    }
}

/// A source backed by a hash map (filled by a loader, a test, or a bench with random values).
#[derive(Debug)]
pub struct MapSource<B: Backend> {
    tensors: HashMap<String, Tensor<B>>,
}

impl<B: Backend> Default for MapSource<B> {
    fn default() -> Self {
        Self {
            tensors: HashMap::new(),
        }
    }
}

impl<B: Backend> MapSource<B> {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor<B>) {
        self.tensors.insert(name.into(), t);
    }

    /// Number of tensors left.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no tensor is left.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

impl<B: Backend> TensorSource<B> for MapSource<B> {
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn take(&mut self, name: &str) -> Option<Tensor<B>> {
        self.tensors.remove(name)
    }

    fn sample_names(&self, n: usize) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort_unstable();
        v.truncate(n);
        v
    }
}

/// Finds which of `prefixes` (tried in order) the source uses, by probing for `probe`.
pub fn detect_prefix<B: Backend>(
    src: &dyn TensorSource<B>,
    prefixes: &[&'static str],
    probe: &str,
) -> Option<&'static str> {
    prefixes
        .iter()
        .copied()
        .find(|p| src.contains(&format!("{p}{probe}")))
}

/// A source of deterministic pseudo-random parameters for `shapes` (benches and tests):
/// matrices and conv kernels uniform with variance `1/fan_in`, norm weights near 1, other
/// vectors near 0.
pub fn random_source<B: Backend>(
    be: &B,
    shapes: &[(String, Vec<usize>)],
    seed: u64,
    dtype: flux_kernels::DType,
) -> Result<MapSource<B>, NetError> {
    let mut state = seed;
    let mut next = move || {
        // SplitMix64 to a uniform value in [-1, 1).
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    };
    let mut src = MapSource::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            let a = (3.0 / fan_in.max(1) as f64).sqrt();
            (0..n).map(|_| a * next()).collect()
        } else if name.ends_with("norm.weight")
            || name.contains("norm1.weight")
            || name.contains("norm2.weight")
            || name.contains("norm_out.weight")
            || name.contains("layer_norm")
        {
            (0..n).map(|_| 1.0 + 0.1 * next()).collect()
        } else {
            (0..n).map(|_| 0.05 * next()).collect()
        };
        let t = be.upload(flux_kernels::HostData::F64(&v), shape, dtype)?;
        src.insert(name.clone(), t);
    }
    Ok(src)
}
