//! Checkpoints: model weights and optimizer state in safetensors, with the step they belong to.
//!
//! A checkpoint is a directory `step-NNNNNNNN/` holding
//! - `model.safetensors`: one f32 tensor per parameter, under its name and shape, readable by
//!   any safetensors tool;
//! - `optimizer.safetensors`: the flat optimizer buffers (`momentum_buffer`, or
//!   `first_moment` and `second_moment`) in parameter order.
//!
//! - `evaluation.txt`, when an evaluation ran at its step: that evaluation
//!   ([`EVALUATION_FILE`]), what [`list`] reads to rank checkpoints for retention.
//!
//! Both tensor files carry the step in their metadata, and the model file the position in the data
//! stream after that step (`epoch`, `epoch_offset`: examples of that epoch's shuffled order
//! already trained on), so that a resumed run continues with exactly the examples that come next.
//! The directory is written under a temporary name (`.step-NNNNNNNN.partial-PID`), its files
//! and itself flushed to disk, and only then renamed into place ([`commit`]): a crash, even a
//! `SIGKILL` in the middle of a write, never leaves a half-written checkpoint under a final
//! name, so [`latest`] only ever finds complete ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cohort_jobspec::train::OptimizerKind;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Result, TrainerError};
use crate::metrics::EvaluationMetrics;
use crate::optim::{Optimizer, OptimizerState};
use crate::parameters::ParameterSet;
use crate::sampler::DataPosition;

/// File holding the model weights.
pub const MODEL_FILE: &str = "model.safetensors";
/// File holding the optimizer state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Value of the `format` metadata key.
pub(crate) const FORMAT: &str = "cohort-checkpoint-v1";

/// What a loaded checkpoint restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoredCheckpoint {
    /// Optimizer steps completed when it was written; training resumes with this step.
    pub step: u64,
    /// Where the data stream stood after that step (`None` in checkpoints written before
    /// positions were recorded).
    pub position: Option<DataPosition>,
}

/// Returns the complete checkpoint of the highest step in `directory`, if any: what a restarted
/// run resumes from. Partial checkpoints (a write that was cut short) have hidden names and are
/// never returned; a missing directory holds none.
pub fn latest(directory: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(complete_checkpoints(directory)?.pop())
}

/// The complete checkpoints in `directory` by step, lowest first (none in a missing directory).
fn complete_checkpoints(directory: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(checkpoint_error(directory, error)),
    };
    let mut checkpoints = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| checkpoint_error(directory, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|name| name.strip_prefix("step-"))
            .and_then(|digits| digits.parse::<u64>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if is_checkpoint(&path) {
            checkpoints.push((step, path));
        }
    }
    checkpoints.sort();
    Ok(checkpoints)
}

/// A complete checkpoint found in a directory.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointEntry {
    /// Optimizer steps completed when it was written.
    pub step: u64,
    /// Its directory.
    pub path: PathBuf,
    /// Total bytes of its files.
    pub bytes: u64,
    /// The evaluation recorded at its step, if one ran there (and its file reads back).
    pub evaluation: Option<EvaluationMetrics>,
}

/// Lists the complete checkpoints in `directory`, lowest step first, with their sizes and
/// recorded evaluations: what retention ranks, after a restart as during a run. A missing
/// directory holds none; an evaluation file that does not read back is logged and counts as
/// no evaluation.
pub fn list(directory: &Path) -> Result<Vec<CheckpointEntry>> {
    complete_checkpoints(directory)?
        .into_iter()
        .map(|(step, path)| {
            let evaluation = read_evaluation(&path).unwrap_or_else(|error| {
                tracing::warn!(step, %error, "a checkpoint's evaluation does not read back");
                None
            });
            Ok(CheckpointEntry {
                step,
                bytes: size(&path)?,
                path,
                evaluation,
            })
        })
        .collect()
}

