//! Conformance suite: the behaviour every [`Communicator`] implementation must have.
//!
//! [`communicator_conformance_suite!`] expands to one test per property for a *group factory*,
//! a function that connects `world_size` communicators (one per rank) and returns them in rank
//! order. Each rank then runs on its own thread. Results are compared with references computed
//! independently here, in `f64`, with tolerances derived from each format's precision. A new
//! implementation (NCCL behind a feature, say) gets the whole suite by invoking the macro with
//! its own factory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cohort_collective::{
    BufferMut, Communicator, DType, Element, Error, InMemoryStore, ReduceOp, TcpRing, TcpRingConfig,
};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Buffer lengths every collective is tried with.
const SIZES: [usize; 5] = [0, 1, 7, 1023, 1_048_579];
/// World sizes every collective is tried with.
const WORLD_SIZES: std::ops::RangeInclusive<usize> = 1..=5;
/// Bound on how long ranks may take to notice a failed peer in the failure tests.
const FAILURE_DETECTION_BOUND: Duration = Duration::from_secs(20);

/// How a factory should set up a group.
#[derive(Debug, Clone)]
struct GroupSettings {
    /// Longest time without progress before a collective fails.
    io_timeout: Duration,
}

impl Default for GroupSettings {
    fn default() -> Self {
        // Generous: the success paths run on a loaded two-core machine.
        Self {
            io_timeout: Duration::from_secs(60),
        }
    }
}

/// Connects `world_size` communicators and returns them in rank order.
type GroupFactory = fn(usize, &GroupSettings) -> Vec<Box<dyn Communicator>>;

/// Forms a [`TcpRing`] group over loopback through an [`InMemoryStore`], with the given
/// message size.
fn tcp_ring_group_with(
    world_size: usize,
    settings: &GroupSettings,
    chunk_bytes: usize,
) -> Vec<Box<dyn Communicator>> {
    let store = Arc::new(InMemoryStore::new());
    let config = TcpRingConfig {
        io_timeout: settings.io_timeout,
        connect_timeout: Duration::from_secs(60),
        chunk_bytes,
        ..TcpRingConfig::default()
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let store = Arc::clone(&store);
                let config = config.clone();
                scope.spawn(move || {
                    TcpRing::connect(&*store, "conformance", rank, world_size, &config)
                        .map(|ring| Box::new(ring) as Box<dyn Communicator>)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap().expect("ring setup failed"))
            .collect()
    })
}

/// [`TcpRing`] with default settings.
fn tcp_ring_group(world_size: usize, settings: &GroupSettings) -> Vec<Box<dyn Communicator>> {
    tcp_ring_group_with(world_size, settings, TcpRingConfig::default().chunk_bytes)
}

/// [`TcpRing`] with the smallest messages: many chunks per step, which exercises the
/// pipelining logic.
fn tcp_ring_small_chunks_group(
    world_size: usize,
    settings: &GroupSettings,
) -> Vec<Box<dyn Communicator>> {
    tcp_ring_group_with(world_size, settings, 1024)
}

/// Runs `body` on every rank's communicator, each on its own thread, and returns the results in
/// rank order.
fn run_ranks<R: Send>(
    group: Vec<Box<dyn Communicator>>,
    body: impl Fn(&mut dyn Communicator) -> R + Sync,
) -> Vec<R> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|mut communicator| {
                let body = &body;
                scope.spawn(move || body(communicator.as_mut()))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Returns `len` random values in [-1, 1), determined by `seed` and `rank`.
fn random_values<T: Element>(seed: u64, rank: usize, len: usize) -> Vec<T> {
    let mut generator = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1_000_003) + rank as u64);
    (0..len)
        .map(|_| T::from_f32(generator.random_range(-1.0..1.0)))
        .collect()
}

