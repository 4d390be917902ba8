//! Building blocks of `cohort bench allreduce`: the raw TCP throughput a ring is compared with,
//! all-reduce timing, and the bandwidth formulas of the nccl-tests convention.
//!
//! The command runs each side of the TCP measurement and each rank in its own process; the
//! functions here do one side or one rank's work each, plus helpers that run everything in
//! threads of one process for quick measurements and tests.
//!
//! Low-precision all-reduces are timed against `f32` at the same element count in the same
//! run, interleaved call by call, so that both see the same machine load; the ratio of the two
//! times is what a mixed-precision job gains, and the bytes each sends show why.
//!
//! Conventions (nccl-tests): for a buffer of `S` bytes all-reduced in time `t`, the algorithm
//! bandwidth is `algbw = S / t` and the bus bandwidth is `busbw = algbw * 2 (N - 1) / N`, the
//! rate every link must sustain, comparable across world sizes and with a link's raw rate.
//!
//! The NCCL measurement ([`nccl_all_reduce_in_threads`]) runs one thread per GPU and times
//! [`Nccl`]'s device-buffer all-reduce as nccl-tests does: a burst of back-to-back calls queued on
//! the stream, then one wait for them all, divided by their number. Unlike nccl-tests, which
//! averages that time across ranks, it reports the slowest rank's time (see [`NCCL_TIME_NOTE`]),
//! so its times read no lower, and its bandwidths no higher, than nccl-tests' for the same run.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use half::{bf16, f16};

use crate::buffer::{BufferMut, DType, ReduceOp};
use crate::communicator::Communicator;
use crate::cuda::{self, CudaLibrary};
use crate::error::{Error, Result};
#[cfg(doc)]
use crate::nccl::Nccl;
use crate::nccl::NcclConfig;
use crate::rendezvous::InMemoryStore;
use crate::tcp_ring::{TcpRing, TcpRingConfig};

/// Size of each write in the raw TCP throughput measurement, as the issue specifies.
pub const STREAM_WRITE_BYTES: usize = 1 << 20;

/// Byte the receiving side answers with once it has read everything.
const STREAM_DONE: u8 = 0x5a;

/// The result of one side of a stream transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamMeasurement {
    /// Bytes transferred.
    pub bytes: u64,
    /// Time from the first write to the receiver's acknowledgement (sender side), or from the
    /// first byte to the last (receiver side).
    pub elapsed: Duration,
}

impl StreamMeasurement {
    /// Returns the throughput in bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// Maps an I/O error of the stream benchmark.
fn stream_error(context: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        context: format!("stream benchmark: {context}"),
        source,
    }
}

/// Sends `total_bytes` over `stream` in [`STREAM_WRITE_BYTES`] writes and waits for the
/// receiver ([`receive_stream`]) to acknowledge them all. The sender's measurement, which
/// includes one round trip, is the one to report.
pub fn send_stream(stream: &mut TcpStream, total_bytes: u64) -> Result<StreamMeasurement> {
    stream
        .set_nodelay(true)
        .map_err(stream_error("set TCP_NODELAY"))?;
    let block = vec![0x42_u8; STREAM_WRITE_BYTES];
    let started = Instant::now();
    let mut remaining = total_bytes;
    while remaining > 0 {
        let length = remaining.min(block.len() as u64) as usize;
        stream
            .write_all(&block[..length])
            .map_err(stream_error("write"))?;
        remaining -= length as u64;
    }
    let mut answer = [0_u8; 1];
    stream
        .read_exact(&mut answer)
        .map_err(stream_error("read the acknowledgement"))?;
    if answer[0] != STREAM_DONE {
        return Err(Error::Io {
            context: "stream benchmark: acknowledgement".to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("expected {STREAM_DONE:#04x}, found {:#04x}", answer[0]),
            ),
        });
    }
    Ok(StreamMeasurement {
        bytes: total_bytes,
        elapsed: started.elapsed(),
    })
}

