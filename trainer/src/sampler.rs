//! The deterministic distributed sampler: which examples each rank trains on at each step.
//!
//! Every epoch has its own permutation of the training examples, derived from the data seed and
//! the epoch number alone, so every rank computes the same one without talking to the others.
//! Step `s` of an epoch takes the global batch `order[s * B .. (s + 1) * B]`, which therefore
//! does not depend on the world size; the last incomplete batch of an epoch is dropped (a
//! different one each epoch). Rank `r` of `N` takes a contiguous share of that batch.
//!
//! # Uneven shares
//!
//! When `B` is not a multiple of `N`, the first `B mod N` ranks take `floor(B / N) + 1` examples
//! and the others `floor(B / N)`. Each rank computes the mean gradient `g_r` over its own `b_r`
//! examples; the data-parallel step scales it by `b_r / B` before a *sum* all-reduce, so the
//! result `sum_r (b_r / B) g_r = (1 / B) sum_i grad(example i)` is exactly the mean gradient
//! of the whole global batch, as one rank with batch `B` would compute it. A plain average of
//! the `g_r` would instead over-weight the examples of the smaller shares.

use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, TrainerError};

/// Records the training examples a rank takes at every step, one line `STEP INDEX,INDEX,...`
/// per step (`STEP` counted from 1, indices into the training split in the order trained).
/// Each line is written as it is made, so what a killed rank trained on is on record up to its
/// last step.
#[derive(Debug)]
pub struct SampleRecord {
    path: std::path::PathBuf,
    file: std::io::LineWriter<std::fs::File>,
    line: String,
}

impl SampleRecord {
    /// Creates (or truncates) the record at `path`, creating its directory.
    pub fn create(path: &std::path::Path) -> Result<Self> {
        let failed = |error: std::io::Error| {
            TrainerError::Config(format!("sample record {}: {error}", path.display()))
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        let file = std::fs::File::create(path).map_err(failed)?;
        Ok(Self {
            path: path.to_owned(),
            file: std::io::LineWriter::new(file),
            line: String::new(),
        })
    }

    /// Records that step `step` (from 1) trained on `indices`.
    pub fn record(&mut self, step: u64, indices: &[usize]) -> Result<()> {
        use std::fmt::Write as _;
        use std::io::Write as _;
        self.line.clear();
        let _ = write!(self.line, "{step} ");
        for (position, index) in indices.iter().enumerate() {
            let separator = if position == 0 { "" } else { "," };
            let _ = write!(self.line, "{separator}{index}");
        }
        self.line.push('\n');
        self.file.write_all(self.line.as_bytes()).map_err(|error| {
            TrainerError::Config(format!("sample record {}: {error}", self.path.display()))
        })
    }
}

/// Returns the positions within a global batch of `global_batch` examples that `rank` of
/// `world_size` takes: the first `global_batch % world_size` ranks take one extra example.
pub fn rank_share(global_batch: usize, world_size: usize, rank: usize) -> Range<usize> {
    let base = global_batch / world_size;
    let extra = global_batch % world_size;
    let start = rank * base + rank.min(extra);
    let length = base + usize::from(rank < extra);
    start..start + length
}

/// Where a run stands in its data stream: the epoch, and how many examples of that epoch's
/// shuffled order it has trained on. Checkpoints record it, so a resumed run continues with
/// exactly the examples that come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPosition {
    /// The epoch (from 0).
    pub epoch: u64,
    /// Examples of the epoch's order already trained on.
    pub offset: u64,
}

impl std::fmt::Display for DataPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} offset {}", self.epoch, self.offset)
    }
}

/// Yields, for one rank, the training examples of every step.
#[derive(Debug, Clone)]
pub struct DistributedSampler {
    /// Size of the training split.
    examples: usize,
    /// Examples per optimizer step summed over all ranks.
    global_batch: usize,
    /// Positions of this rank's examples within each global batch.
    share: Range<usize>,
    /// Seed of the per-epoch permutations, identical on every rank.
    seed: u64,
}

