//! Megatron-style tensor parallelism: how a parameter is split over the ranks of a
//! tensor-parallel group, and the two communication operators of the split layers.
//!
//! A column-parallel layer (output rows split over the ranks) takes a replicated input through
//! `f` ([`TensorParallel::copy_to_region`]: identity forward, gradient all-reduced backward);
//! the row-parallel layer that follows (input columns split) produces partial sums that go
//! through `g` ([`TensorParallel::reduce_from_region`]: all-reduce forward, identity backward).
//! Both are candle custom ops, so `loss.backward()` runs the backward collectives by itself.
//! Every rank of the group runs the same graph, so candle's backward pass meets the collectives
//! in the same order on every rank and they line up.

use std::fmt;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use cohort_collective::{Communicator, ReduceOp};

use crate::error::{Result, TrainerError};

/// How a local parameter relates to its full tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds the whole tensor.
    Replicated,
    /// Dimension 0 is cut into tensor-size equal chunks; rank `r` holds chunk `r`.
    Rows,
    /// Dimension 1 is cut into tensor-size equal chunks; rank `r` holds chunk `r`.
    Columns,
}

/// A local parameter's global name, full shape and split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterLayout {
    /// Global, layout-independent name (the checkpoint key), e.g. `blocks.0.attention.q.weight`.
    pub name: String,
    /// Shape of the full (unsplit) tensor.
    pub full_shape: Vec<usize>,
    /// How the full tensor is split over the tensor-parallel ranks.
    pub split: Split,
}

impl ParameterLayout {
    /// Returns the shape each of `size` ranks holds, or an error when the split dimension is
    /// missing or not a multiple of `size`.
    pub fn local_shape(&self, size: usize) -> Result<Vec<usize>> {
        let dimension = match self.split {
            Split::Replicated => return Ok(self.full_shape.clone()),
            Split::Rows => 0,
            Split::Columns => 1,
        };
        let mut shape = self.full_shape.clone();
        match shape.get_mut(dimension) {
            Some(extent) if size > 0 && extent.is_multiple_of(size) => {
                *extent /= size;
                Ok(shape)
            }
            _ => Err(TrainerError::Config(format!(
                "parameter {}: {:?} split of shape {:?} over {size} tensor-parallel ranks, \
                 expected a dimension {dimension} divisible by {size}",
                self.name, self.split, self.full_shape
            ))),
        }
    }

    /// Returns rank `rank`'s slice (of [`Self::local_shape`]) of the full tensor `full`, given
    /// in row-major order.
    pub fn slice(&self, full: &[f32], rank: usize, size: usize) -> Result<Vec<f32>> {
        self.check_full_length(full.len())?;
        let local_shape = self.local_shape(size)?;
        if rank >= size {
            return Err(TrainerError::Config(format!(
                "parameter {}: slice of rank {rank}, expected a rank below {size}",
                self.name
            )));
        }
        let local_count: usize = local_shape.iter().product();
        Ok(match self.split {
            Split::Replicated => full.to_vec(),
            Split::Rows => full[rank * local_count..(rank + 1) * local_count].to_vec(),
            Split::Columns => {
                // Each full row of `columns * inner` elements gives one run of
                // `local_columns * inner` elements.
                let run: usize = local_shape[1..].iter().product();
                let row: usize = self.full_shape[1..].iter().product();
                full.chunks(row.max(1))
                    .flat_map(|full_row| &full_row[rank * run..(rank + 1) * run])
                    .copied()
                    .collect()
            }
        })
    }

    /// Reassembles the full tensor from the concatenation of all ranks' slices in rank order
    /// (what an all-gather of the slices returns).
    fn assemble(&self, gathered: &[f32], size: usize) -> Result<Vec<f32>> {
        self.check_full_length(gathered.len())?;
        let local_shape = self.local_shape(size)?;
        Ok(match self.split {
            Split::Replicated | Split::Rows => gathered.to_vec(),
            Split::Columns => {
                let local_count: usize = local_shape.iter().product();
                let run: usize = local_shape[1..].iter().product();
                let rows = self.full_shape[0];
                let mut full = Vec::with_capacity(gathered.len());
                for row in 0..rows {
                    for rank in 0..size {
                        let start = rank * local_count + row * run;
                        full.extend_from_slice(&gathered[start..start + run]);
                    }
                }
                full
            }
        })
    }

    fn check_full_length(&self, length: usize) -> Result<()> {
        let expected: usize = self.full_shape.iter().product();
        if length != expected {
            return Err(TrainerError::Config(format!(
                "parameter {}: full tensor of {length} elements, expected {expected} (shape {:?})",
                self.name, self.full_shape
            )));
        }
        Ok(())
    }
}

