//! Conformance suite: the behaviour every [`Communicator`] implementation must have.
//!
//! [`communicator_conformance_suite!`] expands to one test per property for a [`Backend`]: how
//! to connect one rank of a group, and how large a group this machine can form. Every rank
//! connects and then runs on its own thread (NCCL's communicators stay on the thread that made
//! them). Results are compared with references computed independently here, in `f64`, with
//! tolerances derived from each format's precision. A new implementation gets the whole suite
//! by invoking the macro with its own backend.
//!
//! The [`Nccl`] variants run with one rank per GPU, at most 4; on a machine without CUDA, NCCL
//! or GPUs (CI), or in a build without the `cuda` feature, they print why and pass. With the
//! `cuda` feature, module `nccl_device` checks [`Nccl`]'s device-buffer methods the same way,
//! including buffers written on another stream than the communicator's.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cohort_collective::cuda::{self, CudaLibrary};
use cohort_collective::{
    BufferMut, Communicator, DType, Element, Error, GroupConfig, InMemoryStore, Nccl, NcclConfig,
    Progress, ReduceOp, ShmConfig, ShmGroup, TcpRing, TcpRingConfig, Transport, connect_group,
};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Buffer lengths every collective is tried with.
const SIZES: [usize; 5] = [0, 1, 7, 1023, 1_048_579];
/// World sizes every collective is tried with (those the backend can form here).
const WORLD_SIZES: std::ops::RangeInclusive<usize> = 1..=5;
/// Bound on how long ranks may take to notice a failed peer in the failure tests, beyond the
/// collective timeout where the backend can only notice by it.
const FAILURE_DETECTION_BOUND: Duration = Duration::from_secs(20);

/// How a backend should set up a group.
#[derive(Debug, Clone)]
struct GroupSettings {
    /// Longest time without progress (a collective's deadline, for NCCL) before a collective
    /// fails.
    io_timeout: Duration,
    /// Each rank's progress record (by rank; a rank past the end gets one of its own).
    progress: Vec<Progress>,
}

impl GroupSettings {
    /// Rank `rank`'s progress record.
    fn progress_of(&self, rank: usize) -> Progress {
        self.progress.get(rank).cloned().unwrap_or_default()
    }
}

impl Default for GroupSettings {
    fn default() -> Self {
        // Generous: the success paths run on a loaded two-core machine.
        Self {
            io_timeout: Duration::from_secs(60),
            progress: Vec::new(),
        }
    }
}

/// Connects `rank` of a `world_size` group through the store, on the calling thread.
type ConnectRank = fn(
    store: &InMemoryStore,
    rank: usize,
    world_size: usize,
    settings: &GroupSettings,
) -> cohort_collective::Result<Box<dyn Communicator>>;

/// One [`Communicator`] implementation under test.
#[derive(Clone, Copy)]
struct Backend {
    /// The implementation's name, in messages.
    name: &'static str,
    /// Returns the largest group this machine can form, or why it can form none.
    max_world_size: fn() -> Result<usize, String>,
    /// Connects one rank.
    connect: ConnectRank,
    /// Whether a failure names the rank that failed, and a closed connection is noticed at once
    /// (TcpRing). NCCL cannot say which rank failed, and notices a dead one by the deadline.
    names_failed_peers: bool,
}

impl Backend {
    /// Returns the world sizes of [`WORLD_SIZES`] this machine can run, or prints why none and
    /// returns `None`.
    fn world_sizes(&self, test: &str) -> Option<Vec<usize>> {
        match (self.max_world_size)() {
            Ok(max) => Some(WORLD_SIZES.filter(|&size| size <= max).collect()),
            Err(reason) => {
                eprintln!("skipping {} conformance ({test}): {reason}", self.name);
                None
            }
        }
    }

    /// Returns whether a group of `world_size` can be formed here, printing why not otherwise.
    fn can_form(&self, world_size: usize, test: &str) -> bool {
        match (self.max_world_size)() {
            Ok(max) if max >= world_size => true,
            Ok(max) => {
                eprintln!(
                    "skipping {} conformance ({test}): it needs {world_size} ranks, this \
                     machine has {max}",
                    self.name
                );
                false
            }
            Err(reason) => {
                eprintln!("skipping {} conformance ({test}): {reason}", self.name);
                false
            }
        }
    }
}

