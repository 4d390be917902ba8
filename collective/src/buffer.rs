//! Typed buffers handed to collectives, and the reduction kernels that work on them.
//!
//! A [`Communicator`](crate::Communicator) is a trait object, so its methods cannot be generic;
//! they take [`BufferMut`] and [`BufferRef`], enums over the supported element types, and
//! implementations dispatch once per call to code generic over the sealed [`Element`] trait.
//!
//! Reductions always accumulate in `f32`: low-precision values are widened, summed, and rounded
//! back exactly once, so the error of a bf16 or f16 all-reduce does not grow with the number of
//! ranks.
//!
//! The kernels allocate nothing and run at memory speed: `f32` and bf16 convert element by
//! element with branch-free integer operations, which the compiler vectorizes; f16 converts
//! blocks of a few hundred elements with `half`'s slice functions (F16C instructions where the
//! processor has them), in `f32` copies that stay in the L1 cache.

use half::{bf16, f16};

/// The element types collectives support (defined with the shared numerics, so that parameter
/// servers take the same one without linking this crate).
pub use cohort_numerics::DType;

/// How a reduction combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// The element-wise sum over ranks.
    Sum,
    /// The element-wise sum divided by the world size (computed in `f32` before rounding).
    Average,
}

mod sealed {
    use half::slice::HalfFloatSliceExt;
    use half::{bf16, f16};

    /// Keeps [`super::Element`] closed to the types this crate knows how to send, and tells the
    /// reduction kernels how to convert them (crate-internal).
    pub trait Sealed: Sized {
        /// Whether [`super::Element::to_f32`] and [`super::Element::from_f32`] are cheap and
        /// branch-free, so that kernels converting one element at a time vectorize (`f32`,
        /// bf16). Otherwise kernels convert blocks with the slice functions below.
        const SCALAR_CONVERSIONS: bool;

        /// Writes `source` widened to `f32` into `destination` (same lengths); exact.
        fn widen_slice(source: &[Self], destination: &mut [f32]);

        /// Writes `source` rounded to this type (to nearest, ties to even) into `destination`
        /// (same lengths).
        fn narrow_slice(source: &[f32], destination: &mut [Self]);
    }

    impl Sealed for f32 {
        const SCALAR_CONVERSIONS: bool = true;
        fn widen_slice(source: &[f32], destination: &mut [f32]) {
            destination.copy_from_slice(source);
        }
        fn narrow_slice(source: &[f32], destination: &mut [f32]) {
            destination.copy_from_slice(source);
        }
    }

    impl Sealed for bf16 {
        const SCALAR_CONVERSIONS: bool = true;
        fn widen_slice(source: &[bf16], destination: &mut [f32]) {
            assert_eq!(source.len(), destination.len());
            for (widened, value) in destination.iter_mut().zip(source) {
                *widened = super::Element::to_f32(*value);
            }
        }
        fn narrow_slice(source: &[f32], destination: &mut [bf16]) {
            assert_eq!(source.len(), destination.len());
            for (narrowed, value) in destination.iter_mut().zip(source) {
                *narrowed = super::Element::from_f32(*value);
            }
        }
    }

    /// `half` converts single f16 values with a processor-feature check each (no
    /// vectorization), but whole slices with the F16C instructions where the processor has
    /// them.
    impl Sealed for f16 {
        const SCALAR_CONVERSIONS: bool = false;
        fn widen_slice(source: &[f16], destination: &mut [f32]) {
            source.convert_to_f32_slice(destination);
        }
        fn narrow_slice(source: &[f32], destination: &mut [f16]) {
            destination.convert_from_f32_slice(source);
        }
    }
}

