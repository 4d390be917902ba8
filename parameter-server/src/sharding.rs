//! Splitting a model's flat parameter space into shards: a pure, deterministic function of the
//! tensor list and the shard count, computed identically by every rank and every server.
//!
//! The flat space is the model's tensors concatenated in declared order. Shard `s` holds one
//! contiguous range of it, `[cut[s], cut[s + 1])`. The ideal cuts divide the space into equal
//! parts; each cut then moves to the nearest tensor boundary when one lies within
//! [`BOUNDARY_SNAP_FRACTION`] of the mean shard size (so small tensors stay whole: sharding is
//! "by parameter"), and otherwise to the nearest row boundary inside the tensor it falls in (so
//! large tensors are split across shards: "by byte range"; embedding tables are split between
//! whole rows, dense tensors anywhere).
//!
//! Balance: every cut moves by at most 2% of the mean, so every shard is within 4% of the mean
//! plus one element of rounding: within 5% whenever the mean shard holds at least 100 elements
//! and no row is longer than 4% of the mean. Coarser models (a few huge rows, fewer elements
//! than shards) get the best cuts their rows allow, possibly empty shards.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest number of shards of one job.
pub const MAX_SHARDS: u32 = 1024;

/// Largest number of tensors in a model.
pub const MAX_TENSORS: usize = 8192;

/// Longest tensor name, in bytes.
pub const MAX_TENSOR_NAME_BYTES: usize = 256;

/// Largest number of elements in a model (4 TiB of f32).
pub const MAX_TOTAL_ELEMENTS: u64 = 1 << 40;

/// A cut moves to a tensor boundary within this fraction of the mean shard size.
pub const BOUNDARY_SNAP_FRACTION: f64 = 0.02;

/// One tensor of the model, as the parameter server knows it: a name and a number of `f32`
/// elements (no shape beyond rows).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorDeclaration {
    /// The model's name for it (`embedding.weight`), unique within the model.
    pub name: String,
    /// Number of elements.
    pub element_count: u64,
    /// Elements per row: the embedding width of a sparse table, 1 for a dense tensor. Shards
    /// split a tensor only between rows.
    pub row_elements: u64,
    /// Whether the tensor is an embedding table exchanged by rows: its gradients arrive as the
    /// rows a batch touched, and ranks pull the rows they need.
    pub sparse: bool,
}

impl TensorDeclaration {
    /// Declares a dense tensor of `element_count` elements.
    pub fn dense(name: impl Into<String>, element_count: u64) -> Self {
        Self {
            name: name.into(),
            element_count,
            row_elements: 1,
            sparse: false,
        }
    }

    /// Declares a row-sparse embedding table of `rows` rows of `width` elements.
    pub fn embedding_table(name: impl Into<String>, rows: u64, width: u64) -> Self {
        Self {
            name: name.into(),
            element_count: rows.saturating_mul(width),
            row_elements: width,
            sparse: true,
        }
    }

    /// Returns the number of rows.
    pub fn row_count(&self) -> u64 {
        self.element_count / self.row_elements.max(1)
    }
}

/// A contiguous part of one tensor held by a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Index of the tensor in the model's list.
    pub tensor_index: usize,
    /// Offset of the part within the tensor, in elements.
    pub tensor_offset: u64,
    /// Length of the part, in elements.
    pub element_count: u64,
}

/// What one shard holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLayout {
    /// The shard's index.
    pub shard_id: u32,
    /// Its range of the model's flat space (all tensors in order), in elements.
    pub flat_range: Range<u64>,
    /// Its range of the model's dense space (the non-sparse tensors in order), in elements.
    pub dense_range: Range<u64>,
    /// The tensor parts in flat order.
    pub segments: Vec<Segment>,
}

impl ShardLayout {
    /// Returns the number of dense elements (pushed and pulled densely).
    pub fn dense_element_count(&self) -> u64 {
        self.dense_range.end - self.dense_range.start
    }

    /// Returns the number of elements, dense and sparse.
    pub fn element_count(&self) -> u64 {
        self.flat_range.end - self.flat_range.start
    }
}

