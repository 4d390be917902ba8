//! Layout-independent transformer checkpoints: full tensors by global name, whatever mesh
//! trained them, so a run can resume (or be sampled) under any other mesh.
//!
//! Saving gathers each stage's tensor-parallel slices into full tensors, sends every full
//! tensor to world rank 0 and writes there (`model.safetensors` with the weights,
//! `optimizer.safetensors` with each state buffer per parameter as `BUFFER/NAME`). Loading
//! reads the files on every rank and keeps each rank's slices.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cohort_collective::Communicator;
use cohort_jobspec::layout::TransformerShape;

use crate::checkpoint::{
    FORMAT, MODEL_FILE, OPTIMIZER_FILE, TensorFile, checkpoint_error, checkpoint_name,
    evaluation_file, write_tensors,
};
use crate::error::{Result, TrainerError};
use crate::metrics::EvaluationMetrics;
use crate::optim::Optimizer;
use crate::text::Vocabulary;
use crate::transformer::{
    ParameterLayout, Split, TensorParallel, TransformerConfig, TransformerStage,
};

/// Metadata key naming the model family.
const MODEL_KEY: &str = "model";
/// Its value for transformers.
const TRANSFORMER: &str = "transformer";

/// One tensor of the full model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullParameter {
    /// Global name.
    pub name: String,
    /// Full shape.
    pub shape: Vec<usize>,
    /// The pipeline stage holding it.
    pub stage: usize,
}

/// Every tensor of the model in canonical order, with its full shape and owning stage, for
/// blocks split into stages of `stage_layers` blocks.
pub fn full_parameters(config: &TransformerConfig, stage_layers: &[u32]) -> Vec<FullParameter> {
    let shape = &config.shape;
    let (width, vocabulary) = (shape.width as usize, config.vocabulary);
    let last = stage_layers.len().saturating_sub(1);
    let mut parameters = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, stage: usize| {
        parameters.push(FullParameter { name, shape, stage });
    };
    add("embedding.token".into(), vec![vocabulary, width], 0);
    add(
        "embedding.position".into(),
        vec![shape.context as usize, width],
        0,
    );
    let mut block = 0usize;
    for (stage, &blocks) in stage_layers.iter().enumerate() {
        for _ in 0..blocks {
            let prefix = format!("blocks.{block}");
            for norm in ["ln1", "ln2"] {
                add(format!("{prefix}.{norm}.weight"), vec![width], stage);
                add(format!("{prefix}.{norm}.bias"), vec![width], stage);
            }
            for projection in ["q", "k", "v", "output"] {
                add(
                    format!("{prefix}.attention.{projection}.weight"),
                    vec![width, width],
                    stage,
                );
                add(
                    format!("{prefix}.attention.{projection}.bias"),
                    vec![width],
                    stage,
                );
            }
            add(
                format!("{prefix}.mlp.up.weight"),
                vec![4 * width, width],
                stage,
            );
            add(format!("{prefix}.mlp.up.bias"), vec![4 * width], stage);
            add(
                format!("{prefix}.mlp.down.weight"),
                vec![width, 4 * width],
                stage,
            );
            add(format!("{prefix}.mlp.down.bias"), vec![width], stage);
            block += 1;
        }
    }
    add("ln_f.weight".into(), vec![width], last);
    add("ln_f.bias".into(), vec![width], last);
    if !shape.tie_embeddings {
        add("head.weight".into(), vec![vocabulary, width], last);
    }
    add("head.bias".into(), vec![vocabulary], last);
    parameters
}

/// Checks that every local parameter is a full parameter of the shape its layout says.
pub fn check_layouts(layouts: &[ParameterLayout], full: &[FullParameter]) -> Result<()> {
    for layout in layouts {
        let known = full.iter().find(|p| p.name == layout.name);
        if known.is_none_or(|p| p.shape != layout.full_shape) {
            return Err(TrainerError::Config(format!(
                "parameter {} of shape {:?} is not in the checkpoint layout ({:?})",
                layout.name,
                layout.full_shape,
                known.map(|p| &p.shape)
            )));
        }
    }
    Ok(())
}