/// Rounds an `f32` to the bits of the nearest bf16, ties to even; NaNs stay NaNs (quiet, with
/// the upper payload bits kept). The same results as `half::bf16::from_f32`, without branches,
/// so that loops over it vectorize.
#[inline]
fn bf16_bits_nearest_even(value: f32) -> u16 {
    let bits = value.to_bits();
    // Adding 0x7fff, plus one when the kept part is odd, carries into the kept part exactly
    // when the dropped half is above one half, or equal to it with an odd kept part.
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x0040;
    (if value.is_nan() { quiet_nan } else { rounded }) as u16
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
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    fn from_f32(value: f32) -> Self {
        bf16::from_bits(bf16_bits_nearest_even(value))
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

/// Elements per block of the kernels that convert blocks: their `f32` working copies stay in
/// the L1 cache.
const BLOCK: usize = 256;

/// The other operand of a reduction kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Addend<'a, T> {
    /// Another rank's values, in the element type.
    Values(&'a [T]),
    /// `f32` partial sums of other ranks' values.
    Sums(&'a [f32]),
}

impl<T: Element> Addend<'_, T> {
    /// Returns the number of elements.
    fn len(&self) -> usize {
        match self {
            Addend::Values(values) => values.len(),
            Addend::Sums(sums) => sums.len(),
        }
    }

    /// Returns elements `start..start + block.len()` as `f32`, widened into `block` if needed.
    fn widened<'b>(&'b self, start: usize, block: &'b mut [f32]) -> &'b [f32] {
        let range = start..start + block.len();
        match self {
            Addend::Values(values) => {
                T::widen_slice(&values[range], block);
                block
            }
            Addend::Sums(sums) => &sums[range],
        }
    }
}

/// Sets `values[i] = round(combine(values[i], addend[i]))`, computing in `f32`.
fn combine_in_place<T: Element>(
    values: &mut [T],
    addend: Addend<'_, T>,
    combine: impl Fn(f32, f32) -> f32,
) {
    assert_eq!(values.len(), addend.len());
    if T::SCALAR_CONVERSIONS {
        match addend {
            Addend::Values(other) => {
                for (value, other) in values.iter_mut().zip(other) {
                    *value = T::from_f32(combine(value.to_f32(), other.to_f32()));
                }
            }
            Addend::Sums(sums) => {
                for (value, sum) in values.iter_mut().zip(sums) {
                    *value = T::from_f32(combine(value.to_f32(), *sum));
                }
            }
        }
        return;
    }
    let (mut own, mut other) = ([0.0_f32; BLOCK], [0.0_f32; BLOCK]);
    for (index, values) in values.chunks_mut(BLOCK).enumerate() {
        let own = &mut own[..values.len()];
        T::widen_slice(values, own);
        let addend = addend.widened(index * BLOCK, &mut other[..values.len()]);
        for (value, other) in own.iter_mut().zip(addend) {
            *value = combine(*value, *other);
        }
        T::narrow_slice(own, values);
    }
}

/// Sets `output[i] = round(combine(local[i], addend[i]))`, computing in `f32`.
fn combine_into<T: Element>(
    output: &mut [T],
    local: &[T],
    addend: Addend<'_, T>,
    combine: impl Fn(f32, f32) -> f32,
) {
    assert!(output.len() == local.len() && local.len() == addend.len());
    if T::SCALAR_CONVERSIONS {
        match addend {
            Addend::Values(other) => {
                for ((output, local), other) in output.iter_mut().zip(local).zip(other) {
                    *output = T::from_f32(combine(local.to_f32(), other.to_f32()));
                }
            }
            Addend::Sums(sums) => {
                for ((output, local), sum) in output.iter_mut().zip(local).zip(sums) {
                    *output = T::from_f32(combine(local.to_f32(), *sum));
                }
            }
        }
        return;
    }
    let (mut own, mut other) = ([0.0_f32; BLOCK], [0.0_f32; BLOCK]);
    for (index, (output, local)) in output
        .chunks_mut(BLOCK)
        .zip(local.chunks(BLOCK))
        .enumerate()
    {
        let own = &mut own[..local.len()];
        T::widen_slice(local, own);
        let addend = addend.widened(index * BLOCK, &mut other[..local.len()]);
        for (value, other) in own.iter_mut().zip(addend) {
            *value = combine(*value, *other);
        }
        T::narrow_slice(own, output);
    }
}

/// Adds `local`, widened to `f32`, into the partial sums `partial` (same lengths).
pub(crate) fn accumulate<T: Element>(partial: &mut [f32], local: &[T]) {
    assert_eq!(partial.len(), local.len());
    if T::SCALAR_CONVERSIONS {
        for (sum, value) in partial.iter_mut().zip(local) {
            *sum += value.to_f32();
        }
        return;
    }
    let mut block = [0.0_f32; BLOCK];
    for (partial, local) in partial.chunks_mut(BLOCK).zip(local.chunks(BLOCK)) {
        let block = &mut block[..local.len()];
        T::widen_slice(local, block);
        for (sum, value) in partial.iter_mut().zip(block.iter()) {
            *sum += value;
        }
    }
}

/// Starts partial sums from two ranks' values: `partial[i] = local[i] + received[i]` in `f32`
/// (same lengths).
pub(crate) fn sum_pair<T: Element>(partial: &mut [f32], local: &[T], received: &[T]) {
    T::widen_slice(local, partial);
    accumulate(partial, received);
}

/// Completes a reduction in place: `values[i] = round((values[i] + addend[i]) / divisor)`,
/// where `values` holds this rank's own contribution and `addend` the other ranks' (their sum,
/// or with two ranks the other rank's values).
pub(crate) fn finish_in_place<T: Element>(
    values: &mut [T],
    addend: Addend<'_, T>,
    divisor: Option<f32>,
) {
    match divisor {
        None => combine_in_place(values, addend, |own, other| own + other),
        Some(divisor) => combine_in_place(values, addend, |own, other| (own + other) / divisor),
    }
}

/// Completes a reduction into a separate output: `output[i] = round((local[i] + addend[i]) /
/// divisor)`.
pub(crate) fn finish_into<T: Element>(
    output: &mut [T],
    local: &[T],
    addend: Addend<'_, T>,
    divisor: Option<f32>,
) {
    match divisor {
        None => combine_into(output, local, addend, |own, other| own + other),
        Some(divisor) => combine_into(output, local, addend, |own, other| (own + other) / divisor),
    }
}

#[cfg(test)]
mod tests {
    use super::sealed::Sealed;
    use super::*;
    use std::fmt;

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
        let step = bf16::from_f32(2f32.powi(-9));
        let mut partial = vec![0.0_f32];
        sum_pair(&mut partial, &[step], &[step]);
        accumulate(&mut partial, &[step]);
        let mut values = [bf16::ONE];
        finish_in_place(&mut values, Addend::Sums(&partial), None);
        assert_eq!(values[0].to_f32(), 1.0 + 2f32.powi(-7));
        // Two ranks, ties to even: 1 + 2^-8 rounds down to 1, 1 + 2^-7 + 2^-8 up to 1 + 2^-6.
        let half_step = bf16::from_f32(2f32.powi(-8));
        let mut pair = [bf16::ONE, bf16::from_f32(1.0 + 2f32.powi(-7))];
        finish_in_place(&mut pair, Addend::Values(&[half_step, half_step]), None);
        assert_eq!(pair.map(bf16::to_f32), [1.0, 1.0 + 2f32.powi(-6)]);
    }

    #[test]
    fn average_divides_after_summing() {
        let local = [f16::from_f32(1.0), f16::from_f32(-2.0)];
        let other = [f16::from_f32(3.0), f16::from_f32(-1.0)];
        let mut partial = vec![0.0_f32; 2];
        f16::widen_slice(&other, &mut partial);
        let mut output = [f16::ZERO; 2];
        finish_into(&mut output, &local, Addend::Sums(&partial), Some(2.0));
        assert_eq!(output.map(f16::to_f32), [2.0, -1.5]);
        output = [f16::ZERO; 2];
        finish_into(&mut output, &local, Addend::Values(&other), Some(2.0));
        assert_eq!(output.map(f16::to_f32), [2.0, -1.5]);
    }

    /// `f32` bit patterns covering every exponent, both signs, ties, values next to ties,
    /// overflow to infinity, subnormals, infinities and NaNs.
    fn f32_patterns() -> Vec<f32> {
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(65_521).collect();
        for high in (0..=0xffff_u32).step_by(7) {
            for low in [0, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1000, 0x0fff, 0x2000] {
                bits.push(high << 16 | low);
            }
        }
        bits.extend([
            0x7f7f_ffff,
            0x7f7f_8000,
            0x7f7f_7fff,
            0x477f_f000,
            0x477f_efff,
        ]);
        bits.into_iter().map(f32::from_bits).collect()
    }

    /// Asserts that two values have the same bits, or are both NaN.
    fn assert_same<T: Element + fmt::Debug>(found: T, expected: T, input: f32) {
        let same = bytemuck::bytes_of(&found) == bytemuck::bytes_of(&expected)
            || (found.to_f32().is_nan() && expected.to_f32().is_nan());
        assert!(
            same,
            "{input:e} ({:#010x}): found {found:?}, expected {expected:?}",
            input.to_bits()
        );
    }

    /// Checks this crate's element and slice conversions against `half`'s element conversions
    /// (`reference_narrow`, `reference_widen`).
    fn conversions_match_half<T: Element + fmt::Debug>(
        reference_narrow: fn(f32) -> T,
        reference_widen: fn(T) -> f32,
    ) {
        let inputs = f32_patterns();
        let mut narrowed = vec![reference_narrow(0.0); inputs.len()];
        T::narrow_slice(&inputs, &mut narrowed);
        for (value, input) in narrowed.iter().zip(&inputs) {
            assert_same(*value, reference_narrow(*input), *input);
            assert_same(T::from_f32(*input), reference_narrow(*input), *input);
        }
        let every_value: Vec<T> = (0..=u16::MAX).map(bytemuck::cast).collect();
        let mut widened = vec![0.0_f32; every_value.len()];
        T::widen_slice(&every_value, &mut widened);
        for (value, widened) in every_value.iter().zip(&widened) {
            assert_same(*widened, reference_widen(*value), *widened);
            assert_same(value.to_f32(), reference_widen(*value), *widened);
        }
    }

    #[test]
    fn bf16_conversions_match_half() {
        conversions_match_half(bf16::from_f32, bf16::to_f32);
    }

    #[test]
    fn f16_conversions_match_half() {
        conversions_match_half(f16::from_f32, f16::to_f32);
    }

    /// The kernels, on lengths around the block size, match an element-by-element computation
    /// in `f64` rounded once by `half` (`reference_narrow`): exact here, since sums of three of
    /// these values fit an `f32`.
    fn kernels_match_elementwise_sums<T: Element + fmt::Debug + PartialEq>(
        reference_narrow: fn(f32) -> T,
    ) {
        let value = |index: usize, salt: usize| {
            reference_narrow(((index * 7919 + salt * 104_729) % 2001) as f32 / 97.0 - 10.0)
        };
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
            let local: Vec<T> = (0..len).map(|index| value(index, 1)).collect();
            let received: Vec<T> = (0..len).map(|index| value(index, 2)).collect();
            let third: Vec<T> = (0..len).map(|index| value(index, 3)).collect();
            let expected = |divisor: f64, operands: &[&[T]]| -> Vec<T> {
                (0..len)
                    .map(|index| {
                        let sum: f64 = operands
                            .iter()
                            .map(|values| f64::from(values[index].to_f32()))
                            .sum();
                        reference_narrow((sum / divisor) as f32)
                    })
                    .collect()
            };
            let all_three = expected(1.0, &[&local, &received, &third]);
            let mut partial = vec![0.0_f32; len];
            sum_pair(&mut partial, &local, &received);
            let mut output = vec![T::from_f32(0.0); len];
            finish_into(&mut output, &third, Addend::Sums(&partial), None);
            assert_eq!(output, all_three, "finish_into sums, {len} elements");
            let mut values = third.clone();
            finish_in_place(&mut values, Addend::Sums(&partial), Some(3.0));
            let average = expected(3.0, &[&local, &received, &third]);
            assert_eq!(values, average, "finish_in_place sums, {len} elements");
            accumulate(&mut partial, &third);
            let mut values = vec![T::from_f32(0.0); len];
            finish_in_place(&mut values, Addend::Sums(&partial), None);
            assert_eq!(values, all_three, "accumulate, {len} elements");
            let mut values = local.clone();
            finish_in_place(&mut values, Addend::Values(&received), Some(2.0));
            let pair_average = expected(2.0, &[&local, &received]);
            assert_eq!(
                values, pair_average,
                "finish_in_place values, {len} elements"
            );
            finish_into(&mut output, &local, Addend::Values(&received), None);
            let pair_sum = expected(1.0, &[&local, &received]);
            assert_eq!(output, pair_sum, "finish_into values, {len} elements");
        }
    }

    #[test]
    fn bf16_kernels_match_elementwise_sums() {
        kernels_match_elementwise_sums(bf16::from_f32);
    }

    #[test]
    fn f16_kernels_match_elementwise_sums() {
        kernels_match_elementwise_sums(f16::from_f32);
    }
}
