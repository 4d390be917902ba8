//! What a shard looks like once initialised ([`ShardShape`]), and the checked assembly of
//! streamed requests against it: gradients of a push, initial values of an init, and the rows a
//! pull selects. Everything here runs before the shard's lock is taken; a request that fails any
//! check is dropped whole, so a bad request changes nothing.

use std::ops::Range;

use cohort_proto::ps_v1;
use prost::bytes::Bytes;

use crate::config::{Limits, OptimizerConfig};
use crate::encoding::{self, DType};
use crate::error::{Error, Result};
use crate::sharding::{ShardLayout, TensorDeclaration, plan_shards};
use cohort_numerics::OptimizerState;
use cohort_numerics::optimizer::zeroed;

/// The part of one embedding table a shard holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// Index of the table in the model's tensor list.
    pub tensor_index: u32,
    /// The table's rows held here (row numbers of the whole table).
    pub rows: Range<u64>,
    /// Elements per row.
    pub row_elements: u64,
}

impl TableShape {
    /// Returns the number of rows held.
    pub fn row_count(&self) -> u64 {
        self.rows.end - self.rows.start
    }
}

/// The immutable shape of an initialised shard: derived from the tensor list of the first
/// `Init` and the shard count, fixed afterwards.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardShape {
    /// Fingerprint of the tensor list and shard count.
    pub fingerprint: u64,
    /// The model's tensors.
    pub tensors: Vec<TensorDeclaration>,
    /// The shard's part of the flat space.
    pub layout: ShardLayout,
    /// Planned steps of the run (end of the cosine decay).
    pub total_steps: u64,
    /// The embedding-table parts held, in flat order.
    pub tables: Vec<TableShape>,
}

impl ShardShape {
    /// Plans the model's shards and keeps shard `shard_id`'s, checking that its buffers fit
    /// `limits` (memory, rows no larger than a chunk).
    pub fn new(
        tensors: Vec<TensorDeclaration>,
        shard_count: u32,
        shard_id: u32,
        total_steps: u64,
        limits: &Limits,
        optimizer: &OptimizerConfig,
    ) -> Result<Self> {
        let plan = plan_shards(&tensors, shard_count)?;
        let layout = plan
            .shard(shard_id)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("plan lacks shard {shard_id}")))?;
        let bytes_per_element = 4 + OptimizerState::bytes_per_element(optimizer);
        let shard_bytes = layout.element_count().saturating_mul(bytes_per_element);
        if shard_bytes > limits.max_shard_bytes {
            return Err(Error::invalid(format!(
                "shard {shard_id} would hold {shard_bytes} bytes of parameters and optimizer \
                 state, expected at most limits.max_shard_bytes = {}",
                limits.max_shard_bytes
            )));
        }
        let mut tables = Vec::new();
        for segment in &layout.segments {
            let tensor = &tensors[segment.tensor_index];
            if !tensor.sparse {
                continue;
            }
            if tensor.row_elements * 4 > limits.max_chunk_bytes {
                return Err(Error::invalid(format!(
                    "tensors[{}] ({:?}): rows of {} bytes, expected at most \
                     limits.max_chunk_bytes = {}",
                    segment.tensor_index,
                    tensor.name,
                    tensor.row_elements * 4,
                    limits.max_chunk_bytes
                )));
            }
            let first_row = segment.tensor_offset / tensor.row_elements;
            tables.push(TableShape {
                tensor_index: segment.tensor_index as u32,
                rows: first_row..first_row + segment.element_count / tensor.row_elements,
                row_elements: tensor.row_elements,
            });
        }
        Ok(Self {
            fingerprint: plan.fingerprint(),
            tensors,
            layout,
            total_steps,
            tables,
        })
    }

    /// Returns the number of dense elements.
    pub fn dense_element_count(&self) -> usize {
        self.layout.dense_element_count() as usize
    }

    /// Returns the position in [`ShardShape::tables`] of table `tensor_index`, or an error
    /// saying the shard holds no such table.
    pub fn table_position(&self, tensor_index: u32) -> Result<usize> {
        self.tables
            .iter()
            .position(|table| table.tensor_index == tensor_index)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "tensor_index = {tensor_index}: shard {} holds no rows of such an embedding \
                     table (it holds tables {:?})",
                    self.layout.shard_id,
                    self.tables
                        .iter()
                        .map(|table| table.tensor_index)
                        .collect::<Vec<_>>()
                ))
            })
    }

    /// Checks that every row of `rows` is held by table position `table`, and returns the rows
    /// as positions within the held part.
    fn local_rows(&self, table: usize, rows: &[u64]) -> Result<Vec<u64>> {
        let shape = &self.tables[table];
        rows.iter()
            .map(|&row| {
                if shape.rows.contains(&row) {
                    Ok(row - shape.rows.start)
                } else {
                    Err(Error::invalid(format!(
                        "row {row} of table {}: shard {} holds rows {}..{}",
                        shape.tensor_index, self.layout.shard_id, shape.rows.start, shape.rows.end
                    )))
                }
            })
            .collect()
    }
}

