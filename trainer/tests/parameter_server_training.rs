//! Acceptance tests of training through parameter servers: sync mode must follow all-reduce
//! data parallelism exactly, and the embedding table must travel row-sparse.
//!
//! Servers run in this process on loopback gRPC (the same `serve` the server processes run);
//! ranks are threads. The references are independent runs: a 4-rank TCP-ring all-reduce job,
//! and the batches' own pixel tokens.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use cohort_jobspec::train::{
    Communication, LearningRateDecay, ModelKind, ModelSpec, OptimizerKind, OptimizerSpec, PsMode,
};
use cohort_parameter_server::{ClientConfig, ShardServer};
use cohort_proto::JobId;
use cohort_trainer::data::{TrainTestSplits, synthetic_splits};
use cohort_trainer::metrics::DiscardMetrics;
use cohort_trainer::models::Model;
use cohort_trainer::parameter_server::server_config;
use cohort_trainer::sampler::DistributedSampler;
use cohort_trainer::{ParameterServerLink, TrainConfig, train_with_parameter_server};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

/// Largest difference allowed, relative to the largest parameter magnitude.
const RELATIVE_TOLERANCE: f32 = 1e-5;
/// Optimizer steps of the equivalence runs.
const STEPS: u64 = 20;

fn config(world_size: u32, optimizer: OptimizerSpec, model: ModelSpec) -> TrainConfig {
    let spec = cohort_jobspec::parse("version = 1\nkind = \"train\"\n").unwrap();
    let mut config = TrainConfig::from_job_spec(&spec, std::env::temp_dir());
    config.model = model;
    config.optimizer = optimizer;
    config.data.seed = 5;
    config.schedule.batch_size = 256;
    config.schedule.epochs = 3;
    config.schedule.max_steps = Some(STEPS);
    config.schedule.warmup_steps = 5;
    config.schedule.lr_decay = LearningRateDecay::Cosine;
    config.parallel.data = world_size;
    config.evaluate = false;
    config.final_checkpoint = false;
    config
}

fn mlp() -> ModelSpec {
    ModelSpec {
        hidden: vec![64, 32],
        seed: 3,
        ..ModelSpec::default()
    }
}

/// Shard servers running on a runtime of their own until dropped.
struct Servers {
    runtime: Runtime,
    addresses: Vec<String>,
    shards: Vec<Arc<ShardServer>>,
    _shutdown: Vec<oneshot::Sender<()>>,
}

