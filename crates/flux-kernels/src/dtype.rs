//! Element types a tensor can hold.

use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE double precision; the CPU backend's exact-parity type.
    F64,
    /// IEEE single precision; the production type for latents and activations.
    F32,
    /// IEEE half precision (weights).
    F16,
    /// bfloat16 (weights).
    BF16,
    /// 8-bit float e4m3fn (weights).
    F8E4M3,
}

impl DType {
    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    /// Lower-case name as used on the command line and in error messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8_e4m3",
        }
    }

    /// Whether the type is used for activations and latents (as opposed to storage-only weights).
    pub const fn is_compute(self) -> bool {
        matches!(self, DType::F64 | DType::F32)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f64" => Ok(DType::F64),
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            "f8_e4m3" | "fp8" => Ok(DType::F8E4M3),
            other => Err(format!(
                "unknown dtype '{other}': expected one of f64, f32, f16, bf16, f8_e4m3"
            )),
        }
    }
}