/// The exact result of a reduction, in `f64`, with the sum of magnitudes that bounds the error
/// of any summation order.
struct Reference {
    /// Expected value of every element.
    values: Vec<f64>,
    /// Sum over ranks of each element's magnitude (after the division for averages).
    magnitudes: Vec<f64>,
}

/// Computes the reference reduction of `inputs` (one per rank) independently of the crate.
fn reference<T: Element>(inputs: &[Vec<T>], op: ReduceOp) -> Reference {
    let len = inputs.first().map_or(0, Vec::len);
    let scale = match op {
        ReduceOp::Sum => 1.0,
        ReduceOp::Average => 1.0 / inputs.len() as f64,
    };
    let mut values = vec![0.0_f64; len];
    let mut magnitudes = vec![0.0_f64; len];
    for input in inputs {
        for (index, value) in input.iter().enumerate() {
            let value = f64::from(value.to_f32());
            values[index] += value;
            magnitudes[index] += value.abs();
        }
    }
    for index in 0..len {
        values[index] *= scale;
        magnitudes[index] *= scale;
    }
    Reference { values, magnitudes }
}

/// Returns (unit roundoff, smallest positive step) of a format: a correctly rounded result is
/// within `unit_roundoff * |value|` of the exact one, or within the smallest step near zero.
fn precision(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2f64.powi(-24), 2f64.powi(-149)),
        DType::Bf16 => (2f64.powi(-8), 2f64.powi(-133)),
        DType::F16 => (2f64.powi(-11), 2f64.powi(-24)),
    }
}

/// Asserts that `actual` matches `expected` within: one rounding to `T` (whatever the world
/// size, since partial sums are kept in `f32`), plus the `f32` accumulation error of
/// `world_size` additions.
fn assert_close<T: Element>(actual: &[T], expected: &Reference, world_size: usize, what: &str) {
    assert_eq!(actual.len(), expected.values.len(), "{what}: length");
    let (unit_roundoff, smallest_step) = precision(T::DTYPE);
    let accumulation_roundoff = 2f64.powi(-24) * (world_size as f64 + 1.0);
    for (index, value) in actual.iter().enumerate() {
        let exact = expected.values[index];
        let tolerance = unit_roundoff * exact.abs() * 1.001
            + accumulation_roundoff * expected.magnitudes[index] * 2.0
            + smallest_step;
        let found = f64::from(value.to_f32());
        assert!(
            (found - exact).abs() <= tolerance,
            "{what}: element {index} is {found}, expected {exact} within {tolerance}"
        );
    }
}