/// Connects one [`TcpRing`] rank over loopback, with the given message size.
fn tcp_ring_rank_with(
    store: &InMemoryStore,
    rank: usize,
    world_size: usize,
    settings: &GroupSettings,
    chunk_bytes: usize,
) -> cohort_collective::Result<Box<dyn Communicator>> {
    let config = TcpRingConfig {
        io_timeout: settings.io_timeout,
        connect_timeout: Duration::from_secs(60),
        chunk_bytes,
        progress: settings.progress_of(rank),
        ..TcpRingConfig::default()
    };
    TcpRing::connect(store, "conformance", rank, world_size, &config)
        .map(|ring| Box::new(ring) as Box<dyn Communicator>)
}

/// TCP rings of any size can form on any machine.
fn unlimited() -> Result<usize, String> {
    Ok(usize::MAX)
}

/// [`TcpRing`] with default settings.
const TCP_RING: Backend = Backend {
    name: "TcpRing",
    max_world_size: unlimited,
    connect: |store, rank, world_size, settings| {
        let chunk_bytes = TcpRingConfig::default().chunk_bytes;
        tcp_ring_rank_with(store, rank, world_size, settings, chunk_bytes)
    },
    names_failed_peers: true,
};

/// [`TcpRing`] with the smallest messages: many chunks per step, which exercises the
/// pipelining logic.
const TCP_RING_SMALL_CHUNKS: Backend = Backend {
    name: "TcpRing (small chunks)",
    max_world_size: unlimited,
    connect: |store, rank, world_size, settings| {
        tcp_ring_rank_with(store, rank, world_size, settings, 1024)
    },
    names_failed_peers: true,
};

/// Connects one [`ShmGroup`] rank, with the given slot size.
fn shm_rank_with(
    store: &InMemoryStore,
    rank: usize,
    world_size: usize,
    settings: &GroupSettings,
    slot_bytes: usize,
) -> cohort_collective::Result<Box<dyn Communicator>> {
    let config = ShmConfig {
        io_timeout: settings.io_timeout,
        connect_timeout: Duration::from_secs(60),
        slot_bytes,
        progress: settings.progress_of(rank),
        ..ShmConfig::default()
    };
    ShmGroup::connect(store, "conformance", rank, world_size, &config)
        .map(|group| Box::new(group) as Box<dyn Communicator>)
}

/// [`ShmGroup`] with default settings.
const SHM: Backend = Backend {
    name: "ShmGroup",
    max_world_size: unlimited,
    connect: |store, rank, world_size, settings| {
        let slot_bytes = ShmConfig::default().slot_bytes;
        shm_rank_with(store, rank, world_size, settings, slot_bytes)
    },
    names_failed_peers: true,
};

/// [`ShmGroup`] with the smallest slots: many steps per collective, and the striped
/// all-reduce even for small buffers.
const SHM_SMALL_SLOTS: Backend = Backend {
    name: "ShmGroup (small slots)",
    max_world_size: unlimited,
    connect: |store, rank, world_size, settings| {
        shm_rank_with(store, rank, world_size, settings, 4096)
    },
    names_failed_peers: true,
};

/// [`connect_group`] with ranks on "nodes" of two consecutive ranks (all on loopback): two
/// ranks share memory, four form a hierarchical group (two nodes of two), three and five a TCP
/// ring.
const HIERARCHICAL: Backend = Backend {
    name: "connect_group (two ranks per node)",
    max_world_size: unlimited,
    connect: |store, rank, world_size, settings| {
        let config = GroupConfig {
            transport: Transport::Auto,
            node: format!("node-{}", rank / 2),
            tcp: TcpRingConfig {
                io_timeout: settings.io_timeout,
                connect_timeout: Duration::from_secs(60),
                progress: settings.progress_of(rank),
                ..TcpRingConfig::default()
            },
            shm_slot_bytes: None,
        };
        connect_group(store, "conformance", rank, world_size, &config)
            .map(|group| group as Box<dyn Communicator>)
    },
    names_failed_peers: true,
};