/// Gradients of one table received in one rows chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct RowGradient {
    /// Position of the table in [`ShardShape::tables`].
    pub table: usize,
    /// Rows, as positions within the held part.
    pub rows: Vec<u64>,
    /// `rows.len() * row_elements` values.
    pub values: Vec<f32>,
}

/// A push's dense gradient, kept as the chunks it arrived in (no copy): decoded window by
/// window when it is applied, so that the server never materialises a second shard-sized
/// buffer per push.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseGradient {
    /// Element type of the bytes.
    dtype: DType,
    /// Number of elements.
    element_count: usize,
    /// First element of each chunk and its bytes, contiguous and in order.
    chunks: Vec<(usize, Bytes)>,
}

impl DenseGradient {
    /// Wraps f32 values (for tests and in-process callers).
    pub fn from_values(values: &[f32]) -> Self {
        Self {
            dtype: DType::F32,
            element_count: values.len(),
            chunks: vec![(0, encoding::encode(DType::F32, values))],
        }
    }

    /// Returns the number of elements.
    pub fn element_count(&self) -> usize {
        self.element_count
    }

    /// Adds the gradient's elements `range` to `output` (of the range's length).
    pub fn add_to(&self, range: Range<usize>, output: &mut [f32]) {
        let size = self.dtype.size_bytes();
        let first = self
            .chunks
            .partition_point(|(start, _)| *start <= range.start)
            .saturating_sub(1);
        for (start, bytes) in &self.chunks[first..] {
            let chunk_end = start + bytes.len() / size;
            if *start >= range.end {
                break;
            }
            let from = range.start.max(*start);
            let to = range.end.min(chunk_end);
            if from >= to {
                continue;
            }
            let data = &bytes[(from - start) * size..(to - start) * size];
            encoding::add_decoded(
                self.dtype,
                data,
                &mut output[from - range.start..to - range.start],
            );
        }
    }
}

/// A push's complete, checked gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient {
    /// Every dense element's gradient.
    pub dense: DenseGradient,
    /// Row-sparse gradients, in arrival order.
    pub rows: Vec<RowGradient>,
}

/// Checks the common bounds of a chunk's data and rows.
fn check_chunk(limits: &Limits, what: &str, data_bytes: usize, rows: usize) -> Result<()> {
    if data_bytes as u64 > limits.max_chunk_bytes {
        return Err(Error::invalid(format!(
            "{what} of {data_bytes} bytes, expected at most max_chunk_bytes = {}",
            limits.max_chunk_bytes
        )));
    }
    if rows as u64 > limits.max_rows_per_chunk {
        return Err(Error::invalid(format!(
            "{what} with {rows} rows, expected at most max_rows_per_chunk = {}",
            limits.max_rows_per_chunk
        )));
    }
    Ok(())
}

