use cohort_collective::bench::{all_reduce_in_threads, loopback_tcp_throughput};
use cohort_collective::{DType, TcpRingConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ranks: usize = args.get(1).map_or(2, |a| a.parse().unwrap());
    let chunks: Vec<usize> = args[2..].iter().map(|a| a.parse().unwrap()).collect();
    for round in 0..3 {
        let loopback = loopback_tcp_throughput(1 << 30).unwrap();
        for &chunk in &chunks {
            let config = TcpRingConfig {
                chunk_bytes: chunk,
                ..TcpRingConfig::default()
            };
            let rows =
                all_reduce_in_threads(ranks, &[4096, 64 << 20], DType::F32, &config).unwrap();
            println!(
                "round {round} ranks {ranks} chunk {chunk:>8}: loopback {:.2} GB/s, 4K {:.1} us, 64M busbw {:.2} GB/s = {:.0}%",
                loopback / 1e9,
                rows[0].time.as_secs_f64() * 1e6,
                rows[1].bus_bandwidth / 1e9,
                100.0 * rows[1].bus_bandwidth / loopback
            );
        }
    }
}
