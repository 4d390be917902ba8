//! Sync mode gives the result of all-reduce data parallelism: N ranks pushing through S shards
//! end with the parameters of a naive single-process reference that averages the N ranks'
//! gradients and applies the same optimizer, written here independently in f64.

mod common;

use cohort_parameter_server::{
    LearningRateDecay, OptimizerConfig, OptimizerKind, PsMode, ScheduleConfig, ServerConfig,
    TensorDeclaration,
};
use common::{TestShards, max_relative_difference};

const STEPS: u64 = 20;
const WARMUP_STEPS: u64 = 3;

fn tensors() -> Vec<TensorDeclaration> {
    vec![
        TensorDeclaration::dense("layer1.weight", 3000),
        TensorDeclaration::dense("layer1.bias", 17),
        TensorDeclaration::dense("layer2.weight", 2500),
        TensorDeclaration::dense("layer2.bias", 3),
    ]
}

fn initial_value(index: usize) -> f64 {
    0.5 * (0.05 * index as f64).cos()
}

/// Rank `rank`'s gradient at `step` for parameters `parameters`: pulls towards a target,
/// scaled per rank, plus a rank- and step-dependent term, so that ranks disagree and errors
/// would compound.
fn gradient(rank: u32, step: u64, index: usize, parameter: f64) -> f64 {
    let target = (0.11 * index as f64).sin();
    (parameter - target) * (1.0 + 0.25 * f64::from(rank))
        + 0.05 * (0.7 * index as f64 + 1.3 * step as f64 + 2.1 * f64::from(rank)).sin()
}

fn learning_rate(peak: f64, step: u64) -> f64 {
    if step < WARMUP_STEPS {
        return peak * (step + 1) as f64 / WARMUP_STEPS as f64;
    }
    let progress = (step - WARMUP_STEPS) as f64 / (STEPS - WARMUP_STEPS) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Naive data parallelism in f64: average the ranks' gradients, apply PyTorch's SGD or AdamW.
fn reference(optimizer: &OptimizerConfig, ranks: u32, elements: usize) -> Vec<f64> {
    let mut parameters: Vec<f64> = (0..elements).map(initial_value).collect();
    let mut first = vec![0.0f64; elements];
    let mut second = vec![0.0f64; elements];
    for step in 0..STEPS {
        let lr = learning_rate(optimizer.learning_rate, step);
        let t = (step + 1) as i32;
        for index in 0..elements {
            let p = parameters[index];
            let average = (0..ranks)
                .map(|rank| gradient(rank, step, index, p))
                .sum::<f64>()
                / f64::from(ranks);
            match optimizer.kind {
                OptimizerKind::Sgd => {
                    let g = average + optimizer.weight_decay * p;
                    first[index] = optimizer.momentum * first[index] + g;
                    parameters[index] = p - lr * first[index];
                }
                OptimizerKind::Adamw => {
                    let decayed = p * (1.0 - lr * optimizer.weight_decay);
                    first[index] =
                        optimizer.beta1 * first[index] + (1.0 - optimizer.beta1) * average;
                    second[index] = optimizer.beta2 * second[index]
                        + (1.0 - optimizer.beta2) * average * average;
                    let m_hat = first[index] / (1.0 - optimizer.beta1.powi(t));
                    let v_hat = second[index] / (1.0 - optimizer.beta2.powi(t));
                    parameters[index] = decayed - lr * m_hat / (v_hat.sqrt() + optimizer.eps);
                }
            }
        }
    }
    parameters
}

async fn run_sync_job(optimizer: OptimizerConfig, ranks: u32, shard_count: u32) {
    let config = ServerConfig {
        ranks,
        mode: PsMode::Sync,
        optimizer: optimizer.clone(),
        schedule: ScheduleConfig {
            warmup_steps: WARMUP_STEPS,
            decay: LearningRateDecay::Cosine,
        },
        ..ServerConfig::default()
    };
    let shards = TestShards::start(&config, shard_count).await;
    let tensors = tensors();
    let elements: usize = tensors.iter().map(|t| t.element_count as usize).sum();

    let mut tasks = Vec::new();
    for rank in 0..ranks {
        let mut client = shards.client(rank, &tensors).await;
        tasks.push(tokio::spawn(async move {
            if rank == 0 {
                let initial: Vec<f32> = (0..elements).map(|i| initial_value(i) as f32).collect();
                assert!(client.init(&initial, STEPS).await.unwrap());
            }
            let mut parameters = vec![0.0f32; elements];
            let report = client.pull(&mut parameters).await.unwrap();
            assert_eq!(report.next_step, 0);
            for step in 0..STEPS {
                let gradients: Vec<f32> = parameters
                    .iter()
                    .enumerate()
                    .map(|(index, &p)| gradient(rank, step, index, f64::from(p)) as f32)
                    .collect();
                let report = client
                    .push_pull(&gradients, &[], &mut parameters, &[])
                    .await
                    .unwrap();
                assert_eq!(report.versions, vec![step + 1; shard_count as usize]);
                assert_eq!(report.next_step, step + 1);
                assert_eq!(report.global_step, step + 1);
                assert_eq!(report.staleness, 0);
            }
            parameters
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    // Every rank ends with the same parameters.
    for result in &results[1..] {
        assert_eq!(result, &results[0]);
    }
    let expected = reference(&optimizer, ranks, elements);
    let difference = max_relative_difference(&results[0], &expected);
    println!(
        "{ranks} ranks, {shard_count} shards, {:?}: max relative difference {difference:e}",
        optimizer.kind
    );
    assert!(
        difference <= 1e-5,
        "{ranks} ranks, {shard_count} shards, {:?}: max relative difference {difference:e}",
        optimizer.kind
    );
    // The parameters moved far more than the tolerance.
    let initial: Vec<f64> = (0..elements).map(initial_value).collect();
    assert!(max_relative_difference(&results[0], &initial) > 0.01);
    for server in &shards.servers {
        let status = server.status().await;
        assert_eq!(status.version, STEPS);
        assert_eq!(status.rank_next_step, vec![STEPS; ranks as usize]);
        assert!(status.pending_ranks.is_empty() && status.waiting_ranks.is_empty());
    }
    shards.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_ranks_two_shards_adamw_match_data_parallel_averaging() {
    let optimizer = OptimizerConfig {
        kind: OptimizerKind::Adamw,
        learning_rate: 0.01,
        weight_decay: 0.01,
        ..OptimizerConfig::default()
    };
    run_sync_job(optimizer, 4, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_ranks_three_shards_sgd_momentum_match_data_parallel_averaging() {
    let optimizer = OptimizerConfig {
        kind: OptimizerKind::Sgd,
        learning_rate: 0.05,
        momentum: 0.9,
        weight_decay: 0.001,
        ..OptimizerConfig::default()
    };
    run_sync_job(optimizer, 3, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rank_one_shard_matches_plain_training() {
    let optimizer = OptimizerConfig {
        kind: OptimizerKind::Adamw,
        learning_rate: 0.02,
        ..OptimizerConfig::default()
    };
    run_sync_job(optimizer, 1, 1).await;
}