impl DistributedSampler {
    /// Creates the sampler of `rank` among `world_size` ranks, refusing a batch larger than the
    /// data set or smaller than the world.
    pub fn new(
        examples: usize,
        global_batch: usize,
        world_size: usize,
        rank: usize,
        seed: u64,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(TrainerError::Config(format!(
                "rank {rank} of world size {world_size}, expected a rank below the world size"
            )));
        }
        if global_batch < world_size {
            return Err(TrainerError::Config(format!(
                "global batch {global_batch}, expected at least the world size {world_size}"
            )));
        }
        if global_batch > examples {
            return Err(TrainerError::Config(format!(
                "global batch {global_batch}, expected at most the {examples} training examples"
            )));
        }
        Ok(Self {
            examples,
            global_batch,
            share: rank_share(global_batch, world_size, rank),
            seed,
        })
    }

    /// Returns the number of full global batches in an epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.examples / self.global_batch
    }

    /// Returns where the data stream stands after `completed_steps` optimizer steps. The same
    /// on every rank and for every world size: steps take whole global batches.
    pub fn position(&self, completed_steps: u64) -> DataPosition {
        let steps_per_epoch = self.steps_per_epoch().max(1) as u64;
        DataPosition {
            epoch: completed_steps / steps_per_epoch,
            offset: completed_steps % steps_per_epoch * self.global_batch as u64,
        }
    }

    /// Returns how many examples this rank takes from every global batch.
    pub fn local_batch(&self) -> usize {
        self.share.len()
    }

    /// Returns the weight `b_r / B` this rank's mean gradient gets in the global mean.
    pub fn gradient_weight(&self) -> f64 {
        self.share.len() as f64 / self.global_batch as f64
    }

    /// Writes the permutation of `epoch` into `order`, reusing its capacity. It depends only on
    /// the seed and the epoch.
    pub fn epoch_order(&self, epoch: u64, order: &mut Vec<usize>) {
        order.clear();
        order.extend(0..self.examples);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch);
        // Fisher-Yates, written out so the order does not depend on rand's shuffle internals.
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
    }

    /// Returns the whole global batch of `step` (counted within the epoch) from `order`.
    pub fn global_batch<'a>(&self, order: &'a [usize], step: usize) -> &'a [usize] {
        &order[step * self.global_batch..(step + 1) * self.global_batch]
    }

    /// Returns this rank's share of the global batch of `step` (counted within the epoch).
    pub fn rank_batch<'a>(&self, order: &'a [usize], step: usize) -> &'a [usize] {
        let batch = self.global_batch(order, step);
        &batch[self.share.clone()]
    }
}

/// The current epoch's permutation of one sampler, computed again when a step of another
/// epoch asks for its batch.
#[derive(Debug, Default)]
pub struct EpochOrder {
    /// The permutation of `epoch`.
    order: Vec<usize>,
    /// The epoch `order` belongs to.
    epoch: Option<u64>,
}

