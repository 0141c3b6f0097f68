//! Errors of the kernel layer.

use crate::DType;

/// An error raised by a backend operation.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Operand shapes do not fit the operation.
    #[error("{op}: shape mismatch: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        op: &'static str,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Operand element types do not fit the operation.
    #[error("{op}: dtype mismatch: expected {expected}, found {found}")]
    DTypeMismatch {
        op: &'static str,
        expected: DType,
        found: DType,
    },
    /// The backend cannot run this op on this dtype.
    #[error("backend {backend} does not support {op} on {dtype}")]
    Unsupported {
        backend: String,
        op: &'static str,
        dtype: DType,
    },
    /// A host buffer's length does not match the tensor it is meant for.
    #[error("{op}: host data has {found} elements, the tensor needs {expected}")]
    LengthMismatch {
        op: &'static str,
        expected: usize,
        found: usize,
    },
    /// An argument is out of the op's domain.
    #[error("{op}: {message}")]
    InvalidArgument { op: &'static str, message: String },
    /// A device-level failure (driver, out of memory, lost device).
    #[error("device error: {0}")]
    Device(String),
}

/// Result alias of the kernel layer.
pub type Result<T> = std::result::Result<T, KernelError>;