/// Returns this rank's slice of `full` (of `shape`) for `split` as shard `rank` of `size`.
pub fn slice_full(
    full: &[f32],
    shape: &[usize],
    split: &Split,
    rank: usize,
    size: usize,
) -> Vec<f32> {
    match split {
        Split::Replicated => full.to_vec(),
        Split::Rows => {
            let rows = shape[0] / size;
            let row = full.len() / shape[0].max(1);
            full[rank * rows * row..(rank + 1) * rows * row].to_vec()
        }
        Split::Columns => {
            let columns = shape[1] / size;
            full.chunks(shape[1])
                .flat_map(|row| row[rank * columns..(rank + 1) * columns].iter().copied())
                .collect()
        }
    }
}

/// Everything a save needs besides the model: the rank's groups and where it sits.
pub struct SaveContext<'a> {
    /// Every rank of the job.
    pub world: &'a mut dyn Communicator,
    /// The stage's tensor-parallel group.
    pub tensor_parallel: &'a TensorParallel,
    /// The full model's tensors in canonical order.
    pub full: &'a [FullParameter],
    /// World rank of the rank that writes each stage's tensors: replica 0, shard 0.
    pub stage_roots: &'a [usize],
    /// The model's vocabulary and shape, for the metadata.
    pub vocabulary: &'a Vocabulary,
    /// The model's shape.
    pub shape: TransformerShape,
}

/// Writes the checkpoint of `step` under `directory` on world rank 0, whose path is returned,
/// recording `evaluation`, the evaluation at that step if one ran. Every rank must call it.
pub fn save(
    context: SaveContext<'_>,
    directory: &Path,
    step: u64,
    stage: &TransformerStage,
    optimizer: &Optimizer,
    evaluation: Option<&EvaluationMetrics>,
) -> Result<Option<PathBuf>> {
    let SaveContext {
        world,
        tensor_parallel,
        full,
        stage_roots,
        vocabulary,
        shape,
    } = context;
    let parameters = stage.parameters();
    let mut local_values = vec![0.0f32; parameters.element_count()];
    parameters.read_values(&mut local_values)?;
    let state = optimizer.state();
    let buffers: Vec<(&str, &[f32])> = state
        .buffers()
        .into_iter()
        .filter(|(_, values)| !values.is_empty())
        .collect();
    // Full tensors of this rank's stage, by name: weights, then each optimizer buffer.
    let mut gathered: HashMap<String, Vec<f32>> = HashMap::new();
    for (parameter, layout) in parameters.iter().zip(stage.layouts()) {
        let range = parameter.flat_range();
        let local_shape = parameter.shape().dims().to_vec();
        gathered.insert(
            layout.name.clone(),
            tensor_parallel.gather(&local_values[range.clone()], layout, &local_shape)?,
        );
        for (buffer, values) in &buffers {
            gathered.insert(
                format!("{buffer}/{}", layout.name),
                tensor_parallel.gather(&values[range.clone()], layout, &local_shape)?,
            );
        }
    }
    let rank = world.rank();
    let mut model_tensors = Vec::new();
    let mut optimizer_tensors = Vec::new();
    let names: Vec<(String, usize)> = std::iter::once(String::new())
        .chain(buffers.iter().map(|(buffer, _)| format!("{buffer}/")))
        .enumerate()
        .flat_map(|(kind, prefix)| {
            full.iter()
                .map(move |parameter| (format!("{prefix}{}", parameter.name), kind))
        })
        .collect();
    for (name, kind) in names {
        let base = name.rsplit('/').next().unwrap_or(&name);
        let parameter = full
            .iter()
            .find(|p| p.name == base)
            .ok_or_else(|| TrainerError::Config(format!("{name} has no full parameter")))?;
        let root = stage_roots[parameter.stage];
        let mut values = if rank == root {
            gathered.remove(&name).ok_or_else(|| {
                TrainerError::Config(format!("stage {} holds no {name}", parameter.stage))
            })?
        } else {
            vec![0.0; parameter.shape.iter().product()]
        };
        if world.world_size() > 1 {
            world.broadcast(values.as_mut_slice().into(), root)?;
        }
        if rank == 0 {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let entry = (name, parameter.shape.clone(), bytes);
            if kind == 0 {
                model_tensors.push(entry);
            } else {
                optimizer_tensors.push(entry);
            }
        }
    }
    if rank != 0 {
        return Ok(None);
    }
    let buffer_names: Vec<&str> = buffers.iter().map(|(name, _)| *name).collect();
    let header = Header {
        step,
        vocabulary,
        shape,
        steps_taken: optimizer.steps_taken(),
        buffers: &buffer_names,
        evaluation,
    };
    write_checkpoint(directory, &header, &model_tensors, &optimizer_tensors).map(Some)
}