/// Receives `total_bytes` from a [`send_stream`] peer and acknowledges them.
pub fn receive_stream(stream: &mut TcpStream, total_bytes: u64) -> Result<StreamMeasurement> {
    let mut block = vec![0_u8; STREAM_WRITE_BYTES];
    let mut received = 0_u64;
    let mut started = None;
    while received < total_bytes {
        let count = stream.read(&mut block).map_err(stream_error("read"))?;
        if count == 0 {
            return Err(Error::Io {
                context: "stream benchmark: read".to_owned(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        started.get_or_insert_with(Instant::now);
        received += count as u64;
    }
    let elapsed = started.map_or(Duration::ZERO, |started| started.elapsed());
    stream
        .write_all(&[STREAM_DONE])
        .map_err(stream_error("write the acknowledgement"))?;
    Ok(StreamMeasurement {
        bytes: total_bytes,
        elapsed,
    })
}

/// Measures single-stream TCP throughput over loopback between two threads of this process,
/// in bytes per second (sender's measurement). The CLI runs the two sides in two processes
/// instead; this is for quick checks and tests.
pub fn loopback_tcp_throughput(total_bytes: u64) -> Result<f64> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(stream_error("bind"))?;
    let address = listener
        .local_addr()
        .map_err(stream_error("read the listener address"))?;
    let receiver = std::thread::spawn(move || -> Result<StreamMeasurement> {
        let (mut stream, _) = listener.accept().map_err(stream_error("accept"))?;
        receive_stream(&mut stream, total_bytes)
    });
    let mut stream = TcpStream::connect(address).map_err(stream_error("connect"))?;
    let sent = send_stream(&mut stream, total_bytes);
    let received = receiver.join().map_err(|_| Error::Io {
        context: "stream benchmark: receiver thread panicked".to_owned(),
        source: std::io::ErrorKind::Other.into(),
    })?;
    received?;
    Ok(sent?.bytes_per_second())
}

/// Algorithm bandwidth in bytes per second: `bytes / time`.
pub fn algorithm_bandwidth(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// What the time of an NCCL benchmark row is, for output that reports one: nccl-tests averages
/// the time over ranks, this benchmark takes the slowest rank's.
pub const NCCL_TIME_NOTE: &str = "time: the slowest rank's mean over a burst of calls \
     (nccl-tests averages over ranks instead, so its times can read lower)";

/// Bus bandwidth of an all-reduce in bytes per second, as nccl-tests computes it:
/// `algbw * 2 (N - 1) / N` for `N` ranks. For one rank the factor is 0 (no data crosses a link),
/// so the bus bandwidth is 0, as nccl-tests prints it; a world size of 0 also gives 0.
pub fn bus_bandwidth(algorithm_bandwidth: f64, world_size: usize) -> f64 {
    if world_size <= 1 {
        return 0.0;
    }
    algorithm_bandwidth * 2.0 * (world_size - 1) as f64 / world_size as f64
}

/// A benchmark buffer of zeros, so repeated sums stay finite (the time does not depend on the
/// values).
enum ZeroBuffer {
    /// `f32` elements.
    F32(Vec<f32>),
    /// `bf16` elements.
    Bf16(Vec<bf16>),
    /// `f16` elements.
    F16(Vec<f16>),
}

impl ZeroBuffer {
    /// Allocates `elements` zeros of `dtype`.
    fn new(dtype: DType, elements: usize) -> Self {
        match dtype {
            DType::F32 => ZeroBuffer::F32(vec![0.0; elements]),
            DType::Bf16 => ZeroBuffer::Bf16(vec![bf16::ZERO; elements]),
            DType::F16 => ZeroBuffer::F16(vec![f16::ZERO; elements]),
        }
    }

    /// Returns the buffer as collectives take it.
    fn as_mut(&mut self) -> BufferMut<'_> {
        match self {
            ZeroBuffer::F32(values) => BufferMut::F32(values),
            ZeroBuffer::Bf16(values) => BufferMut::Bf16(values),
            ZeroBuffer::F16(values) => BufferMut::F16(values),
        }
    }
}

/// Returns the median of `times` (which must not be empty).
fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

/// Times `iterations` all-reduces (sum) of `elements` elements of `dtype` on `communicator`,
/// after `warmup` untimed ones and a barrier, and returns the median time of one.
///
/// Every rank of the group must call this with the same arguments.
pub fn time_all_reduce(
    communicator: &mut dyn Communicator,
    elements: usize,
    dtype: DType,
    warmup: usize,
    iterations: usize,
) -> Result<Duration> {
    let mut buffer = ZeroBuffer::new(dtype, elements);
    for _ in 0..warmup {
        communicator.all_reduce(buffer.as_mut(), ReduceOp::Sum)?;
    }
    communicator.barrier()?;
    let mut times = Vec::with_capacity(iterations.max(1));
    for _ in 0..iterations.max(1) {
        let started = Instant::now();
        communicator.all_reduce(buffer.as_mut(), ReduceOp::Sum)?;
        times.push(started.elapsed());
    }
    Ok(median(times))
}

/// One element type's side of [`compare_all_reduce_with_f32`], as seen by one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllReduceSample {
    /// Median time of one all-reduce.
    pub time: Duration,
    /// Payload bytes this rank sent over the network during one all-reduce, where the
    /// transport counts them ([`Communicator::network_bytes_sent`]).
    pub bytes_sent: Option<u64>,
}

/// Times all-reduces (sum) of `elements` elements of `dtype` and of `f32` on `ring`,
/// alternating one of each `iterations` times after `warmup` untimed pairs and a barrier, so
/// that both types see the same machine load. Returns `[dtype, f32]`: each one's median time
/// and the payload bytes this rank sent for one all-reduce. For `dtype == F32` the one
/// measurement is returned twice.
///
/// Every rank of the ring must call this with the same arguments.
pub fn compare_all_reduce_with_f32(
    ring: &mut dyn Communicator,
    elements: usize,
    dtype: DType,
    warmup: usize,
    iterations: usize,
) -> Result<[AllReduceSample; 2]> {
    let mut buffers = vec![ZeroBuffer::new(dtype, elements)];
    if dtype != DType::F32 {
        buffers.push(ZeroBuffer::new(DType::F32, elements));
    }
    for _ in 0..warmup {
        for buffer in &mut buffers {
            ring.all_reduce(buffer.as_mut(), ReduceOp::Sum)?;
        }
    }
    ring.barrier()?;
    let mut times = vec![Vec::with_capacity(iterations.max(1)); buffers.len()];
    let mut bytes_sent = vec![None; buffers.len()];
    for _ in 0..iterations.max(1) {
        for ((buffer, times), bytes_sent) in buffers.iter_mut().zip(&mut times).zip(&mut bytes_sent)
        {
            let bytes_before = ring.network_bytes_sent();
            let started = Instant::now();
            ring.all_reduce(buffer.as_mut(), ReduceOp::Sum)?;
            times.push(started.elapsed());
            *bytes_sent = ring
                .network_bytes_sent()
                .zip(bytes_before)
                .map(|(after, before)| after - before);
        }
    }
    let samples: Vec<AllReduceSample> = times
        .into_iter()
        .zip(bytes_sent)
        .map(|(times, bytes_sent)| AllReduceSample {
            time: median(times),
            bytes_sent,
        })
        .collect();
    Ok([samples[0], samples[samples.len() - 1]])
}

/// One row of an all-reduce benchmark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AllReduceMeasurement {
    /// Buffer size in bytes.
    pub bytes: usize,
    /// Time of one all-reduce, the slowest rank's: its median for the TCP ring
    /// ([`all_reduce_in_threads`]), its mean over a burst of calls for NCCL
    /// ([`nccl_all_reduce_in_threads`], where nccl-tests would average over ranks instead).
    pub time: Duration,
    /// `bytes / time`, bytes per second.
    pub algorithm_bandwidth: f64,
    /// [`bus_bandwidth`] of that, bytes per second.
    pub bus_bandwidth: f64,
}

/// Runs an all-reduce benchmark with `world_size` ranks as threads of this process, joined
/// through an [`InMemoryStore`] and loopback TCP, and returns one row per size in `sizes_bytes`
/// (rounded down to whole elements). Iterations per size shrink for large sizes so that each
/// size takes a bounded time.
pub fn all_reduce_in_threads(
    world_size: usize,
    sizes_bytes: &[usize],
    dtype: DType,
    config: &TcpRingConfig,
) -> Result<Vec<AllReduceMeasurement>> {
    let store = Arc::new(InMemoryStore::new());
    let prefix = format!("bench-{}", std::process::id());
    let ranks: Vec<_> = (0..world_size)
        .map(|rank| {
            let store = Arc::clone(&store);
            let prefix = prefix.clone();
            let config = config.clone();
            let sizes = sizes_bytes.to_vec();
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let mut ring = TcpRing::connect(&*store, &prefix, rank, world_size, &config)?;
                sizes
                    .iter()
                    .map(|&bytes| {
                        let iterations = iterations_for(bytes);
                        time_all_reduce(
                            &mut ring,
                            bytes / dtype.size_bytes(),
                            dtype,
                            (iterations / 5).max(2),
                            iterations,
                        )
                    })
                    .collect()
            })
        })
        .collect();
    let mut slowest = vec![Duration::ZERO; sizes_bytes.len()];
    for rank in ranks {
        let times = rank.join().map_err(|_| Error::Io {
            context: "all-reduce benchmark: a rank thread panicked".to_owned(),
            source: std::io::ErrorKind::Other.into(),
        })??;
        for (slowest, time) in slowest.iter_mut().zip(times) {
            *slowest = (*slowest).max(time);
        }
    }
    Ok(sizes_bytes
        .iter()
        .zip(slowest)
        .map(|(&bytes, time)| {
            let bytes = bytes / dtype.size_bytes() * dtype.size_bytes();
            let algorithm_bandwidth = algorithm_bandwidth(bytes, time);
            AllReduceMeasurement {
                bytes,
                time,
                algorithm_bandwidth,
                bus_bandwidth: bus_bandwidth(algorithm_bandwidth, world_size),
            }
        })
        .collect())
}