/// Hashes the bytes of a buffer (FNV-1a), to compare results across ranks bit for bit.
fn fingerprint<T: Element>(values: &[T]) -> u64 {
    bytemuck::cast_slice::<T, u8>(values)
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// All-reduce of every size, for sum and average, matches the `f64` reference on every rank,
/// and every rank ends with the same bits.
fn all_reduce_matches_reference<T: Element>(factory: GroupFactory) {
    for world_size in WORLD_SIZES {
        let cases: Vec<(usize, ReduceOp, u64)> = SIZES
            .iter()
            .enumerate()
            .flat_map(|(size_index, &size)| {
                [ReduceOp::Sum, ReduceOp::Average]
                    .into_iter()
                    .enumerate()
                    .map(move |(op_index, op)| (size, op, (size_index * 2 + op_index) as u64))
            })
            .collect();
        let references: Vec<Reference> = cases
            .iter()
            .map(|&(size, op, seed)| {
                let inputs: Vec<Vec<T>> = (0..world_size)
                    .map(|rank| random_values(seed, rank, size))
                    .collect();
                reference(&inputs, op)
            })
            .collect();
        let group = factory(world_size, &GroupSettings::default());
        let fingerprints = run_ranks(group, |communicator| {
            let rank = communicator.rank();
            cases
                .iter()
                .zip(&references)
                .map(|(&(size, op, seed), expected)| {
                    let mut buffer: Vec<T> = random_values(seed, rank, size);
                    communicator
                        .all_reduce(BufferMut::from(&mut buffer), op)
                        .unwrap();
                    let what = format!(
                        "{} all_reduce {op:?} of {size} on rank {rank} of {world_size}",
                        T::DTYPE
                    );
                    assert_close(&buffer, expected, world_size, &what);
                    fingerprint(&buffer)
                })
                .collect::<Vec<u64>>()
        });
        for (rank, ranks_fingerprints) in fingerprints.iter().enumerate() {
            assert_eq!(
                ranks_fingerprints, &fingerprints[0],
                "rank {rank} of {world_size} holds different bits than rank 0"
            );
        }
    }
}

/// Broadcast from every root delivers the root's exact bits to every rank.
fn broadcast_from_every_root<T: Element>(factory: GroupFactory) {
    for world_size in WORLD_SIZES {
        let group = factory(world_size, &GroupSettings::default());
        run_ranks(group, |communicator| {
            let rank = communicator.rank();
            for root in 0..world_size {
                for (size_index, &size) in SIZES.iter().enumerate() {
                    let seed = (root * SIZES.len() + size_index) as u64;
                    let expected: Vec<T> = random_values(seed, root, size);
                    let mut buffer = if rank == root {
                        expected.clone()
                    } else {
                        vec![T::from_f32(f32::NAN); size]
                    };
                    communicator
                        .broadcast(BufferMut::from(&mut buffer), root)
                        .unwrap();
                    assert!(
                        bytemuck::cast_slice::<T, u8>(&buffer)
                            == bytemuck::cast_slice::<T, u8>(&expected),
                        "{} broadcast of {size} from root {root} differs on rank {rank} of \
                         {world_size}",
                        T::DTYPE
                    );
                }
            }
        });
    }
}

/// All-gather concatenates the inputs in rank order; reduce-scatter leaves each rank its block
/// of the reduction; reduce-scatter followed by all-gather equals the reference all-reduce.
fn gather_and_scatter_round_trip<T: Element>(factory: GroupFactory) {
    for world_size in WORLD_SIZES {
        let blocks: Vec<usize> = SIZES.iter().map(|size| size.div_ceil(world_size)).collect();
        let references: Vec<Reference> = blocks
            .iter()
            .enumerate()
            .map(|(seed, &block)| {
                let inputs: Vec<Vec<T>> = (0..world_size)
                    .map(|rank| random_values(100 + seed as u64, rank, block * world_size))
                    .collect();
                reference(&inputs, ReduceOp::Sum)
            })
            .collect();
        let group = factory(world_size, &GroupSettings::default());
        run_ranks(group, |communicator| {
            let rank = communicator.rank();
            for (seed, (&block, expected)) in blocks.iter().zip(&references).enumerate() {
                let what = format!(
                    "{} block of {block} on rank {rank} of {world_size}",
                    T::DTYPE
                );
                // All-gather of each rank's own random block.
                let own: Vec<T> = random_values(200 + seed as u64, rank, block);
                let mut gathered = vec![T::from_f32(f32::NAN); block * world_size];
                communicator
                    .all_gather((&own).into(), BufferMut::from(&mut gathered))
                    .unwrap();
                for peer in 0..world_size {
                    let peer_block: Vec<T> = random_values(200 + seed as u64, peer, block);
                    assert!(
                        bytemuck::cast_slice::<T, u8>(&gathered[peer * block..(peer + 1) * block])
                            == bytemuck::cast_slice::<T, u8>(&peer_block),
                        "all_gather: {what}: block of rank {peer} differs"
                    );
                }
                // Reduce-scatter, then all-gather of the reduced blocks.
                let input: Vec<T> = random_values(100 + seed as u64, rank, block * world_size);
                let mut reduced = vec![T::from_f32(f32::NAN); block];
                communicator
                    .reduce_scatter(
                        (&input).into(),
                        BufferMut::from(&mut reduced),
                        ReduceOp::Sum,
                    )
                    .unwrap();
                let own_reference = Reference {
                    values: expected.values[rank * block..(rank + 1) * block].to_vec(),
                    magnitudes: expected.magnitudes[rank * block..(rank + 1) * block].to_vec(),
                };
                assert_close(
                    &reduced,
                    &own_reference,
                    world_size,
                    &format!("reduce_scatter: {what}"),
                );
                let mut everything = vec![T::from_f32(f32::NAN); block * world_size];
                communicator
                    .all_gather((&reduced).into(), BufferMut::from(&mut everything))
                    .unwrap();
                assert_close(
                    &everything,
                    expected,
                    world_size,
                    &format!("round trip: {what}"),
                );
            }
        });
    }
}

/// No rank leaves a barrier before every rank has entered it.
fn barrier_waits_for_every_rank(factory: GroupFactory) {
    const ROUNDS: usize = 20;
    for world_size in WORLD_SIZES {
        let arrivals: Vec<AtomicUsize> = (0..ROUNDS).map(|_| AtomicUsize::new(0)).collect();
        let group = factory(world_size, &GroupSettings::default());
        run_ranks(group, |communicator| {
            for (round, arrived) in arrivals.iter().enumerate() {
                if communicator.rank() == round % world_size {
                    // Not synchronisation: a late rank gives a barrier that does not wait the
                    // chance to let the others through early, so that the assertion can catch it.
                    std::thread::sleep(Duration::from_millis(5));
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                communicator.barrier().unwrap();
                assert_eq!(
                    arrived.load(Ordering::SeqCst),
                    world_size,
                    "rank {} left barrier round {round} early",
                    communicator.rank()
                );
            }
        });
    }
}

/// Bad arguments are reported as errors and leave the communicator usable.
fn bad_arguments_are_errors(factory: GroupFactory) {
    let group = factory(2, &GroupSettings::default());
    run_ranks(group, |communicator| {
        let input = vec![1.0_f32; 3];
        let mut short_output = vec![0.0_f32; 5];
        let error = communicator
            .all_gather((&input).into(), BufferMut::from(&mut short_output))
            .unwrap_err();
        assert!(
            matches!(
                error,
                Error::LengthMismatch {
                    found: 5,
                    expected: 6,
                    ..
                }
            ),
            "{error}"
        );

        let mut half_output = vec![bf16::ZERO; 6];
        let error = communicator
            .all_gather((&input).into(), BufferMut::from(&mut half_output))
            .unwrap_err();
        assert!(matches!(error, Error::DtypeMismatch { .. }), "{error}");

        let mut output = vec![0.0_f32; 2];
        let error = communicator
            .reduce_scatter((&input).into(), BufferMut::from(&mut output), ReduceOp::Sum)
            .unwrap_err();
        assert!(matches!(error, Error::LengthMismatch { .. }), "{error}");

        let mut buffer = vec![f16::ONE; 4];
        let error = communicator
            .broadcast(BufferMut::from(&mut buffer), 2)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "broadcast: root rank 2 out of range, expected 0..2"
        );

        communicator
            .all_reduce(BufferMut::from(&mut buffer), ReduceOp::Sum)
            .unwrap();
        assert_eq!(buffer, vec![f16::from_f32(2.0); 4]);
    });
}

/// A rank that drops its communicator makes every other rank's next collective fail, naming
/// it, quickly (by the closed connection, not the I/O timeout), and later calls fail too.
fn dropped_peer_is_named(factory: GroupFactory) {
    const DROPPED: usize = 2;
    let group = factory(4, &GroupSettings::default());
    let outcomes = run_ranks(group, |communicator| {
        let mut warmup = vec![1.0_f32; 1000];
        communicator
            .all_reduce(BufferMut::from(&mut warmup), ReduceOp::Sum)
            .unwrap();
        if communicator.rank() == DROPPED {
            return None;
        }
        let mut buffer = vec![1.0_f32; 1 << 20];
        let started = Instant::now();
        let error = communicator
            .all_reduce(BufferMut::from(&mut buffer), ReduceOp::Sum)
            .unwrap_err();
        let elapsed = started.elapsed();
        let later = communicator.barrier().unwrap_err();
        Some((error, elapsed, later))
    });
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let Some((error, elapsed, later)) = outcome else {
            continue;
        };
        assert_eq!(error.failed_rank(), Some(DROPPED), "rank {rank}: {error}");
        assert!(
            error.to_string().contains(&format!("peer rank {DROPPED}")),
            "rank {rank}: {error}"
        );
        assert!(
            elapsed < FAILURE_DETECTION_BOUND,
            "rank {rank} took {elapsed:?}"
        );
        assert!(
            matches!(later, Error::Poisoned { .. }),
            "rank {rank}: {later}"
        );
        assert_eq!(later.failed_rank(), Some(DROPPED), "rank {rank}: {later}");
    }
}