/// Returns the total bytes of the files in the checkpoint directory `path`.
pub fn size(path: &Path) -> Result<u64> {
    let mut bytes = 0;
    for entry in std::fs::read_dir(path).map_err(|e| checkpoint_error(path, e))? {
        let metadata = entry
            .and_then(|entry| entry.metadata())
            .map_err(|e| checkpoint_error(path, e))?;
        if metadata.is_file() {
            bytes += metadata.len();
        }
    }
    Ok(bytes)
}

/// Deletes the checkpoint at `path`: renamed to a hidden name first (atomically, so that no
/// half-deleted checkpoint is ever found under its final name), then removed.
pub fn remove(path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| checkpoint_error(path, "not a checkpoint directory name"))?;
    let doomed = path.with_file_name(format!(".{name}.deleting-{}", std::process::id()));
    std::fs::rename(path, &doomed).map_err(|e| checkpoint_error(path, e))?;
    std::fs::remove_dir_all(&doomed).map_err(|e| checkpoint_error(&doomed, e))
}

/// File inside a checkpoint holding the evaluation at its step, when one ran there: lines
/// `key = value` (`step`, `epoch`, `loss`, `accuracy`, `examples`).
pub const EVALUATION_FILE: &str = "evaluation.txt";

/// The file (name and bytes) recording `evaluation` in a checkpoint, written with its other
/// files before the checkpoint is committed.
pub fn evaluation_file(evaluation: &EvaluationMetrics) -> (String, Vec<u8>) {
    // `{}` prints the shortest text that reads back as the same float.
    let text = format!(
        "step = {}\nepoch = {}\nloss = {}\naccuracy = {}\nexamples = {}\n",
        evaluation.step,
        evaluation.epoch,
        evaluation.loss,
        evaluation.accuracy,
        evaluation.examples
    );
    (EVALUATION_FILE.to_owned(), text.into_bytes())
}

/// Reads the evaluation recorded in the checkpoint at `path`: `None` when it has none.
pub fn read_evaluation(path: &Path) -> Result<Option<EvaluationMetrics>> {
    let file = path.join(EVALUATION_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(checkpoint_error(&file, error)),
    };
    let values: HashMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect();
    fn field<T: std::str::FromStr>(
        file: &Path,
        values: &HashMap<&str, &str>,
        key: &str,
    ) -> Result<T> {
        values
            .get(key)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| {
                checkpoint_error(
                    file,
                    format!("{key} = {:?}, expected a number", values.get(key)),
                )
            })
    }
    Ok(Some(EvaluationMetrics {
        step: field(&file, &values, "step")?,
        epoch: field(&file, &values, "epoch")?,
        loss: field(&file, &values, "loss")?,
        accuracy: field(&file, &values, "accuracy")?,
        examples: field(&file, &values, "examples")?,
    }))
}

/// Makes the checkpoint written into `partial` durable and visible as `final_path`: flushes
/// every file in it and the directory itself, replaces an older checkpoint of the same step,
/// renames, and flushes the parent directory so that the rename survives a crash too.
pub(crate) fn commit(partial: &Path, final_path: &Path) -> Result<()> {
    commit_or_stop(partial, final_path, false)
}

