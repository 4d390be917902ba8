//! [`DType`]: the element types gradients and parameters travel in. Collectives reduce them and
//! parameter servers accept them on the wire; both take this one definition, so a rank pushes
//! gradients in the type its communicator already uses.

use std::fmt;

/// The element types collectives and parameter servers support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// bfloat16: 8 exponent bits, 8 significant bits.
    Bf16,
    /// IEEE 754 half precision: 5 exponent bits, 11 significant bits.
    F16,
}

impl DType {
    /// Returns the size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }

    /// Returns the lowercase name used in messages and benchmark output (`f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}
