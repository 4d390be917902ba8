//! The conformance cases of `Nccl`'s device-buffer methods (no host copies), run where a GPU
//! is present and skipped with a printed reason elsewhere, as the host-buffer cases are.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits,
};

use super::*;

/// Buffer lengths tried (CUDA cannot allocate an empty buffer; the device methods' early
/// return for empty ones is not what is tested here).
const DEVICE_SIZES: [usize; 4] = [1, 7, 1023, 1_048_579];
/// Longest wait for a result to reach the host.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(60);

/// One rank: its communicator, and two more streams of its device.
struct DeviceRank {
    /// The communicator, on a stream of its own.
    nccl: Nccl,
    /// A stream other than the communicator's.
    side: Arc<CudaStream>,
    /// A third stream.
    other_side: Arc<CudaStream>,
}

impl DeviceRank {
    /// Returns the communicator's stream.
    fn stream(&self) -> Arc<CudaStream> {
        Arc::clone(self.nccl.stream())
    }
}

/// Maps a CUDA error of the test's own setup.
fn setup_error(error: DriverError) -> Error {
    Error::Cuda {
        operation: "set up the test device",
        message: error.to_string(),
    }
}

/// Connects `rank` of `world_size` on GPU `rank`, on a stream of a context that tracks no
/// events.
fn connect_device_rank(
    store: &InMemoryStore,
    rank: usize,
    world_size: usize,
) -> cohort_collective::Result<DeviceRank> {
    let context = CudaContext::new(rank).map_err(setup_error)?;
    // SAFETY: no buffer of this context object exists yet, so none is left tracked by
    // halves; ordering between streams is then the communicator's job, which is what these
    // tests check.
    unsafe { context.disable_event_tracking() };
    let stream = context.new_stream().map_err(setup_error)?;
    let side = context.new_stream().map_err(setup_error)?;
    let other_side = context.new_stream().map_err(setup_error)?;
    let config = NcclConfig {
        prefix: "conformance-device".to_owned(),
        rank,
        world_size,
        device: rank,
        connect_timeout: Duration::from_secs(60),
        collective_timeout: GroupSettings::default().io_timeout,
        ..NcclConfig::default()
    };
    let nccl = Nccl::connect_on_stream(store, &config, stream)?;
    Ok(DeviceRank {
        nccl,
        side,
        other_side,
    })
}

/// Forms a group of `world_size` device ranks, runs `body` on each, then closes each
/// communicator (which must succeed), and returns the results in rank order.
fn run_device_ranks<R: Send>(
    world_size: usize,
    body: impl Fn(&mut DeviceRank) -> R + Sync,
) -> Vec<R> {
    let store = InMemoryStore::new();
    run_group(
        world_size,
        |rank| connect_device_rank(&store, rank, world_size),
        |mut device_rank| {
            let result = body(&mut device_rank);
            let rank = device_rank.nccl.rank();
            if let Err(error) = device_rank.nccl.close() {
                panic!("rank {rank} of {world_size}: close: {error}");
            }
            result
        },
    )
}

/// Copies `values` to a new buffer on `stream`.
fn upload<T: Element + DeviceRepr>(stream: &Arc<CudaStream>, values: &[T]) -> CudaSlice<T> {
    stream.clone_htod(values).unwrap()
}

/// Copies `buffer` to the host through `stream`: a device copy queued on `stream`, waited
/// for by polling an event under a deadline (so that a collective that never finishes fails
/// the test instead of hanging it), then read. Whatever produced `buffer` on another stream
/// must have been ordered before `stream`'s later work by the code under test.
fn read_back<T: Element + DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buffer: &CudaSlice<T>,
) -> Vec<T> {
    let mut snapshot = stream.alloc_zeros::<T>(buffer.len()).unwrap();
    stream.memcpy_dtod(buffer, &mut snapshot).unwrap();
    let copied = stream.record_event(None).unwrap();
    let deadline = Instant::now() + READ_BACK_TIMEOUT;
    while !copied.try_is_complete().unwrap() {
        assert!(
            Instant::now() < deadline,
            "the result did not reach stream {:?} within {READ_BACK_TIMEOUT:?}",
            stream.cu_stream()
        );
        std::thread::yield_now();
    }
    let values = stream.clone_dtoh(&snapshot).unwrap();
    // Only the copy just queued is left to wait for.
    stream.synchronize().unwrap();
    values
}

