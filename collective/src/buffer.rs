//! Typed buffers handed to collectives, and the reduction kernels that work on them.
//!
//! A [`Communicator`](crate::Communicator) is a trait object, so its methods cannot be generic;
//! they take [`BufferMut`] and [`BufferRef`], enums over the supported element types, and
//! implementations dispatch once per call to code generic over the sealed [`Element`] trait.
//!
//! Reductions always accumulate in `f32`: low-precision values are widened, summed, and rounded
//! back exactly once, so the error of a bf16 or f16 all-reduce does not grow with the number of
//! ranks.

use std::fmt;

use half::{bf16, f16};

/// The element types collectives support.
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

/// How a reduction combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// The element-wise sum over ranks.
    Sum,
    /// The element-wise sum divided by the world size (computed in `f32` before rounding).
    Average,
}

mod sealed {
    /// Keeps [`super::Element`] closed to the types this crate knows how to send.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// An element type collectives can move and reduce: `f32`, [`bf16`] or [`f16`](struct@f16).
pub trait Element: sealed::Sealed + bytemuck::Pod + Send + Sync + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;

    /// Widens the value to `f32` (exact for every supported type).
    fn to_f32(self) -> f32;

    /// Rounds an `f32` to this type (round to nearest even).
    fn from_f32(value: f32) -> Self;

    /// Wraps a mutable slice as a [`BufferMut`].
    fn buffer_mut(slice: &mut [Self]) -> BufferMut<'_>;

    /// Wraps a slice as a [`BufferRef`].
    fn buffer_ref(slice: &[Self]) -> BufferRef<'_>;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(value: f32) -> Self {
        value
    }
    fn buffer_mut(slice: &mut [Self]) -> BufferMut<'_> {
        BufferMut::F32(slice)
    }
    fn buffer_ref(slice: &[Self]) -> BufferRef<'_> {
        BufferRef::F32(slice)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(value: f32) -> Self {
        bf16::from_f32(value)
    }
    fn buffer_mut(slice: &mut [Self]) -> BufferMut<'_> {
        BufferMut::Bf16(slice)
    }
    fn buffer_ref(slice: &[Self]) -> BufferRef<'_> {
        BufferRef::Bf16(slice)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
    fn buffer_mut(slice: &mut [Self]) -> BufferMut<'_> {
        BufferMut::F16(slice)
    }
    fn buffer_ref(slice: &[Self]) -> BufferRef<'_> {
        BufferRef::F16(slice)
    }
}

/// A mutable buffer of one of the supported element types, as collectives take it.
///
/// Built from a slice with `.into()`: `comm.all_reduce(gradients.as_mut_slice().into(), op)`.
#[derive(Debug)]
pub enum BufferMut<'a> {
    /// `f32` elements.
    F32(&'a mut [f32]),
    /// `bf16` elements.
    Bf16(&'a mut [bf16]),
    /// `f16` elements.
    F16(&'a mut [f16]),
}

/// A read-only buffer of one of the supported element types.
#[derive(Debug, Clone, Copy)]
pub enum BufferRef<'a> {
    /// `f32` elements.
    F32(&'a [f32]),
    /// `bf16` elements.
    Bf16(&'a [bf16]),
    /// `f16` elements.
    F16(&'a [f16]),
}

impl BufferMut<'_> {
    /// Returns the element type.
    pub fn dtype(&self) -> DType {
        match self {
            BufferMut::F32(_) => DType::F32,
            BufferMut::Bf16(_) => DType::Bf16,
            BufferMut::F16(_) => DType::F16,
        }
    }

    /// Returns the number of elements.
    pub fn len(&self) -> usize {
        match self {
            BufferMut::F32(slice) => slice.len(),
            BufferMut::Bf16(slice) => slice.len(),
            BufferMut::F16(slice) => slice.len(),
        }
    }

    /// Returns whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns a shorter-lived mutable view of the same buffer, so it can be passed to a
    /// collective and used again afterwards.
    pub fn reborrow(&mut self) -> BufferMut<'_> {
        match self {
            BufferMut::F32(slice) => BufferMut::F32(slice),
            BufferMut::Bf16(slice) => BufferMut::Bf16(slice),
            BufferMut::F16(slice) => BufferMut::F16(slice),
        }
    }

    /// Returns a read-only view of the same buffer.
    pub fn as_ref(&self) -> BufferRef<'_> {
        match self {
            BufferMut::F32(slice) => BufferRef::F32(slice),
            BufferMut::Bf16(slice) => BufferRef::Bf16(slice),
            BufferMut::F16(slice) => BufferRef::F16(slice),
        }
    }
}

impl BufferRef<'_> {
    /// Returns the element type.
    pub fn dtype(&self) -> DType {
        match self {
            BufferRef::F32(_) => DType::F32,
            BufferRef::Bf16(_) => DType::Bf16,
            BufferRef::F16(_) => DType::F16,
        }
    }

    /// Returns the number of elements.
    pub fn len(&self) -> usize {
        match self {
            BufferRef::F32(slice) => slice.len(),
            BufferRef::Bf16(slice) => slice.len(),
            BufferRef::F16(slice) => slice.len(),
        }
    }

    /// Returns whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a, T: Element> From<&'a mut [T]> for BufferMut<'a> {
    fn from(slice: &'a mut [T]) -> Self {
        T::buffer_mut(slice)
    }
}

