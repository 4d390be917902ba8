//! [`TcpRing`]: a [`Communicator`] over TCP connections arranged in a ring.
//!
//! Each rank listens on a socket, publishes its address in the rendezvous [`Store`], connects
//! to its successor and accepts its predecessor. All-reduce is a pipelined reduce-scatter
//! followed by an all-gather, which moves `2 (N - 1) / N` times the buffer through every rank:
//! bandwidth-optimal, and every link busy at once.
//!
//! - `setup`: rendezvous and handshake.
//! - `transport`: the single-threaded, non-blocking event loop and failure handling.
//! - `plans`: the message schedule of each collective.
//! - `wire`: handshake and frame formats.

mod plans;
mod setup;
mod transport;
mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tracing::debug;

use self::plans::{BarrierPlan, BroadcastPlan, GatherPlan, ReducePlan, Scratch};
use self::transport::RingTransport;
use crate::buffer::{Element, ReduceOp};
use crate::communicator::TypedCollectives;
use crate::error::{AbortCause, Error, Result};
use crate::operation::Collective;
use crate::progress::{Channel, Entered, Progress};
use crate::rendezvous::Store;

/// Settings of a [`TcpRing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRingConfig {
    /// Address the rank listens on. Default `127.0.0.1:0` (loopback, any free port); use the
    /// node's address (or `0.0.0.0:0` with `advertise_host`) for ranks on several machines.
    pub listen_address: SocketAddr,
    /// Host published to the other ranks instead of the listener's own address. Default `None`
    /// (publish the listener's address, which must then not be unspecified).
    pub advertise_host: Option<IpAddr>,
    /// Longest wait for all ranks to publish their addresses and connect. Default 120 s.
    pub connect_timeout: Duration,
    /// Longest a collective may go without moving a byte before it fails naming the rank it
    /// waits on. Default 30 s.
    pub io_timeout: Duration,
    /// Largest message, in bytes (chunks of reductions that forward `f32` partial sums are
    /// counted as `f32` throughout): smaller chunks overlap more but cost more per byte.
    /// Default 512 KiB; a multiple of 4 from 1 KiB to 64 MiB.
    pub chunk_bytes: usize,
    /// The job's link secret, which every connection must prove it knows
    /// ([`crate::auth`]). Default `None`: links prove nothing (in-process tests and
    /// benchmarks); Cohort's ranks always set their job's.
    pub secret: Option<crate::LinkSecret>,
    /// Where the ring records its operations (a channel named after the prefix), for hang
    /// diagnosis. Default: a record of its own, read by nobody.
    pub progress: Progress,
    /// The rank each member is called in errors and abort notices, by ring rank, when the ring
    /// is one part of a larger group (a hierarchical all-reduce's ring across nodes). Default
    /// `None`: ring ranks.
    pub rank_names: Option<Vec<usize>>,
}

impl Default for TcpRingConfig {
    fn default() -> Self {
        Self {
            listen_address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            advertise_host: None,
            connect_timeout: Duration::from_secs(120),
            io_timeout: Duration::from_secs(30),
            chunk_bytes: 512 * 1024,
            secret: None,
            progress: Progress::default(),
            rank_names: None,
        }
    }
}

impl TcpRingConfig {
    /// Checks every field; returns the first problem found.
    pub fn validate(&self) -> Result<()> {
        if !self.chunk_bytes.is_multiple_of(4) || !(1024..=64 << 20).contains(&self.chunk_bytes) {
            return Err(Error::InvalidArgument {
                field: "config.chunk_bytes",
                found: self.chunk_bytes.to_string(),
                expected: "a multiple of 4 from 1024 to 67108864",
            });
        }
        crate::error::check_positive_durations(&[
            ("config.connect_timeout", self.connect_timeout),
            ("config.io_timeout", self.io_timeout),
        ])
    }
}