/// [`commit`], first stopping this process (`SIGSTOP`) when `stop_first`: the fault injection
/// of [`crate::TrainConfig::stop_in_checkpoint`].
fn commit_or_stop(partial: &Path, final_path: &Path, stop_first: bool) -> Result<()> {
    if stop_first {
        tracing::warn!(path = %partial.display(), "fault injection: stopping in the middle of a checkpoint write");
        // SAFETY: raise has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
    let io_error = |path: &Path, error: std::io::Error| checkpoint_error(path, error);
    for entry in std::fs::read_dir(partial).map_err(|e| io_error(partial, e))? {
        let path = entry.map_err(|e| io_error(partial, e))?.path();
        std::fs::File::open(&path)
            .and_then(|file| file.sync_all())
            .map_err(|e| io_error(&path, e))?;
    }
    sync_directory(partial)?;
    if final_path.exists() {
        std::fs::remove_dir_all(final_path).map_err(|e| io_error(final_path, e))?;
    }
    std::fs::rename(partial, final_path).map_err(|e| io_error(final_path, e))?;
    if let Some(parent) = final_path.parent() {
        sync_directory(parent)?;
    }
    Ok(())
}

/// Flushes a directory's entries to disk.
fn sync_directory(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(|e| checkpoint_error(path, e))
}

/// Metadata key of the epoch a checkpoint's data position is in.
const EPOCH_KEY: &str = "epoch";
/// Metadata key of the examples of that epoch already trained on.
const EPOCH_OFFSET_KEY: &str = "epoch_offset";

/// Returns whether `path` looks like a checkpoint directory written by this crate.
pub fn is_checkpoint(path: &Path) -> bool {
    path.join(MODEL_FILE).is_file() && path.join(OPTIMIZER_FILE).is_file()
}

/// Returns the directory name of the checkpoint of `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

pub(crate) fn checkpoint_error(path: &Path, message: impl std::fmt::Display) -> TrainerError {
    TrainerError::Checkpoint {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn optimizer_name(state: &OptimizerState) -> &'static str {
    match state {
        OptimizerState::Sgd { .. } => "sgd",
        OptimizerState::AdamW { .. } => "adamw",
    }
}

fn to_le_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// Writes the checkpoint of `step`, with the data stream at `position` after it, into
/// `directory` (created if missing) and returns its path.
pub fn save(
    directory: &Path,
    step: u64,
    position: DataPosition,
    parameters: &ParameterSet,
    optimizer: &Optimizer,
) -> Result<PathBuf> {
    save_with_files(directory, step, position, parameters, optimizer, &[], false)
}

/// Returns the file name of parameter-server shard `shard`'s snapshot inside a checkpoint.
pub fn parameter_server_snapshot_name(shard: u32) -> String {
    format!("parameter-server-shard-{shard}.safetensors")
}

/// Reads parameter-server shard `shard`'s snapshot from the checkpoint at `path`, if it has
/// one (checkpoints of all-reduce jobs have none).
pub fn read_parameter_server_snapshot(path: &Path, shard: u32) -> Result<Option<Vec<u8>>> {
    let file = path.join(parameter_server_snapshot_name(shard));
    match std::fs::read(&file) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if path.join(MODEL_FILE).is_file() {
                Ok(None)
            } else {
                Err(checkpoint_error(path, "not a checkpoint: no model file"))
            }
        }
        Err(error) => Err(checkpoint_error(&file, error)),
    }
}

