//! Snapshots for checkpoints: shards restored from them hold the same parameters, optimizer
//! state and clocks, and continue exactly as the originals.

mod common;

use std::sync::Arc;

use cohort_parameter_server::{
    OptimizerConfig, OptimizerKind, ParameterClient, PsMode, ServerConfig, ShardServer,
    SparseGradient, TensorDeclaration,
};
use common::{TestShards, job_id};

fn tensors() -> Vec<TensorDeclaration> {
    vec![
        TensorDeclaration::dense("w", 700),
        TensorDeclaration::embedding_table("e", 50, 8),
        TensorDeclaration::dense("b", 9),
    ]
}

fn config() -> ServerConfig {
    ServerConfig {
        ranks: 1,
        mode: PsMode::Sync,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Adamw,
            learning_rate: 0.01,
            weight_decay: 0.1,
            ..OptimizerConfig::default()
        },
        ..ServerConfig::default()
    }
}

/// One training step whose gradients depend only on the step and the pulled parameters.
async fn train_step(client: &mut ParameterClient, dense: &mut [f32], step: u64) {
    let gradient: Vec<f32> = dense
        .iter()
        .enumerate()
        .map(|(index, p)| p - (index as f32 * 0.01 + step as f32).sin())
        .collect();
    let rows = [step % 50, (step * 7 + 3) % 50];
    let values: Vec<f32> = (0..16).map(|i| (i as f32 - step as f32) * 0.1).collect();
    client
        .push_pull(
            &gradient,
            &[SparseGradient {
                tensor_index: 1,
                rows: &rows,
                values: &values,
            }],
            dense,
            &[],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_shards_continue_exactly_like_the_originals() {
    let shards = TestShards::start(&config(), 2).await;
    let tensors = tensors();
    let total = 700 + 400 + 9;
    let mut original = shards.client(0, &tensors).await;
    let initial: Vec<f32> = (0..total).map(|i| (i as f32 * 0.3).cos()).collect();
    original.init(&initial, 6).await.unwrap();
    let mut dense = vec![0.0f32; 709];
    original.pull(&mut dense).await.unwrap();
    for step in 0..3 {
        train_step(&mut original, &mut dense, step).await;
    }

    let snapshots = original.snapshot(3).await.unwrap();
    assert_eq!(snapshots.len(), 2);
    let restored_servers = snapshots
        .iter()
        .enumerate()
        .map(|(shard_id, bytes)| {
            let config = ServerConfig {
                job_id: job_id(),
                shard_id: shard_id as u32,
                shard_count: 2,
                ..config()
            };
            Arc::new(ShardServer::from_snapshot(config, bytes).unwrap())
        })
        .collect();
    let restored_shards = TestShards::serve(restored_servers).await;
    let mut restored = restored_shards.client(0, &tensors).await;

    let mut original_values = vec![0.0f32; total];
    let mut restored_values = vec![0.0f32; total];
    original.pull_all(&mut original_values).await.unwrap();
    let report = restored.pull_all(&mut restored_values).await.unwrap();
    assert_eq!(restored_values, original_values);
    assert_eq!(report.versions, vec![3, 3]);
    assert_eq!(report.next_step, 3);
    assert_ne!(original_values, initial, "training moved the parameters");

    let mut restored_dense = vec![0.0f32; 709];
    restored.pull(&mut restored_dense).await.unwrap();
    for step in 3..6 {
        train_step(&mut original, &mut dense, step).await;
        train_step(&mut restored, &mut restored_dense, step).await;
    }
    original.pull_all(&mut original_values).await.unwrap();
    restored.pull_all(&mut restored_values).await.unwrap();
    assert_eq!(
        restored_values, original_values,
        "optimizer state and learning-rate schedule were restored"
    );
    // A snapshot of one shard does not restore another.
    let wrong_shard = ServerConfig {
        job_id: job_id(),
        shard_id: 1,
        shard_count: 2,
        ..config()
    };
    let error = ShardServer::from_snapshot(wrong_shard, &snapshots[0]).unwrap_err();
    assert!(
        error.to_string().contains("shard_id = 0, expected 1"),
        "{error}"
    );
    shards.stop();
    restored_shards.stop();
}