/// A communicator whose ranks exchange data over a ring of TCP connections.
///
/// Built by every rank with [`TcpRing::connect`]; not shared between threads (collectives take
/// `&mut self`), but it can be moved to a dedicated communication thread. Each call runs on the
/// calling thread: non-blocking sockets let it send, receive and reduce at once.
///
/// Reductions accumulate in `f32` and round once. The first reduce-scatter step sends each
/// rank's own values in their element type (exact); later steps forward `f32` partial sums, and
/// the all-gather moves the rounded result in the element type. So with two ranks a bf16/f16
/// all-reduce moves half the bytes of an `f32` one; with `N` ranks its reduce-scatter moves
/// `(2 N - 3) / (N - 1)` times the bytes of its all-gather (the price of rounding only once).
///
/// Memory: one chunk of scratch, plus, for reductions over more than two ranks that cannot
/// accumulate in the caller's buffer (bf16/f16 all-reduces, reduce-scatters), an `f32`
/// accumulator as long as the input (kept for later calls).
pub struct TcpRing {
    /// This rank.
    rank: usize,
    /// Number of ranks.
    world_size: usize,
    /// The key prefix the ring was formed under.
    prefix: String,
    /// Largest message in bytes.
    chunk_bytes: usize,
    /// The connections; `None` for a world of one rank.
    transport: Option<RingTransport>,
    /// Buffers reused by every reduction.
    scratch: Scratch,
    /// Where the ring's operations are recorded.
    channel: Channel,
    /// What members are called in errors ([`TcpRingConfig::rank_names`]; empty: ring ranks).
    rank_names: Vec<usize>,
}

impl TcpRing {
    /// Joins the ring named `prefix` as `rank` of `world_size`: binds
    /// `config.listen_address`, publishes it under `{prefix}/addr/{rank}` in `store`, waits for
    /// every rank's address, connects to `rank + 1` and accepts `rank - 1`. Returns once both
    /// connections are up, or fails within `config.connect_timeout` naming missing ranks.
    ///
    /// Every rank must call this concurrently with the same `prefix` and `world_size`. The prefix
    /// must be unique per ring for the life of the store (add a generation when re-forming a
    /// ring). With `world_size == 1` nothing is bound or published.
    pub fn connect(
        store: &dyn Store,
        prefix: &str,
        rank: usize,
        world_size: usize,
        config: &TcpRingConfig,
    ) -> Result<TcpRing> {
        config.validate()?;
        if world_size == 0 {
            return Err(Error::InvalidArgument {
                field: "world_size",
                found: "0".to_owned(),
                expected: "at least 1",
            });
        }
        if rank >= world_size {
            return Err(Error::InvalidArgument {
                field: "rank",
                found: rank.to_string(),
                expected: "less than world_size",
            });
        }
        if prefix.is_empty() || prefix.len() > wire::MAX_PREFIX_BYTES {
            return Err(Error::InvalidArgument {
                field: "prefix",
                found: format!("{prefix:?}"),
                expected: "1 to 1024 bytes",
            });
        }
        let rank_names = config.rank_names.clone().unwrap_or_default();
        let transport = if world_size == 1 {
            None
        } else {
            let connections = setup::connect_ring(store, prefix, rank, world_size, config)
                .map_err(|error| error.with_rank_names(&rank_names))?;
            Some(RingTransport::new(
                rank,
                world_size,
                connections.previous,
                connections.next,
                config.io_timeout,
                rank_names.clone(),
            )?)
        };
        debug!(prefix, rank, world_size, "tcp ring ready");
        let scratch_bytes = if world_size == 1 {
            0
        } else {
            config.chunk_bytes
        };
        Ok(TcpRing {
            rank,
            world_size,
            prefix: prefix.to_owned(),
            chunk_bytes: config.chunk_bytes,
            transport,
            scratch: Scratch::new(scratch_bytes),
            channel: config.progress.channel(prefix, world_size),
            rank_names,
        })
    }