/// Checks that a dense chunk continues a run at `filled` of `expected` elements; returns the
/// run's new end.
fn check_dense_chunk(
    dtype: DType,
    chunk: &ps_v1::DenseChunk,
    filled: usize,
    expected: usize,
) -> Result<usize> {
    if chunk.offset != filled as u64 {
        return Err(Error::invalid(format!(
            "dense chunk at offset {}, expected {filled} (chunks must arrive in order)",
            chunk.offset
        )));
    }
    let count = encoding::element_count(dtype, chunk.data.len(), "dense chunk")?;
    let end = filled + count;
    if end > expected {
        return Err(Error::invalid(format!(
            "dense data runs to element {end}, expected {expected} elements"
        )));
    }
    Ok(end)
}

/// Collects a dense run arriving in order, chunk by chunk.
#[derive(Debug)]
struct DenseAssembly {
    /// The values, sized for the whole run.
    values: Vec<f32>,
    /// Elements received so far.
    filled: usize,
}

impl DenseAssembly {
    fn new(element_count: usize) -> Result<Self> {
        Ok(Self {
            values: zeroed(element_count, "a shard buffer")?,
            filled: 0,
        })
    }

    fn add(&mut self, dtype: DType, chunk: &ps_v1::DenseChunk) -> Result<()> {
        let end = check_dense_chunk(dtype, chunk, self.filled, self.values.len())?;
        encoding::decode_into(dtype, &chunk.data, &mut self.values[self.filled..end]);
        self.filled = end;
        Ok(())
    }

    fn finish(self, what: &str) -> Result<Vec<f32>> {
        if self.filled != self.values.len() {
            return Err(Error::invalid(format!(
                "{what} of {} elements, expected {}",
                self.filled,
                self.values.len()
            )));
        }
        Ok(self.values)
    }
}

/// Decodes a rows chunk against the shape: the table, its rows and the data length.
fn decode_rows(
    shape: &ShardShape,
    dtype: DType,
    chunk: &ps_v1::RowsChunk,
) -> Result<(usize, Vec<u64>, Vec<f32>)> {
    let table = shape.table_position(chunk.tensor_index)?;
    let rows = shape.local_rows(table, &chunk.rows)?;
    let row_elements = shape.tables[table].row_elements as usize;
    let expected = rows.len() * row_elements * dtype.size_bytes();
    if chunk.data.len() != expected {
        return Err(Error::invalid(format!(
            "rows chunk of table {}: {} bytes for {} rows, expected {expected} ({row_elements} \
             {dtype} elements per row)",
            chunk.tensor_index,
            chunk.data.len(),
            rows.len()
        )));
    }
    let mut values = zeroed(rows.len() * row_elements, "a shard buffer")?;
    encoding::decode_into(dtype, &chunk.data, &mut values);
    Ok((table, rows, values))
}

/// Collects a push's gradient chunks, checking each against the shape and the limits.
#[derive(Debug)]
pub struct GradientAssembly<'a> {
    /// The shard's shape.
    shape: &'a ShardShape,
    /// Bounds on chunks and rows.
    limits: &'a Limits,
    /// Element type of the pushed bytes.
    dtype: DType,
    /// Dense chunks so far, with their first element.
    dense_chunks: Vec<(usize, Bytes)>,
    /// Dense elements received so far.
    dense_filled: usize,
    /// Row gradients so far.
    rows: Vec<RowGradient>,
    /// Rows received so far, all tables together.
    row_count: u64,
}

impl<'a> GradientAssembly<'a> {
    /// Starts assembling a push of `dtype` gradients.
    pub fn new(shape: &'a ShardShape, limits: &'a Limits, dtype: DType) -> Result<Self> {
        Ok(Self {
            shape,
            limits,
            dtype,
            dense_chunks: Vec::new(),
            dense_filled: 0,
            rows: Vec::new(),
            row_count: 0,
        })
    }

