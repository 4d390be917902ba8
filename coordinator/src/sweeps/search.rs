//! The parameter values of each trial of a sweep: a pure function of the sweep and the trial's
//! number, so that they are recomputed rather than stored, and the same on every coordinator.
//!
//! - Random search (and ASHA, which searches the same way): trial `n` draws its values from
//!   the ChaCha20 stream `n` of the generator seeded with the sweep's seed, one draw per
//!   parameter in file order. So a seed gives the same configurations to a random search and
//!   to an ASHA sweep over the same parameters, and trial `n`'s values do not depend on how
//!   many trials ran before it. The draws are computed here from raw 64-bit outputs (not by
//!   `rand`'s distributions, whose algorithms may change between versions), so a seed keeps
//!   its configurations across upgrades.
//! - Grid search: trial `n` is the `n`-th point of the product of the `choice` lists, in file
//!   order with the last parameter varying fastest (as nested loops would), so trials
//!   `0..grid_size` enumerate every point once.

use cohort_jobspec::sweep::{Distribution, Parameter, Searcher, SweepSpec, Value};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// The values of trial `trial` of `spec`: each parameter's path and value, in file order.
pub fn trial_values(spec: &SweepSpec, trial: u32) -> Vec<(String, Value)> {
    match spec.searcher {
        Searcher::Grid => grid_point(&spec.parameters, trial),
        Searcher::Random | Searcher::Asha(_) => random_point(&spec.parameters, spec.seed, trial),
    }
}

/// The random draws of trial `trial` of a sweep seeded with `seed`.
pub fn random_point(parameters: &[Parameter], seed: u64, trial: u32) -> Vec<(String, Value)> {
    let mut stream = trial_stream(seed, trial);
    parameters
        .iter()
        .map(|parameter| {
            (
                parameter.path.clone(),
                draw(&parameter.distribution, &mut stream),
            )
        })
        .collect()
}

/// The `trial`-th point of the grid of `parameters` (wrapping around past the grid's size).
/// Parameters that are not choices, which a grid sweep refuses, are drawn as a random search
/// of seed 0 would draw them.
pub fn grid_point(parameters: &[Parameter], trial: u32) -> Vec<(String, Value)> {
    let size = parameters
        .iter()
        .map(|parameter| choice_count(&parameter.distribution))
        .fold(1u64, u64::saturating_mul);
    let mut rest = u64::from(trial) % size.max(1);
    let mut stream = trial_stream(0, trial);
    let mut values: Vec<(String, Value)> = parameters
        .iter()
        .rev()
        .map(|parameter| {
            let value = match &parameter.distribution {
                Distribution::Choice(choices) => {
                    let count = choice_count(&parameter.distribution);
                    let index = rest % count;
                    rest /= count;
                    pick(choices, index)
                }
                other => draw(other, &mut stream),
            };
            (parameter.path.clone(), value)
        })
        .collect();
    values.reverse();
    values
}

/// Number of choices of `distribution` on a grid axis (at least 1).
fn choice_count(distribution: &Distribution) -> u64 {
    match distribution {
        Distribution::Choice(choices) => (choices.len() as u64).max(1),
        _ => 1,
    }
}

/// Choice `index` of `choices` (an empty list, which validation refuses, gives an empty
/// array).
fn pick(choices: &[Value], index: u64) -> Value {
    usize::try_from(index)
        .ok()
        .and_then(|index| choices.get(index))
        .cloned()
        .unwrap_or_else(|| Value::Array(Vec::new()))
}

/// The random stream of trial `trial` of a sweep seeded with `seed`.
fn trial_stream(seed: u64, trial: u32) -> ChaCha20Rng {
    let mut stream = ChaCha20Rng::seed_from_u64(seed);
    stream.set_stream(u64::from(trial));
    stream
}

/// One value of `distribution`.
fn draw(distribution: &Distribution, stream: &mut ChaCha20Rng) -> Value {
    match distribution {
        Distribution::Uniform { low, high } => Value::Float(between(*low, *high, unit(stream))),
        Distribution::LogUniform { low, high } => {
            let exponent = between(low.ln(), high.ln(), unit(stream));
            Value::Float(within(exponent.exp(), *low, *high))
        }
        Distribution::Int { low, high } => Value::Integer(integer(*low, *high, stream)),
        Distribution::Choice(choices) => {
            pick(choices, below((choices.len() as u64).max(1), stream))
        }
    }
}