/// One rank per GPU, at most 4 ranks; none without CUDA, NCCL or GPUs.
fn nccl_max_world_size() -> Result<usize, String> {
    cuda::require(CudaLibrary::Nccl).map_err(|error| error.to_string())?;
    match cuda::device_count() {
        Ok(0) => Err("no CUDA device found".to_owned()),
        Ok(devices) => Ok(devices.min(4)),
        Err(error) => Err(error.to_string()),
    }
}

/// [`Nccl`], rank `r` on GPU `r`.
const NCCL: Backend = Backend {
    name: "Nccl",
    max_world_size: nccl_max_world_size,
    connect: |store, rank, world_size, settings| {
        let config = NcclConfig {
            prefix: "conformance".to_owned(),
            rank,
            world_size,
            device: rank,
            connect_timeout: Duration::from_secs(60),
            collective_timeout: settings.io_timeout,
            progress: settings.progress_of(rank),
        };
        Nccl::connect(store, &config).map(|nccl| Box::new(nccl) as Box<dyn Communicator>)
    },
    names_failed_peers: false,
};

/// Forms a group of `world_size` ranks of `backend`, each connecting and then running `body`
/// on its own thread, and returns the results in rank order. No rank starts `body` before every
/// rank has connected.
fn run_ranks<R: Send>(
    backend: &Backend,
    world_size: usize,
    settings: &GroupSettings,
    body: impl Fn(&mut dyn Communicator) -> R + Sync,
) -> Vec<R> {
    let store = InMemoryStore::new();
    run_group(
        world_size,
        |rank| (backend.connect)(&store, rank, world_size, settings),
        |mut communicator| body(communicator.as_mut()),
    )
}