    /// Adds a dense chunk (the next one in order), keeping its bytes without a copy.
    pub fn add_dense(&mut self, chunk: ps_v1::DenseChunk) -> Result<()> {
        check_chunk(self.limits, "dense chunk", chunk.data.len(), 0)?;
        let end = check_dense_chunk(
            self.dtype,
            &chunk,
            self.dense_filled,
            self.shape.dense_element_count(),
        )?;
        if end > self.dense_filled {
            self.dense_chunks.push((self.dense_filled, chunk.data));
        }
        self.dense_filled = end;
        Ok(())
    }

    /// Adds a chunk of row gradients.
    pub fn add_rows(&mut self, chunk: &ps_v1::RowsChunk) -> Result<()> {
        check_chunk(
            self.limits,
            "rows chunk",
            chunk.data.len(),
            chunk.rows.len(),
        )?;
        self.row_count += chunk.rows.len() as u64;
        if self.row_count > self.limits.max_rows_per_request {
            return Err(Error::invalid(format!(
                "push of more than {} rows, expected at most max_rows_per_request",
                self.limits.max_rows_per_request
            )));
        }
        let (table, rows, values) = decode_rows(self.shape, self.dtype, chunk)?;
        self.rows.push(RowGradient {
            table,
            rows,
            values,
        });
        Ok(())
    }

    /// Returns the gradient once every dense element has arrived.
    pub fn finish(self) -> Result<Gradient> {
        let expected = self.shape.dense_element_count();
        if self.dense_filled != expected {
            return Err(Error::invalid(format!(
                "dense gradient of {} elements, expected {expected}",
                self.dense_filled
            )));
        }
        Ok(Gradient {
            dense: DenseGradient {
                dtype: self.dtype,
                element_count: expected,
                chunks: self.dense_chunks,
            },
            rows: self.rows,
        })
    }
}

/// Initial values of a shard, complete and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct InitialValues {
    /// Dense values.
    pub dense: Vec<f32>,
    /// Every held row of each table, by position in [`ShardShape::tables`].
    pub tables: Vec<Vec<f32>>,
}

/// Collects an init's values: the dense run and every held row of every table exactly once.
#[derive(Debug)]
pub struct InitAssembly<'a> {
    /// The shape the values are for.
    shape: &'a ShardShape,
    /// Bounds on chunks.
    limits: &'a Limits,
    /// Dense values so far.
    dense: DenseAssembly,
    /// Table values, by position.
    tables: Vec<Vec<f32>>,
    /// Which rows have arrived, by table position.
    rows_seen: Vec<Vec<bool>>,
}

impl<'a> InitAssembly<'a> {
    /// Starts assembling initial values for `shape`.
    pub fn new(shape: &'a ShardShape, limits: &'a Limits) -> Result<Self> {
        let mut tables = Vec::with_capacity(shape.tables.len());
        let mut rows_seen = Vec::with_capacity(shape.tables.len());
        for table in &shape.tables {
            tables.push(zeroed(
                (table.row_count() * table.row_elements) as usize,
                "a shard buffer",
            )?);
            rows_seen.push(vec![false; table.row_count() as usize]);
        }
        Ok(Self {
            shape,
            limits,
            dense: DenseAssembly::new(shape.dense_element_count())?,
            tables,
            rows_seen,
        })
    }

    /// Adds a dense chunk (f32, the next one in order).
    pub fn add_dense(&mut self, chunk: &ps_v1::DenseChunk) -> Result<()> {
        check_chunk(self.limits, "dense chunk", chunk.data.len(), 0)?;
        self.dense.add(DType::F32, chunk)
    }

