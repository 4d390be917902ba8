//! Helpers the trainer's integration tests share: multi-rank runs on loopback TCP rings and
//! parameter comparisons.

#![allow(dead_code)]

use cohort_collective::{InMemoryStore, TcpRing, TcpRingConfig};
use cohort_trainer::data::TrainTestSplits;
use cohort_trainer::metrics::DiscardMetrics;
use cohort_trainer::models::Model;
use cohort_trainer::{MetricsSink, TrainConfig, TrainOutcome, train};

/// Returns `model`'s parameters, flat.
pub fn flat(model: &Model) -> Vec<f32> {
    let parameters = model.parameters();
    let mut values = vec![0.0; parameters.element_count()];
    parameters.read_values(&mut values).unwrap();
    values
}

/// Trains `config` on `parallel.data` ranks (threads joined by a TCP ring) and returns every
/// rank's final parameters, flat, after checking that each ran `expected_steps` steps.
pub fn train_on_ring(
    config: &TrainConfig,
    data: &TrainTestSplits,
    expected_steps: u64,
) -> Vec<Vec<f32>> {
    train_on_ring_recording::<DiscardMetrics>(config, data)
        .into_iter()
        .map(|(outcome, _)| {
            assert_eq!(outcome.steps, expected_steps);
            flat(&outcome.model)
        })
        .collect()
}

/// Trains `config` on `parallel.data` ranks (threads joined by a TCP ring), each reporting to
/// its own `S`; returns every rank's outcome and sink.
pub fn train_on_ring_recording<S: MetricsSink + Default + Send>(
    config: &TrainConfig,
    data: &TrainTestSplits,
) -> Vec<(TrainOutcome, S)> {
    let world_size = config.parallel.data as usize;
    let store = InMemoryStore::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let store = &store;
                scope.spawn(move || {
                    let mut ring = TcpRing::connect(
                        store,
                        "test-ring",
                        rank,
                        world_size,
                        &TcpRingConfig::default(),
                    )
                    .unwrap();
                    let mut sink = S::default();
                    let outcome = train(config, data, &mut ring, &mut sink).unwrap();
                    (outcome, sink)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Largest magnitude in `values`.
pub fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |max, v| max.max(v.abs()))
}

/// Largest element-wise difference of two equally long vectors.
pub fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |max, (x, y)| max.max((x - y).abs()))
}