/// Runs an all-reduce benchmark of [`Nccl`]'s device-buffer all-reduce (sum, no host copies) with
/// `world_size` ranks as threads of this process, rank `r` on GPU `r`, joined through an
/// [`InMemoryStore`]. Returns one row per count in `elements`, whose time is the slowest rank's
/// time of one all-reduce, averaged over a burst of calls after untimed warm-up ones and a
/// barrier. nccl-tests averages over ranks instead: output should say which (see
/// [`NCCL_TIME_NOTE`]).
///
/// Fails with [`Error::NotCompiledWithCuda`], [`Error::NoCudaDriver`] or [`Error::NoNccl`] where
/// NCCL cannot run, and with an invalid-argument error when `world_size` exceeds the GPUs.
pub fn nccl_all_reduce_in_threads(
    world_size: usize,
    elements: &[usize],
    dtype: DType,
    collective_timeout: Duration,
) -> Result<Vec<AllReduceMeasurement>> {
    cuda::require(CudaLibrary::Nccl)?;
    let devices = cuda::device_count()?;
    if world_size == 0 || world_size > devices {
        return Err(Error::InvalidArgument {
            field: "world_size",
            found: format!("{world_size} ({devices} CUDA devices)"),
            expected: "1 to the number of CUDA devices",
        });
    }
    let store = InMemoryStore::new();
    let config = NcclConfig {
        prefix: format!("bench-nccl-{}", std::process::id()),
        world_size,
        collective_timeout,
        ..NcclConfig::default()
    };
    let per_rank: Vec<Result<Vec<Duration>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let config = NcclConfig {
                    rank,
                    device: rank,
                    ..config.clone()
                };
                let store = &store;
                scope.spawn(move || nccl_timing::time_rank(store, &config, elements, dtype))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    Err(Error::Io {
                        context: "nccl all-reduce benchmark: a rank thread panicked".to_owned(),
                        source: std::io::ErrorKind::Other.into(),
                    })
                })
            })
            .collect()
    });
    let mut slowest = vec![Duration::ZERO; elements.len()];
    for times in per_rank {
        for (slowest, time) in slowest.iter_mut().zip(times?) {
            *slowest = (*slowest).max(time);
        }
    }
    Ok(elements
        .iter()
        .zip(slowest)
        .map(|(&count, time)| {
            let bytes = count * dtype.size_bytes();
            let algorithm_bandwidth = algorithm_bandwidth(bytes, time);
            AllReduceMeasurement {
                bytes,
                time,
                algorithm_bandwidth,
                bus_bandwidth: bus_bandwidth(algorithm_bandwidth, world_size),
            }
        })
        .collect())
}