    /// Adds a chunk of table rows (f32); each row may arrive once.
    pub fn add_rows(&mut self, chunk: &ps_v1::RowsChunk) -> Result<()> {
        check_chunk(
            self.limits,
            "rows chunk",
            chunk.data.len(),
            chunk.rows.len(),
        )?;
        let (table, rows, values) = decode_rows(self.shape, DType::F32, chunk)?;
        let width = self.shape.tables[table].row_elements as usize;
        for (index, &row) in rows.iter().enumerate() {
            let seen = &mut self.rows_seen[table][row as usize];
            if *seen {
                return Err(Error::invalid(format!(
                    "row {} of table {} sent twice",
                    row + self.shape.tables[table].rows.start,
                    chunk.tensor_index
                )));
            }
            *seen = true;
            let row = row as usize;
            self.tables[table][row * width..(row + 1) * width]
                .copy_from_slice(&values[index * width..(index + 1) * width]);
        }
        Ok(())
    }

    /// Returns the values once every dense element and every row has arrived.
    pub fn finish(self) -> Result<InitialValues> {
        for (position, seen) in self.rows_seen.iter().enumerate() {
            let missing = seen.iter().filter(|seen| !**seen).count();
            if missing > 0 {
                return Err(Error::invalid(format!(
                    "init lacks {missing} of the {} rows of table {} held by shard {}",
                    seen.len(),
                    self.shape.tables[position].tensor_index,
                    self.shape.layout.shard_id
                )));
            }
        }
        Ok(InitialValues {
            dense: self.dense.finish("initial dense values")?,
            tables: self.tables,
        })
    }
}

/// What a pull returns, checked against the shape.
#[derive(Debug, Clone, PartialEq)]
pub struct PullPlan {
    /// Whether to return the dense elements.
    pub dense: bool,
    /// Element type of the returned data.
    pub dtype: DType,
    /// Selected rows: table position and rows as positions within the held part.
    pub selections: Vec<(usize, Vec<u64>)>,
    /// Whether to return every held row of every table.
    pub all_rows: bool,
}