/// What a checkpoint's metadata records besides its tensors.
struct Header<'a> {
    /// Steps completed.
    step: u64,
    /// The model's vocabulary.
    vocabulary: &'a Vocabulary,
    /// The model's shape.
    shape: TransformerShape,
    /// Updates the optimizer applied.
    steps_taken: u64,
    /// The optimizer's non-empty buffers, in order.
    buffers: &'a [&'a str],
    /// The evaluation at its step, if one ran there.
    evaluation: Option<&'a EvaluationMetrics>,
}

/// Writes a checkpoint's two files into a partial directory under `directory`, then renames
/// it into place (replacing an older checkpoint of the same step), and returns its path.
fn write_checkpoint(
    directory: &Path,
    header: &Header<'_>,
    model_tensors: &[(String, Vec<usize>, Vec<u8>)],
    optimizer_tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<PathBuf> {
    let final_path = directory.join(checkpoint_name(header.step));
    let partial_path = directory.join(format!(
        ".{}.partial-{}",
        checkpoint_name(header.step),
        std::process::id()
    ));
    std::fs::create_dir_all(&partial_path).map_err(|e| checkpoint_error(&partial_path, e))?;
    let mut metadata = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        ("step".to_owned(), header.step.to_string()),
        (MODEL_KEY.to_owned(), TRANSFORMER.to_owned()),
        ("vocabulary".to_owned(), header.vocabulary.to_metadata()),
        ("layers".to_owned(), header.shape.layers.to_string()),
        ("heads".to_owned(), header.shape.heads.to_string()),
        ("width".to_owned(), header.shape.width.to_string()),
        ("context".to_owned(), header.shape.context.to_string()),
        (
            "tie_embeddings".to_owned(),
            header.shape.tie_embeddings.to_string(),
        ),
    ]);
    write_tensors(
        &partial_path.join(MODEL_FILE),
        model_tensors,
        metadata.clone(),
    )?;
    metadata.insert("steps_taken".to_owned(), header.steps_taken.to_string());
    metadata.insert("buffers".to_owned(), header.buffers.join(","));
    write_tensors(
        &partial_path.join(OPTIMIZER_FILE),
        optimizer_tensors,
        metadata,
    )?;
    if let Some(evaluation) = header.evaluation {
        let (name, bytes) = evaluation_file(evaluation);
        let path = partial_path.join(name);
        std::fs::write(&path, bytes).map_err(|e| checkpoint_error(&path, e))?;
    }
    crate::checkpoint::commit(&partial_path, &final_path)?;
    tracing::info!(step = header.step, path = %final_path.display(), "checkpoint written");
    Ok(final_path)
}

/// What a transformer checkpoint says about its model.
#[derive(Debug, Clone)]
pub struct CheckpointHeader {
    /// Steps trained.
    pub step: u64,
    /// The model's symbols.
    pub vocabulary: Vocabulary,
    /// The model's shape.
    pub shape: TransformerShape,
}