/// Like [`save`], with `extra_files` (name and bytes, e.g. parameter-server snapshots or
/// [`evaluation_file`]) written into the checkpoint before it appears under its final name,
/// stopping in the middle of the write when `stop_in_write` (fault injection, see
/// [`crate::TrainConfig::stop_in_checkpoint`]).
pub fn save_with_files(
    directory: &Path,
    step: u64,
    position: DataPosition,
    parameters: &ParameterSet,
    optimizer: &Optimizer,
    extra_files: &[(String, Vec<u8>)],
    stop_in_write: bool,
) -> Result<PathBuf> {
    let final_path = directory.join(checkpoint_name(step));
    let partial_path = directory.join(format!(
        ".{}.partial-{}",
        checkpoint_name(step),
        std::process::id()
    ));
    let io_error = |path: &Path, error: std::io::Error| checkpoint_error(path, error);
    std::fs::create_dir_all(&partial_path).map_err(|e| io_error(&partial_path, e))?;

    let metadata = |extra: (&str, &str)| -> HashMap<String, String> {
        HashMap::from([
            ("format".to_owned(), FORMAT.to_owned()),
            ("step".to_owned(), step.to_string()),
            (extra.0.to_owned(), extra.1.to_owned()),
        ])
    };

    let mut flat = vec![0.0f32; parameters.element_count()];
    parameters.read_values(&mut flat)?;
    let model_bytes: Vec<(String, Vec<usize>, Vec<u8>)> = parameters
        .iter()
        .map(|p| {
            (
                p.name().to_owned(),
                p.shape().dims().to_vec(),
                to_le_bytes(&flat[p.flat_range()]),
            )
        })
        .collect();
    let mut model_metadata = metadata(("parameters", &parameters.element_count().to_string()));
    model_metadata.insert(EPOCH_KEY.to_owned(), position.epoch.to_string());
    model_metadata.insert(EPOCH_OFFSET_KEY.to_owned(), position.offset.to_string());
    write_tensors(&partial_path.join(MODEL_FILE), &model_bytes, model_metadata)?;

    let state = optimizer.state();
    let optimizer_bytes: Vec<(String, Vec<usize>, Vec<u8>)> = state
        .buffers()
        .into_iter()
        .map(|(name, values)| (name.to_owned(), vec![values.len()], to_le_bytes(values)))
        .collect();
    let mut optimizer_metadata = metadata(("optimizer", optimizer_name(state)));
    optimizer_metadata.insert(
        "steps_taken".to_owned(),
        optimizer.steps_taken().to_string(),
    );
    write_tensors(
        &partial_path.join(OPTIMIZER_FILE),
        &optimizer_bytes,
        optimizer_metadata,
    )?;

    for (name, bytes) in extra_files {
        let path = partial_path.join(name);
        std::fs::write(&path, bytes).map_err(|e| io_error(&path, e))?;
    }

    commit_or_stop(&partial_path, &final_path, stop_in_write)?;
    tracing::info!(step, %position, path = %final_path.display(), "checkpoint written");
    Ok(final_path)
}

pub(crate) fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| checkpoint_error(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| checkpoint_error(path, e))
}

/// A safetensors file read into memory.
pub(crate) struct TensorFile {
    /// Where it was read from, for errors.
    path: PathBuf,
    /// Its bytes.
    bytes: Vec<u8>,
}

impl TensorFile {
    pub(crate) fn read(path: PathBuf) -> Result<Self> {
        let bytes = std::fs::read(&path).map_err(|e| checkpoint_error(&path, e))?;
        Ok(Self { path, bytes })
    }