/// A rank that stays connected but stops taking part makes every other rank fail within the
/// I/O timeout (plus slack), naming the stalled rank rather than its neighbours.
fn stalled_peer_is_named(factory: GroupFactory) {
    const STALLED: usize = 1;
    let io_timeout = Duration::from_secs(2);
    let group = factory(4, &GroupSettings { io_timeout });
    let finished = AtomicUsize::new(0);
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    let outcomes = run_ranks(group, |communicator| {
        if communicator.rank() == STALLED {
            // Holds its connections open without taking part until the others have failed.
            let _ = released.lock().unwrap().recv();
            return None;
        }
        let mut buffer = vec![1.0_f32; 1 << 20];
        let started = Instant::now();
        let result = communicator.all_reduce(BufferMut::from(&mut buffer), ReduceOp::Sum);
        let elapsed = started.elapsed();
        if finished.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
            let _ = release.send(());
        }
        Some((result.unwrap_err(), elapsed))
    });
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let Some((error, elapsed)) = outcome else {
            continue;
        };
        assert_eq!(error.failed_rank(), Some(STALLED), "rank {rank}: {error}");
        assert!(
            elapsed < io_timeout + FAILURE_DETECTION_BOUND,
            "rank {rank} took {elapsed:?}"
        );
    }
}