    /// Returns the key prefix the ring was formed under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Records the start of `collective` over `len` elements of `dtype`.
    fn enter(&self, collective: Collective, len: usize, dtype: crate::DType) -> Entered {
        self.channel
            .enter(collective.name(), len * dtype.size_bytes(), None)
    }

    /// [`Communicator::barrier`], unrecorded.
    fn barrier_untracked(&mut self) -> Result<()> {
        let collective = Collective::Barrier;
        let world_size = self.world_size;
        let Some(transport) = self.transport_for(collective, 1)? else {
            return Ok(());
        };
        transport.run(collective, &mut BarrierPlan::new(world_size))
    }

    /// The error with members named as [`TcpRingConfig::rank_names`] says.
    fn name_error(&self, error: Error) -> Error {
        error.with_rank_names(&self.rank_names)
    }

    /// Tells both neighbours that the group this ring belongs to failed, blaming
    /// `failed_rank` (a name, as in [`TcpRingConfig::rank_names`]) for `cause` as reported by
    /// `reporter`, and makes the ring unusable. Called between collectives, when another part of
    /// the group failed; does nothing on a ring that has already failed.
    pub(crate) fn abort(&mut self, failed_rank: usize, cause: AbortCause, reporter: usize) {
        if let Some(transport) = self.transport.as_mut() {
            transport.abort(failed_rank, cause, reporter);
        }
    }

    /// Returns the payload bytes this rank has sent to its successor since the ring formed
    /// (message headers excluded; 0 for a world of one rank). The difference across a call is
    /// the traffic that collective put on this rank's outgoing link.
    pub fn payload_bytes_sent(&self) -> u64 {
        self.transport
            .as_ref()
            .map_or(0, RingTransport::payload_bytes_sent)
    }

    /// Returns the transport, or `None` when there is nothing to exchange (one rank, or an
    /// empty buffer) after checking the communicator is still usable.
    fn transport_for(
        &mut self,
        collective: Collective,
        elements: usize,
    ) -> Result<Option<&mut RingTransport>> {
        match self.transport.as_mut() {
            None => Ok(None),
            Some(transport) => {
                transport.check_usable(collective)?;
                Ok((elements > 0).then_some(transport))
            }
        }
    }
}

impl TypedCollectives for TcpRing {
    fn all_reduce_typed<T: Element>(&mut self, buffer: &mut [T], op: ReduceOp) -> Result<()> {
        let collective = Collective::AllReduce;
        let (rank, world_size) = (self.rank, self.world_size);
        let Some(transport) = self.transport.as_mut() else {
            return Ok(());
        };
        transport.check_usable(collective)?;
        if buffer.is_empty() {
            return Ok(());
        }
        let mut plan = ReducePlan::all_reduce(buffer, rank, world_size, op, &mut self.scratch);
        transport.run(collective, &mut plan)
    }

    fn broadcast_typed<T: Element>(&mut self, buffer: &mut [T], root: usize) -> Result<()> {
        let collective = Collective::Broadcast;
        let (rank, world_size, chunk_bytes) = (self.rank, self.world_size, self.chunk_bytes);
        let Some(transport) = self.transport_for(collective, buffer.len())? else {
            return Ok(());
        };
        let mut plan = BroadcastPlan::new(buffer, rank, world_size, root, chunk_bytes);
        transport.run(collective, &mut plan)
    }

    fn all_gather_typed<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let collective = Collective::AllGather;
        let own_block = self.rank * input.len()..(self.rank + 1) * input.len();
        let (rank, world_size, chunk_bytes) = (self.rank, self.world_size, self.chunk_bytes);
        let transport = self.transport_for(collective, input.len())?;
        output[own_block].copy_from_slice(input);
        let Some(transport) = transport else {
            return Ok(());
        };
        let mut plan = GatherPlan::new(output, rank, world_size, chunk_bytes);
        transport.run(collective, &mut plan)
    }

    fn reduce_scatter_typed<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let collective = Collective::ReduceScatter;
        let (rank, world_size) = (self.rank, self.world_size);
        let Some(transport) = self.transport.as_mut() else {
            output.copy_from_slice(input);
            return Ok(());
        };
        transport.check_usable(collective)?;
        if output.is_empty() {
            return Ok(());
        }
        let mut plan =
            ReducePlan::reduce_scatter(input, output, rank, world_size, op, &mut self.scratch);
        transport.run(collective, &mut plan)
    }
}