/// A uniform draw from `[0, 1)` with 53 random bits.
fn unit(stream: &mut ChaCha20Rng) -> f64 {
    (stream.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The point a fraction `fraction` of the way from `low` to `high`, within them (written so
/// that no intermediate overflows for any finite ends).
fn between(low: f64, high: f64, fraction: f64) -> f64 {
    if low.partial_cmp(&high) != Some(std::cmp::Ordering::Less) {
        return low;
    }
    within(low * (1.0 - fraction) + high * fraction, low, high)
}

/// `value` brought within `low..=high` (`low` when the range is empty or not a number; never
/// panics, unlike `f64::clamp`).
fn within(value: f64, low: f64, high: f64) -> f64 {
    if low <= high {
        value.max(low).min(high)
    } else {
        low
    }
}

/// A uniform integer of `low..=high` (`low` when the range is reversed).
fn integer(low: i64, high: i64, stream: &mut ChaCha20Rng) -> i64 {
    if high <= low {
        return low;
    }
    let span = high.abs_diff(low);
    let offset = match span.checked_add(1) {
        Some(count) => below(count, stream),
        None => stream.next_u64(),
    };
    low.wrapping_add_unsigned(offset)
}

/// A uniform integer of `0..count` (`count >= 1`), without modulo bias (Lemire's method).
fn below(count: u64, stream: &mut ChaCha20Rng) -> u64 {
    let threshold = count.wrapping_neg() % count;
    loop {
        let product = u128::from(stream.next_u64()) * u128::from(count);
        if product as u64 >= threshold {
            return (product >> 64) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cohort_jobspec::sweep::parse_sweep;
    use proptest::prelude::*;

    use super::*;

    fn parameter(path: &str, distribution: Distribution) -> Parameter {
        Parameter {
            path: path.to_owned(),
            distribution,
        }
    }

    /// A sweep of four parameters with searcher `kind` and seed `seed`.
    fn sweep(kind: &str, seed: u64) -> SweepSpec {
        let text = format!(
            r#"
version = 1
[sweep]
seed = {seed}
[sweep.searcher]
kind = "{kind}"
[sweep.parameters]
optimizer.lr = {{ loguniform = [1e-4, 1e-1] }}
"model.hidden" = {{ choice = [[256], [512, 256]] }}
schedule.batch_size = {{ int = [64, 512] }}
optimizer.momentum = {{ uniform = [0.0, 0.95] }}
[job]
version = 1
kind = "train"
[job.model]
kind = "mlp"
[job.data]
dataset = "fashion-mnist"
[job.optimizer]
kind = "sgd"
"#
        );
        parse_sweep(&text).unwrap()
    }

    #[test]
    fn a_seed_gives_random_search_and_asha_the_same_trials() {
        let random = sweep("random", 42);
        let asha = sweep("asha", 42);
        let trials: Vec<_> = (0..16).map(|n| trial_values(&random, n)).collect();
        assert_eq!(
            trials,
            (0..16).map(|n| trial_values(&asha, n)).collect::<Vec<_>>()
        );
        assert_eq!(trials[3][0].0, "optimizer.lr");
        assert_eq!(trials[3][3].0, "optimizer.momentum");
        let distinct: BTreeSet<String> = trials.iter().map(|t| format!("{t:?}")).collect();
        assert_eq!(distinct.len(), 16, "16 different configurations");
        let other_seed: Vec<_> = (0..16)
            .map(|n| trial_values(&sweep("random", 43), n))
            .collect();
        assert_ne!(trials, other_seed);
    }

    #[test]
    fn a_grid_runs_its_points_in_nested_loop_order() {
        let parameters = [
            parameter("a", Distribution::Choice(vec![1.into(), 2.into()])),
            parameter(
                "b",
                Distribution::Choice(vec!["x".into(), "y".into(), "z".into()]),
            ),
        ];
        let points: Vec<Vec<Value>> = (0..7)
            .map(|n| {
                grid_point(&parameters, n)
                    .into_iter()
                    .map(|(_, v)| v)
                    .collect()
            })
            .collect();
        let expected: Vec<Vec<Value>> =
            [(1, "x"), (1, "y"), (1, "z"), (2, "x"), (2, "y"), (2, "z")]
                .iter()
                .map(|(a, b)| vec![Value::from(*a), Value::from(*b)])
                .collect();
        assert_eq!(points[..6], expected[..]);
        assert_eq!(points[6], expected[0], "past the grid it wraps around");
    }

    /// Shares of `values` in each decade from 1e-4 to 1.
    fn decade_shares(values: &[f64]) -> [f64; 4] {
        let mut counts = [0usize; 4];
        for value in values {
            let decade = (value.log10() + 4.0).floor().clamp(0.0, 3.0) as usize;
            counts[decade] += 1;
        }
        counts.map(|count| count as f64 / values.len() as f64)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cohort_proto::fuzz_cases().min(256)))]

        #[test]
        fn the_same_seed_and_trial_give_the_same_values(seed in any::<u64>(), trial in any::<u32>()) {
            let parameters = sweep("random", 0).parameters;
            prop_assert_eq!(
                random_point(&parameters, seed, trial),
                random_point(&parameters, seed, trial)
            );
        }

        #[test]
        fn draws_stay_within_their_ranges(
            seed in any::<u64>(),
            ends in (-1e300..1e300f64, -1e300..1e300f64),
            int_ends in (any::<i64>(), any::<i64>()),
            log_ends in (1e-300..1e300f64, 1e-300..1e300f64),
        ) {
            let (low, high) = (ends.0.min(ends.1), ends.0.max(ends.1));
            let (int_low, int_high) = (int_ends.0.min(int_ends.1), int_ends.0.max(int_ends.1));
            let (log_low, log_high) = (log_ends.0.min(log_ends.1), log_ends.0.max(log_ends.1));
            let parameters = [
                parameter("u", Distribution::Uniform { low, high }),
                parameter("i", Distribution::Int { low: int_low, high: int_high }),
                parameter("l", Distribution::LogUniform { low: log_low, high: log_high }),
                parameter("c", Distribution::Choice(vec![1.into(), "two".into()])),
            ];
            for trial in 0..8 {
                let values = random_point(&parameters, seed, trial);
                let uniform = values[0].1.as_float().unwrap();
                prop_assert!((low..=high).contains(&uniform), "{} not in {}..{}", uniform, low, high);
                let int = values[1].1.as_integer().unwrap();
                prop_assert!((int_low..=int_high).contains(&int));
                let log = values[2].1.as_float().unwrap();
                prop_assert!((log_low..=log_high).contains(&log), "{} not in {}..{}", log, log_low, log_high);
                prop_assert!(values[3].1 == Value::from(1) || values[3].1 == Value::from("two"));
            }
        }

        #[test]
        fn loguniform_draws_spread_evenly_over_decades(seed in any::<u64>()) {
            let parameters = [parameter("lr", Distribution::LogUniform { low: 1e-4, high: 1.0 })];
            let values: Vec<f64> = (0..4000)
                .map(|trial| random_point(&parameters, seed, trial)[0].1.as_float().unwrap())
                .collect();
            // 1000 expected per decade, a standard deviation of 27: 6 of them either side.
            for share in decade_shares(&values) {
                prop_assert!((0.21..=0.29).contains(&share), "{:?}", decade_shares(&values));
            }
        }

        #[test]
        fn int_draws_reach_both_ends(seed in any::<u64>(), low in -5i64..5, width in 1i64..4) {
            let high = low + width;
            let parameters = [parameter("n", Distribution::Int { low, high })];
            let seen: BTreeSet<i64> = (0..200)
                .map(|trial| random_point(&parameters, seed, trial)[0].1.as_integer().unwrap())
                .collect();
            prop_assert_eq!(seen, (low..=high).collect::<BTreeSet<_>>());
        }

        #[test]
        fn a_grid_enumerates_every_point_exactly_once(lengths in prop::collection::vec(1usize..5, 1..5)) {
            let parameters: Vec<Parameter> = lengths
                .iter()
                .enumerate()
                .map(|(axis, length)| {
                    let choices = (0..*length as i64).map(Value::Integer).collect();
                    parameter(&format!("p{axis}"), Distribution::Choice(choices))
                })
                .collect();
            let size: usize = lengths.iter().product();
            let points: BTreeSet<Vec<i64>> = (0..size as u32)
                .map(|n| {
                    grid_point(&parameters, n)
                        .into_iter()
                        .map(|(_, value)| value.as_integer().unwrap())
                        .collect()
                })
                .collect();
            prop_assert_eq!(points.len(), size);
            for point in &points {
                for (value, length) in point.iter().zip(&lengths) {
                    prop_assert!((0..*length as i64).contains(value));
                }
            }
        }
    }
}