impl EpochOrder {
    /// Returns `sampler`'s rank batch of step `step`, counted from the start of the run.
    pub fn rank_batch(&mut self, sampler: &DistributedSampler, step: u64) -> &[usize] {
        let steps_per_epoch = sampler.steps_per_epoch().max(1) as u64;
        let epoch = step / steps_per_epoch;
        if self.epoch != Some(epoch) {
            sampler.epoch_order(epoch, &mut self.order);
            self.epoch = Some(epoch);
        }
        sampler.rank_batch(&self.order, (step % steps_per_epoch) as usize)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_position_after_a_step_counts_whole_global_batches_of_its_epoch() {
        // 100 examples, batches of 30: 3 steps an epoch, the last 10 examples dropped.
        for world_size in [1, 2, 3] {
            let sampler = DistributedSampler::new(100, 30, world_size, 0, 7).unwrap();
            let at = |step| sampler.position(step);
            assert_eq!(
                at(0),
                DataPosition {
                    epoch: 0,
                    offset: 0
                }
            );
            assert_eq!(
                at(2),
                DataPosition {
                    epoch: 0,
                    offset: 60
                }
            );
            assert_eq!(
                at(3),
                DataPosition {
                    epoch: 1,
                    offset: 0
                }
            );
            assert_eq!(
                at(7),
                DataPosition {
                    epoch: 2,
                    offset: 30
                }
            );
        }
    }

    #[test]
    fn uneven_shares_give_the_first_ranks_one_more() {
        let shares: Vec<_> = (0..3).map(|rank| rank_share(10, 3, rank)).collect();
        assert_eq!(shares, vec![0..4, 4..7, 7..10]);
        let weights: f64 = (0..3)
            .map(|rank| {
                DistributedSampler::new(100, 10, 3, rank, 0)
                    .unwrap()
                    .gradient_weight()
            })
            .sum();
        assert!((weights - 1.0).abs() < 1e-12);
    }

    #[test]
    fn epochs_differ_and_repeat() {
        let sampler = DistributedSampler::new(1000, 10, 1, 0, 42).unwrap();
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        sampler.epoch_order(0, &mut a);
        sampler.epoch_order(1, &mut b);
        sampler.epoch_order(0, &mut c);
        assert_ne!(a, b);
        assert_eq!(a, c);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn the_epoch_order_follows_the_run_across_epochs() {
        // 105 examples, batches of 10: 10 steps an epoch, the last 5 examples dropped.
        let sampler = DistributedSampler::new(105, 10, 2, 1, 7).unwrap();
        let mut cached = EpochOrder::default();
        let mut order = Vec::new();
        // Out of order on purpose: a resumed run starts mid-epoch.
        for step in [13u64, 14, 9, 0, 29, 20] {
            sampler.epoch_order(step / 10, &mut order);
            let expected = sampler.rank_batch(&order, (step % 10) as usize).to_vec();
            assert_eq!(cached.rank_batch(&sampler, step), expected, "step {step}");
        }
    }

    #[test]
    fn refuses_impossible_batches() {
        assert!(DistributedSampler::new(100, 2, 3, 0, 0).is_err());
        assert!(DistributedSampler::new(100, 101, 1, 0, 0).is_err());
        assert!(DistributedSampler::new(100, 10, 2, 2, 0).is_err());
        assert!(DistributedSampler::new(100, 10, 0, 0, 0).is_err());
    }

    proptest! {
        #[test]
        fn union_over_ranks_is_exactly_the_global_batch(
            examples in 1usize..400,
            world_size in 1usize..9,
            batch_fraction in 0.0f64..1.0,
            seed in any::<u64>(),
            epoch in 0u64..5,
        ) {
            prop_assume!(examples >= world_size);
            let global_batch = world_size + ((examples - world_size) as f64 * batch_fraction) as usize;
            let single = DistributedSampler::new(examples, global_batch, 1, 0, seed).unwrap();
            let mut order = Vec::new();
            single.epoch_order(epoch, &mut order);
            let mut ranks = Vec::new();
            for rank in 0..world_size {
                let sampler =
                    DistributedSampler::new(examples, global_batch, world_size, rank, seed).unwrap();
                let mut rank_order = Vec::new();
                sampler.epoch_order(epoch, &mut rank_order);
                prop_assert_eq!(&rank_order, &order);
                prop_assert_eq!(sampler.steps_per_epoch(), single.steps_per_epoch());
                ranks.push((sampler, rank_order));
            }
            for step in 0..single.steps_per_epoch() {
                let mut union = Vec::new();
                for (sampler, rank_order) in &ranks {
                    let part = sampler.rank_batch(rank_order, step);
                    prop_assert!(part.len() == global_batch / world_size
                        || part.len() == global_batch / world_size + 1);
                    union.extend_from_slice(part);
                }
                // Concatenated in rank order, the shares are the global batch itself.
                prop_assert_eq!(union.as_slice(), single.global_batch(&order, step));
            }
        }
    }
}