/// Expands to the whole suite for one group factory, as module `$name`.
macro_rules! communicator_conformance_suite {
    ($name:ident, $factory:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn all_reduce_f32_matches_reference() {
                all_reduce_matches_reference::<f32>($factory);
            }
            #[test]
            fn all_reduce_bf16_matches_reference() {
                all_reduce_matches_reference::<bf16>($factory);
            }
            #[test]
            fn all_reduce_f16_matches_reference() {
                all_reduce_matches_reference::<f16>($factory);
            }
            #[test]
            fn broadcast_f32_from_every_root() {
                broadcast_from_every_root::<f32>($factory);
            }
            #[test]
            fn broadcast_bf16_from_every_root() {
                broadcast_from_every_root::<bf16>($factory);
            }
            #[test]
            fn gather_and_scatter_f32_round_trip() {
                gather_and_scatter_round_trip::<f32>($factory);
            }
            #[test]
            fn gather_and_scatter_f16_round_trip() {
                gather_and_scatter_round_trip::<f16>($factory);
            }
            #[test]
            fn barrier_waits_for_every_rank() {
                super::barrier_waits_for_every_rank($factory);
            }
            #[test]
            fn bad_arguments_are_errors() {
                super::bad_arguments_are_errors($factory);
            }
            #[test]
            fn dropped_peer_is_named() {
                super::dropped_peer_is_named($factory);
            }
            #[test]
            fn stalled_peer_is_named() {
                super::stalled_peer_is_named($factory);
            }
        }
    };
}

communicator_conformance_suite!(tcp_ring, tcp_ring_group);
communicator_conformance_suite!(tcp_ring_small_chunks, tcp_ring_small_chunks_group);
