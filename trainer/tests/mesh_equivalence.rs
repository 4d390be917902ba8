//! Acceptance tests of model parallelism: the transformer trained on pipeline, tensor and
//! hybrid meshes must follow the one-rank trajectory (same global batch, same data order), 1F1B
//! must bound the activations it holds, and a checkpoint must resume under another mesh.
//!
//! Ranks are threads joined through an in-memory rendezvous store by real TCP rings and
//! point-to-point links, exactly as rank processes are; the model is tiny and the text
//! synthetic, so the arithmetic is what is tested.

mod common;

use std::collections::HashMap;

use cohort_jobspec::train::PipelineSchedule;
use cohort_trainer::TrainConfig;
use cohort_trainer::language_model::LanguageModelOutcome;
use cohort_trainer::mesh::MeshShape;
use cohort_trainer::transformer::Split;

/// Largest difference allowed, relative to the largest parameter magnitude.
const RELATIVE_TOLERANCE: f32 = 1e-4;
/// Optimizer steps of the equivalence runs.
const STEPS: u64 = 10;

fn config(data: u32, pipeline: u32, tensor: u32, schedule: PipelineSchedule) -> TrainConfig {
    let mut config = common::transformer_config(4, 16, 8, STEPS);
    config.parallel.data = data;
    config.parallel.pipeline = pipeline;
    config.parallel.tensor = tensor;
    config.parallel.micro_batches = Some(4);
    config.parallel.pipeline_schedule = schedule;
    config.evaluate = false;
    config.final_checkpoint = false;
    config
}

/// Assembles the full parameters by name from replica 0's stages and shards.
fn assemble(config: &TrainConfig, outcomes: &[LanguageModelOutcome]) -> HashMap<String, Vec<f32>> {
    let shape = MeshShape::of(&config.parallel);
    let mut full: HashMap<String, Vec<f32>> = HashMap::new();
    for (rank, outcome) in outcomes
        .iter()
        .enumerate()
        .take(shape.pipeline * shape.tensor)
    {
        let shard = shape.coordinates(rank).unwrap().tensor;
        let parameters = outcome.model.parameters();
        let mut values = vec![0.0; parameters.element_count()];
        parameters.read_values(&mut values).unwrap();
        for (parameter, layout) in parameters.iter().zip(outcome.model.layouts()) {
            let local = &values[parameter.flat_range()];
            let size: usize = layout.full_shape.iter().product();
            let target = full
                .entry(layout.name.clone())
                .or_insert_with(|| vec![f32::NAN; size]);
            match layout.split {
                Split::Replicated => target.copy_from_slice(local),
                Split::Rows => {
                    let start = shard * local.len();
                    target[start..start + local.len()].copy_from_slice(local);
                }
                Split::Columns => {
                    let columns = layout.full_shape[1];
                    let local_columns = columns / shape.tensor;
                    for (row, chunk) in local.chunks(local_columns).enumerate() {
                        let start = row * columns + shard * local_columns;
                        target[start..start + local_columns].copy_from_slice(chunk);
                    }
                }
            }
        }
    }
    full
}

fn max_abs(parameters: &HashMap<String, Vec<f32>>) -> f32 {
    parameters
        .values()
        .flatten()
        .fold(0.0f32, |max, v| max.max(v.abs()))
}

fn max_difference(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> f32 {
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect::<std::collections::BTreeSet<_>>()
    );
    a.iter()
        .flat_map(|(name, values)| values.iter().zip(&b[name]))
        .fold(0.0f32, |max, (x, y)| max.max((x - y).abs()))
}

fn assert_mesh_matches_one_rank(data: u32, pipeline: u32, tensor: u32, schedule: PipelineSchedule) {
    let corpus = common::synthetic_corpus();
    // The reference takes the whole batch in one pass: no micro-batches, no mesh.
    let mut reference_config = config(1, 1, 1, schedule);
    reference_config.parallel.micro_batches = Some(1);
    let reference = assemble(
        &reference_config,
        &common::train_mesh(&reference_config, &corpus),
    );
    let tolerance = RELATIVE_TOLERANCE * max_abs(&reference);
    // Training moved the parameters far beyond the tolerance: a wrong step would show.
    let mut untrained_config = reference_config.clone();
    untrained_config.schedule.max_steps = Some(0);
    let untrained = assemble(
        &untrained_config,
        &common::train_mesh(&untrained_config, &corpus),
    );
    assert!(max_difference(&untrained, &reference) > 100.0 * tolerance);
    let mesh_config = config(data, pipeline, tensor, schedule);
    let outcomes = common::train_mesh(&mesh_config, &corpus);
    let trained = assemble(&mesh_config, &outcomes);
    let difference = max_difference(&trained, &reference);
    eprintln!(
        "{data}x{pipeline}x{tensor} {}: max |mesh - one rank| = {difference:e} (tolerance {tolerance:e})",
        schedule.name()
    );
    assert!(difference <= tolerance, "{difference} > {tolerance}");
    // Replicas hold the same model.
    if data > 1 {
        let shape = MeshShape::of(&mesh_config.parallel);
        for rank in 0..shape.world_size() {
            let twin = rank % (shape.pipeline * shape.tensor);
            let value = |r: usize| {
                let parameters = outcomes[r].model.parameters();
                let mut values = vec![0.0; parameters.element_count()];
                parameters.read_values(&mut values).unwrap();
                values
            };
            assert_eq!(
                value(rank),
                value(twin),
                "rank {rank} differs from its replica"
            );
        }
    }
    // Activations in flight: GPipe holds every micro-batch, 1F1B at most the stages after it.
    let shape = MeshShape::of(&mesh_config.parallel);
    for (rank, outcome) in outcomes.iter().enumerate() {
        let stage = shape.coordinates(rank).unwrap().stage;
        let live = outcome.pipeline.max_live_activations;
        match schedule {
            PipelineSchedule::Gpipe => assert_eq!(live, 4, "rank {rank}"),
            PipelineSchedule::OneForwardOneBackward => {
                assert!(
                    live <= (shape.pipeline - stage).min(4),
                    "rank {rank}: {live}"
                )
            }
        }
    }
}