/// The communicator of a tensor-parallel group, shared by the custom ops that use it.
struct Group {
    /// The group's communicator; locked for each collective (the ops must be `Sync`).
    communicator: Mutex<Box<dyn Communicator + Send>>,
    /// The first collective failure, kept so that it can be reported as such after candle has
    /// turned it into a message.
    failure: Mutex<Option<cohort_collective::Error>>,
}

impl Group {
    /// Replaces `values` by their sum over the group.
    fn all_reduce(&self, values: &mut [f32]) -> candle_core::Result<()> {
        let mut communicator = self.communicator.lock().map_err(|_| {
            candle_core::Error::msg("tensor-parallel communicator poisoned by an earlier panic")
        })?;
        communicator
            .all_reduce(values.into(), ReduceOp::Sum)
            .map_err(|error| self.record(error))
    }

    /// Returns the all-reduced sum of `tensor` over the group, as a new tensor.
    fn all_reduce_tensor(&self, tensor: &Tensor) -> candle_core::Result<Tensor> {
        let mut values = tensor.flatten_all()?.to_vec1::<f32>()?;
        self.all_reduce(&mut values)?;
        Tensor::from_vec(values, tensor.shape(), tensor.device())
    }

    /// Keeps the first collective failure and returns it as a candle error.
    fn record(&self, error: cohort_collective::Error) -> candle_core::Error {
        let message = format!("tensor-parallel collective: {error}");
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert(error);
        }
        candle_core::Error::msg(message)
    }
}

/// This rank's view of its tensor-parallel group: rank, size and the `f` and `g` operators.
pub struct TensorParallel {
    /// The group; `None` for a group of one that never communicates.
    group: Option<Arc<Group>>,
    /// This rank within the group.
    rank: usize,
    /// Number of ranks in the group.
    size: usize,
}

impl fmt::Debug for TensorParallel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TensorParallel")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl TensorParallel {
    /// Returns a group of one: every operator is the identity and nothing is communicated.
    pub fn single() -> Self {
        Self {
            group: None,
            rank: 0,
            size: 1,
        }
    }

    /// Wraps the communicator of the tensor-parallel group; rank and size are its own.
    pub fn new(communicator: Box<dyn Communicator + Send>) -> Self {
        let (rank, size) = (communicator.rank(), communicator.world_size());
        Self {
            group: Some(Arc::new(Group {
                communicator: Mutex::new(communicator),
                failure: Mutex::new(None),
            })),
            rank,
            size,
        }
    }

    /// Returns this rank within the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Returns the number of ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Megatron's f: identity forward, all-reduce (sum) of the gradient backward. Applied to the
    /// replicated input of a column-parallel layer.
    pub fn copy_to_region(&self, x: &Tensor) -> Result<Tensor> {
        match self.communicating_group() {
            None => Ok(x.clone()),
            Some(group) => Ok(x.contiguous()?.apply_op1(CopyToRegion { group })?),
        }
    }

    /// Megatron's g: all-reduce (sum) forward, identity backward. Applied to the partial output
    /// of a row-parallel layer.
    pub fn reduce_from_region(&self, x: &Tensor) -> Result<Tensor> {
        match self.communicating_group() {
            None => Ok(x.clone()),
            Some(group) => Ok(x
                .contiguous()?
                .apply_op1(ReduceFromRegion { group })
                .map_err(|error| self.trainer_error(error))?),
        }
    }

    /// Gathers every rank's slice `local` (of shape `local_shape`) of the tensor described by
    /// `layout` into the full tensor, in row-major order (for checkpoints). Replicated tensors
    /// are returned as they are, without communicating; all ranks must call it for split ones.
    pub fn gather(
        &self,
        local: &[f32],
        layout: &ParameterLayout,
        local_shape: &[usize],
    ) -> Result<Vec<f32>> {
        let expected = layout.local_shape(self.size)?;
        let count: usize = local_shape.iter().product();
        if local_shape != expected.as_slice() || local.len() != count {
            return Err(TrainerError::Config(format!(
                "parameter {}: gather of {} elements of shape {local_shape:?}, expected shape \
                 {expected:?} on each of {} ranks",
                layout.name,
                local.len(),
                self.size
            )));
        }
        let group = match (layout.split, self.communicating_group()) {
            (Split::Replicated, _) | (_, None) => return Ok(local.to_vec()),
            (_, Some(group)) => group,
        };
        let mut gathered = vec![0.0; local.len() * self.size];
        let result = {
            let mut communicator = group.communicator.lock().map_err(|_| {
                TrainerError::Config(
                    "tensor-parallel communicator poisoned by an earlier panic".to_owned(),
                )
            })?;
            communicator.all_gather(local.into(), gathered.as_mut_slice().into())
        };
        result?;
        layout.assemble(&gathered, self.size)
    }

    /// Converts a candle error raised while running `f` or `g` (in a forward pass or in
    /// `loss.backward()`) into the crate's error: the collective failure behind it when there is
    /// one (so that [`TrainerError::failed_rank`] can name the culprit), the tensor error
    /// otherwise.
    pub fn trainer_error(&self, error: candle_core::Error) -> TrainerError {
        let failure = self
            .group
            .as_ref()
            .and_then(|group| group.failure.lock().ok()?.take());
        match failure {
            Some(failure) => TrainerError::Collective(failure),
            None => TrainerError::Tensor(error),
        }
    }

    /// Returns the group when it has more than one rank.
    fn communicating_group(&self) -> Option<Arc<Group>> {
        self.group.as_ref().filter(|_| self.size > 1).cloned()
    }
}