/// Full tensors by name: shape and values.
pub type FullTensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads a transformer checkpoint's model file: its header and every tensor.
pub fn read_model(path: &Path) -> Result<(CheckpointHeader, FullTensors)> {
    let file = TensorFile::read(path.join(MODEL_FILE))?;
    let (tensors, metadata) = file.parse()?;
    if metadata.get(MODEL_KEY).map(String::as_str) != Some(TRANSFORMER) {
        return Err(checkpoint_error(
            path,
            format!(
                "model {:?}, expected a transformer checkpoint",
                metadata.get(MODEL_KEY)
            ),
        ));
    }
    let number = |key: &str| -> Result<u32> {
        u32::try_from(file.number(&metadata, key)?)
            .map_err(|_| checkpoint_error(path, format!("metadata {key} is out of range")))
    };
    let header = CheckpointHeader {
        step: file.number(&metadata, "step")?,
        vocabulary: Vocabulary::from_metadata(
            metadata.get("vocabulary").map_or("", String::as_str),
        )?,
        shape: TransformerShape {
            layers: number("layers")?,
            heads: number("heads")?,
            width: number("width")?,
            context: number("context")?,
            tie_embeddings: metadata.get("tie_embeddings").map(String::as_str) == Some("true"),
        },
    };
    let mut values = HashMap::new();
    for (name, view) in tensors.tensors() {
        let shape = view.shape().to_vec();
        let data = file.values(&tensors, &name, &shape)?;
        values.insert(name, (shape, data));
    }
    Ok((header, values))
}

/// Loads the checkpoint at `path` into this rank's stage and optimizer (slicing for its
/// tensor-parallel shard); returns the checkpoint's step. Refuses a model of another shape.
pub fn load(
    path: &Path,
    config: &TransformerConfig,
    stage: &TransformerStage,
    tensor_parallel: &TensorParallel,
    optimizer: &mut Optimizer,
) -> Result<u64> {
    let (header, model) = read_model(path)?;
    if header.shape != config.shape || header.vocabulary.len() != config.vocabulary {
        return Err(checkpoint_error(
            path,
            format!(
                "a model of {:?} with {} symbols, expected {:?} with {}",
                header.shape,
                header.vocabulary.len(),
                config.shape,
                config.vocabulary
            ),
        ));
    }
    stage.load_full(&|name| model.get(name).map(|(_, values)| values.clone()))?;

    let file = TensorFile::read(path.join(OPTIMIZER_FILE))?;
    let (tensors, metadata) = file.parse()?;
    let steps_taken = file.number(&metadata, "steps_taken")?;
    let parameters = stage.parameters();
    let mut restored = Vec::new();
    for (buffer, current) in optimizer.state().buffers() {
        if current.is_empty() {
            continue;
        }
        let mut local = vec![0.0f32; current.len()];
        for (parameter, layout) in parameters.iter().zip(stage.layouts()) {
            let full = file.values(
                &tensors,
                &format!("{buffer}/{}", layout.name),
                &layout.full_shape,
            )?;
            let slice = slice_full(
                &full,
                &layout.full_shape,
                &layout.split,
                tensor_parallel.rank(),
                tensor_parallel.size(),
            );
            local[parameter.flat_range()].copy_from_slice(&slice);
        }
        restored.push((buffer.to_owned(), local));
    }
    optimizer
        .restore(steps_taken, &restored)
        .map_err(|error| checkpoint_error(path, error))?;
    tracing::info!(step = header.step, path = %path.display(), "checkpoint loaded");
    Ok(header.step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cut_rows_and_columns() {
        let full: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(
            slice_full(&full, &[4, 3], &Split::Rows, 1, 2),
            [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
        );
        assert_eq!(
            slice_full(&full, &[2, 6], &Split::Columns, 2, 3),
            [4.0, 5.0, 10.0, 11.0]
        );
        assert_eq!(slice_full(&full, &[12], &Split::Replicated, 0, 4), full);
    }

    #[test]
    fn the_full_list_follows_the_stages() {
        let config = TransformerConfig {
            vocabulary: 10,
            shape: TransformerShape {
                layers: 3,
                heads: 2,
                width: 8,
                context: 4,
                tie_embeddings: false,
            },
            seed: 0,
        };
        let full = full_parameters(&config, &[2, 1]);
        assert_eq!(full.len(), 2 + 3 * 16 + 4);
        let stage_of = |name: &str| full.iter().find(|p| p.name == name).unwrap().stage;
        assert_eq!(stage_of("embedding.token"), 0);
        assert_eq!(stage_of("blocks.1.mlp.up.weight"), 0);
        assert_eq!(stage_of("blocks.2.ln1.bias"), 1);
        assert_eq!(stage_of("head.weight"), 1);
        let total: usize = full.iter().map(|p| p.shape.iter().product::<usize>()).sum();
        assert_eq!(total as u64, config.shape.parameter_count(10));
    }
}
