//! The trainable parameters of a model as one ordered set, with a flat f32 view of them.
//!
//! Each parameter is a candle [`Var`] (so `loss.backward()` produces its gradient) with a fixed
//! position in a virtual flat vector of all parameters. Gradient packing, collective exchange,
//! optimizer state and checkpoints all use that flat order, so every rank agrees on which
//! element is which without exchanging names. Values are read and written in place in the
//! `Var`s' own storage: no tensor is allocated on the update path. In-place updates need host
//! storage, so the sets the optimizer updates (the f32 masters) always live on the CPU; a
//! working copy elsewhere (another format, a GPU) is refreshed with [`ParameterSet::copy_from`]
//! and its gradients are copied back to the host as they are read.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Shape, Storage, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, TrainerError};

/// How a new parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Initialization {
    /// Uniform in `±sqrt(6 / fan_in)` (He et al., suited to ReLU layers).
    HeUniform {
        /// Inputs feeding one output unit.
        fan_in: usize,
    },
    /// All zeros (biases).
    Zeros,
}

/// One named parameter and its place in the flat vector.
#[derive(Debug, Clone)]
pub struct Parameter {
    /// Name used in checkpoints, e.g. `dense.0.weight`.
    name: String,
    /// The variable candle tracks gradients for.
    var: Var,
    /// Position of its first element in the flat vector.
    offset: usize,
}

impl Parameter {
    /// Returns the checkpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the tensor models compute with (shares storage with the variable).
    pub fn tensor(&self) -> &Tensor {
        self.var.as_tensor()
    }

    /// Returns the shape.
    pub fn shape(&self) -> &Shape {
        self.var.shape()
    }

    /// Returns the number of elements.
    pub fn len(&self) -> usize {
        self.var.elem_count()
    }

    /// Returns whether the parameter has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the range of the flat vector it occupies.
    pub fn flat_range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// All parameters of a model, in creation order.
#[derive(Debug, Clone)]
pub struct ParameterSet {
    /// The parameters, in flat-vector order.
    parameters: Vec<Parameter>,
    /// Sum of their element counts.
    element_count: usize,
    /// Device all parameters live on.
    device: Device,
    /// Element type of every parameter (f32 for master weights, bf16 or f16 for a working
    /// copy).
    dtype: DType,
}

impl ParameterSet {
    /// Creates an empty set of f32 parameters on `device`.
    pub fn new(device: Device) -> Self {
        Self::with_dtype(device, DType::F32)
    }

    /// Creates an empty set whose parameters are stored as `dtype` on `device`.
    pub fn with_dtype(device: Device, dtype: DType) -> Self {
        Self {
            parameters: Vec::new(),
            element_count: 0,
            device,
            dtype,
        }
    }

    /// Element type of the parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Overwrites every parameter with the value of the parameter at the same position of
    /// `master` (same names and shapes), moved to this set's device and converted to its element
    /// type: how a working copy (bf16 or f16 for mixed precision, on a GPU for a GPU rank) is
    /// refreshed from the f32 host masters after each step. On a GPU each parameter crosses to
    /// the device as f32 and is narrowed there.
    pub fn copy_from(&self, master: &ParameterSet) -> Result<()> {
        if master.parameters.len() != self.parameters.len() {
            return Err(TrainerError::Config(format!(
                "{} master parameters for {} working ones",
                master.parameters.len(),
                self.parameters.len()
            )));
        }
        let same_place = self.device.same_device(&master.device) && self.dtype == master.dtype;
        for (working, master) in self.parameters.iter().zip(&master.parameters) {
            if working.name != master.name || working.var.shape() != master.var.shape() {
                return Err(TrainerError::Config(format!(
                    "master parameter {} {:?} does not match working parameter {} {:?}",
                    master.name,
                    master.var.shape(),
                    working.name,
                    working.var.shape()
                )));
            }
            let source = master.var.as_tensor();
            let converted = if same_place {
                // Neither move nor conversion copies: a variable cannot be set from itself.
                source.copy()?
            } else {
                source.to_device(&self.device)?.to_dtype(self.dtype)?
            };
            working.var.set(&converted)?;
        }
        Ok(())
    }