#[test]
fn pipeline_of_two_stages_matches_one_rank_with_both_schedules() {
    assert_mesh_matches_one_rank(1, 2, 1, PipelineSchedule::Gpipe);
    assert_mesh_matches_one_rank(1, 2, 1, PipelineSchedule::OneForwardOneBackward);
}

#[test]
fn pipeline_of_four_stages_matches_one_rank_with_both_schedules() {
    assert_mesh_matches_one_rank(1, 4, 1, PipelineSchedule::Gpipe);
    assert_mesh_matches_one_rank(1, 4, 1, PipelineSchedule::OneForwardOneBackward);
}

#[test]
fn tensor_parallelism_over_two_and_four_ranks_matches_one_rank() {
    assert_mesh_matches_one_rank(1, 1, 2, PipelineSchedule::OneForwardOneBackward);
    assert_mesh_matches_one_rank(1, 1, 4, PipelineSchedule::OneForwardOneBackward);
}

#[test]
fn hybrid_meshes_match_one_rank() {
    assert_mesh_matches_one_rank(2, 2, 1, PipelineSchedule::OneForwardOneBackward);
    assert_mesh_matches_one_rank(2, 1, 2, PipelineSchedule::Gpipe);
}

#[test]
fn a_checkpoint_of_one_mesh_resumes_under_another() {
    let corpus = common::synthetic_corpus();
    let directory = tempfile::tempdir().unwrap();
    let mut first = config(2, 2, 1, PipelineSchedule::OneForwardOneBackward);
    first.output_directory = directory.path().to_owned();
    first.evaluate = true;
    first.final_checkpoint = true;
    let outcomes = common::train_mesh(&first, &corpus);
    let before = outcomes[0].final_validation.clone().unwrap();
    let initial = outcomes[0].initial_validation.clone().unwrap();
    assert!(before.loss < initial.loss, "{initial:?} -> {before:?}");
    let checkpoint = outcomes[0]
        .checkpoint
        .clone()
        .expect("rank 0 wrote the checkpoint");
    assert!(outcomes[1..].iter().all(|o| o.checkpoint.is_none()));

    let mut second = config(1, 1, 4, PipelineSchedule::OneForwardOneBackward);
    second.output_directory = directory.path().to_owned();
    second.evaluate = true;
    second.checkpoint.resume_from = Some(checkpoint.to_string_lossy().into_owned());
    // Resumed at the end: only the evaluation runs.
    let resumed = common::train_mesh(&second, &corpus);
    let after = resumed[0].initial_validation.clone().unwrap();
    eprintln!(
        "validation loss {} under 2x2x1, {} resumed under 1x1x4",
        before.loss, after.loss
    );
    assert_eq!(after.step, STEPS);
    assert!(
        (after.loss - before.loss).abs() <= 1e-3,
        "{before:?} vs {after:?}"
    );

    // Training on from the checkpoint under either mesh follows the same trajectory.
    let mut continued = Vec::new();
    for (mesh, (data, pipeline, tensor)) in [("2x2x1", (2, 2, 1)), ("1x1x4", (1, 1, 4))] {
        let mut more = config(
            data,
            pipeline,
            tensor,
            PipelineSchedule::OneForwardOneBackward,
        );
        more.output_directory = directory.path().join(mesh);
        more.schedule.max_steps = Some(STEPS + 4);
        more.checkpoint.resume_from = Some(checkpoint.to_string_lossy().into_owned());
        let outcomes = common::train_mesh(&more, &corpus);
        assert_eq!(outcomes[0].steps, STEPS + 4);
        continued.push(assemble(&more, &outcomes));
    }
    let tolerance = RELATIVE_TOLERANCE * max_abs(&continued[0]);
    let difference = max_difference(&continued[0], &continued[1]);
    eprintln!("4 more steps from the checkpoint: 2x2x1 vs 1x1x4 differ by {difference:e}");
    assert!(difference <= tolerance, "{difference} > {tolerance}");
}