/// Forms a group of `world_size` ranks, each connecting with `connect` (given its rank) and
/// then handing what it connected to `body`, on its own thread (where the connection stays:
/// NCCL's belong to the thread that made them). Returns the results in rank order. No rank
/// starts `body` before every rank has connected.
fn run_group<C, R: Send>(
    world_size: usize,
    connect: impl Fn(usize) -> cohort_collective::Result<C> + Sync,
    body: impl Fn(C) -> R + Sync,
) -> Vec<R> {
    let formed = Barrier::new(world_size);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let (connect, formed, body) = (&connect, &formed, &body);
                scope.spawn(move || {
                    // A panic is held until every rank has passed the barrier, so that the
                    // others do not wait for this one forever.
                    let connected = catch_unwind(AssertUnwindSafe(|| connect(rank)));
                    formed.wait();
                    let connection = match connected {
                        Ok(Ok(connection)) => connection,
                        Ok(Err(error)) => panic!("rank {rank} of {world_size}: setup: {error}"),
                        Err(panic) => resume_unwind(panic),
                    };
                    body(connection)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap_or_else(|panic| resume_unwind(panic)))
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
fn all_reduce_matches_reference<T: Element>(backend: Backend) {
    let Some(world_sizes) = backend.world_sizes("all_reduce_matches_reference") else {
        return;
    };
    for world_size in world_sizes {
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
        let settings = GroupSettings::default();
        let fingerprints = run_ranks(&backend, world_size, &settings, |communicator| {
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
fn broadcast_from_every_root<T: Element>(backend: Backend) {
    let Some(world_sizes) = backend.world_sizes("broadcast_from_every_root") else {
        return;
    };
    for world_size in world_sizes {
        run_ranks(
            &backend,
            world_size,
            &GroupSettings::default(),
            |communicator| {
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
            },
        );
    }
}

/// All-gather concatenates the inputs in rank order; reduce-scatter leaves each rank its block
/// of the reduction; reduce-scatter followed by all-gather equals the reference all-reduce.
fn gather_and_scatter_round_trip<T: Element>(backend: Backend) {
    let Some(world_sizes) = backend.world_sizes("gather_and_scatter_round_trip") else {
        return;
    };
    for world_size in world_sizes {
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
        run_ranks(
            &backend,
            world_size,
            &GroupSettings::default(),
            |communicator| {
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
                            bytemuck::cast_slice::<T, u8>(
                                &gathered[peer * block..(peer + 1) * block]
                            ) == bytemuck::cast_slice::<T, u8>(&peer_block),
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
            },
        );
    }
}

/// No rank leaves a barrier before every rank has entered it.
fn barrier_waits_for_every_rank(backend: Backend) {
    const ROUNDS: usize = 20;
    let Some(world_sizes) = backend.world_sizes("barrier_waits_for_every_rank") else {
        return;
    };
    for world_size in world_sizes {
        let arrivals: Vec<AtomicUsize> = (0..ROUNDS).map(|_| AtomicUsize::new(0)).collect();
        run_ranks(
            &backend,
            world_size,
            &GroupSettings::default(),
            |communicator| {
                for (round, arrived) in arrivals.iter().enumerate() {
                    if communicator.rank() == round % world_size {
                        // Not synchronisation: a late rank gives a barrier that does not wait the
                        // chance to let the others through early, so that the assertion can catch
                        // it.
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
            },
        );
    }
}

/// Every collective is numbered in the rank's progress record, entered and completed, with its
/// name and size, the same on every rank (what hang diagnosis compares).
fn collectives_are_recorded_in_order(backend: Backend) {
    let Some(world_sizes) = backend.world_sizes("collectives_are_recorded_in_order") else {
        return;
    };
    for world_size in world_sizes {
        let settings = GroupSettings {
            progress: (0..world_size).map(|_| Progress::default()).collect(),
            ..GroupSettings::default()
        };
        run_ranks(&backend, world_size, &settings, |communicator| {
            let mut values = vec![1.0_f32; 100];
            communicator
                .all_reduce((&mut values).into(), ReduceOp::Sum)
                .unwrap();
            communicator.broadcast((&mut values).into(), 0).unwrap();
            communicator
                .all_reduce((&mut values).into(), ReduceOp::Sum)
                .unwrap();
        });
        for (rank, progress) in settings.progress.iter().enumerate() {
            let snapshot = progress.snapshot();
            assert_eq!(snapshot.len(), 1, "rank {rank}: {snapshot:?}");
            let channel = &snapshot[0];
            assert_eq!(
                (channel.entered, channel.completed, channel.operation),
                (3, 3, "all_reduce"),
                "rank {rank} of {world_size}: {channel:?}"
            );
            assert_eq!(channel.bytes, 400, "rank {rank}: {channel:?}");
        }
    }
}

/// Bad arguments are reported as errors and leave the communicator usable.
fn bad_arguments_are_errors(backend: Backend) {
    if !backend.can_form(2, "bad_arguments_are_errors") {
        return;
    }
    run_ranks(&backend, 2, &GroupSettings::default(), |communicator| {
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

/// A rank that drops its communicator makes every other rank's next collective fail, and later
/// calls fail too. Where the backend can tell (TcpRing), quickly (by the closed connection, not
/// the I/O timeout) and naming the dropped rank; otherwise (NCCL) within the collective timeout,
/// naming the collective.
fn dropped_peer_is_named(backend: Backend) {
    const DROPPED: usize = 2;
    if !backend.can_form(4, "dropped_peer_is_named") {
        return;
    }
    let settings = if backend.names_failed_peers {
        GroupSettings::default()
    } else {
        GroupSettings {
            io_timeout: Duration::from_secs(5),
            ..GroupSettings::default()
        }
    };
    let bound = if backend.names_failed_peers {
        FAILURE_DETECTION_BOUND
    } else {
        settings.io_timeout + FAILURE_DETECTION_BOUND
    };
    let warmed_up = Barrier::new(4);
    let outcomes = run_ranks(&backend, 4, &settings, |communicator| {
        let mut warmup = vec![1.0_f32; 1000];
        communicator
            .all_reduce(BufferMut::from(&mut warmup), ReduceOp::Sum)
            .unwrap();
        // The dropped rank leaves only once every rank has its warm-up result: with NCCL a
        // rank's part can end while a peer still reads its buffers, which dropping frees.
        warmed_up.wait();
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
        if backend.names_failed_peers {
            assert_eq!(error.failed_rank(), Some(DROPPED), "rank {rank}: {error}");
            assert!(
                error.to_string().contains(&format!("peer rank {DROPPED}")),
                "rank {rank}: {error}"
            );
            assert_eq!(later.failed_rank(), Some(DROPPED), "rank {rank}: {later}");
        } else {
            assert!(
                error.to_string().contains("all_reduce"),
                "rank {rank}: {error}"
            );
        }
        assert!(elapsed < bound, "rank {rank} took {elapsed:?}");
        assert!(
            matches!(later, Error::Poisoned { .. }),
            "rank {rank}: {later}"
        );
    }
}

/// A rank that stays connected but stops taking part makes every other rank fail within the
/// I/O timeout (plus slack), naming the stalled rank rather than its neighbours where the
/// backend can tell (TcpRing), the collective otherwise (NCCL).
fn stalled_peer_is_named(backend: Backend) {
    const STALLED: usize = 1;
    if !backend.can_form(4, "stalled_peer_is_named") {
        return;
    }
    let io_timeout = Duration::from_secs(2);
    let finished = AtomicUsize::new(0);
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    let settings = GroupSettings {
        io_timeout,
        ..GroupSettings::default()
    };
    let outcomes = run_ranks(&backend, 4, &settings, |communicator| {
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
        if backend.names_failed_peers {
            assert_eq!(error.failed_rank(), Some(STALLED), "rank {rank}: {error}");
        } else {
            assert!(
                error.to_string().contains("all_reduce"),
                "rank {rank}: {error}"
            );
        }
        assert!(
            elapsed < io_timeout + FAILURE_DETECTION_BOUND,
            "rank {rank} took {elapsed:?}"
        );
    }
}

/// Expands to the whole suite for one [`Backend`], as module `$name`.
macro_rules! communicator_conformance_suite {
    ($name:ident, $backend:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn all_reduce_f32_matches_reference() {
                all_reduce_matches_reference::<f32>($backend);
            }
            #[test]
            fn all_reduce_bf16_matches_reference() {
                all_reduce_matches_reference::<bf16>($backend);
            }
            #[test]
            fn all_reduce_f16_matches_reference() {
                all_reduce_matches_reference::<f16>($backend);
            }
            #[test]
            fn broadcast_f32_from_every_root() {
                broadcast_from_every_root::<f32>($backend);
            }
            #[test]
            fn broadcast_bf16_from_every_root() {
                broadcast_from_every_root::<bf16>($backend);
            }
            #[test]
            fn gather_and_scatter_f32_round_trip() {
                gather_and_scatter_round_trip::<f32>($backend);
            }
            #[test]
            fn gather_and_scatter_f16_round_trip() {
                gather_and_scatter_round_trip::<f16>($backend);
            }
            #[test]
            fn barrier_waits_for_every_rank() {
                super::barrier_waits_for_every_rank($backend);
            }
            #[test]
            fn collectives_are_recorded_in_order() {
                super::collectives_are_recorded_in_order($backend);
            }
            #[test]
            fn bad_arguments_are_errors() {
                super::bad_arguments_are_errors($backend);
            }
            #[test]
            fn dropped_peer_is_named() {
                super::dropped_peer_is_named($backend);
            }
            #[test]
            fn stalled_peer_is_named() {
                super::stalled_peer_is_named($backend);
            }
        }
    };
}

communicator_conformance_suite!(tcp_ring, TCP_RING);
communicator_conformance_suite!(tcp_ring_small_chunks, TCP_RING_SMALL_CHUNKS);
communicator_conformance_suite!(shm, SHM);
communicator_conformance_suite!(shm_small_slots, SHM_SMALL_SLOTS);
communicator_conformance_suite!(hierarchical, HIERARCHICAL);
communicator_conformance_suite!(nccl, NCCL);

/// [`Nccl`]'s device-buffer methods, which the [`Communicator`] suite does not reach: results
/// are compared with references computed on the host, as above, with tolerances for NCCL's
/// reduction in the element type. Every rank's CUDA context tracks no events (as with candle's
/// per-thread-stream device), so that cudarc orders nothing between streams and only the
/// communicator's own ordering is tested. Same world sizes and skips as the [`NCCL`] suite.
#[cfg(feature = "cuda")]
mod nccl_device;