    pub(crate) fn parse(&self) -> Result<(SafeTensors<'_>, HashMap<String, String>)> {
        let (_, metadata) =
            SafeTensors::read_metadata(&self.bytes).map_err(|e| checkpoint_error(&self.path, e))?;
        let metadata = metadata.metadata().clone().unwrap_or_default();
        if metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(checkpoint_error(
                &self.path,
                format!(
                    "metadata format {:?}, expected {FORMAT:?}",
                    metadata.get("format")
                ),
            ));
        }
        let tensors =
            SafeTensors::deserialize(&self.bytes).map_err(|e| checkpoint_error(&self.path, e))?;
        Ok((tensors, metadata))
    }

    pub(crate) fn number(&self, metadata: &HashMap<String, String>, key: &str) -> Result<u64> {
        metadata
            .get(key)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| {
                checkpoint_error(
                    &self.path,
                    format!(
                        "metadata {key} = {:?}, expected an integer",
                        metadata.get(key)
                    ),
                )
            })
    }

    /// Reads tensor `name` as f32 values, checking its type and shape.
    pub(crate) fn values(
        &self,
        tensors: &SafeTensors<'_>,
        name: &str,
        shape: &[usize],
    ) -> Result<Vec<f32>> {
        let view = tensors
            .tensor(name)
            .map_err(|e| checkpoint_error(&self.path, format!("tensor {name}: {e}")))?;
        if view.dtype() != Dtype::F32 || view.shape() != shape {
            return Err(checkpoint_error(
                &self.path,
                format!(
                    "tensor {name} is {:?} {:?}, expected F32 {shape:?}",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Loads only the weights of the checkpoint at `path` into `parameters` (for parameter-server
/// jobs, whose optimizer state lives in the servers' snapshots), checking names and shapes.
pub fn load_weights(path: &Path, parameters: &ParameterSet) -> Result<RestoredCheckpoint> {
    let (flat, restored) = read_weights(path, parameters)?;
    parameters.write_values(&flat)?;
    tracing::info!(step = restored.step, path = %path.display(), "checkpoint weights loaded");
    Ok(restored)
}

/// Reads and checks the weights of the checkpoint at `path` against `parameters`; returns the
/// flat values and the checkpoint's step and data position.
fn read_weights(path: &Path, parameters: &ParameterSet) -> Result<(Vec<f32>, RestoredCheckpoint)> {
    let model_file = TensorFile::read(path.join(MODEL_FILE))?;
    let (tensors, metadata) = model_file.parse()?;
    let step = model_file.number(&metadata, "step")?;
    let position = if metadata.contains_key(EPOCH_KEY) {
        Some(DataPosition {
            epoch: model_file.number(&metadata, EPOCH_KEY)?,
            offset: model_file.number(&metadata, EPOCH_OFFSET_KEY)?,
        })
    } else {
        None
    };
    let mut flat = vec![0.0f32; parameters.element_count()];
    for parameter in parameters.iter() {
        let values = model_file.values(&tensors, parameter.name(), parameter.shape().dims())?;
        flat[parameter.flat_range()].copy_from_slice(&values);
    }
    if tensors.len() != parameters.len() {
        return Err(checkpoint_error(
            &model_file.path,
            format!(
                "{} tensors, expected the model's {} parameters",
                tensors.len(),
                parameters.len()
            ),
        ));
    }
    Ok((flat, RestoredCheckpoint { step, position }))
}

/// Loads the checkpoint at `path` into `parameters` and `optimizer`, checking that names,
/// shapes, optimizer kind and step agree with what this run built. Nothing is modified unless
/// everything checks out.
pub fn load(
    path: &Path,
    parameters: &ParameterSet,
    optimizer: &mut Optimizer,
    optimizer_kind: OptimizerKind,
) -> Result<RestoredCheckpoint> {
    let (flat, restored_checkpoint) = read_weights(path, parameters)?;
    let step = restored_checkpoint.step;

    let optimizer_file = TensorFile::read(path.join(OPTIMIZER_FILE))?;
    let (tensors, metadata) = optimizer_file.parse()?;
    let expected_kind = match optimizer_kind {
        OptimizerKind::Sgd => "sgd",
        OptimizerKind::Adamw => "adamw",
    };
    if metadata.get("optimizer").map(String::as_str) != Some(expected_kind) {
        return Err(checkpoint_error(
            &optimizer_file.path,
            format!(
                "optimizer {:?}, expected {expected_kind:?} as the job spec says",
                metadata.get("optimizer")
            ),
        ));
    }
    let optimizer_step = optimizer_file.number(&metadata, "step")?;
    if optimizer_step != step {
        return Err(checkpoint_error(
            &optimizer_file.path,
            format!("step {optimizer_step}, expected {step} as in {MODEL_FILE}"),
        ));
    }
    let steps_taken = optimizer_file.number(&metadata, "steps_taken")?;
    let mut buffers = Vec::new();
    for (name, current) in optimizer.state().buffers() {
        let values = optimizer_file.values(&tensors, name, &[current.len()])?;
        buffers.push((name.to_owned(), values));
    }
    let mut restored = optimizer.clone();
    restored
        .restore(steps_taken, &buffers)
        .map_err(|e| checkpoint_error(&optimizer_file.path, e))?;
    parameters.write_values(&flat)?;
    *optimizer = restored;
    tracing::info!(step, path = %path.display(), "checkpoint loaded");
    Ok(restored_checkpoint)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use cohort_jobspec::train::{ModelSpec, OptimizerSpec};

    use super::*;
    use crate::models::Model;

    fn model(seed: u64) -> Model {
        let spec = ModelSpec {
            hidden: vec![5],
            seed,
            ..ModelSpec::default()
        };
        Model::new(&spec, (2, 3), 4, &Device::Cpu).unwrap()
    }

    fn flat_values(parameters: &ParameterSet) -> Vec<f32> {
        let mut flat = vec![0.0; parameters.element_count()];
        parameters.read_values(&mut flat).unwrap();
        flat
    }

    #[test]
    fn save_then_load_restores_weights_state_and_step() {
        let dir = tempfile::tempdir().unwrap();
        let source = model(1);
        let spec = OptimizerSpec::default();
        let count = source.parameters().element_count();
        let mut optimizer = Optimizer::new(&spec, count).unwrap();
        let gradients: Vec<f32> = (0..count).map(|i| (i as f32).sin()).collect();
        optimizer
            .step(source.parameters(), &gradients, 0.01)
            .unwrap();
        let position = DataPosition {
            epoch: 2,
            offset: 640,
        };
        let path = save(dir.path(), 17, position, source.parameters(), &optimizer).unwrap();
        assert_eq!(path, dir.path().join("step-00000017"));

        let target = model(2);
        assert_ne!(
            flat_values(target.parameters()),
            flat_values(source.parameters())
        );
        let mut restored = Optimizer::new(&spec, count).unwrap();
        let loaded = load(&path, target.parameters(), &mut restored, spec.kind).unwrap();
        assert_eq!(loaded.step, 17);
        assert_eq!(loaded.position, Some(position));
        assert_eq!(
            flat_values(target.parameters()),
            flat_values(source.parameters())
        );
        assert_eq!(restored.state(), optimizer.state());
        assert_eq!(restored.steps_taken(), 1);
        // The model file is plain safetensors with named, shaped tensors.
        let bytes = std::fs::read(path.join(MODEL_FILE)).unwrap();
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(tensors.tensor("dense.0.weight").unwrap().shape(), &[5, 6]);
    }

    const START: DataPosition = DataPosition {
        epoch: 0,
        offset: 0,
    };

    #[test]
    fn the_latest_complete_checkpoint_is_found_and_partial_ones_never_are() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest(&dir.path().join("none yet")).unwrap(), None);
        assert_eq!(latest(dir.path()).unwrap(), None);
        let source = model(1);
        let spec = OptimizerSpec::default();
        let optimizer = Optimizer::new(&spec, source.parameters().element_count()).unwrap();
        for step in [50, 100, 9] {
            save(dir.path(), step, START, source.parameters(), &optimizer).unwrap();
        }
        // What a rank killed while writing step 150 leaves: a hidden partial directory.
        let partial = dir.path().join(".step-00000150.partial-4242");
        std::fs::create_dir(&partial).unwrap();
        std::fs::write(partial.join(MODEL_FILE), b"half").unwrap();
        // And a directory under a final name without its files is no checkpoint either.
        std::fs::create_dir(dir.path().join("step-00000200")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        assert_eq!(
            latest(dir.path()).unwrap(),
            Some((100, dir.path().join("step-00000100")))
        );
    }

    #[test]
    fn checkpoints_list_with_their_sizes_and_evaluations_and_are_removed_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list(&dir.path().join("none yet")).unwrap().is_empty());
        let source = model(1);
        let spec = OptimizerSpec::default();
        let optimizer = Optimizer::new(&spec, source.parameters().element_count()).unwrap();
        let evaluation = EvaluationMetrics {
            step: 20,
            epoch: 1,
            loss: 0.412_345_67,
            accuracy: 0.1 + 0.2,
            examples: 300,
        };
        let files = [evaluation_file(&evaluation)];
        let parameters = source.parameters();
        let evaluated =
            save_with_files(dir.path(), 20, START, parameters, &optimizer, &files, false).unwrap();
        let plain = save(dir.path(), 10, START, parameters, &optimizer).unwrap();
        // A partial checkpoint is not listed.
        std::fs::create_dir(dir.path().join(".step-00000030.partial-7")).unwrap();

        let entries = list(dir.path()).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].step, &entries[0].path), (10, &plain));
        assert_eq!(entries[0].evaluation, None);
        // The evaluation reads back exactly, floats included.
        assert_eq!((entries[1].step, &entries[1].path), (20, &evaluated));
        assert_eq!(entries[1].evaluation.as_ref(), Some(&evaluation));
        let file_bytes =
            |path: &Path, name: &str| std::fs::metadata(path.join(name)).unwrap().len();
        assert_eq!(
            entries[1].bytes,
            file_bytes(&evaluated, MODEL_FILE)
                + file_bytes(&evaluated, OPTIMIZER_FILE)
                + file_bytes(&evaluated, EVALUATION_FILE)
        );
        assert_eq!(size(&evaluated).unwrap(), entries[1].bytes);

        // An evaluation file that does not read back counts as none.
        std::fs::write(evaluated.join(EVALUATION_FILE), b"loss = lots\n").unwrap();
        let error = read_evaluation(&evaluated).unwrap_err().to_string();
        assert!(error.contains("expected a number"), "{error}");
        assert_eq!(list(dir.path()).unwrap()[1].evaluation, None);

        remove(&plain).unwrap();
        assert!(!plain.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| !name.contains("partial"))
            .collect();
        assert_eq!(
            names,
            ["step-00000020"],
            "nothing of it is left, hidden or not"
        );
        assert_eq!(latest(dir.path()).unwrap(), Some((20, evaluated)));
        assert!(remove(&plain).is_err());
    }

    #[test]
    fn mismatches_are_refused_without_touching_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let source = model(1);
        let spec = OptimizerSpec::default();
        let optimizer = Optimizer::new(&spec, source.parameters().element_count()).unwrap();
        let path = save(dir.path(), 3, START, source.parameters(), &optimizer).unwrap();

        let other_shape = Model::new(
            &ModelSpec {
                hidden: vec![6],
                ..ModelSpec::default()
            },
            (2, 3),
            4,
            &Device::Cpu,
        )
        .unwrap();
        let before = flat_values(other_shape.parameters());
        let mut other_optimizer =
            Optimizer::new(&spec, other_shape.parameters().element_count()).unwrap();
        let error = load(
            &path,
            other_shape.parameters(),
            &mut other_optimizer,
            spec.kind,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("expected F32 [6, 6]"), "{error}");
        assert_eq!(flat_values(other_shape.parameters()), before);

        let target = model(2);
        let sgd = OptimizerSpec {
            kind: OptimizerKind::Sgd,
            ..OptimizerSpec::default()
        };
        let mut sgd_optimizer = Optimizer::new(&sgd, target.parameters().element_count()).unwrap();
        let error = load(&path, target.parameters(), &mut sgd_optimizer, sgd.kind)
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected \"sgd\""), "{error}");
    }

    #[test]
    fn corrupt_or_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let source = model(1);
        let spec = OptimizerSpec::default();
        let mut optimizer = Optimizer::new(&spec, source.parameters().element_count()).unwrap();
        let missing = load(
            &dir.path().join("nope"),
            source.parameters(),
            &mut optimizer,
            spec.kind,
        );
        assert!(missing.unwrap_err().to_string().contains("nope"));
        let path = save(dir.path(), 3, START, source.parameters(), &optimizer).unwrap();
        let model_path = path.join(MODEL_FILE);
        let bytes = std::fs::read(&model_path).unwrap();
        for cut in [0, 7, 8, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&model_path, &bytes[..cut]).unwrap();
            assert!(load(&path, source.parameters(), &mut optimizer, spec.kind).is_err());
        }
        std::fs::write(&model_path, vec![0xff; 64]).unwrap();
        assert!(load(&path, source.parameters(), &mut optimizer, spec.kind).is_err());
    }
}