/// One rank of the NCCL benchmark.
#[cfg(feature = "cuda")]
mod nccl_timing {
    use std::time::{Duration, Instant};

    use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use half::{bf16, f16};

    use super::iterations_for;
    use crate::buffer::{DType, Element, ReduceOp};
    use crate::communicator::Communicator;
    use crate::error::{Error, Result};
    use crate::nccl::{Nccl, NcclConfig};
    use crate::rendezvous::InMemoryStore;

    /// Joins the communicator and times every count, in the element type of `dtype`.
    pub(super) fn time_rank(
        store: &InMemoryStore,
        config: &NcclConfig,
        elements: &[usize],
        dtype: DType,
    ) -> Result<Vec<Duration>> {
        match dtype {
            DType::F32 => time_counts::<f32>(store, config, elements),
            DType::Bf16 => time_counts::<bf16>(store, config, elements),
            DType::F16 => time_counts::<f16>(store, config, elements),
        }
    }

    /// Times the all-reduce of the first `count` elements of one device buffer, for each count.
    fn time_counts<T: Element + DeviceRepr + ValidAsZeroBits>(
        store: &InMemoryStore,
        config: &NcclConfig,
        elements: &[usize],
    ) -> Result<Vec<Duration>> {
        let mut nccl = Nccl::connect(store, config)?;
        let largest = elements.iter().copied().max().unwrap_or(0).max(1);
        // Zeros, so that repeated sums stay finite (the time does not depend on the values).
        let allocated = nccl.stream().alloc_zeros::<T>(largest);
        let mut buffer = allocated.map_err(|error| Error::Cuda {
            operation: "allocate the benchmark buffer",
            message: error.to_string(),
        })?;
        let mut times = Vec::with_capacity(elements.len());
        for &count in elements {
            let iterations = iterations_for(count * T::DTYPE.size_bytes()).max(1);
            let mut view = buffer.slice_mut(..count);
            for _ in 0..(iterations / 5).max(2) {
                nccl.all_reduce_device(&mut view, ReduceOp::Sum)?;
            }
            nccl.synchronize()?;
            nccl.barrier()?;
            let started = Instant::now();
            for _ in 0..iterations {
                nccl.all_reduce_device(&mut view, ReduceOp::Sum)?;
            }
            nccl.synchronize()?;
            times.push(started.elapsed().div_f64(iterations as f64));
        }
        nccl.close()?;
        Ok(times)
    }
}

