//! Snapshots of a shard in the safetensors format, for job checkpoints, and restoring a shard
//! from one.
//!
//! A snapshot holds the parameters (`dense`, `table.<tensor index>` as `[rows, width]`), the
//! optimizer state of each (`dense.first_moment`, `table.3.momentum_buffer`, ...) and, as
//! safetensors metadata under [`METADATA_KEY`], a JSON [`SnapshotHeader`] with the tensor list,
//! the version and the rank clocks. It is taken between two updates; sync-mode gradients of an
//! incomplete step are not part of it (every rank resumes at the snapshot's version).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::{OptimizerKind, PsMode, ServerConfig};
use crate::error::{Error, Result};
use crate::shard::assembly::{InitialValues, ShardShape};
use crate::shard::{ShardCore, ShardModel};
use crate::sharding::TensorDeclaration;
use cohort_numerics::OptimizerState;
use cohort_numerics::optimizer::zeroed;

/// Safetensors metadata key of the [`SnapshotHeader`].
pub const METADATA_KEY: &str = "cohort.parameter_server";

/// The only snapshot format version.
pub const FORMAT_VERSION: u32 = 1;

/// What a snapshot says about its shard besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotHeader {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The job that wrote it.
    pub job_id: String,
    /// The shard.
    pub shard_id: u32,
    /// Shards of the job.
    pub shard_count: u32,
    /// Ranks of the job.
    pub ranks: u32,
    /// The mode it ran in.
    pub mode: PsMode,
    /// The optimizer whose state it holds.
    pub optimizer: OptimizerKind,
    /// The model's tensors.
    pub tensors: Vec<TensorDeclaration>,
    /// Planned steps of the run.
    pub total_steps: u64,
    /// Updates applied.
    pub version: u64,
    /// Each rank's clock.
    pub rank_next_step: Vec<u64>,
    /// Learning rate of the last update.
    pub last_learning_rate: f64,
}

/// A shard read back from a snapshot.
#[derive(Debug)]
pub struct RestoredShard {
    /// The buffers.
    pub model: ShardModel,
    /// Updates applied.
    pub version: u64,
    /// Each rank's clock.
    pub rank_next_step: Vec<u64>,
    /// Learning rate of the last update.
    pub last_learning_rate: f64,
}

fn snapshot_error(context: &str) -> impl FnOnce(safetensors::SafeTensorError) -> Error + '_ {
    move |error| Error::Snapshot(format!("{context}: {error}"))
}

