//! Low-level tensor layer of flux-kernels: the [`Backend`] trait every device implements,
//! the [`Tensor`] handle, element types, and the CPU backend that is the reference for the
//! others.
//!
//! The trait is split by consumer: [`SamplerOps`] holds what samplers need (allocation,
//! transfers, the fused linear combination, reductions). Model ops join as further
//! supertraits of [`Backend`], so sampler code never changes when they do.

pub mod backend;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod conv_ops;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod model_ops;
pub mod shapes;
pub mod simd;
pub mod tensor;

pub use backend::{Backend, HostData, MAX_LINCOMB_TERMS, SamplerOps};
pub use conv_ops::{Conv2dParams, ConvOps, GroupMoments};
pub use cpu::Cpu;
pub use dtype::DType;
pub use error::{KernelError, Result};
pub use model_ops::{Activation, BinaryOp, ByteView, ModelOps};
pub use tensor::Tensor;