fn start_servers(config: &TrainConfig, job_id: &JobId) -> Servers {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shard_count = config.parallel.server_count();
    let mut servers = Servers {
        addresses: Vec::new(),
        shards: Vec::new(),
        _shutdown: Vec::new(),
        runtime,
    };
    for shard in 0..shard_count {
        let shard_config = server_config(config, job_id.clone(), shard, shard_count);
        let server = Arc::new(ShardServer::new(shard_config).unwrap());
        let listener = servers
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        servers
            .addresses
            .push(listener.local_addr().unwrap().to_string());
        let (stop, stopped) = oneshot::channel::<()>();
        servers.runtime.spawn(cohort_parameter_server::serve_shard(
            server.clone(),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        servers.shards.push(server);
        servers._shutdown.push(stop);
    }
    servers
}

/// Trains `config` through fresh servers on `world_size` rank threads; returns every rank's
/// final parameters and the servers.
fn train_through_servers(config: &TrainConfig, data: &TrainTestSplits) -> (Vec<Vec<f32>>, Servers) {
    let job_id = JobId::new("ps-equivalence").unwrap();
    let servers = start_servers(config, &job_id);
    let world_size = config.parallel.world_size();
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let link = ParameterServerLink {
                    runtime: servers.runtime.handle().clone(),
                    client: ClientConfig {
                        job_id: job_id.clone(),
                        rank,
                        gradient_dtype: cohort_trainer::precision::wire_dtype(
                            config.train.grad_comm_dtype(),
                        ),
                        ..ClientConfig::default()
                    },
                    addresses: servers.addresses.clone(),
                    progress: Default::default(),
                };
                scope.spawn(move || {
                    let outcome =
                        train_with_parameter_server(config, data, &link, &mut DiscardMetrics)
                            .unwrap();
                    common::flat(&outcome.model)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .collect()
    });
    (results, servers)
}

fn assert_sync_matches_all_reduce(optimizer: OptimizerSpec) {
    let data = synthetic_splits(8 * 256, 100, 28, 10, 11).unwrap();
    let reference_config = config(4, optimizer.clone(), mlp());
    let reference = common::train_on_ring(&reference_config, &data, STEPS);
    let tolerance = RELATIVE_TOLERANCE * common::max_abs(&reference[0]);

    let mut ps_config = reference_config.clone();
    ps_config.parallel.comm = Communication::Ps;
    ps_config.parallel.ps_shards = Some(2);
    ps_config.parallel.ps_mode = Some(PsMode::Sync);
    let (trained, servers) = train_through_servers(&ps_config, &data);
    for (rank, parameters) in trained.iter().enumerate() {
        let difference = common::max_difference(parameters, &reference[0]);
        println!("rank {rank}: max |ps - allreduce| = {difference:e} (tolerance {tolerance:e})");
        assert!(
            difference <= tolerance,
            "rank {rank}: {difference} > {tolerance}"
        );
    }
    // The comparison is sharp: the runs moved far beyond the tolerance from the start.
    let model = Model::new(
        &reference_config.model,
        data.train.image_shape(),
        data.train.classes(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(common::max_difference(&common::flat(&model), &reference[0]) > 100.0 * tolerance);
    for shard in &servers.shards {
        let status = servers.runtime.block_on(shard.status());
        assert_eq!(status.version, STEPS, "one update per step in sync mode");
    }
}

#[test]
fn sync_parameter_servers_match_all_reduce_with_adamw() {
    assert_sync_matches_all_reduce(OptimizerSpec {
        kind: OptimizerKind::Adamw,
        lr: Some(0.003),
        ..OptimizerSpec::default()
    });
}

#[test]
fn sync_parameter_servers_match_all_reduce_with_sgd_momentum() {
    assert_sync_matches_all_reduce(OptimizerSpec {
        kind: OptimizerKind::Sgd,
        lr: Some(0.05),
        momentum: Some(0.9),
        weight_decay: Some(1e-4),
        ..OptimizerSpec::default()
    });
}

/// Images of mostly background with a few lit pixels each, so batches touch few rows.
fn sparse_images() -> TrainTestSplits {
    let split = |examples: usize, seed: u64| {
        let mut state = seed;
        let mut next = move || {
            // xorshift64: any deterministic scatter will do.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut images = vec![0u8; examples * 784];
        let mut labels = Vec::new();
        for image in images.chunks_exact_mut(784) {
            for _ in 0..20 {
                image[(next() % 784) as usize] = (next() % 256) as u8;
            }
            labels.push((next() % 10) as u8);
        }
        cohort_trainer::data::Dataset::new(images, labels, 28, 28, 10).unwrap()
    };
    TrainTestSplits {
        train: split(64, 7),
        test: split(8, 9),
    }
}

/// Only the rows the batches touched change on the servers: nothing else was pushed.
#[test]
fn embedding_rows_travel_only_for_the_batch() {
    let data = sparse_images();
    let model_spec = ModelSpec {
        kind: ModelKind::Embedding,
        hidden: vec![16],
        embedding_width: Some(8),
        intensity_levels: Some(4),
        seed: 1,
        ..ModelSpec::default()
    };
    let mut config = config(
        1,
        OptimizerSpec {
            kind: OptimizerKind::Adamw,
            lr: Some(0.01),
            ..OptimizerSpec::default()
        },
        model_spec,
    );
    config.schedule.batch_size = 8;
    config.schedule.max_steps = Some(2);
    config.parallel.comm = Communication::Ps;
    config.parallel.ps_shards = Some(2);

    let model = Model::new(
        &config.model,
        data.train.image_shape(),
        data.train.classes(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let table = model
        .embedding_table()
        .expect("the embedding model has a table");
    let initial = common::flat(&model);
    // The rows the two batches touch, found independently from their pixels.
    let sampler = DistributedSampler::new(data.train.len(), 8, 1, 0, config.data.seed).unwrap();
    let mut order = Vec::new();
    sampler.epoch_order(0, &mut order);
    let mut touched = BTreeSet::new();
    let (mut images, mut labels, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..2 {
        let indices = sampler.rank_batch(&order, step);
        data.train
            .gather(indices, &mut images, &mut labels)
            .unwrap();
        model.touched_rows(&images, indices.len(), &mut rows);
        touched.extend(rows.iter().copied());
    }
    assert!(!touched.is_empty() && touched.len() < table.rows);

    let (trained, _servers) = train_through_servers(&config, &data);
    let table_range = model
        .parameters()
        .get(table.parameter_index)
        .unwrap()
        .flat_range();
    let before = &initial[table_range.clone()];
    let after = &trained[0][table_range];
    let changed: BTreeSet<u64> = (0..table.rows)
        .filter(|row| {
            let range = row * table.width..(row + 1) * table.width;
            before[range.clone()] != after[range]
        })
        .map(|row| row as u64)
        .collect();
    println!(
        "{} of {} rows touched by the batches, {} changed on the servers",
        touched.len(),
        table.rows,
        changed.len()
    );
    assert_eq!(changed, touched);
}

/// bf16 through parameter servers: bf16 passes, bf16 pushes summed in f32 on the servers; the
/// result stays close to fp32 all-reduce (half precision, not bit equality).
#[test]
fn bf16_pushes_train_close_to_fp32() {
    let data = synthetic_splits(8 * 256, 100, 28, 10, 11).unwrap();
    let optimizer = OptimizerSpec {
        kind: OptimizerKind::Adamw,
        lr: Some(0.003),
        ..OptimizerSpec::default()
    };
    let reference_config = config(4, optimizer, mlp());
    let reference = common::train_on_ring(&reference_config, &data, STEPS);
    let mut ps_config = reference_config.clone();
    ps_config.parallel.comm = Communication::Ps;
    ps_config.parallel.ps_shards = Some(2);
    ps_config.train.precision = cohort_jobspec::precision::Precision::Bf16;
    let (trained, _servers) = train_through_servers(&ps_config, &data);
    let scale = common::max_abs(&reference[0]);
    let model = Model::new(
        &reference_config.model,
        data.train.image_shape(),
        data.train.classes(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // In L2 over all parameters: AdamW turns rounding into full-size sign flips on a few tiny
    // gradients, so the element-wise maximum says little; the update as a whole must agree.
    let initial = common::flat(&model);
    let distance = |a: &[f32], b: &[f32]| -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt()
    };
    let moved = distance(&initial, &reference[0]);
    let difference = distance(&trained[0], &reference[0]);
    eprintln!(
        "bf16 ps vs fp32 all-reduce: L2 difference {difference} against an update of {moved} (largest parameter {scale})"
    );
    assert!(difference < 0.1 * moved, "{difference} vs {moved}");
}
