//! The tensor handle: device storage plus shape and element type.

use crate::{Backend, DType};

/// A dense, contiguous, row-major tensor living on backend `B`.
///
/// Tensors are not `Clone`: copying device memory is explicit (`SamplerOps::copy`).
pub struct Tensor<B: Backend> {
    storage: B::Storage,
    shape: Vec<usize>,
    dtype: DType,
}

impl<B: Backend> Tensor<B> {
    /// Assembles a tensor from backend storage. Only backends call this; they guarantee that
    /// `storage` holds `shape.iter().product()` elements of `dtype`.
    pub fn from_parts(storage: B::Storage, shape: Vec<usize>, dtype: DType) -> Self {
        Self {
            storage,
            shape,
            dtype,
        }
    }

    /// The shape (row-major).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The backend storage.
    pub fn storage(&self) -> &B::Storage {
        &self.storage
    }

    /// The backend storage, mutably.
    pub fn storage_mut(&mut self) -> &mut B::Storage {
        &mut self.storage
    }

    /// Splits the tensor into storage, shape and dtype.
    pub fn into_parts(self) -> (B::Storage, Vec<usize>, DType) {
        (self.storage, self.shape, self.dtype)
    }

    /// Reinterprets the shape without touching memory (same element count required).
    pub fn reshape(mut self, shape: &[usize]) -> crate::Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(crate::KernelError::ShapeMismatch {
                op: "reshape",
                expected: self.shape.clone(),
                found: shape.to_vec(),
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}