    /// Creates a parameter, draws its initial values from `rng` and returns the tensor a layer
    /// should hold.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        shape: impl Into<Shape>,
        initialization: Initialization,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let count = shape.elem_count();
        let values: Vec<f32> = match initialization {
            Initialization::HeUniform { fan_in } => {
                let bound = (6.0 / fan_in.max(1) as f64).sqrt() as f32;
                (0..count)
                    .map(|_| rng.random_range(-bound..=bound))
                    .collect()
            }
            Initialization::Zeros => vec![0.0; count],
        };
        self.add_values(name, shape, values)
    }

    /// Creates a parameter holding `values` (row-major, of `shape`'s element count), stored in
    /// this set's element type on its device, and returns the tensor a layer should hold.
    pub fn add_values(
        &mut self,
        name: impl Into<String>,
        shape: impl Into<Shape>,
        values: Vec<f32>,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let name = name.into();
        let count = shape.elem_count();
        if values.len() != count {
            return Err(TrainerError::Config(format!(
                "parameter {name}: {} values for shape {shape:?} ({count} elements)",
                values.len()
            )));
        }
        let var = Var::from_vec(values, shape, &self.device)?;
        let var = if self.dtype == DType::F32 {
            var
        } else {
            Var::from_tensor(&var.as_tensor().to_dtype(self.dtype)?)?
        };
        let tensor = var.as_tensor().clone();
        self.parameters.push(Parameter {
            name,
            var,
            offset: self.element_count,
        });
        self.element_count += count;
        Ok(tensor)
    }

    /// Returns the parameters in flat order.
    pub fn iter(&self) -> std::slice::Iter<'_, Parameter> {
        self.parameters.iter()
    }

    /// Returns the number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.parameters.len()
    }

    /// Returns whether the set holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.parameters.is_empty()
    }

    /// Returns the total number of scalar elements, the length of the flat vector.
    pub fn element_count(&self) -> usize {
        self.element_count
    }

    /// Returns the device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Copies every parameter's values into `flat` (of [`Self::element_count`] elements).
    pub fn read_values(&self, flat: &mut [f32]) -> Result<()> {
        self.check_flat_length(flat.len())?;
        for parameter in &self.parameters {
            with_f32_values(parameter.tensor(), |values| {
                flat[parameter.flat_range()].copy_from_slice(values);
            })?;
        }
        Ok(())
    }

    /// Overwrites every parameter's values from `flat`, in place.
    pub fn write_values(&self, flat: &[f32]) -> Result<()> {
        self.check_flat_length(flat.len())?;
        for (index, parameter) in self.parameters.iter().enumerate() {
            let source = &flat[parameter.flat_range()];
            self.update(index, |values| values.copy_from_slice(source))?;
        }
        Ok(())
    }

    /// Copies the gradients of `gradients` into `flat`, multiplied by `scale`; a parameter the
    /// loss does not depend on gets zeros.
    pub fn read_gradients(
        &self,
        gradients: &GradStore,
        flat: &mut [f32],
        scale: f32,
    ) -> Result<()> {
        self.check_flat_length(flat.len())?;
        for (index, parameter) in self.parameters.iter().enumerate() {
            self.read_gradient(index, gradients, &mut flat[parameter.flat_range()], scale)?;
        }
        Ok(())
    }

    /// Copies the gradient of parameter `index` into `destination` (of the parameter's length),
    /// multiplied by `scale`; zeros when the loss does not depend on it.
    pub fn read_gradient(
        &self,
        index: usize,
        gradients: &GradStore,
        destination: &mut [f32],
        scale: f32,
    ) -> Result<()> {
        let parameter = self.get(index)?;
        if destination.len() != parameter.len() {
            return Err(TrainerError::Config(format!(
                "gradient buffer of {} elements for {} ({} elements)",
                destination.len(),
                parameter.name,
                parameter.len()
            )));
        }
        match gradients.get(parameter.tensor()) {
            Some(gradient) => copy_scaled(gradient, destination, scale),
            None => {
                destination.fill(0.0);
                Ok(())
            }
        }
    }

    /// Returns parameter `index`.
    pub fn get(&self, index: usize) -> Result<&Parameter> {
        self.parameters.get(index).ok_or_else(|| {
            TrainerError::Config(format!(
                "parameter {index} requested from a set of {}",
                self.parameters.len()
            ))
        })
    }

    /// Runs `update` on the values of parameter `index`, in place in its storage.
    pub fn update(&self, index: usize, update: impl FnMut(&mut [f32])) -> Result<()> {
        self.get(index)?.var.inplace_op1(&InPlaceUpdate {
            update: RefCell::new(update),
        })?;
        Ok(())
    }

    fn check_flat_length(&self, length: usize) -> Result<()> {
        if length != self.element_count {
            return Err(TrainerError::Config(format!(
                "flat buffer of {length} elements, expected {}",
                self.element_count
            )));
        }
        Ok(())
    }
}