impl PullPlan {
    /// Checks a pull spec against the shape: known tables, held rows, bounded counts.
    pub fn new(shape: &ShardShape, limits: &Limits, spec: &ps_v1::PullSpec) -> Result<Self> {
        let dtype = crate::encoding::from_wire(spec.dtype, "pull.dtype")?;
        let total: u64 = spec.rows.iter().map(|s| s.rows.len() as u64).sum();
        if total > limits.max_rows_per_request {
            return Err(Error::invalid(format!(
                "pull of {total} rows, expected at most max_rows_per_request = {}",
                limits.max_rows_per_request
            )));
        }
        let selections = spec
            .rows
            .iter()
            .map(|selection| {
                let table = shape.table_position(selection.tensor_index)?;
                Ok((table, shape.local_rows(table, &selection.rows)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            dense: spec.dense,
            dtype,
            selections,
            all_rows: spec.all_rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ShardShape {
        let tensors = vec![
            TensorDeclaration::dense("w", 6),
            TensorDeclaration::embedding_table("e", 4, 2),
        ];
        ShardShape::new(
            tensors,
            1,
            0,
            10,
            &Limits::default(),
            &OptimizerConfig::default(),
        )
        .unwrap()
    }

    fn dense(offset: u64, values: &[f32]) -> ps_v1::DenseChunk {
        ps_v1::DenseChunk {
            offset,
            data: encoding::encode(DType::F32, values),
        }
    }

    #[test]
    fn gradients_assemble_in_order_and_must_be_complete() {
        let shape = shape();
        let limits = Limits::default();
        let mut assembly = GradientAssembly::new(&shape, &limits, DType::F32).unwrap();
        assembly.add_dense(dense(0, &[1.0, 2.0])).unwrap();
        let error = assembly.add_dense(dense(3, &[3.0])).unwrap_err();
        assert!(
            error.to_string().contains("offset 3, expected 2"),
            "{error}"
        );
        assembly.add_dense(dense(2, &[3.0, 4.0, 5.0])).unwrap();
        assert!(
            assembly.add_dense(dense(5, &[6.0, 7.0])).is_err(),
            "too long"
        );
        assembly
            .add_rows(&ps_v1::RowsChunk {
                tensor_index: 1,
                rows: vec![3],
                data: encoding::encode(DType::F32, &[0.5, 0.25]),
            })
            .unwrap();
        let error = assembly.finish().unwrap_err();
        assert_eq!(
            error.to_string(),
            "dense gradient of 5 elements, expected 6"
        );
    }

    #[test]
    fn dense_gradients_add_any_window_across_chunks() {
        let shape = shape();
        let limits = Limits::default();
        let mut assembly = GradientAssembly::new(&shape, &limits, DType::Bf16).unwrap();
        let chunk = |offset: u64, values: &[f32]| ps_v1::DenseChunk {
            offset,
            data: encoding::encode(DType::Bf16, values),
        };
        assembly.add_dense(chunk(0, &[1.0, 2.0, 3.0])).unwrap();
        assembly.add_dense(chunk(3, &[])).unwrap();
        assembly.add_dense(chunk(3, &[4.0])).unwrap();
        assembly.add_dense(chunk(4, &[5.0, 6.0])).unwrap();
        let gradient = assembly.finish().unwrap();
        for (start, end) in [(0, 6), (2, 5), (3, 4), (5, 6), (0, 1)] {
            let mut output = vec![10.0; end - start];
            gradient.dense.add_to(start..end, &mut output);
            let expected: Vec<f32> = (start..end).map(|i| 11.0 + i as f32).collect();
            assert_eq!(output, expected, "window {start}..{end}");
        }
    }

    #[test]
    fn rows_must_be_held_and_sized() {
        let shape = shape();
        let limits = Limits::default();
        let mut assembly = GradientAssembly::new(&shape, &limits, DType::Bf16).unwrap();
        let bad_table = ps_v1::RowsChunk {
            tensor_index: 0,
            rows: vec![0],
            data: Bytes::from(vec![0u8; 4]),
        };
        assert!(assembly.add_rows(&bad_table).is_err());
        let bad_row = ps_v1::RowsChunk {
            tensor_index: 1,
            rows: vec![4],
            data: Bytes::from(vec![0u8; 4]),
        };
        let error = assembly.add_rows(&bad_row).unwrap_err().to_string();
        assert_eq!(error, "row 4 of table 1: shard 0 holds rows 0..4");
        let short = ps_v1::RowsChunk {
            tensor_index: 1,
            rows: vec![1, 2],
            data: Bytes::from(vec![0u8; 4]),
        };
        assert!(assembly.add_rows(&short).is_err());
        let big = ps_v1::DenseChunk {
            offset: 0,
            data: Bytes::from(vec![0u8; (limits.max_chunk_bytes + 2) as usize]),
        };
        let error = assembly.add_dense(big).unwrap_err().to_string();
        assert!(
            error.contains("expected at most max_chunk_bytes"),
            "{error}"
        );
    }

    #[test]
    fn init_needs_every_row_once() {
        let shape = shape();
        let limits = Limits::default();
        let mut assembly = InitAssembly::new(&shape, &limits).unwrap();
        assembly.add_dense(&dense(0, &[0.0; 6])).unwrap();
        let rows = |rows: Vec<u64>| ps_v1::RowsChunk {
            tensor_index: 1,
            data: encoding::encode(DType::F32, &vec![1.0; rows.len() * 2]),
            rows,
        };
        assembly.add_rows(&rows(vec![0, 1])).unwrap();
        assert!(assembly.add_rows(&rows(vec![1])).is_err(), "row sent twice");
        assembly.add_rows(&rows(vec![3])).unwrap();
        let error = assembly.finish().unwrap_err().to_string();
        assert_eq!(
            error,
            "init lacks 1 of the 4 rows of table 1 held by shard 0"
        );
    }

    #[test]
    fn shards_beyond_the_memory_bound_are_refused() {
        let limits = Limits {
            max_shard_bytes: 1024,
            ..Limits::default()
        };
        let error = ShardShape::new(
            vec![TensorDeclaration::dense("w", 1000)],
            1,
            0,
            1,
            &limits,
            &OptimizerConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("12000 bytes"), "{error}");
    }
}