/// Asserts that `actual` matches `expected` for a reduction over `world_size` ranks done in
/// the element type, as NCCL does: each of up to `world_size` partial sums may round to `T`
/// (each error at most the unit roundoff of the sum of magnitudes), and an average scales
/// every input by `1 / world_size` rounded to `T` (one more rounding of each term, and of
/// the scale).
fn assert_close_in_element_type<T: Element>(
    actual: &[T],
    expected: &Reference,
    world_size: usize,
    what: &str,
) {
    assert_eq!(actual.len(), expected.values.len(), "{what}: length");
    let (unit_roundoff, smallest_step) = precision(T::DTYPE);
    let roundings = world_size as f64 + 2.0;
    for (index, value) in actual.iter().enumerate() {
        let exact = expected.values[index];
        let tolerance =
            unit_roundoff * (roundings * expected.magnitudes[index] + exact.abs()) * 1.001
                + smallest_step * roundings;
        let found = f64::from(value.to_f32());
        assert!(
            (found - exact).abs() <= tolerance,
            "{what}: element {index} is {found}, expected {exact} within {tolerance}"
        );
    }
}

/// `all_reduce_device` of every size, sum and average, matches the host reference on every
/// rank, and every rank ends with the same bits.
fn all_reduce_device_matches_reference<T: Element + DeviceRepr + ValidAsZeroBits>() {
    let Some(world_sizes) = NCCL.world_sizes("all_reduce_device_matches_reference") else {
        return;
    };
    for world_size in world_sizes {
        let cases: Vec<(usize, ReduceOp, u64)> = DEVICE_SIZES
            .iter()
            .enumerate()
            .flat_map(|(size_index, &size)| {
                [ReduceOp::Sum, ReduceOp::Average]
                    .into_iter()
                    .enumerate()
                    .map(move |(op_index, op)| (size, op, 300 + (size_index * 2 + op_index) as u64))
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
        let fingerprints = run_device_ranks(world_size, |device_rank| {
            let rank = device_rank.nccl.rank();
            let stream = device_rank.stream();
            cases
                .iter()
                .zip(&references)
                .map(|(&(size, op, seed), expected)| {
                    let values: Vec<T> = random_values(seed, rank, size);
                    let mut buffer = upload(&stream, &values);
                    device_rank.nccl.all_reduce_device(&mut buffer, op).unwrap();
                    device_rank.nccl.synchronize().unwrap();
                    let result = read_back(&stream, &buffer);
                    let what = format!(
                        "{} all_reduce_device {op:?} of {size} on rank {rank} of {world_size}",
                        T::DTYPE
                    );
                    assert_close_in_element_type(&result, expected, world_size, &what);
                    fingerprint(&result)
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

/// `all_reduce_buckets` reduces every bucket of one grouped call like a separate
/// all-reduce would.
fn all_reduce_buckets_match_reference(op: ReduceOp) {
    const BUCKETS: [usize; 4] = [1, 1023, 70_001, 7];
    let Some(world_sizes) = NCCL.world_sizes("all_reduce_buckets_match_reference") else {
        return;
    };
    for world_size in world_sizes {
        let seed = |bucket: usize| 400 + bucket as u64;
        let references: Vec<Reference> = BUCKETS
            .iter()
            .enumerate()
            .map(|(bucket, &size)| {
                let inputs: Vec<Vec<f32>> = (0..world_size)
                    .map(|rank| random_values(seed(bucket), rank, size))
                    .collect();
                reference(&inputs, op)
            })
            .collect();
        run_device_ranks(world_size, |device_rank| {
            let rank = device_rank.nccl.rank();
            let stream = device_rank.stream();
            let mut buckets: Vec<CudaSlice<f32>> = BUCKETS
                .iter()
                .enumerate()
                .map(|(bucket, &size)| {
                    let values: Vec<f32> = random_values(seed(bucket), rank, size);
                    upload(&stream, &values)
                })
                .collect();
            let mut borrowed: Vec<&mut CudaSlice<f32>> = buckets.iter_mut().collect();
            device_rank
                .nccl
                .all_reduce_buckets(&mut borrowed, op)
                .unwrap();
            device_rank.nccl.synchronize().unwrap();
            for (bucket, (buffer, expected)) in buckets.iter().zip(&references).enumerate() {
                let what = format!(
                    "all_reduce_buckets {op:?}: bucket {bucket} of {} on rank {rank} of \
                     {world_size}",
                    BUCKETS[bucket]
                );
                let result = read_back(&stream, buffer);
                assert_close_in_element_type(&result, expected, world_size, &what);
            }
        });
    }
}

/// `broadcast_device` from every root delivers the root's exact bits to every rank.
fn broadcast_device_from_every_root<T: Element + DeviceRepr + ValidAsZeroBits>() {
    let Some(world_sizes) = NCCL.world_sizes("broadcast_device_from_every_root") else {
        return;
    };
    for world_size in world_sizes {
        run_device_ranks(world_size, |device_rank| {
            let rank = device_rank.nccl.rank();
            let stream = device_rank.stream();
            for root in 0..world_size {
                for (size_index, &size) in DEVICE_SIZES.iter().enumerate() {
                    let seed = 500 + (root * DEVICE_SIZES.len() + size_index) as u64;
                    let expected: Vec<T> = random_values(seed, root, size);
                    let mut buffer = if rank == root {
                        upload(&stream, &expected)
                    } else {
                        upload(&stream, &vec![T::from_f32(f32::NAN); size])
                    };
                    device_rank
                        .nccl
                        .broadcast_device(&mut buffer, root)
                        .unwrap();
                    device_rank.nccl.synchronize().unwrap();
                    let result = read_back(&stream, &buffer);
                    assert!(
                        bytemuck::cast_slice::<T, u8>(&result)
                            == bytemuck::cast_slice::<T, u8>(&expected),
                        "{} broadcast_device of {size} from root {root} differs on rank \
                         {rank} of {world_size}",
                        T::DTYPE
                    );
                }
            }
        });
    }
}

/// `all_gather_device` concatenates the inputs in rank order, bit for bit;
/// `reduce_scatter_device` leaves each rank its block of the reference reduction.
fn gather_and_scatter_device_match_reference<T: Element + DeviceRepr + ValidAsZeroBits>() {
    let Some(world_sizes) = NCCL.world_sizes("gather_and_scatter_device_match_reference") else {
        return;
    };
    for world_size in world_sizes {
        let seed = |size_index: usize| 600 + size_index as u64;
        let references: Vec<Reference> = DEVICE_SIZES
            .iter()
            .enumerate()
            .map(|(size_index, &block)| {
                let inputs: Vec<Vec<T>> = (0..world_size)
                    .map(|rank| random_values(seed(size_index), rank, block * world_size))
                    .collect();
                reference(&inputs, ReduceOp::Sum)
            })
            .collect();
        run_device_ranks(world_size, |device_rank| {
            let rank = device_rank.nccl.rank();
            let stream = device_rank.stream();
            for (size_index, (&block, expected)) in DEVICE_SIZES.iter().zip(&references).enumerate()
            {
                let what = format!(
                    "{} block of {block} on rank {rank} of {world_size}",
                    T::DTYPE
                );
                let own: Vec<T> = random_values(700 + size_index as u64, rank, block);
                let input = upload(&stream, &own);
                let mut gathered =
                    upload(&stream, &vec![T::from_f32(f32::NAN); block * world_size]);
                device_rank
                    .nccl
                    .all_gather_device(&input, &mut gathered)
                    .unwrap();
                device_rank.nccl.synchronize().unwrap();
                let gathered = read_back(&stream, &gathered);
                for peer in 0..world_size {
                    let peer_block: Vec<T> = random_values(700 + size_index as u64, peer, block);
                    assert!(
                        bytemuck::cast_slice::<T, u8>(&gathered[peer * block..(peer + 1) * block])
                            == bytemuck::cast_slice::<T, u8>(&peer_block),
                        "all_gather_device: {what}: block of rank {peer} differs"
                    );
                }

                let values: Vec<T> = random_values(seed(size_index), rank, block * world_size);
                let input = upload(&stream, &values);
                let mut reduced = upload(&stream, &vec![T::from_f32(f32::NAN); block]);
                device_rank
                    .nccl
                    .reduce_scatter_device(&input, &mut reduced, ReduceOp::Sum)
                    .unwrap();
                device_rank.nccl.synchronize().unwrap();
                let own_reference = Reference {
                    values: expected.values[rank * block..(rank + 1) * block].to_vec(),
                    magnitudes: expected.magnitudes[rank * block..(rank + 1) * block].to_vec(),
                };
                assert_close_in_element_type(
                    &read_back(&stream, &reduced),
                    &own_reference,
                    world_size,
                    &format!("reduce_scatter_device: {what}"),
                );
            }
        });
    }
}

/// Queues on `stream` enough copying to keep it busy for a few milliseconds, so that a
/// collective not ordered after `stream`'s later work would overtake it.
fn keep_busy(stream: &Arc<CudaStream>) {
    const SCRATCH_BYTES: usize = 256 << 20;
    let source = stream.alloc_zeros::<u8>(SCRATCH_BYTES).unwrap();
    let mut target = stream.alloc_zeros::<u8>(SCRATCH_BYTES).unwrap();
    for _ in 0..8 {
        stream.memcpy_dtod(&source, &mut target).unwrap();
    }
}

/// Buffers written on other streams than the communicator's, and read there right after the
/// call without waiting on the host, hold the reference results: each collective waits for
/// the writes queued on its buffers' streams, and their later work waits for it.
fn device_buffers_on_other_streams_are_ordered() {
    const SIZE: usize = 1_048_579;
    let Some(world_sizes) = NCCL.world_sizes("device_buffers_on_other_streams_are_ordered") else {
        return;
    };
    for world_size in world_sizes {
        let inputs: Vec<Vec<f32>> = (0..world_size)
            .map(|rank| random_values(800, rank, SIZE))
            .collect();
        let expected = reference(&inputs, ReduceOp::Sum);
        run_device_ranks(world_size, |device_rank| {
            let rank = device_rank.nccl.rank();
            let side = Arc::clone(&device_rank.side);
            let other_side = Arc::clone(&device_rank.other_side);
            let what = format!("rank {rank} of {world_size}");

            // All-reduce in place of a buffer of `side`, whose values land after a busy
            // stretch of `side`; the result is read on `side` without any host wait.
            let values = upload(&side, &inputs[rank]);
            let mut buffer = side.alloc_zeros::<f32>(SIZE).unwrap();
            keep_busy(&side);
            side.memcpy_dtod(&values, &mut buffer).unwrap();
            device_rank
                .nccl
                .all_reduce_device(&mut buffer, ReduceOp::Sum)
                .unwrap();
            let reduced = read_back(&side, &buffer);
            assert_close_in_element_type(
                &reduced,
                &expected,
                world_size,
                &format!("all_reduce_device from another stream: {what}"),
            );

            // All-gather from a buffer of `side` into one of `other_side`, read there.
            let own = upload(&side, &inputs[rank]);
            let mut input = side.alloc_zeros::<f32>(SIZE).unwrap();
            keep_busy(&side);
            side.memcpy_dtod(&own, &mut input).unwrap();
            let mut gathered = other_side.alloc_zeros::<f32>(SIZE * world_size).unwrap();
            device_rank
                .nccl
                .all_gather_device(&input, &mut gathered)
                .unwrap();
            let gathered = read_back(&other_side, &gathered);
            for (peer, peer_input) in inputs.iter().enumerate() {
                assert!(
                    bytemuck::cast_slice::<f32, u8>(&gathered[peer * SIZE..(peer + 1) * SIZE])
                        == bytemuck::cast_slice::<f32, u8>(peer_input),
                    "all_gather_device across streams: {what}: block of rank {peer} differs"
                );
            }
            device_rank.nccl.synchronize().unwrap();
        });
    }
}

/// The legacy and per-thread default streams are refused, naming the argument.
fn default_streams_are_refused() {
    if !NCCL.can_form(1, "default_streams_are_refused") {
        return;
    }
    let store = InMemoryStore::new();
    let context = CudaContext::new(0).unwrap();
    let config = NcclConfig {
        prefix: "conformance-default-streams".to_owned(),
        ..NcclConfig::default()
    };
    for stream in [context.default_stream(), context.per_thread_stream()] {
        let handle = stream.cu_stream() as usize;
        let error = Nccl::connect_on_stream(&store, &config, stream).unwrap_err();
        assert!(
            matches!(
                error,
                Error::InvalidArgument {
                    field: "stream",
                    ..
                }
            ),
            "stream {handle:#x}: {error}"
        );
    }
}

#[test]
fn all_reduce_device_f32_matches_reference() {
    all_reduce_device_matches_reference::<f32>();
}
#[test]
fn all_reduce_device_bf16_matches_reference() {
    all_reduce_device_matches_reference::<bf16>();
}
#[test]
fn all_reduce_buckets_sum_match_reference() {
    all_reduce_buckets_match_reference(ReduceOp::Sum);
}
#[test]
fn all_reduce_buckets_average_match_reference() {
    all_reduce_buckets_match_reference(ReduceOp::Average);
}
#[test]
fn broadcast_device_f32_from_every_root() {
    broadcast_device_from_every_root::<f32>();
}
#[test]
fn broadcast_device_f16_from_every_root() {
    broadcast_device_from_every_root::<f16>();
}
#[test]
fn gather_and_scatter_device_f32_match_reference() {
    gather_and_scatter_device_match_reference::<f32>();
}
#[test]
fn gather_and_scatter_device_bf16_match_reference() {
    gather_and_scatter_device_match_reference::<bf16>();
}
#[test]
fn buffers_on_other_streams_are_ordered() {
    device_buffers_on_other_streams_are_ordered();
}
#[test]
fn default_streams_are_refused_as_the_communicators_stream() {
    default_streams_are_refused();
}