/// Returns the little-endian bytes of `values` (borrowed on little-endian machines).
fn f32_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Writes the shard's snapshot; an uninitialised shard has none.
pub fn write(core: &ShardCore) -> Result<Vec<u8>> {
    let Some(model) = &core.model else {
        return Err(Error::NotInitialised {
            shard_id: core.config.shard_id,
        });
    };
    let header = SnapshotHeader {
        format_version: FORMAT_VERSION,
        job_id: core.config.job_id.to_string(),
        shard_id: core.config.shard_id,
        shard_count: core.config.shard_count,
        ranks: core.config.ranks,
        mode: core.config.mode,
        optimizer: core.config.optimizer.kind,
        tensors: model.shape.tensors.clone(),
        total_steps: model.shape.total_steps,
        version: core.version,
        rank_next_step: core.rank_next_step.clone(),
        last_learning_rate: core.last_learning_rate,
    };
    let header = serde_json::to_string(&header)
        .map_err(|error| Error::Snapshot(format!("encode the header: {error}")))?;

    let mut buffers: Vec<(String, Vec<usize>, Cow<'_, [u8]>)> = Vec::new();
    buffers.push((
        "dense".to_owned(),
        vec![model.dense.len()],
        f32_bytes(&model.dense),
    ));
    for (name, state) in model.dense_state.buffers() {
        if !state.is_empty() {
            buffers.push((format!("dense.{name}"), vec![state.len()], f32_bytes(state)));
        }
    }
    for (position, table) in model.shape.tables.iter().enumerate() {
        let shape = vec![table.row_count() as usize, table.row_elements as usize];
        let name = format!("table.{}", table.tensor_index);
        buffers.push((
            name.clone(),
            shape.clone(),
            f32_bytes(&model.tables[position]),
        ));
        for (state_name, state) in model.table_states[position].buffers() {
            if !state.is_empty() {
                buffers.push((
                    format!("{name}.{state_name}"),
                    shape.clone(),
                    f32_bytes(state),
                ));
            }
        }
    }
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(snapshot_error(name))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([(METADATA_KEY.to_owned(), header)]);
    safetensors::serialize(views, Some(metadata)).map_err(snapshot_error("serialize"))
}

/// Reads one f32 tensor of `expected` elements.
fn read_tensor(tensors: &SafeTensors<'_>, name: &str, expected: usize) -> Result<Vec<f32>> {
    let view = tensors.tensor(name).map_err(snapshot_error(name))?;
    if view.dtype() != Dtype::F32 {
        return Err(Error::Snapshot(format!(
            "{name} is {:?}, expected F32",
            view.dtype()
        )));
    }
    let data = view.data();
    if data.len() != expected * 4 {
        return Err(Error::Snapshot(format!(
            "{name} holds {} bytes, expected {} ({expected} elements)",
            data.len(),
            expected * 4
        )));
    }
    let mut values = zeroed(expected, "a shard buffer")?;
    crate::encoding::decode_into(crate::encoding::DType::F32, data, &mut values);
    Ok(values)
}

/// Loads the optimizer state buffers named `prefix.<buffer>` into `state`.
fn read_state(tensors: &SafeTensors<'_>, prefix: &str, state: &mut OptimizerState) -> Result<()> {
    for (name, buffer) in state.buffers_mut() {
        if !buffer.is_empty() {
            *buffer = read_tensor(tensors, &format!("{prefix}.{name}"), buffer.len())?;
        }
    }
    Ok(())
}

/// Reads a snapshot for the shard `config` describes: the shard id, shard count, ranks and
/// optimizer must match (the job id and mode may differ: a resumed job has a new id).
pub fn read(config: &Arc<ServerConfig>, bytes: &[u8]) -> Result<RestoredShard> {
    let (_, metadata) =
        SafeTensors::read_metadata(bytes).map_err(snapshot_error("read the header"))?;
    let header = metadata
        .metadata()
        .as_ref()
        .and_then(|metadata| metadata.get(METADATA_KEY))
        .ok_or_else(|| {
            Error::Snapshot(format!(
                "no {METADATA_KEY} metadata: not a parameter-server snapshot"
            ))
        })?;
    let header: SnapshotHeader = serde_json::from_str(header)
        .map_err(|error| Error::Snapshot(format!("{METADATA_KEY} metadata: {error}")))?;
    let mut problems = Vec::new();
    if header.format_version != FORMAT_VERSION {
        problems.push(format!(
            "format_version = {}, expected {FORMAT_VERSION}",
            header.format_version
        ));
    }
    for (field, found, expected) in [
        ("shard_id", header.shard_id, config.shard_id),
        ("shard_count", header.shard_count, config.shard_count),
        ("ranks", header.ranks, config.ranks),
    ] {
        if found != expected {
            problems.push(format!(
                "{field} = {found}, expected {expected} as configured"
            ));
        }
    }
    if header.optimizer != config.optimizer.kind {
        problems.push(format!(
            "optimizer = {:?}, expected {:?} as configured",
            header.optimizer, config.optimizer.kind
        ));
    }
    if header.rank_next_step.len() != header.ranks as usize {
        problems.push(format!(
            "rank_next_step has {} clocks for {} ranks",
            header.rank_next_step.len(),
            header.ranks
        ));
    }
    if !problems.is_empty() {
        return Err(Error::Snapshot(problems.join("; ")));
    }
    let shape = Arc::new(ShardShape::new(
        header.tensors,
        config.shard_count,
        config.shard_id,
        header.total_steps,
        &config.limits,
        &config.optimizer,
    )?);
    let tensors = SafeTensors::deserialize(bytes).map_err(snapshot_error("read the tensors"))?;
    let dense = read_tensor(&tensors, "dense", shape.dense_element_count())?;
    let tables = shape
        .tables
        .iter()
        .map(|table| {
            read_tensor(
                &tensors,
                &format!("table.{}", table.tensor_index),
                (table.row_count() * table.row_elements) as usize,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut model = ShardModel::new(config, shape.clone(), InitialValues { dense, tables })?;
    read_state(&tensors, "dense", &mut model.dense_state)?;
    for (position, table) in shape.tables.iter().enumerate() {
        let prefix = format!("table.{}", table.tensor_index);
        read_state(&tensors, &prefix, &mut model.table_states[position])?;
    }
    let rank_next_step = match config.mode {
        // Gradients of an incomplete step are not in the snapshot: every rank redoes it.
        PsMode::Sync => vec![header.version; header.ranks as usize],
        PsMode::Async | PsMode::Ssp => header.rank_next_step,
    };
    Ok(RestoredShard {
        model,
        version: header.version,
        rank_next_step,
        last_learning_rate: header.last_learning_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::assembly::{DenseGradient, Gradient};

    fn config() -> Arc<ServerConfig> {
        Arc::new(ServerConfig {
            ranks: 2,
            mode: PsMode::Async,
            ..ServerConfig::default()
        })
    }

    fn trained_core(config: &Arc<ServerConfig>) -> ShardCore {
        let tensors = vec![
            TensorDeclaration::dense("w", 5),
            TensorDeclaration::embedding_table("e", 3, 2),
        ];
        let shape = Arc::new(
            ShardShape::new(tensors, 1, 0, 100, &config.limits, &config.optimizer).unwrap(),
        );
        let values = InitialValues {
            dense: vec![1.0, 2.0, 3.0, 4.0, 5.0],
            tables: vec![vec![0.5; 6]],
        };
        let mut core = ShardCore::new(config.clone());
        core.initialise(ShardModel::new(config, shape, values).unwrap());
        let gradient = Gradient {
            dense: DenseGradient::from_values(&[0.1, -0.2, 0.3, -0.4, 0.5]),
            rows: vec![crate::shard::assembly::RowGradient {
                table: 0,
                rows: vec![1],
                values: vec![1.0, -1.0],
            }],
        };
        core.commit_push(1, 0, 0, gradient).unwrap();
        core
    }

    #[test]
    fn a_snapshot_restores_parameters_state_and_clocks() {
        let config = config();
        let core = trained_core(&config);
        let bytes = write(&core).unwrap();
        let restored = read(&config, &bytes).unwrap();
        let model = core.model.as_ref().unwrap();
        assert_eq!(restored.model.dense, model.dense);
        assert_eq!(restored.model.tables, model.tables);
        assert_eq!(restored.model.dense_state, model.dense_state);
        assert_eq!(restored.model.table_states, model.table_states);
        assert_eq!(restored.version, 1);
        assert_eq!(restored.rank_next_step, vec![0, 1]);
        assert_eq!(restored.model.shape, model.shape);
    }

    #[test]
    fn mismatched_or_damaged_snapshots_are_refused() {
        let config = config();
        let bytes = write(&trained_core(&config)).unwrap();
        let other = Arc::new(ServerConfig {
            ranks: 3,
            ..(*config).clone()
        });
        let error = read(&other, &bytes).unwrap_err().to_string();
        assert!(error.contains("ranks = 2, expected 3"), "{error}");
        assert!(read(&config, &bytes[..bytes.len() - 4]).is_err());
        assert!(read(&config, b"not a snapshot").is_err());
    }
}