/// The mapping of every element of a model to a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    /// The model's tensors, as declared.
    tensors: Vec<TensorDeclaration>,
    /// Flat offset of each tensor, plus the total at the end.
    tensor_offsets: Vec<u64>,
    /// Dense offset of each tensor (that of the next dense tensor for sparse ones), plus the
    /// dense total at the end.
    dense_offsets: Vec<u64>,
    /// One layout per shard, by shard id.
    shards: Vec<ShardLayout>,
    /// Fingerprint of the tensor list and shard count.
    fingerprint: u64,
}

impl ShardPlan {
    /// Returns the model's tensors.
    pub fn tensors(&self) -> &[TensorDeclaration] {
        &self.tensors
    }

    /// Returns every shard's layout, by shard id.
    pub fn shards(&self) -> &[ShardLayout] {
        &self.shards
    }

    /// Returns one shard's layout.
    pub fn shard(&self, shard_id: u32) -> Option<&ShardLayout> {
        self.shards.get(shard_id as usize)
    }

    /// Returns the number of shards.
    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// Returns a fingerprint of the tensor list and shard count (FNV-1a, stable across builds),
    /// which every request carries so that a rank sharding differently is refused.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Returns the number of elements of all tensors.
    pub fn total_element_count(&self) -> u64 {
        self.tensor_offsets.last().copied().unwrap_or(0)
    }

    /// Returns the number of elements of the dense tensors.
    pub fn dense_element_count(&self) -> u64 {
        self.dense_offsets.last().copied().unwrap_or(0)
    }

    /// Returns the range of tensor `tensor_index` in the flat space.
    pub fn tensor_flat_range(&self, tensor_index: usize) -> Option<Range<u64>> {
        let start = *self.tensor_offsets.get(tensor_index)?;
        Some(start..*self.tensor_offsets.get(tensor_index + 1)?)
    }

    /// Returns the offset of dense tensor `tensor_index` in the dense space (`None` for sparse
    /// tables and out-of-range indices).
    pub fn tensor_dense_offset(&self, tensor_index: usize) -> Option<u64> {
        let tensor = self.tensors.get(tensor_index)?;
        (!tensor.sparse).then(|| self.dense_offsets[tensor_index])
    }

    /// Returns the shard holding row `row` of the sparse table `tensor_index`, or `None` when
    /// the tensor is not a sparse table or has no such row.
    pub fn row_owner(&self, tensor_index: usize, row: u64) -> Option<u32> {
        let tensor = self.tensors.get(tensor_index)?;
        if !tensor.sparse || row >= tensor.row_count() {
            return None;
        }
        let position = self.tensor_offsets[tensor_index] + row * tensor.row_elements;
        let shard = self
            .shards
            .partition_point(|shard| shard.flat_range.end <= position);
        Some(shard as u32)
    }
}

/// Checks a tensor list: names unique, non-empty and bounded; counts non-zero, whole rows, and
/// a bounded total.
pub fn validate_tensors(tensors: &[TensorDeclaration]) -> Result<()> {
    if tensors.is_empty() || tensors.len() > MAX_TENSORS {
        return Err(Error::invalid(format!(
            "tensors: {} declared, expected 1 to {MAX_TENSORS}",
            tensors.len()
        )));
    }
    let mut names = std::collections::HashSet::with_capacity(tensors.len());
    let mut total = 0u64;
    for (index, tensor) in tensors.iter().enumerate() {
        if tensor.name.is_empty() || tensor.name.len() > MAX_TENSOR_NAME_BYTES {
            return Err(Error::invalid(format!(
                "tensors[{index}].name has {} bytes, expected 1 to {MAX_TENSOR_NAME_BYTES}",
                tensor.name.len()
            )));
        }
        if !names.insert(tensor.name.as_str()) {
            return Err(Error::invalid(format!(
                "tensors[{index}].name {:?} is declared twice",
                tensor.name
            )));
        }
        if tensor.element_count == 0 {
            return Err(Error::invalid(format!(
                "tensors[{index}] ({:?}) has 0 elements, expected at least 1",
                tensor.name
            )));
        }
        if tensor.row_elements == 0 || !tensor.element_count.is_multiple_of(tensor.row_elements) {
            return Err(Error::invalid(format!(
                "tensors[{index}] ({:?}): row_elements = {}, expected a divisor of its {} \
                 elements",
                tensor.name, tensor.row_elements, tensor.element_count
            )));
        }
        total = total
            .checked_add(tensor.element_count)
            .filter(|total| *total <= MAX_TOTAL_ELEMENTS)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "tensors: more than {MAX_TOTAL_ELEMENTS} elements in total"
                ))
            })?;
    }
    Ok(())
}