/// Calls `read` with the f32 elements of `tensor` in row-major order, without copying when the
/// tensor is a contiguous CPU tensor.
pub(crate) fn with_f32_values<T>(tensor: &Tensor, read: impl FnOnce(&[f32]) -> T) -> Result<T> {
    check_f32(tensor)?;
    {
        let (storage, layout) = tensor.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(read(&values[start..end]));
        }
    }
    // A strided view or another device: copy it out.
    let values = tensor.flatten_all()?.to_vec1::<f32>()?;
    Ok(read(&values))
}

fn check_f32(tensor: &Tensor) -> Result<()> {
    if tensor.dtype() != DType::F32 {
        return Err(TrainerError::Config(format!(
            "tensor of {:?}, expected f32",
            tensor.dtype()
        )));
    }
    Ok(())
}

/// Side of the square tiles of [`copy_transposed_scaled`].
const TILE: usize = 32;

/// Writes `scale` times the elements of `tensor`, in row-major order, into `destination`
/// (of the tensor's element count). Contiguous tensors and transposed matrices (the layout of
/// candle's weight gradients) are copied without an intermediate allocation.
pub(crate) fn copy_scaled(tensor: &Tensor, destination: &mut [f32], scale: f32) -> Result<()> {
    // Gradients of a bf16 or f16 working copy are widened first.
    let widened;
    let tensor = if tensor.dtype() == DType::F32 {
        tensor
    } else {
        widened = tensor.to_dtype(DType::F32)?;
        &widened
    };
    {
        let (storage, layout) = tensor.storage_and_layout();
        if let Storage::Cpu(CpuStorage::F32(values)) = &*storage {
            if let Some((start, end)) = layout.contiguous_offsets() {
                for (out, &value) in destination.iter_mut().zip(&values[start..end]) {
                    *out = value * scale;
                }
                return Ok(());
            }
            if let (&[rows, columns], &[1, column_stride]) = (layout.dims(), layout.stride())
                && column_stride == rows
            {
                let start = layout.start_offset();
                let source = &values[start..start + rows * columns];
                copy_transposed_scaled(source, rows, columns, destination, scale);
                return Ok(());
            }
        }
    }
    with_f32_values(tensor, |values| {
        for (out, &value) in destination.iter_mut().zip(values) {
            *out = value * scale;
        }
    })
}

/// Writes the `rows x columns` row-major matrix whose column-major elements are `source`,
/// scaled, into `destination`, tile by tile so that both sides stay in cache.
fn copy_transposed_scaled(
    source: &[f32],
    rows: usize,
    columns: usize,
    destination: &mut [f32],
    scale: f32,
) {
    for row_tile in (0..rows).step_by(TILE) {
        for column_tile in (0..columns).step_by(TILE) {
            for row in row_tile..(row_tile + TILE).min(rows) {
                let out = &mut destination[row * columns..(row + 1) * columns];
                for column in column_tile..(column_tile + TILE).min(columns) {
                    out[column] = source[column * rows + row] * scale;
                }
            }
        }
    }
}

/// An in-place candle op handing the contiguous f32 storage of a tensor to a closure.
struct InPlaceUpdate<F> {
    /// The closure; in a `RefCell` because candle passes the op by shared reference.
    update: RefCell<F>,
}

