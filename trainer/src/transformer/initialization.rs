//! Initial values that do not depend on how the model is cut.
//!
//! Every full tensor is drawn from its own random stream, seeded from the model seed and the
//! tensor's global name, so a pipeline stage or a tensor-parallel shard computes exactly the
//! values the single-rank model holds at the same positions, whatever else it holds. The seed
//! of a tensor is `splitmix64(fnv1a_64(name) ^ splitmix64(model_seed))`: FNV-1a (64-bit, offset
//! basis `0xcbf29ce484222325`, prime `0x100000001b3`) hashes the UTF-8 bytes of the name and
//! SplitMix64's finaliser mixes it with the seed. The stream is a [`ChaCha8Rng`] seeded with
//! [`SeedableRng::seed_from_u64`]; normal values come from the Box–Muller transform of pairs of
//! uniform `f64`s, both outputs of a pair used in order.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// How a full tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TensorInitialization {
    /// Normal with mean 0 and the given standard deviation (weights and embeddings).
    Normal {
        /// Standard deviation of every element.
        standard_deviation: f32,
    },
    /// All zeros (biases).
    Zeros,
    /// All ones (LayerNorm weights).
    Ones,
}

/// Returns the 64-bit FNV-1a hash of the UTF-8 bytes of `name`.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(FNV_OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// Returns SplitMix64's output for state `value` (a bijective mixing of the 64 bits).
fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Returns the seed of the random stream of tensor `name` in a model seeded with `model_seed`.
pub fn tensor_seed(model_seed: u64, name: &str) -> u64 {
    splitmix64(name_hash(name) ^ splitmix64(model_seed))
}

/// Returns the `element_count` initial values of the full tensor `name`, in row-major order.
pub fn full_values(
    model_seed: u64,
    name: &str,
    element_count: usize,
    initialization: TensorInitialization,
) -> Vec<f32> {
    match initialization {
        TensorInitialization::Zeros => vec![0.0; element_count],
        TensorInitialization::Ones => vec![1.0; element_count],
        TensorInitialization::Normal { standard_deviation } => {
            let mut rng = ChaCha8Rng::seed_from_u64(tensor_seed(model_seed, name));
            let mut values = Vec::with_capacity(element_count + 1);
            while values.len() < element_count {
                // 1 - u lies in (0, 1], so the logarithm is finite.
                let radius = (-2.0 * (1.0 - rng.random::<f64>()).ln()).sqrt();
                let angle = std::f64::consts::TAU * rng.random::<f64>();
                let scale = f64::from(standard_deviation);
                values.push((scale * radius * angle.cos()) as f32);
                values.push((scale * radius * angle.sin()) as f32);
            }
            values.truncate(element_count);
            values
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_published_test_vectors() {
        // From the FNV reference test suite.
        assert_eq!(name_hash(""), 0xcbf29ce484222325);
        assert_eq!(name_hash("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(name_hash("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn values_depend_on_seed_and_name_only() {
        let normal = TensorInitialization::Normal {
            standard_deviation: 0.02,
        };
        let a = full_values(3, "blocks.0.attention.q.weight", 5, normal);
        assert_eq!(a, full_values(3, "blocks.0.attention.q.weight", 5, normal));
        // A longer draw starts with the shorter one: values do not depend on the count.
        assert_eq!(
            a[..],
            full_values(3, "blocks.0.attention.q.weight", 8, normal)[..5]
        );
        assert_ne!(a, full_values(4, "blocks.0.attention.q.weight", 5, normal));
        assert_ne!(a, full_values(3, "blocks.0.attention.k.weight", 5, normal));
        assert_eq!(full_values(3, "b", 2, TensorInitialization::Ones), [1.0; 2]);
        assert_eq!(
            full_values(3, "b", 2, TensorInitialization::Zeros),
            [0.0; 2]
        );
    }

    #[test]
    fn normal_values_have_the_requested_moments() {
        let count = 200_000;
        let values = full_values(
            1,
            "embedding.token",
            count,
            TensorInitialization::Normal {
                standard_deviation: 0.02,
            },
        );
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / count as f64;
        let variance = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / count as f64;
        // Standard errors: 0.02 / sqrt(n) = 4.5e-5 for the mean, about 0.3% for the deviation.
        assert!(mean.abs() < 3e-4, "{mean}");
        assert!(
            (variance.sqrt() - 0.02).abs() < 0.02 * 0.02,
            "{}",
            variance.sqrt()
        );
        let beyond_three = values.iter().filter(|v| v.abs() > 0.06).count() as f64;
        // P(|z| > 3) = 0.0027.
        assert!((beyond_three / count as f64 - 0.0027).abs() < 0.0006);
    }
}