crate::communicator::recorded_communicator!(
    TcpRing,
    barrier = barrier_untracked,
    bytes_sent = payload_bytes_sent
);

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::communicator::Communicator;
    use crate::rendezvous::{InMemoryStore, address_key};

    /// Settings with a short I/O timeout for failure tests (setup stays generous, for loaded
    /// machines).
    fn quick_config() -> TcpRingConfig {
        TcpRingConfig {
            connect_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(2),
            ..TcpRingConfig::default()
        }
    }

    /// Connects ranks `ranks` of a `world_size` ring on threads and returns their results in
    /// the same order.
    fn connect_ranks(
        store: &Arc<InMemoryStore>,
        prefix: &str,
        ranks: &[usize],
        world_size: usize,
        config: &TcpRingConfig,
    ) -> Vec<Result<TcpRing>> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|&rank| {
                    scope
                        .spawn(move || TcpRing::connect(&**store, prefix, rank, world_size, config))
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .collect()
        })
    }

    /// All-reduces `inputs[rank]` on a ring of `inputs.len()` ranks (threads), and returns each
    /// rank's result and the payload bytes it sent.
    fn all_reduce_on_threads<T: Element>(inputs: Vec<Vec<T>>, op: ReduceOp) -> Vec<(Vec<T>, u64)> {
        let world_size = inputs.len();
        let store = Arc::new(InMemoryStore::new());
        let ranks: Vec<usize> = (0..world_size).collect();
        let rings = connect_ranks(&store, "ring", &ranks, world_size, &quick_config());
        std::thread::scope(|scope| {
            let handles: Vec<_> = rings
                .into_iter()
                .zip(inputs)
                .map(|(ring, mut values)| {
                    scope.spawn(move || {
                        let mut ring = ring.unwrap();
                        let before = ring.payload_bytes_sent();
                        ring.all_reduce((&mut values).into(), op).unwrap();
                        (values, ring.payload_bytes_sent() - before)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .collect()
        })
    }

    /// Returns `len` values `±(1 + m 2^-bits) 2^e`, `e` in -6..=2, with `bits` significand bits
    /// after the point (7 for bf16, 10 for f16): sums of up to 5 of them need at most 22
    /// significant bits, so their `f32` sums are exact in any order.
    fn exactly_summable<T: Element>(seed: u64, len: usize, bits: i32) -> Vec<T> {
        use rand::{Rng, SeedableRng};
        let mut generator = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len)
            .map(|_| {
                let significand =
                    1.0 + generator.random_range(0..1 << bits) as f32 / 2f32.powi(bits);
                let sign = if generator.random() { 1.0 } else { -1.0 };
                T::from_f32(sign * significand * 2f32.powi(generator.random_range(-6..=2)))
            })
            .collect()
    }

    /// Returns whether two elements have the same bits.
    fn same_bits<T: Element>(left: &T, right: &T) -> bool {
        bytemuck::bytes_of(left) == bytemuck::bytes_of(right)
    }

    /// Checks the rounding-once property bit for bit: the all-reduce of low-precision inputs
    /// equals their `f32` sums (exact for these inputs, so the ring's summation order does not
    /// matter), divided in `f32` for averages, rounded once to `T` by `half`
    /// (`reference_narrow`); and rounding after every hop would have given other bits.
    fn low_precision_all_reduce_rounds_once<T: Element>(
        significand_bits: i32,
        reference_narrow: fn(f32) -> T,
    ) {
        let len = 20_011;
        for world_size in [4, 5] {
            let inputs: Vec<Vec<T>> = (0..world_size)
                .map(|rank| exactly_summable(rank as u64 + 17, len, significand_bits))
                .collect();
            for op in [ReduceOp::Sum, ReduceOp::Average] {
                let divisor = match op {
                    ReduceOp::Sum => 1.0,
                    ReduceOp::Average => world_size as f32,
                };
                let mut rounded_once = Vec::with_capacity(len);
                let mut rounded_every_hop = Vec::with_capacity(len);
                for index in 0..len {
                    let values = inputs.iter().map(|input| input[index].to_f32());
                    let sum: f32 = values.clone().sum();
                    rounded_once.push(reference_narrow(sum / divisor));
                    let hops =
                        values.fold(0.0, |sum, value| reference_narrow(sum + value).to_f32());
                    rounded_every_hop.push(reference_narrow(hops / divisor));
                }
                let differing = (0..len)
                    .filter(|&index| !same_bits(&rounded_once[index], &rounded_every_hop[index]))
                    .count();
                assert!(
                    differing > len / 100,
                    "{differing} elements tell the two apart"
                );
                for (rank, (result, _)) in all_reduce_on_threads(inputs.clone(), op)
                    .into_iter()
                    .enumerate()
                {
                    let mismatch =
                        (0..len).find(|&index| !same_bits(&result[index], &rounded_once[index]));
                    assert!(
                        mismatch.is_none(),
                        "{} {op:?} over {world_size} ranks, rank {rank}: element {mismatch:?} \
                         differs from the sum rounded once",
                        T::DTYPE
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_all_reduce_over_four_and_five_ranks_is_the_sum_rounded_once() {
        low_precision_all_reduce_rounds_once(7, half::bf16::from_f32);
    }

    #[test]
    fn f16_all_reduce_over_four_and_five_ranks_is_the_sum_rounded_once() {
        low_precision_all_reduce_rounds_once(10, half::f16::from_f32);
    }

    #[test]
    fn low_precision_all_reduce_sends_own_values_in_their_type() {
        // 4096 elements in segments of 4096 / N. Per rank, in bytes: f32 moves
        // 2 (N - 1) segments of 4-byte values; bf16 one segment of its own 2-byte values, N - 2
        // of 4-byte partial sums, and N - 1 of 2-byte results.
        for world_size in [2, 4] {
            let segment = 4096 / world_size as u64;
            let f32_sent =
                all_reduce_on_threads(vec![vec![1.0_f32; 4096]; world_size], ReduceOp::Sum);
            let bf16_sent =
                all_reduce_on_threads(vec![vec![half::bf16::ONE; 4096]; world_size], ReduceOp::Sum);
            for ((f32_result, f32_bytes), (bf16_result, bf16_bytes)) in
                f32_sent.iter().zip(&bf16_sent)
            {
                assert!(f32_result.iter().all(|&value| value == world_size as f32));
                assert!(
                    bf16_result
                        .iter()
                        .all(|value| value.to_f32() == world_size as f32)
                );
                let n = world_size as u64;
                assert_eq!(*f32_bytes, 2 * (n - 1) * segment * 4);
                assert_eq!(
                    *bf16_bytes,
                    segment * 2 + (n - 2) * segment * 4 + (n - 1) * segment * 2
                );
            }
            if world_size == 2 {
                assert_eq!(bf16_sent[0].1 * 2, f32_sent[0].1);
            }
        }
    }

    #[test]
    fn invalid_arguments_are_rejected_before_any_network_use() {
        let store = InMemoryStore::new();
        let config = TcpRingConfig::default();
        let error = TcpRing::connect(&store, "ring", 2, 2, &config)
            .err()
            .unwrap();
        assert_eq!(error.to_string(), "rank = 2, expected less than world_size");
        let error = TcpRing::connect(&store, "", 0, 1, &config).err().unwrap();
        assert!(error.to_string().starts_with("prefix = \"\""), "{error}");
        let odd_chunks = TcpRingConfig {
            chunk_bytes: 1001,
            ..TcpRingConfig::default()
        };
        let error = TcpRing::connect(&store, "ring", 0, 1, &odd_chunks)
            .err()
            .unwrap();
        assert!(
            error.to_string().starts_with("config.chunk_bytes = 1001"),
            "{error}"
        );
        let unspecified = TcpRingConfig {
            listen_address: "0.0.0.0:0".parse().unwrap(),
            ..TcpRingConfig::default()
        };
        let error = TcpRing::connect(&store, "ring", 0, 2, &unspecified)
            .err()
            .unwrap();
        assert!(
            error.to_string().starts_with("config.advertise_host"),
            "{error}"
        );
    }

    #[test]
    fn a_rank_that_never_joins_is_named() {
        let store = Arc::new(InMemoryStore::new());
        let config = TcpRingConfig {
            connect_timeout: Duration::from_secs(2),
            ..TcpRingConfig::default()
        };
        let started = Instant::now();
        let results = connect_ranks(&store, "ring", &[0, 2], 3, &config);
        for result in results {
            match result {
                Err(Error::RanksMissing { missing_ranks, .. }) => assert_eq!(missing_ranks, [1]),
                Err(other) => panic!("expected RanksMissing, got {other}"),
                Ok(_) => panic!("the ring formed without rank 1"),
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    /// All-reduces 1s on `rank_zero` and 2s on `rank_one` and checks both get 3s.
    fn assert_the_pair_sums(rank_zero: &mut TcpRing, rank_one: &mut TcpRing) {
        std::thread::scope(|scope| {
            let helper = scope.spawn(|| {
                let mut values = vec![2.0_f32; 5];
                rank_one
                    .all_reduce((&mut values).into(), ReduceOp::Sum)
                    .unwrap();
                values
            });
            let mut values = vec![1.0_f32; 5];
            rank_zero
                .all_reduce((&mut values).into(), ReduceOp::Sum)
                .unwrap();
            assert_eq!(values, [3.0; 5]);
            assert_eq!(helper.join().unwrap(), [3.0; 5]);
        });
    }

    #[test]
    fn stray_connections_are_rejected() {
        let store = Arc::new(InMemoryStore::new());
        let config = TcpRingConfig::default();
        std::thread::scope(|scope| {
            let store_for_rank_one = Arc::clone(&store);
            let config_for_rank_one = config.clone();
            let rank_one = scope.spawn(move || {
                TcpRing::connect(&*store_for_rank_one, "ring", 1, 2, &config_for_rank_one)
            });
            // Before rank 0 starts, connect to rank 1 with the wrong prefix and with garbage.
            let address = store
                .wait(&[&address_key("ring", 1)], Duration::from_secs(60))
                .unwrap();
            let address = String::from_utf8(address[0].clone()).unwrap();
            let wrong_prefix = wire::Handshake {
                prefix: "other-ring".to_owned(),
                rank: 0,
                world_size: 2,
            };
            let mut stray = TcpStream::connect(&address).unwrap();
            stray.write_all(&wrong_prefix.encode()).unwrap();
            let mut garbage = TcpStream::connect(&address).unwrap();
            garbage.write_all(&[0x47; 64]).unwrap();

            let mut rank_zero = TcpRing::connect(&*store, "ring", 0, 2, &config).unwrap();
            let mut rank_one = rank_one.join().unwrap().unwrap();
            assert_the_pair_sums(&mut rank_zero, &mut rank_one);
        });
    }

    #[test]
    fn a_process_without_the_job_secret_can_neither_join_the_ring_nor_keep_the_peer_out() {
        let store = Arc::new(InMemoryStore::new());
        let config = TcpRingConfig {
            secret: Some(crate::LinkSecret::derive("cohort-job-right")),
            ..TcpRingConfig::default()
        };
        std::thread::scope(|scope| {
            let rank_one = scope.spawn(|| TcpRing::connect(&*store, "ring", 1, 2, &config));
            let address = store
                .wait(&[&address_key("ring", 1)], Duration::from_secs(60))
                .unwrap();
            let address = String::from_utf8(address[0].clone()).unwrap();
            // An impostor knows everything but the secret: the prefix, its rank, the world
            // size, the wire format. It connects first.
            let intro = wire::Handshake {
                prefix: "ring".to_owned(),
                rank: 0,
                world_size: 2,
            }
            .encode();
            let wrong = crate::LinkSecret::derive("cohort-job-guessed");
            let (_connector, proof) = crate::auth::Connector::start(Some(&wrong), &intro);
            let mut impostor = TcpStream::connect(&address).unwrap();
            impostor.write_all(&intro).unwrap();
            impostor.write_all(&proof).unwrap();

            let mut rank_zero = TcpRing::connect(&*store, "ring", 0, 2, &config).unwrap();
            let mut rank_one = rank_one.join().unwrap().unwrap();
            // Refused: closed without the acceptance byte.
            impostor
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut answer = Vec::new();
            let _ = impostor.read_to_end(&mut answer);
            assert!(answer.is_empty(), "the impostor was answered: {answer:?}");
            assert_the_pair_sums(&mut rank_zero, &mut rank_one);
        });
    }

    #[test]
    fn ranks_with_different_secrets_never_form_a_ring_and_say_why() {
        let store = Arc::new(InMemoryStore::new());
        let config = |token: &str| TcpRingConfig {
            connect_timeout: Duration::from_secs(2),
            secret: Some(crate::LinkSecret::derive(token)),
            ..TcpRingConfig::default()
        };
        let (ours, theirs) = (config("cohort-job-a"), config("cohort-job-b"));
        let results = std::thread::scope(|scope| {
            let other = scope.spawn(|| TcpRing::connect(&*store, "ring", 1, 2, &theirs));
            let own = TcpRing::connect(&*store, "ring", 0, 2, &ours);
            [own, other.join().unwrap()]
        });
        for result in results {
            let error = result.err().expect("a ring of two jobs formed");
            assert!(error.to_string().contains("secret"), "{error}");
        }
    }

    #[test]
    fn mismatched_lengths_fail_instead_of_hanging() {
        let store = Arc::new(InMemoryStore::new());
        let rings = connect_ranks(&store, "ring", &[0, 1], 2, &quick_config());
        let started = Instant::now();
        let errors: Vec<Error> = std::thread::scope(|scope| {
            let handles: Vec<_> = rings
                .into_iter()
                .map(|ring| {
                    scope.spawn(move || {
                        let mut ring = ring.unwrap();
                        let mut values = vec![1.0_f32; 100 + 100 * ring.rank()];
                        ring.all_reduce((&mut values).into(), ReduceOp::Sum)
                            .unwrap_err()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .collect()
        });
        for error in &errors {
            assert!(
                matches!(error, Error::Protocol { .. } | Error::Aborted { .. }),
                "{error}"
            );
        }
        assert!(
            errors
                .iter()
                .any(|error| error.to_string().contains("passed different lengths")),
            "{errors:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn rings_with_different_prefixes_share_a_store() {
        let store = Arc::new(InMemoryStore::new());
        let config = TcpRingConfig::default();
        let rings = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|index| {
                    let store = Arc::clone(&store);
                    let config = config.clone();
                    let prefix = if index < 2 { "axis-a" } else { "axis-b" };
                    scope.spawn(move || TcpRing::connect(&*store, prefix, index % 2, 2, &config))
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        let sums: Vec<f32> = std::thread::scope(|scope| {
            let handles: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(index, mut ring)| {
                    scope.spawn(move || {
                        let mut values = [index as f32];
                        ring.all_reduce((&mut values[..]).into(), ReduceOp::Sum)
                            .unwrap();
                        values[0]
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .collect()
        });
        assert_eq!(sums, [1.0, 1.0, 5.0, 5.0]);
    }
}