impl<F: FnMut(&mut [f32])> InplaceOp1 for InPlaceUpdate<F> {
    fn name(&self) -> &'static str {
        "cohort-parameter-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("parameter update expects f32 storage");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("parameter update expects a contiguous parameter");
        };
        (self.update.borrow_mut())(&mut values[start..end]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn two_parameters(seed: u64) -> ParameterSet {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut set = ParameterSet::new(Device::Cpu);
        set.add(
            "w",
            (3, 2),
            Initialization::HeUniform { fan_in: 2 },
            &mut rng,
        )
        .unwrap();
        set.add("b", 3, Initialization::Zeros, &mut rng).unwrap();
        set
    }

    #[test]
    fn flat_round_trip_and_in_place_update() {
        let set = two_parameters(1);
        assert_eq!(set.element_count(), 9);
        let mut flat = vec![0.0; 9];
        set.read_values(&mut flat).unwrap();
        let bound = 3f32.sqrt();
        assert!(flat[..6].iter().all(|v| v.abs() <= bound && *v != 0.0));
        assert_eq!(&flat[6..], &[0.0; 3]);
        let replacement: Vec<f32> = (0..9).map(|i| i as f32).collect();
        set.write_values(&replacement).unwrap();
        let weight = set
            .iter()
            .next()
            .unwrap()
            .tensor()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(weight, vec![vec![0.0, 1.0], vec![2.0, 3.0], vec![4.0, 5.0]]);
        set.update(1, |values| values[0] = -1.0).unwrap();
        set.read_values(&mut flat).unwrap();
        assert_eq!(flat[6], -1.0);
        assert!(set.write_values(&[0.0; 4]).is_err());
        assert!(set.update(2, |_| ()).is_err());
    }

    #[test]
    fn a_working_copy_takes_the_masters_values_in_its_own_format() {
        let master = two_parameters(3);
        let mut expected = vec![0.0; 9];
        master.read_values(&mut expected).unwrap();
        let mut working = ParameterSet::with_dtype(Device::Cpu, DType::BF16);
        working.add_values("w", (3, 2), vec![0.0; 6]).unwrap();
        working.add_values("b", 3, vec![0.0; 3]).unwrap();
        working.copy_from(&master).unwrap();
        for parameter in working.iter() {
            assert_eq!(parameter.tensor().dtype(), DType::BF16);
            let widened = parameter
                .tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let rounded: Vec<f32> = expected[parameter.flat_range()]
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            assert_eq!(widened, rounded, "{}", parameter.name());
        }
        // A copy in the master's own place and format is a plain copy.
        let same = two_parameters(4);
        same.copy_from(&master).unwrap();
        let mut copied = vec![0.0; 9];
        same.read_values(&mut copied).unwrap();
        assert_eq!(copied, expected);
        // Sets of other parameters are refused.
        let mut other = ParameterSet::new(Device::Cpu);
        other.add_values("x", (3, 2), vec![0.0; 6]).unwrap();
        other.add_values("b", 3, vec![0.0; 3]).unwrap();
        let error = other.copy_from(&master).unwrap_err().to_string();
        assert!(error.contains("does not match"), "{error}");
        let error = other
            .add_values("c", (2, 2), vec![0.0; 3])
            .unwrap_err()
            .to_string();
        assert!(error.contains("3 values for shape [2, 2]"), "{error}");
    }

    #[test]
    fn same_seed_same_values() {
        let (mut a, mut b) = (vec![0.0; 9], vec![0.0; 9]);
        two_parameters(5).read_values(&mut a).unwrap();
        two_parameters(5).read_values(&mut b).unwrap();
        assert_eq!(a, b);
        two_parameters(6).read_values(&mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn gradients_are_packed_scaled_including_transposed_ones() {
        let set = two_parameters(2);
        let mut parameters = set.iter();
        let weight = parameters.next().unwrap().tensor().clone();
        let bias = parameters.next().unwrap().tensor().clone();
        // y = x W^T + b summed: dL/dW[i][j] = sum over rows of x[.][j]; dL/db[i] = rows.
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let loss = x
            .matmul(&weight.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            .sum_all()
            .unwrap();
        let gradients = loss.backward().unwrap();
        let mut flat = vec![0.0; 9];
        set.read_gradients(&gradients, &mut flat, 0.5).unwrap();
        assert_eq!(flat, vec![2.0, 3.0, 2.0, 3.0, 2.0, 3.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn transposed_and_strided_tensors_are_copied_in_row_major_order() {
        let matrix = Tensor::arange(0f32, 70.0, &Device::Cpu)
            .unwrap()
            .reshape((7, 10))
            .unwrap();
        let expected: Vec<f32> = matrix
            .t()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v * 2.0)
            .collect();
        let mut copied = vec![0.0; 70];
        copy_scaled(&matrix.t().unwrap(), &mut copied, 2.0).unwrap();
        assert_eq!(copied, expected);
        // A column slice is neither contiguous nor a transpose: the general path.
        let narrow = matrix.narrow(1, 2, 3).unwrap();
        let mut copied = vec![0.0; 21];
        copy_scaled(&narrow, &mut copied, 1.0).unwrap();
        assert_eq!(copied[..4], [2.0, 3.0, 4.0, 12.0]);
    }
}