/// Splits `tensors` (in flat order) into `shard_count` shards; see the module documentation for
/// the rule and the balance it guarantees.
pub fn plan_shards(tensors: &[TensorDeclaration], shard_count: u32) -> Result<ShardPlan> {
    if shard_count == 0 || shard_count > MAX_SHARDS {
        return Err(Error::invalid(format!(
            "shard_count = {shard_count}, expected 1 to {MAX_SHARDS}"
        )));
    }
    validate_tensors(tensors)?;
    let mut tensor_offsets = Vec::with_capacity(tensors.len() + 1);
    let mut dense_offsets = Vec::with_capacity(tensors.len() + 1);
    let (mut flat, mut dense) = (0u64, 0u64);
    for tensor in tensors {
        tensor_offsets.push(flat);
        dense_offsets.push(dense);
        flat += tensor.element_count;
        if !tensor.sparse {
            dense += tensor.element_count;
        }
    }
    tensor_offsets.push(flat);
    dense_offsets.push(dense);

    let cuts = choose_cuts(tensors, &tensor_offsets, shard_count);
    let shards = cuts
        .windows(2)
        .enumerate()
        .map(|(shard_id, cut)| {
            build_layout(
                shard_id as u32,
                cut[0]..cut[1],
                tensors,
                &tensor_offsets,
                &dense_offsets,
            )
        })
        .collect();
    Ok(ShardPlan {
        tensors: tensors.to_vec(),
        tensor_offsets,
        dense_offsets,
        shards,
        fingerprint: fingerprint(tensors, shard_count),
    })
}

/// Returns the `shard_count + 1` cut points, from 0 to the total, non-decreasing.
fn choose_cuts(tensors: &[TensorDeclaration], offsets: &[u64], shard_count: u32) -> Vec<u64> {
    let total = *offsets.last().unwrap_or(&0);
    let shards = u128::from(shard_count);
    let tolerance = (total as f64 / shard_count as f64 * BOUNDARY_SNAP_FRACTION).floor() as u64;
    let mut cuts = Vec::with_capacity(shard_count as usize + 1);
    cuts.push(0);
    for k in 1..shard_count {
        let ideal = (u128::from(total) * u128::from(k) / shards) as u64;
        let previous = *cuts.last().unwrap_or(&0);
        cuts.push(snap_cut(tensors, offsets, ideal, tolerance).max(previous));
    }
    cuts.push(total);
    cuts
}

/// Moves an ideal cut (strictly inside the flat space) to the nearest tensor boundary within
/// `tolerance`, else to the nearest row boundary of the tensor it falls in.
fn snap_cut(tensors: &[TensorDeclaration], offsets: &[u64], ideal: u64, tolerance: u64) -> u64 {
    // offsets[index] <= ideal < offsets[index + 1].
    let index = offsets.partition_point(|offset| *offset <= ideal) - 1;
    let (start, end) = (offsets[index], offsets[index + 1]);
    let (below, above) = (ideal - start, end - ideal);
    if below.min(above) <= tolerance {
        return if below <= above { start } else { end };
    }
    let row = tensors[index].row_elements;
    let rounded = (below + row / 2) / row * row;
    start + rounded.min(end - start)
}

