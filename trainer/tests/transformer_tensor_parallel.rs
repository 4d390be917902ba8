//! Acceptance tests of the transformer and its cuts: the single-rank model against a naive
//! reference written with plain loops, tensor-parallel groups of 2 and 4 ranks (threads joined
//! by TCP rings on loopback) against the single rank, and pipeline stages composed against the
//! whole model.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use cohort_collective::{InMemoryStore, TcpRing, TcpRingConfig};
use cohort_jobspec::layout::TransformerShape;
use cohort_trainer::transformer::{
    ParameterLayout, Split, StageInput, StagePlan, TensorParallel, TransformerConfig,
    TransformerStage,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCABULARY: usize = 13;
const BATCH: usize = 3;
const SEQUENCE: usize = 8;
/// Largest logit or loss difference allowed against the naive reference.
const REFERENCE_TOLERANCE: f64 = 1e-4;
/// Largest relative loss difference allowed between a tensor-parallel group and one rank.
const LOSS_RELATIVE_TOLERANCE: f32 = 1e-5;
/// Largest gradient difference allowed, relative to the largest gradient of the model.
const GRADIENT_RELATIVE_TOLERANCE: f32 = 1e-4;

fn config(tie_embeddings: bool) -> TransformerConfig {
    TransformerConfig {
        vocabulary: VOCABULARY,
        shape: TransformerShape {
            layers: 2,
            heads: 4,
            width: 16,
            context: 8,
            tie_embeddings,
        },
        seed: 11,
    }
}

/// Full parameter values by global name.
type Values = HashMap<String, Vec<f32>>;

/// Returns the local values of every parameter of `stage`, by name.
fn local_values(stage: &TransformerStage) -> Values {
    let parameters = stage.parameters();
    let mut flat = vec![0.0; parameters.element_count()];
    parameters.read_values(&mut flat).unwrap();
    parameters
        .iter()
        .map(|p| (p.name().to_owned(), flat[p.flat_range()].to_vec()))
        .collect()
}

/// Returns the initial values of the full model with noise of 0.1 added everywhere, so that
/// biases and LayerNorm parameters are not all zeros and ones and the tests see them.
fn perturbed_values(config: &TransformerConfig) -> Values {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let model = TransformerStage::full(config, &Device::Cpu).unwrap();
    let mut values = local_values(&model);
    let mut names: Vec<_> = values.keys().cloned().collect();
    names.sort();
    for name in names {
        for value in values.get_mut(&name).unwrap() {
            *value += rng.random_range(-0.1..0.1);
        }
    }
    values
}

/// Returns random tokens and targets, `[BATCH, SEQUENCE]`, as tensors and as plain vectors.
fn batch(seed: u64) -> (Tensor, Tensor, Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draw = || -> Vec<u32> {
        (0..BATCH * SEQUENCE)
            .map(|_| rng.random_range(0..VOCABULARY as u32))
            .collect()
    };
    let (tokens, targets) = (draw(), draw());
    let tensor = |values: &[u32]| Tensor::from_slice(values, (BATCH, SEQUENCE), &Device::Cpu);
    (
        tensor(&tokens).unwrap(),
        tensor(&targets).unwrap(),
        tokens.iter().map(|&t| t as usize).collect(),
        targets.iter().map(|&t| t as usize).collect(),
    )
}

fn load(stage: &TransformerStage, values: &Values) {
    stage.load_full(&|name| values.get(name).cloned()).unwrap();
}

// --- The naive reference: plain f64 loops over the f32 parameters. ---

/// `[rows][in] -> [rows][out]`: `x W^T + b` with `W` row-major `[out, in]`.
fn reference_linear(x: &[Vec<f64>], weight: &[f32], bias: &[f32]) -> Vec<Vec<f64>> {
    let out = bias.len();
    x.iter()
        .map(|row| {
            (0..out)
                .map(|o| {
                    let w = &weight[o * row.len()..(o + 1) * row.len()];
                    f64::from(bias[o])
                        + row
                            .iter()
                            .zip(w)
                            .map(|(a, b)| a * f64::from(*b))
                            .sum::<f64>()
                })
                .collect()
        })
        .collect()
}

fn reference_layer_norm(x: &[Vec<f64>], weight: &[f32], bias: &[f32]) -> Vec<Vec<f64>> {
    x.iter()
        .map(|row| {
            let n = row.len() as f64;
            let mean = row.iter().sum::<f64>() / n;
            let variance = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let deviation = (variance + 1e-5).sqrt();
            row.iter()
                .enumerate()
                .map(|(i, v)| (v - mean) / deviation * f64::from(weight[i]) + f64::from(bias[i]))
                .collect()
        })
        .collect()
}

/// GELU, tanh approximation.
fn reference_gelu(x: f64) -> f64 {
    let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
    0.5 * x * (1.0 + inner.tanh())
}

/// Causal multi-head attention of one sequence, `[sequence][width]` each.
fn reference_attention(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    heads: usize,
) -> Vec<Vec<f64>> {
    let width = q[0].len();
    let dimension = width / heads;
    let mut out = vec![vec![0.0; width]; q.len()];
    for head in 0..heads {
        let columns = head * dimension..(head + 1) * dimension;
        for (i, out_row) in out.iter_mut().enumerate() {
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    columns.clone().map(|c| q[i][c] * k[j][c]).sum::<f64>()
                        / (dimension as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            for (j, e) in exps.iter().enumerate() {
                for c in columns.clone() {
                    out_row[c] += e / total * v[j][c];
                }
            }
        }
    }
    out
}

/// Returns the logits `[batch * sequence][vocabulary]` and the mean cross-entropy.
fn reference_forward(
    config: &TransformerConfig,
    values: &Values,
    tokens: &[usize],
    targets: &[usize],
) -> (Vec<Vec<f64>>, f64) {
    let shape = config.shape;
    let (width, heads) = (shape.width as usize, shape.heads as usize);
    let get = |name: &str| values[name].as_slice();
    let mut logits = Vec::new();
    for sequence in tokens.chunks(SEQUENCE) {
        let mut x: Vec<Vec<f64>> = sequence
            .iter()
            .enumerate()
            .map(|(position, &token)| {
                (0..width)
                    .map(|c| {
                        f64::from(get("embedding.token")[token * width + c])
                            + f64::from(get("embedding.position")[position * width + c])
                    })
                    .collect()
            })
            .collect();
        for block in 0..shape.layers {
            let p = |suffix: &str| get(&format!("blocks.{block}.{suffix}"));
            let h = reference_layer_norm(&x, p("ln1.weight"), p("ln1.bias"));
            let q = reference_linear(&h, p("attention.q.weight"), p("attention.q.bias"));
            let k = reference_linear(&h, p("attention.k.weight"), p("attention.k.bias"));
            let v = reference_linear(&h, p("attention.v.weight"), p("attention.v.bias"));
            let attended = reference_attention(&q, &k, &v, heads);
            let projected = reference_linear(
                &attended,
                p("attention.output.weight"),
                p("attention.output.bias"),
            );
            add_into(&mut x, &projected);
            let h = reference_layer_norm(&x, p("ln2.weight"), p("ln2.bias"));
            let mut hidden = reference_linear(&h, p("mlp.up.weight"), p("mlp.up.bias"));
            hidden
                .iter_mut()
                .flatten()
                .for_each(|v| *v = reference_gelu(*v));
            let projected = reference_linear(&hidden, p("mlp.down.weight"), p("mlp.down.bias"));
            add_into(&mut x, &projected);
        }
        let h = reference_layer_norm(&x, get("ln_f.weight"), get("ln_f.bias"));
        let head = if shape.tie_embeddings {
            get("embedding.token")
        } else {
            get("head.weight")
        };
        logits.extend(reference_linear(&h, head, get("head.bias")));
    }
    let loss = logits
        .iter()
        .zip(targets)
        .map(|(row, &target)| {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_total = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
            log_total - row[target]
        })
        .sum::<f64>()
        / targets.len() as f64;
    (logits, loss)
}

fn add_into(x: &mut [Vec<f64>], y: &[Vec<f64>]) {
    for (a, b) in x.iter_mut().flatten().zip(y.iter().flatten()) {
        *a += b;
    }
}

fn check_against_reference(tie_embeddings: bool) {
    let config = config(tie_embeddings);
    let values = perturbed_values(&config);
    let model = TransformerStage::full(&config, &Device::Cpu).unwrap();
    load(&model, &values);
    let (tokens, targets, token_ids, target_ids) = batch(1);
    let logits = model.forward(StageInput::Tokens(&tokens)).unwrap();
    assert_eq!(logits.dims(), [BATCH, SEQUENCE, VOCABULARY]);
    let loss = TransformerStage::loss(&logits, &targets)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let (expected_logits, expected_loss) =
        reference_forward(&config, &values, &token_ids, &target_ids);
    let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let logit_difference = got
        .iter()
        .zip(expected_logits.iter().flatten())
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    let loss_difference = (f64::from(loss) - expected_loss).abs();
    eprintln!(
        "tied {tie_embeddings}: max |logit - reference| {logit_difference:e}, \
         |loss - reference| {loss_difference:e} (loss {expected_loss})"
    );
    assert!(logit_difference < REFERENCE_TOLERANCE, "{logit_difference}");
    assert!(loss_difference < REFERENCE_TOLERANCE, "{loss_difference}");
    // The comparison is sharp: logits vary by much more than the tolerance.
    let spread = expected_logits
        .iter()
        .flatten()
        .fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(spread > 1000.0 * REFERENCE_TOLERANCE, "{spread}");
}

#[test]
fn full_model_matches_a_naive_reference() {
    check_against_reference(false);
}

#[test]
fn tied_full_model_matches_a_naive_reference() {
    check_against_reference(true);
}

// --- Tensor parallelism against one rank. ---

/// What one rank of a run reports.
struct RankRun {
    /// The loss.
    loss: f32,
    /// Layout and local gradient of every local parameter.
    gradients: Vec<(ParameterLayout, Vec<f32>)>,
    /// Every local parameter gathered into its full tensor, by name.
    gathered: Values,
}

/// Runs forward, loss and backward on each rank of a tensor-parallel group of `size` (a
/// single rank without communicator when `size` is 1).
fn run(config: &TransformerConfig, values: &Values, size: usize) -> Vec<RankRun> {
    let (tokens, targets, _, _) = batch(2);
    let work = |tensor_parallel: TensorParallel| -> RankRun {
        let tensor_parallel = Arc::new(tensor_parallel);
        let plan = StagePlan::full(config.shape.layers as usize);
        let stage =
            TransformerStage::new(config, plan, tensor_parallel.clone(), &Device::Cpu).unwrap();
        load(&stage, values);
        let logits = stage.forward(StageInput::Tokens(&tokens)).unwrap();
        let loss = TransformerStage::loss(&logits, &targets).unwrap();
        let store = loss.backward().unwrap();
        let parameters = stage.parameters();
        let mut gathered = HashMap::new();
        let mut gradients = Vec::new();
        let local = local_values(&stage);
        for (index, (parameter, layout)) in parameters.iter().zip(stage.layouts()).enumerate() {
            assert_eq!(parameter.name(), layout.name);
            let mut gradient = vec![f32::NAN; parameter.len()];
            parameters
                .read_gradient(index, &store, &mut gradient, 1.0)
                .unwrap();
            gradients.push((layout.clone(), gradient));
            let full = tensor_parallel
                .gather(&local[&layout.name], layout, parameter.shape().dims())
                .unwrap();
            gathered.insert(layout.name.clone(), full);
        }
        RankRun {
            loss: loss.to_scalar::<f32>().unwrap(),
            gradients,
            gathered,
        }
    };
    if size == 1 {
        return vec![work(TensorParallel::single())];
    }
    let store = InMemoryStore::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let (store, work) = (&store, &work);
                scope.spawn(move || {
                    let ring =
                        TcpRing::connect(store, "tensor", rank, size, &TcpRingConfig::default())
                            .unwrap();
                    work(TensorParallel::new(Box::new(ring)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check_tensor_parallel(size: usize, tie_embeddings: bool) {
    let config = config(tie_embeddings);
    let values = perturbed_values(&config);
    let single = run(&config, &values, 1).pop().unwrap();
    let full_gradients: HashMap<_, _> = single
        .gradients
        .iter()
        .map(|(layout, gradient)| (layout.name.clone(), gradient.clone()))
        .collect();
    let scale = full_gradients
        .values()
        .flatten()
        .fold(0.0f32, |m, g| m.max(g.abs()));
    let tolerance = GRADIENT_RELATIVE_TOLERANCE * scale;
    let ranks = run(&config, &values, size);
    assert_eq!(ranks.len(), size);
    let mut worst_gradient = 0.0f32;
    let mut worst_loss = 0.0f32;
    for (rank, run) in ranks.iter().enumerate() {
        let loss_difference = (run.loss - single.loss).abs() / single.loss.abs();
        worst_loss = worst_loss.max(loss_difference);
        assert!(
            loss_difference <= LOSS_RELATIVE_TOLERANCE,
            "rank {rank}: loss {} vs {}",
            run.loss,
            single.loss
        );
        assert_eq!(run.gradients.len(), single.gradients.len());
        for (layout, gradient) in &run.gradients {
            let full = &full_gradients[&layout.name];
            // Every parameter matters to the loss: a zero gradient would compare too easily.
            assert!(full.iter().any(|&g| g != 0.0), "{}", layout.name);
            let expected = layout.slice(full, rank, size).unwrap();
            assert_eq!(gradient.len(), expected.len());
            for (got, want) in gradient.iter().zip(&expected) {
                let difference = (got - want).abs();
                worst_gradient = worst_gradient.max(difference);
                assert!(
                    difference <= tolerance,
                    "rank {rank} of {size}, {}: {got} vs {want} (tolerance {tolerance:e})",
                    layout.name
                );
            }
            if layout.split == Split::Replicated {
                // Replicated gradients come out of the all-reduce bit-identical everywhere.
                let first = ranks[0]
                    .gradients
                    .iter()
                    .find(|(l, _)| l.name == layout.name)
                    .unwrap();
                assert_eq!(gradient, &first.1, "{}", layout.name);
            }
            // Gathering the shards gives back the full values.
            assert_eq!(run.gathered[&layout.name], values[&layout.name]);
        }
    }
    let splits: Vec<_> = ranks[0].gradients.iter().map(|(l, _)| l.split).collect();
    assert!(splits.contains(&Split::Rows) && splits.contains(&Split::Columns));
    eprintln!(
        "{size} tensor-parallel ranks (tied {tie_embeddings}) vs 1: max relative loss \
         difference {worst_loss:e}, max |gradient difference| {worst_gradient:e} (largest \
         gradient {scale:e}, tolerance {tolerance:e})"
    );
}

#[test]
fn two_tensor_parallel_ranks_match_one_rank() {
    check_tensor_parallel(2, false);
}

#[test]
fn four_tensor_parallel_ranks_match_one_rank() {
    check_tensor_parallel(4, false);
}

#[test]
fn tied_two_tensor_parallel_ranks_match_one_rank() {
    check_tensor_parallel(2, true);
}

// --- Pipeline stages against the whole model. ---

fn check_stages(tie_embeddings: bool) {
    let mut config = config(tie_embeddings);
    config.shape.layers = 3;
    let full = TransformerStage::full(&config, &Device::Cpu).unwrap();
    let full_values = local_values(&full);
    let single = || Arc::new(TensorParallel::single());
    let stages: Vec<_> = [1u32, 1, 1]
        .iter()
        .enumerate()
        .map(|(stage, _)| {
            let plan = StagePlan::from_stage_layers(&[1, 1, 1], stage).unwrap();
            TransformerStage::new(&config, plan, single(), &Device::Cpu).unwrap()
        })
        .collect();
    assert_eq!(stages[1].plan().blocks, 1..2);
    let mut covered = 0;
    for stage in &stages {
        // Freshly initialised: every stage starts from the full model's values.
        for (name, values) in local_values(stage) {
            assert_eq!(values, full_values[&name], "{name}");
            covered += 1;
        }
    }
    // Every parameter lives on exactly one stage, except a tied table copied to the last.
    let copies = usize::from(tie_embeddings);
    assert_eq!(covered, full_values.len() + copies);

    let (tokens, _, _, _) = batch(3);
    let expected = full.forward(StageInput::Tokens(&tokens)).unwrap();
    let mut activations = stages[0].forward(StageInput::Tokens(&tokens)).unwrap();
    assert_eq!(activations.dims(), [BATCH, SEQUENCE, 16]);
    for stage in &stages[1..] {
        activations = stage
            .forward(StageInput::Activations(&activations))
            .unwrap();
    }
    let difference = expected
        .sub(&activations)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!(
        "3 stages (tied {tie_embeddings}) vs whole model: max |logit difference| {difference:e}"
    );
    assert!(difference <= 1e-6, "{difference}");
    // Stages refuse the other kind of input.
    assert!(stages[1].forward(StageInput::Tokens(&tokens)).is_err());
    assert!(
        stages[0]
            .forward(StageInput::Activations(&expected))
            .is_err()
    );
}

#[test]
fn pipeline_stages_compose_to_the_whole_model() {
    check_stages(false);
}

#[test]
fn tied_pipeline_stages_compose_to_the_whole_model() {
    check_stages(true);
}

// --- Checkpoint round trips. ---

#[test]
fn load_full_round_trips_and_rejects_missing_or_misshapen_tensors() {
    let config = config(false);
    let values = perturbed_values(&config);
    let model = TransformerStage::full(&config, &Device::Cpu).unwrap();
    load(&model, &values);
    assert_eq!(local_values(&model), values);
    // Back from the model into a fresh one.
    let read = local_values(&model);
    let copy = TransformerStage::full(&config, &Device::Cpu).unwrap();
    load(&copy, &read);
    assert_eq!(local_values(&copy), values);

    let mut missing = values.clone();
    missing.remove("blocks.1.mlp.up.bias");
    assert!(copy.load_full(&|name| missing.get(name).cloned()).is_err());
    let mut short = values.clone();
    short.get_mut("ln_f.weight").unwrap().pop();
    assert!(copy.load_full(&|name| short.get(name).cloned()).is_err());
}

#[test]
fn invalid_shapes_and_inputs_are_errors() {
    let mut config = config(false);
    config.shape.heads = 3;
    assert!(TransformerStage::full(&config, &Device::Cpu).is_err());
    let config = self::config(false);
    let plan = StagePlan {
        blocks: 1..2,
        first: true,
        last: true,
    };
    assert!(
        TransformerStage::new(
            &config,
            plan,
            Arc::new(TensorParallel::single()),
            &Device::Cpu
        )
        .is_err()
    );
    let model = TransformerStage::full(&config, &Device::Cpu).unwrap();
    let too_long = Tensor::zeros((1, 9), candle_core::DType::U32, &Device::Cpu).unwrap();
    assert!(model.forward(StageInput::Tokens(&too_long)).is_err());
    let out_of_vocabulary = Tensor::new(&[[0u32, 13]], &Device::Cpu).unwrap();
    assert!(
        model
            .forward(StageInput::Tokens(&out_of_vocabulary))
            .is_err()
    );
    // A shorter sequence than the context is fine.
    let short = Tensor::new(&[[0u32, 12, 5]], &Device::Cpu).unwrap();
    let logits = model.forward(StageInput::Tokens(&short)).unwrap();
    assert_eq!(logits.dims(), [1, 3, VOCABULARY]);
}
