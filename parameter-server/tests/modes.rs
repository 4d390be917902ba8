//! Async, ssp and sync ordering of pushes, and low-precision pushes accumulated in f32.

mod common;

use std::collections::HashMap;

use cohort_parameter_server::{
    ClientConfig, DType, LearningRateDecay, OptimizerConfig, OptimizerKind, PsMode, ScheduleConfig,
    ServerConfig, TensorDeclaration,
};
use common::{TestShards, job_id};
use tokio::sync::mpsc;

/// Plain SGD with learning rate 1 at every step: each update subtracts its gradient exactly.
fn subtracting_sgd() -> (OptimizerConfig, ScheduleConfig) {
    (
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            learning_rate: 1.0,
            momentum: 0.0,
            weight_decay: 0.0,
            ..OptimizerConfig::default()
        },
        ScheduleConfig {
            warmup_steps: 0,
            decay: LearningRateDecay::Constant,
        },
    )
}

fn tensors() -> Vec<TensorDeclaration> {
    vec![
        TensorDeclaration::dense("w", 600),
        TensorDeclaration::dense("b", 7),
    ]
}

/// A gradient whose every value is a distinct multiple of 1/1024, so that sums of them are
/// exact in f32 whatever the order.
fn exact_gradient(rank: u32, step: u64, elements: usize) -> Vec<f32> {
    (0..elements)
        .map(|index| ((rank as usize + 1) * (step as usize + 1) * (index % 5 + 1)) as f32 / 1024.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_applies_every_push_of_every_rank() {
    const RANKS: u32 = 3;
    const STEPS: u64 = 8;
    let (optimizer, schedule) = subtracting_sgd();
    let config = ServerConfig {
        ranks: RANKS,
        mode: PsMode::Async,
        optimizer,
        schedule,
        ..ServerConfig::default()
    };
    let shards = TestShards::start(&config, 2).await;
    let tensors = tensors();
    let elements = 607;
    let first = shards.client(0, &tensors).await;
    first.init(&vec![0.0; elements], STEPS).await.unwrap();
    drop(first);

    let mut tasks = Vec::new();
    for rank in 0..RANKS {
        let mut client = shards.client(rank, &tensors).await;
        tasks.push(tokio::spawn(async move {
            let mut parameters = vec![0.0f32; elements];
            client.pull(&mut parameters).await.unwrap();
            let mut staleness_seen = 0;
            for step in 0..STEPS {
                let gradient = exact_gradient(rank, step, elements);
                let report = client
                    .push_pull(&gradient, &[], &mut parameters, &[])
                    .await
                    .unwrap();
                assert_eq!(report.next_step, step + 1);
                staleness_seen = staleness_seen.max(report.staleness);
            }
            staleness_seen
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut expected = vec![0.0f32; elements];
    for rank in 0..RANKS {
        for step in 0..STEPS {
            for (total, value) in expected
                .iter_mut()
                .zip(exact_gradient(rank, step, elements))
            {
                *total -= value;
            }
        }
    }
    let mut reader = shards.client(0, &tensors).await;
    let mut parameters = vec![0.0f32; elements];
    let report = reader.pull_all(&mut parameters).await.unwrap();
    assert_eq!(parameters, expected, "every push applied exactly once");
    assert_eq!(report.versions, vec![u64::from(RANKS) * STEPS; 2]);
    assert_eq!(
        report.global_step, STEPS,
        "updates per rank drive the schedule"
    );
    for server in &shards.servers {
        let pushes = server.recent_pushes().await;
        assert_eq!(pushes.len(), (u64::from(RANKS) * STEPS) as usize);
        let mut per_rank: HashMap<u32, Vec<u64>> = HashMap::new();
        for push in &pushes {
            per_rank.entry(push.rank).or_default().push(push.step);
        }
        for steps in per_rank.values() {
            assert_eq!(steps, &(0..STEPS).collect::<Vec<_>>());
        }
    }
    shards.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssp_blocks_a_fast_rank_and_never_lets_the_gap_exceed_the_bound() {
    const STALENESS: u64 = 2;
    const STEPS: u64 = 10;
    let (optimizer, schedule) = subtracting_sgd();
    let config = ServerConfig {
        ranks: 2,
        mode: PsMode::Ssp,
        staleness: STALENESS,
        optimizer,
        schedule,
        ..ServerConfig::default()
    };
    let shards = TestShards::start(&config, 2).await;
    let tensors = tensors();
    let elements = 607;
    let mut fast = shards.client(0, &tensors).await;
    let mut slow = shards.client(1, &tensors).await;
    fast.init(&vec![0.0; elements], STEPS).await.unwrap();

    // The fast rank runs freely; the slow rank takes one step per token the test sends it.
    let fast_task = tokio::spawn(async move {
        let mut parameters = vec![0.0f32; elements];
        fast.pull(&mut parameters).await.unwrap();
        for step in 0..STEPS {
            let gradient = exact_gradient(0, step, elements);
            let report = fast
                .push_pull(&gradient, &[], &mut parameters, &[])
                .await
                .unwrap();
            assert!(report.next_step - report.slowest_step <= STALENESS);
        }
    });
    let (tokens, mut token_receiver) = mpsc::channel::<()>(1);
    let (done, mut slow_steps_done) = mpsc::channel::<u64>(1);
    let slow_task = tokio::spawn(async move {
        let mut parameters = vec![0.0f32; elements];
        slow.pull(&mut parameters).await.unwrap();
        for step in 0..STEPS {
            token_receiver.recv().await.unwrap();
            let gradient = exact_gradient(1, step, elements);
            slow.push_pull(&gradient, &[], &mut parameters, &[])
                .await
                .unwrap();
            done.send(step + 1).await.unwrap();
        }
    });

    for slow_clock in 0..STEPS {
        // With the slow rank at `slow_clock`, the fast one gets exactly STALENESS + 1 pushes
        // ahead and is then held: its next pull waits on every shard.
        let fast_clock = (slow_clock + STALENESS + 1).min(STEPS);
        shards
            .wait_for("the fast rank to be held", |status| {
                status.rank_next_step == vec![fast_clock, slow_clock]
                    && (fast_clock == STEPS || status.waiting_ranks.contains(&0))
            })
            .await;
        if fast_clock < STEPS {
            let status = shards.servers[0].status().await;
            assert_eq!(
                status.rank_next_step[0] - status.rank_next_step[1],
                STALENESS + 1
            );
        }
        tokens.send(()).await.unwrap();
        assert_eq!(slow_steps_done.recv().await, Some(slow_clock + 1));
    }
    fast_task.await.unwrap();
    slow_task.await.unwrap();

    for server in &shards.servers {
        let pushes = server.recent_pushes().await;
        assert_eq!(pushes.len(), 2 * STEPS as usize);
        let largest_gap = pushes
            .iter()
            .map(|push| push.step - push.slowest_step)
            .max()
            .unwrap();
        assert_eq!(
            largest_gap, STALENESS,
            "the bound is reached and never exceeded"
        );
        assert!(server.status().await.waiting_ranks.is_empty());
    }
    shards.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_holds_a_step_until_every_rank_pushed_it() {
    let (optimizer, schedule) = subtracting_sgd();
    let config = ServerConfig {
        ranks: 2,
        mode: PsMode::Sync,
        optimizer,
        schedule,
        ..ServerConfig::default()
    };
    let shards = TestShards::start(&config, 1).await;
    let tensors = tensors();
    let elements = 607;
    let mut first = shards.client(0, &tensors).await;
    let mut second = shards.client(1, &tensors).await;
    first.init(&vec![1.0; elements], 1).await.unwrap();
    let mut parameters = vec![0.0f32; elements];
    first.pull(&mut parameters).await.unwrap();
    second.pull(&mut parameters).await.unwrap();

    let early = tokio::spawn(async move {
        let mut parameters = vec![0.0f32; elements];
        let report = first
            .push_pull(&vec![0.5; elements], &[], &mut parameters, &[])
            .await
            .unwrap();
        (report.versions, parameters)
    });
    shards
        .wait_for("rank 0 to wait for rank 1", |status| {
            status.pending_ranks == vec![0] && status.waiting_ranks == vec![0]
        })
        .await;
    assert_eq!(shards.servers[0].status().await.version, 0);
    let report = second
        .push_pull(&vec![1.5; elements], &[], &mut parameters, &[])
        .await
        .unwrap();
    let (early_versions, early_parameters) = early.await.unwrap();
    assert_eq!(report.versions, vec![1]);
    assert_eq!(early_versions, vec![1]);
    // 1 - (0.5 + 1.5) / 2 = 0, released to both ranks.
    assert_eq!(parameters, vec![0.0; elements]);
    assert_eq!(early_parameters, parameters);
    shards.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_precision_pushes_accumulate_in_f32() {
    let (optimizer, schedule) = subtracting_sgd();
    let config = ServerConfig {
        ranks: 2,
        mode: PsMode::Sync,
        optimizer,
        schedule,
        ..ServerConfig::default()
    };
    let shards = TestShards::start(&config, 2).await;
    let tensors = vec![TensorDeclaration::dense("w", 4)];
    let client = |rank, gradient_dtype, parameter_dtype| ClientConfig {
        job_id: job_id(),
        rank,
        gradient_dtype,
        parameter_dtype,
        ..ClientConfig::default()
    };
    let mut bf16_rank = shards
        .client_with(client(0, DType::Bf16, DType::F32), &tensors)
        .await;
    let mut f16_rank = shards
        .client_with(client(1, DType::F16, DType::Bf16), &tensors)
        .await;
    bf16_rank.init(&[0.0; 4], 1).await.unwrap();
    let mut parameters = [0.0f32; 4];
    bf16_rank.pull(&mut parameters).await.unwrap();
    let mut rounded = [0.0f32; 4];
    f16_rank.pull(&mut rounded).await.unwrap();

    // 256 and 0.125 are exact in both 16-bit types, but their sum is not exact in bf16 (8
    // significant bits): a 16-bit accumulator would lose the 0.125.
    let big = [256.0f32; 4];
    let small = [0.125f32; 4];
    let task = tokio::spawn(async move {
        let mut parameters = [0.0f32; 4];
        bf16_rank
            .push_pull(&big, &[], &mut parameters, &[])
            .await
            .unwrap();
        parameters
    });
    f16_rank
        .push_pull(&small, &[], &mut rounded, &[])
        .await
        .unwrap();
    let parameters = task.await.unwrap();
    assert_eq!(
        parameters, [-128.0625; 4],
        "f32 accumulation keeps the small push"
    );
    // Pulled in bf16, the same value rounds to -128.
    assert_eq!(rounded, [-128.0; 4]);
    shards.stop();
}