impl<'a, T: Element> From<&'a mut Vec<T>> for BufferMut<'a> {
    fn from(vector: &'a mut Vec<T>) -> Self {
        T::buffer_mut(vector.as_mut_slice())
    }
}

impl<'a, T: Element> From<&'a [T]> for BufferRef<'a> {
    fn from(slice: &'a [T]) -> Self {
        T::buffer_ref(slice)
    }
}

impl<'a, T: Element> From<&'a Vec<T>> for BufferRef<'a> {
    fn from(vector: &'a Vec<T>) -> Self {
        T::buffer_ref(vector.as_slice())
    }
}

/// Writes `source` widened to `f32` into `destination` (same lengths).
pub(crate) fn widen<T: Element>(destination: &mut [f32], source: &[T]) {
    for (widened, value) in destination.iter_mut().zip(source) {
        *widened = value.to_f32();
    }
}

/// Adds `local`, widened to `f32`, into the partial sums `partial` (same lengths).
pub(crate) fn accumulate<T: Element>(partial: &mut [f32], local: &[T]) {
    for (sum, value) in partial.iter_mut().zip(local) {
        *sum += value.to_f32();
    }
}

/// Completes a reduction in place: `values[i] = round((values[i] + partial[i]) / divisor)`, where
/// `values` holds this rank's own contribution and `partial` the other ranks' sum.
pub(crate) fn finish_in_place<T: Element>(values: &mut [T], partial: &[f32], divisor: Option<f32>) {
    match divisor {
        None => {
            for (value, sum) in values.iter_mut().zip(partial) {
                *value = T::from_f32(value.to_f32() + sum);
            }
        }
        Some(divisor) => {
            for (value, sum) in values.iter_mut().zip(partial) {
                *value = T::from_f32((value.to_f32() + sum) / divisor);
            }
        }
    }
}

/// Completes a reduction into a separate output: `output[i] = round((local[i] + partial[i]) /
/// divisor)`.
pub(crate) fn finish_into<T: Element>(
    output: &mut [T],
    local: &[T],
    partial: &[f32],
    divisor: Option<f32>,
) {
    match divisor {
        None => {
            for ((out, value), sum) in output.iter_mut().zip(local).zip(partial) {
                *out = T::from_f32(value.to_f32() + sum);
            }
        }
        Some(divisor) => {
            for ((out, value), sum) in output.iter_mut().zip(local).zip(partial) {
                *out = T::from_f32((value.to_f32() + sum) / divisor);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_report_dtype_and_length() {
        let mut values = vec![bf16::ONE; 3];
        let mut buffer: BufferMut<'_> = (&mut values).into();
        assert_eq!(buffer.dtype(), DType::Bf16);
        assert_eq!(buffer.len(), 3);
        assert_eq!(buffer.reborrow().as_ref().len(), 3);
        let empty: BufferRef<'_> = (&[] as &[f16]).into();
        assert!(empty.is_empty());
        assert_eq!(empty.dtype().size_bytes(), 2);
    }

    #[test]
    fn low_precision_finish_rounds_once() {
        // bf16 spacing at 1.0 is 2^-7. Rounding after every addition of 2^-9 would return 1.0
        // each time; rounding once returns the value nearest to 1 + 3 * 2^-9, which is 1 + 2^-7.
        let mut partial = vec![0.0_f32];
        for _ in 0..3 {
            accumulate(&mut partial, &[bf16::from_f32(2f32.powi(-9))]);
        }
        let mut values = [bf16::ONE];
        finish_in_place(&mut values, &partial, None);
        assert_eq!(values[0].to_f32(), 1.0 + 2f32.powi(-7));
    }

    #[test]
    fn average_divides_after_summing() {
        let mut partial = vec![0.0_f32; 2];
        widen(&mut partial, &[f16::from_f32(3.0), f16::from_f32(-1.0)]);
        let mut output = [f16::ZERO; 2];
        finish_into(
            &mut output,
            &[f16::from_f32(1.0), f16::from_f32(-2.0)],
            &partial,
            Some(2.0),
        );
        assert_eq!(output.map(f16::to_f32), [2.0, -1.5]);
    }
}