fn build_layout(
    shard_id: u32,
    flat_range: Range<u64>,
    tensors: &[TensorDeclaration],
    tensor_offsets: &[u64],
    dense_offsets: &[u64],
) -> ShardLayout {
    let mut segments = Vec::new();
    let mut dense_count = 0;
    for (tensor_index, tensor) in tensors.iter().enumerate() {
        let (start, end) = (
            tensor_offsets[tensor_index],
            tensor_offsets[tensor_index + 1],
        );
        let overlap_start = start.max(flat_range.start);
        let overlap_end = end.min(flat_range.end);
        if overlap_start >= overlap_end {
            continue;
        }
        if !tensor.sparse {
            dense_count += overlap_end - overlap_start;
        }
        segments.push(Segment {
            tensor_index,
            tensor_offset: overlap_start - start,
            element_count: overlap_end - overlap_start,
        });
    }
    let dense_start = dense_position(tensors, tensor_offsets, dense_offsets, flat_range.start);
    ShardLayout {
        shard_id,
        flat_range,
        dense_range: dense_start..dense_start + dense_count,
        segments,
    }
}

/// Returns the number of dense elements before flat position `position` (at most the total).
fn dense_position(
    tensors: &[TensorDeclaration],
    tensor_offsets: &[u64],
    dense_offsets: &[u64],
    position: u64,
) -> u64 {
    // The tensor containing `position`, or the last one when it is the end of the space.
    let index = tensor_offsets[..tensors.len()]
        .partition_point(|offset| *offset <= position)
        .saturating_sub(1);
    if tensors[index].sparse {
        dense_offsets[index]
    } else {
        dense_offsets[index] + (position - tensor_offsets[index])
    }
}