/// Never reached: [`nccl_all_reduce_in_threads`] checks for CUDA first.
#[cfg(not(feature = "cuda"))]
mod nccl_timing {
    use std::time::Duration;

    use crate::buffer::DType;
    use crate::error::{Error, Result};
    use crate::nccl::NcclConfig;
    use crate::rendezvous::InMemoryStore;

    /// Fails: this build has no CUDA support.
    pub(super) fn time_rank(
        _store: &InMemoryStore,
        _config: &NcclConfig,
        _elements: &[usize],
        _dtype: DType,
    ) -> Result<Vec<Duration>> {
        Err(Error::NotCompiledWithCuda)
    }
}

/// Picks an iteration count that keeps one size's measurement to roughly a second on loopback.
pub fn iterations_for(bytes: usize) -> usize {
    match bytes {
        0..=65_536 => 200,
        65_537..=4_194_304 => 50,
        4_194_305..=67_108_864 => 20,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_bandwidth_follows_the_nccl_tests_convention() {
        assert_eq!(bus_bandwidth(1.0e9, 2), 1.0e9);
        assert_eq!(bus_bandwidth(1.0e9, 4), 1.5e9);
        assert_eq!(bus_bandwidth(1.0e9, 1), 0.0);
        assert_eq!(algorithm_bandwidth(1000, Duration::from_millis(1)), 1.0e6);
    }

    #[test]
    fn nccl_benchmark_reports_why_it_cannot_run_or_runs() {
        let result =
            nccl_all_reduce_in_threads(1, &[1024, 0], DType::Bf16, Duration::from_secs(60));
        match (result, cuda::require(CudaLibrary::Nccl)) {
            (Ok(rows), Ok(())) => {
                assert_eq!(rows.len(), 2);
                assert_eq!(rows[0].bytes, 2048);
                // One rank moves nothing over links: busbw is 0 by convention.
                assert_eq!(rows[0].bus_bandwidth, 0.0);
            }
            (Err(error), Err(expected)) => assert_eq!(error.to_string(), expected.to_string()),
            // A machine with the libraries but no GPU.
            (Err(error @ Error::InvalidArgument { .. }), Ok(())) => {
                assert!(error.to_string().contains("CUDA devices"), "{error}")
            }
            (result, presence) => panic!("benchmark: {result:?}, presence check: {presence:?}"),
        }
    }

    #[test]
    fn loopback_stream_moves_every_byte() {
        let throughput = loopback_tcp_throughput(8 << 20).unwrap();
        assert!(throughput > 0.0);
    }

    #[test]
    fn small_all_reduce_benchmark_runs() {
        let rows =
            all_reduce_in_threads(2, &[4096, 1 << 20], DType::F32, &TcpRingConfig::default())
                .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].bytes, 4096);
        assert!(rows.iter().all(|row| row.time > Duration::ZERO));
    }

    #[test]
    fn bf16_comparison_with_f32_shows_half_the_bytes_over_two_ranks() {
        let store = Arc::new(InMemoryStore::new());
        let config = TcpRingConfig::default();
        let samples: Vec<[AllReduceSample; 2]> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let (store, config) = (Arc::clone(&store), &config);
                    scope.spawn(move || {
                        let mut ring = TcpRing::connect(&*store, "compare", rank, 2, config)?;
                        compare_all_reduce_with_f32(&mut ring, 100_000, DType::Bf16, 1, 3)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap().unwrap())
                .collect()
        });
        for [bf16_sample, f32_sample] in samples {
            // Each rank sends half the buffer in each phase: 100,000 elements in all.
            assert_eq!(f32_sample.bytes_sent, Some(400_000));
            assert_eq!(bf16_sample.bytes_sent, Some(200_000));
            assert!(bf16_sample.time > Duration::ZERO && f32_sample.time > Duration::ZERO);
        }
    }

    /// Prints the numbers the issue asks for; run in release mode:
    /// `cargo test -p cohort-collective --release -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn report_all_reduce_bandwidth() {
        let loopback = loopback_tcp_throughput(2 << 30).unwrap();
        println!("loopback single stream: {:.2} GB/s", loopback / 1e9);
        let sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20];
        for world_size in [2, 4] {
            let rows =
                all_reduce_in_threads(world_size, &sizes, DType::F32, &TcpRingConfig::default())
                    .unwrap();
            for row in rows {
                println!(
                    "ranks {world_size} bytes {:>10} time {:>10.1} us algbw {:.2} GB/s busbw \
                     {:.2} GB/s ({:.0}% of loopback)",
                    row.bytes,
                    row.time.as_secs_f64() * 1e6,
                    row.algorithm_bandwidth / 1e9,
                    row.bus_bandwidth / 1e9,
                    100.0 * row.bus_bandwidth / loopback
                );
            }
        }
    }
}