/// Returns a copy of the contiguous f32 elements of a custom op's input.
fn contiguous_values(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Vec<f32>> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("tensor-parallel operators expect f32 tensors");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("tensor-parallel operators expect contiguous tensors");
    };
    Ok(values[start..end].to_vec())
}

/// Megatron's f as a candle op: copies forward, all-reduces the gradient backward.
struct CopyToRegion {
    /// The group the gradient is summed over.
    group: Arc<Group>,
}

impl CustomOp1 for CopyToRegion {
    fn name(&self) -> &'static str {
        "cohort-tensor-parallel-copy-to-region"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let values = contiguous_values(storage, layout)?;
        Ok((CpuStorage::F32(values), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _argument: &Tensor,
        _result: &Tensor,
        result_gradient: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.group.all_reduce_tensor(result_gradient)?))
    }
}

/// Megatron's g as a candle op: all-reduces forward, passes the gradient through backward.
struct ReduceFromRegion {
    /// The group the input is summed over.
    group: Arc<Group>,
}

impl CustomOp1 for ReduceFromRegion {
    fn name(&self) -> &'static str {
        "cohort-tensor-parallel-reduce-from-region"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut values = contiguous_values(storage, layout)?;
        self.group.all_reduce(&mut values)?;
        Ok((CpuStorage::F32(values), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _argument: &Tensor,
        _result: &Tensor,
        result_gradient: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(result_gradient.clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use cohort_collective::{InMemoryStore, TcpRing, TcpRingConfig};

    use super::*;

    /// Runs `work` on `size` threads, each holding rank `r` of a group joined by a TCP ring,
    /// and returns their results in rank order.
    fn on_ring<T: Send>(size: usize, work: impl Fn(TensorParallel) -> T + Sync) -> Vec<T> {
        let store = InMemoryStore::new();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..size)
                .map(|rank| {
                    let (store, work) = (&store, &work);
                    scope.spawn(move || {
                        let ring = TcpRing::connect(
                            store,
                            "tensor-parallel",
                            rank,
                            size,
                            &TcpRingConfig::default(),
                        )
                        .unwrap();
                        work(TensorParallel::new(Box::new(ring)))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Returns the `2 x 3` matrix of rank `rank` used as input or weights.
    fn matrix(rank: usize, offset: f32) -> Vec<f32> {
        (0..6).map(|i| offset + (rank * 10 + i) as f32).collect()
    }

    #[test]
    fn copy_to_region_is_the_identity_forward_and_sums_gradients_backward() {
        let results = on_ring(2, |tensor_parallel| {
            let rank = tensor_parallel.rank();
            let x = Var::from_vec(matrix(0, 0.5), (2, 3), &Device::Cpu).unwrap();
            let y = tensor_parallel.copy_to_region(x.as_tensor()).unwrap();
            // Each rank weighs the copy differently: d loss_r / d x = weights_r on rank r.
            let weights = Tensor::from_vec(matrix(rank, -3.0), (2, 3), &Device::Cpu).unwrap();
            let loss = (&y * &weights).unwrap().sum_all().unwrap();
            let gradients = loss.backward().unwrap();
            let gradient = gradients.get(x.as_tensor()).unwrap();
            (
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                gradient.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        });
        let summed: Vec<f32> = matrix(0, -3.0)
            .iter()
            .zip(matrix(1, -3.0))
            .map(|(a, b)| a + b)
            .collect();
        for (output, gradient) in results {
            assert_eq!(output, matrix(0, 0.5));
            assert_eq!(gradient, summed);
        }
    }

    #[test]
    fn reduce_from_region_sums_forward_and_passes_gradients_through_backward() {
        let results = on_ring(2, |tensor_parallel| {
            let rank = tensor_parallel.rank();
            let x = Var::from_vec(matrix(rank, 0.25), (2, 3), &Device::Cpu).unwrap();
            // A transposed (strided) input: the op must read it in logical order.
            let y = tensor_parallel
                .reduce_from_region(&x.as_tensor().t().unwrap())
                .unwrap();
            let weights = Tensor::from_vec(matrix(7, 1.0), (3, 2), &Device::Cpu).unwrap();
            let loss = (&y * &weights).unwrap().sum_all().unwrap();
            let gradients = loss.backward().unwrap();
            let gradient = gradients.get(x.as_tensor()).unwrap();
            (
                y.to_vec2::<f32>().unwrap(),
                gradient.to_vec2::<f32>().unwrap(),
            )
        });
        let (a, b) = (matrix(0, 0.25), matrix(1, 0.25));
        let expected_sum: Vec<Vec<f32>> = (0..3)
            .map(|column| {
                (0..2)
                    .map(|row| a[row * 3 + column] + b[row * 3 + column])
                    .collect()
            })
            .collect();
        let weights = matrix(7, 1.0);
        let expected_gradient: Vec<Vec<f32>> = (0..2)
            .map(|row| (0..3).map(|column| weights[column * 2 + row]).collect())
            .collect();
        for (output, gradient) in results {
            assert_eq!(output, expected_sum);
            assert_eq!(gradient, expected_gradient);
        }
    }

    #[test]
    fn a_group_of_one_adds_no_operator() {
        let tensor_parallel = TensorParallel::single();
        assert_eq!((tensor_parallel.rank(), tensor_parallel.size()), (0, 1));
        let x = Tensor::from_vec(matrix(0, 0.0), (2, 3), &Device::Cpu).unwrap();
        for y in [
            tensor_parallel.copy_to_region(&x).unwrap(),
            tensor_parallel.reduce_from_region(&x).unwrap(),
        ] {
            assert_eq!(y.id(), x.id());
        }
    }

    #[test]
    fn layouts_slice_rows_and_columns() {
        let full: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let layout = |split| ParameterLayout {
            name: "w".to_owned(),
            full_shape: vec![4, 6],
            split,
        };
        assert_eq!(layout(Split::Rows).local_shape(2).unwrap(), [2, 6]);
        assert_eq!(
            layout(Split::Rows).slice(&full, 1, 2).unwrap(),
            (12..24).map(|i| i as f32).collect::<Vec<_>>()
        );
        assert_eq!(layout(Split::Columns).local_shape(3).unwrap(), [4, 2]);
        assert_eq!(
            layout(Split::Columns).slice(&full, 2, 3).unwrap(),
            [4.0, 5.0, 10.0, 11.0, 16.0, 17.0, 22.0, 23.0]
        );
        assert_eq!(layout(Split::Replicated).slice(&full, 1, 4).unwrap(), full);
        assert!(layout(Split::Rows).local_shape(3).is_err());
        assert!(layout(Split::Columns).slice(&full, 2, 2).is_err());
        assert!(layout(Split::Rows).slice(&full[1..], 0, 2).is_err());
        let bias = ParameterLayout {
            name: "b".to_owned(),
            full_shape: vec![6],
            split: Split::Columns,
        };
        assert!(bias.local_shape(2).is_err());
    }

    #[test]
    fn gather_reassembles_row_and_column_slices() {
        let full: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let results = on_ring(2, |tensor_parallel| {
            let (rank, size) = (tensor_parallel.rank(), tensor_parallel.size());
            [Split::Rows, Split::Columns, Split::Replicated].map(|split| {
                let layout = ParameterLayout {
                    name: "w".to_owned(),
                    full_shape: vec![4, 2, 3],
                    split,
                };
                let local = layout.slice(&full, rank, size).unwrap();
                let shape = layout.local_shape(size).unwrap();
                assert!(tensor_parallel.gather(&local, &layout, &[24]).is_err());
                tensor_parallel.gather(&local, &layout, &shape).unwrap()
            })
        });
        for gathered in results {
            assert_eq!(gathered, [full.clone(), full.clone(), full.clone()]);
        }
    }
}