/// FNV-1a over the shard count and every field of every tensor, lengths included.
fn fingerprint(tensors: &[TensorDeclaration], shard_count: u32) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET_BASIS;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    feed(&u64::from(shard_count).to_le_bytes());
    feed(&(tensors.len() as u64).to_le_bytes());
    for tensor in tensors {
        feed(&(tensor.name.len() as u64).to_le_bytes());
        feed(tensor.name.as_bytes());
        feed(&tensor.element_count.to_le_bytes());
        feed(&tensor.row_elements.to_le_bytes());
        feed(&[u8::from(tensor.sparse)]);
    }
    // 0 means "no layout" on the wire.
    hash.max(1)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sizes(plan: &ShardPlan) -> Vec<u64> {
        plan.shards()
            .iter()
            .map(ShardLayout::element_count)
            .collect()
    }

    /// Checks that every element of every tensor belongs to exactly one segment, that segments
    /// match the flat ranges, that sparse segments hold whole rows and that dense ranges tile
    /// the dense space.
    fn assert_covers_every_element_once(plan: &ShardPlan) {
        let tensors = plan.tensors();
        let mut covered = vec![Vec::<Range<u64>>::new(); tensors.len()];
        let mut flat_position = 0;
        let mut dense_position = 0;
        for shard in plan.shards() {
            assert_eq!(shard.flat_range.start, flat_position);
            flat_position = shard.flat_range.end;
            assert_eq!(shard.dense_range.start, dense_position, "shard {shard:?}");
            dense_position = shard.dense_range.end;
            let mut segment_total = 0;
            let mut dense_total = 0;
            for segment in &shard.segments {
                let tensor = &tensors[segment.tensor_index];
                assert!(segment.element_count > 0);
                assert!(segment.tensor_offset + segment.element_count <= tensor.element_count);
                if tensor.sparse {
                    assert_eq!(segment.tensor_offset % tensor.row_elements, 0);
                    assert_eq!(segment.element_count % tensor.row_elements, 0);
                } else {
                    dense_total += segment.element_count;
                }
                segment_total += segment.element_count;
                covered[segment.tensor_index]
                    .push(segment.tensor_offset..segment.tensor_offset + segment.element_count);
            }
            assert_eq!(segment_total, shard.element_count());
            assert_eq!(dense_total, shard.dense_element_count());
        }
        assert_eq!(flat_position, plan.total_element_count());
        assert_eq!(dense_position, plan.dense_element_count());
        for (index, mut ranges) in covered.into_iter().enumerate() {
            ranges.sort_by_key(|range| range.start);
            let mut position = 0;
            for range in ranges {
                assert_eq!(range.start, position, "tensor {index}: gap or overlap");
                position = range.end;
            }
            assert_eq!(position, tensors[index].element_count, "tensor {index}");
        }
    }

    #[test]
    fn small_tensors_stay_whole_and_large_ones_are_split() {
        let tensors = vec![
            TensorDeclaration::dense("layer1.weight", 1000),
            TensorDeclaration::dense("layer1.bias", 10),
            TensorDeclaration::dense("layer2.weight", 1000),
            TensorDeclaration::dense("layer2.bias", 10),
        ];
        let plan = plan_shards(&tensors, 2).unwrap();
        // The ideal cut at 1010 is exactly the boundary after layer1.bias.
        assert_eq!(sizes(&plan), vec![1010, 1010]);
        assert_eq!(plan.shard(0).unwrap().segments.len(), 2);
        assert_covers_every_element_once(&plan);

        let tensors = vec![TensorDeclaration::dense("big", 10_000)];
        let plan = plan_shards(&tensors, 3).unwrap();
        assert_eq!(sizes(&plan), vec![3333, 3333, 3334]);
        assert_eq!(plan.shard(1).unwrap().segments[0].tensor_offset, 3333);
        assert_covers_every_element_once(&plan);
    }

    #[test]
    fn cuts_snap_to_nearby_tensor_boundaries() {
        // Ideal cut at 5000; the boundary at 4950 is within 2% of the mean (100 elements).
        let tensors = vec![
            TensorDeclaration::dense("a", 4950),
            TensorDeclaration::dense("b", 5050),
        ];
        let plan = plan_shards(&tensors, 2).unwrap();
        assert_eq!(sizes(&plan), vec![4950, 5050]);
        // A boundary 300 elements away is too far: the second tensor is split instead.
        let tensors = vec![
            TensorDeclaration::dense("a", 4700),
            TensorDeclaration::dense("b", 5300),
        ];
        let plan = plan_shards(&tensors, 2).unwrap();
        assert_eq!(sizes(&plan), vec![5000, 5000]);
        assert_eq!(plan.shard(1).unwrap().segments[0].tensor_offset, 300);
    }

    #[test]
    fn embedding_tables_split_between_rows_and_rows_find_their_shard() {
        let tensors = vec![
            TensorDeclaration::dense("head", 64),
            TensorDeclaration::embedding_table("embedding", 1000, 16),
            TensorDeclaration::dense("bias", 4),
        ];
        let plan = plan_shards(&tensors, 4).unwrap();
        assert_covers_every_element_once(&plan);
        let dense: u64 = plan
            .shards()
            .iter()
            .map(ShardLayout::dense_element_count)
            .sum();
        assert_eq!(dense, 68);
        for row in [0, 1, 250, 499, 999] {
            let owner = plan.row_owner(1, row).unwrap();
            let layout = plan.shard(owner).unwrap();
            let position = 64 + row * 16;
            assert!(layout.flat_range.contains(&position), "row {row}");
        }
        assert_eq!(plan.row_owner(1, 1000), None);
        assert_eq!(
            plan.row_owner(0, 0),
            None,
            "dense tensors have no row owner"
        );
        assert_eq!(plan.tensor_dense_offset(2), Some(64));
        assert_eq!(plan.tensor_dense_offset(1), None);
    }

    #[test]
    fn bad_tensor_lists_are_refused_with_the_tensor_named() {
        let cases: Vec<(Vec<TensorDeclaration>, &str)> = vec![
            (vec![], "tensors: 0 declared"),
            (
                vec![TensorDeclaration::dense("a", 0)],
                "tensors[0] (\"a\") has 0 elements",
            ),
            (
                vec![
                    TensorDeclaration::dense("a", 4),
                    TensorDeclaration::dense("a", 4),
                ],
                "declared twice",
            ),
            (
                vec![TensorDeclaration {
                    row_elements: 3,
                    ..TensorDeclaration::dense("a", 10)
                }],
                "row_elements = 3, expected a divisor of its 10 elements",
            ),
            (
                vec![TensorDeclaration::dense("a", MAX_TOTAL_ELEMENTS + 1)],
                "more than",
            ),
        ];
        for (tensors, expected) in cases {
            let error = plan_shards(&tensors, 2).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
        let tensors = vec![TensorDeclaration::dense("a", 4)];
        assert!(plan_shards(&tensors, 0).is_err());
        assert!(plan_shards(&tensors, MAX_SHARDS + 1).is_err());
    }

    #[test]
    fn fewer_elements_than_shards_leaves_some_shards_empty() {
        let tensors = vec![TensorDeclaration::dense("tiny", 3)];
        let plan = plan_shards(&tensors, 5).unwrap();
        assert_eq!(sizes(&plan).iter().sum::<u64>(), 3);
        assert_covers_every_element_once(&plan);
    }

    #[test]
    fn fingerprint_changes_with_any_field() {
        let base = vec![TensorDeclaration::dense("a", 10)];
        let fingerprint = plan_shards(&base, 2).unwrap().fingerprint();
        assert_eq!(fingerprint, plan_shards(&base, 2).unwrap().fingerprint());
        assert_ne!(fingerprint, plan_shards(&base, 3).unwrap().fingerprint());
        let renamed = vec![TensorDeclaration::dense("b", 10)];
        assert_ne!(fingerprint, plan_shards(&renamed, 2).unwrap().fingerprint());
        let resized = vec![TensorDeclaration::dense("a", 11)];
        assert_ne!(fingerprint, plan_shards(&resized, 2).unwrap().fingerprint());
    }

    fn tensor_strategy() -> impl Strategy<Value = (u64, u64, bool)> {
        prop_oneof![
            // Small dense tensors (biases, norms).
            (1u64..200).prop_map(|count| (count, 1, false)),
            // Large dense tensors.
            (1_000u64..200_000).prop_map(|count| (count, 1, false)),
            // Embedding tables.
            ((1u64..2_000), (1u64..64)).prop_map(|(rows, width)| (rows * width, width, true)),
        ]
    }

    fn model_strategy() -> impl Strategy<Value = Vec<TensorDeclaration>> {
        prop::collection::vec(tensor_strategy(), 1..40).prop_map(|tensors| {
            tensors
                .into_iter()
                .enumerate()
                .map(|(index, (count, row, sparse))| TensorDeclaration {
                    name: format!("t{index}"),
                    element_count: count,
                    row_elements: row,
                    sparse,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn every_element_is_assigned_exactly_once(
            tensors in model_strategy(),
            shard_count in 1u32..40,
        ) {
            let plan = plan_shards(&tensors, shard_count).unwrap();
            prop_assert_eq!(plan.shard_count(), shard_count);
            assert_covers_every_element_once(&plan);
        }

        #[test]
        fn shards_are_within_five_percent_of_the_mean_when_possible(
            tensors in model_strategy(),
            shard_count in 1u32..40,
        ) {
            let total: u64 = tensors.iter().map(|t| t.element_count).sum();
            let longest_row = tensors.iter().map(|t| t.row_elements).max().unwrap();
            let mean = total as f64 / f64::from(shard_count);
            // The documented condition: at least 100 elements per shard, rows at most 4% of
            // the mean.
            prop_assume!(mean >= 100.0 && longest_row as f64 <= 0.04 * mean);
            let plan = plan_shards(&tensors, shard_count).unwrap();
            for (shard, size) in sizes(&plan).into_iter().enumerate() {
                let deviation = (size as f64 - mean).abs() / mean;
                prop_assert!(
                    deviation <= 0.05,
                    "shard {} holds {} elements, mean {:.1} ({:.2}% off)",
                    shard, size, mean, deviation * 100.0
                );
            }
        }

        #[test]
        fn planning_is_deterministic(tensors in model_strategy(), shard_count in 1u32..40) {
            let first = plan_shards(&tensors, shard_count).unwrap();
            let second = plan_shards(&tensors.clone(), shard_count).unwrap();
            prop_assert_eq!(first, second);
        }
    }
}
